-- Per-class positives of the real training images (origin 'real': the classifier cohort's train split, one row per
-- image) and of a synthesis plan (origin 'synthetic': the rows registered as plan, one per image to generate), over
-- the label columns in $label_columns. An image with two findings counts for both; masked (NULL) counts for neither.
-- no_finding: the images positive for none of them. An empty plan gives no 'synthetic' row.
WITH combined AS (
    SELECT 'real' AS origin, COLUMNS(lambda col: list_contains($label_columns, col))
    FROM classifier_cohort
    WHERE split = 'train'
    UNION ALL BY NAME
    SELECT 'synthetic' AS origin, COLUMNS(lambda col: list_contains($label_columns, col))
    FROM plan
)
SELECT origin, count(*) AS images,
       count_if(coalesce(greatest(*COLUMNS(lambda col: list_contains($label_columns, col))), 0) < 1) AS no_finding,
       CAST(count_if(COLUMNS(lambda col: list_contains($label_columns, col)) = 1) AS BIGINT)
FROM combined
GROUP BY origin
ORDER BY origin
