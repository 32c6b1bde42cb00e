-- Cohort summary: per cohort and split, images, studies and subjects; for the classifier cohort also the
-- positive images per label column in $label_columns (uncertain labels count as the policy made them).
-- Reads the cohorts that tasks.curate registers as generator_cohort and classifier_cohort.
SELECT 'generator' AS cohort, split, count(*) AS images, count(DISTINCT study_id) AS studies,
       count(DISTINCT subject_id) AS subjects
FROM generator_cohort
GROUP BY split
UNION ALL BY NAME
SELECT 'classifier' AS cohort, split, count(*) AS images, count(DISTINCT study_id) AS studies,
       count(DISTINCT subject_id) AS subjects,
       CAST(count_if(COLUMNS(lambda col: list_contains($label_columns, col)) = 1) AS BIGINT)
FROM classifier_cohort
GROUP BY split
ORDER BY cohort, split
