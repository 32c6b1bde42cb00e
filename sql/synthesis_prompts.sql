-- Prompts for class-balanced synthesis, in the order the plan draws them (draw 0, 1, ...). Reads the cohorts
-- registered by tasks.generators.synthesis as classifier_cohort and generator_cohort.
-- A candidate is a study of the classifier cohort's train split that is also in the generator cohort's train split,
-- so its prompt is a real impression of the kind the generator learned from, and its labels are the classifier
-- cohort's label vector for that study (labels are per study, so its images agree; NULL = masked by the policy).
-- One row per (label column in $label_columns, study positive for it); and one row with label_column NULL per study
-- positive for none of them (masked counts as not positive): the No Finding pool.
-- Order within a class: studies with fewer positives first (they add least to the other classes' counts), then
-- md5 of (study_id, $seed): deterministic per seed and across DuckDB versions, unrelated to id order. No Finding
-- studies: md5 alone.
WITH train_studies AS (
    SELECT DISTINCT study_id, COLUMNS(lambda col: list_contains($label_columns, col))
    FROM classifier_cohort
    WHERE split = 'train'
),
prompts AS (
    SELECT t.*, g.impression
    FROM train_studies AS t
    JOIN generator_cohort AS g ON g.study_id = t.study_id AND g.split = 'train'
),
positives AS (
    SELECT study_id, label_column, count(*) OVER (PARTITION BY study_id) AS positives
    FROM (UNPIVOT prompts ON COLUMNS(* EXCLUDE (study_id, impression)) INTO NAME label_column VALUE label)
    WHERE label = 1
),
pools AS (
    SELECT study_id, label_column, positives FROM positives
    UNION ALL
    SELECT study_id, NULL, 0 FROM prompts WHERE study_id NOT IN (SELECT study_id FROM positives)
)
SELECT p.label_column,
       row_number() OVER (PARTITION BY p.label_column
                          ORDER BY p.positives, md5(concat(p.study_id, ':', $seed))) - 1 AS draw,
       prompts.*
FROM pools AS p
JOIN prompts USING (study_id)
ORDER BY p.label_column NULLS LAST, draw
