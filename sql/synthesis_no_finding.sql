-- No Finding prompts for synthesis: the studies of the classifier cohort's train split, also in the generator
-- cohort's train split, that are positive for none of the label columns in $label_columns (masked counts as not
-- positive), in the order the plan draws them: md5 of (study_id, $seed). Reads the cohorts registered by
-- tasks.generators.synthesis as classifier_cohort and generator_cohort.
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
positive AS (
    SELECT DISTINCT study_id
    FROM (UNPIVOT prompts ON COLUMNS(* EXCLUDE (study_id, impression)) INTO NAME label_column VALUE label)
    WHERE label = 1
)
SELECT row_number() OVER (ORDER BY md5(concat(study_id, ':', $seed))) - 1 AS draw, prompts.*
FROM prompts
WHERE study_id NOT IN (SELECT study_id FROM positive)
ORDER BY draw
