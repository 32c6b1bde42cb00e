-- The dataset explorer's rows: the members of one cohort ($cohort: 'generator' or 'classifier', registered as
-- generator_cohort and classifier_cohort), with their view, split, impression and the findings they are positive
-- for (the label columns in $label_columns equal to 1 in the classifier cohort), filtered by $split, $view and
-- $finding (a label column); a NULL filter keeps every row. Read by tasks.browse.explore.
WITH members AS (
    SELECT dicom_id, split FROM generator_cohort WHERE $cohort = 'generator'
    UNION ALL
    SELECT dicom_id, split FROM classifier_cohort WHERE $cohort = 'classifier'
), labels AS (
    UNPIVOT (SELECT dicom_id, COLUMNS(lambda col: list_contains($label_columns, col)) FROM classifier_cohort)
    ON COLUMNS(* EXCLUDE (dicom_id)) INTO NAME finding VALUE value
), positive AS (
    SELECT dicom_id, list(finding ORDER BY finding) AS findings FROM labels WHERE value = 1 GROUP BY dicom_id
)
SELECT m.dicom_id, i.subject_id, i.study_id, m.split, i.view_position, coalesce(p.findings, []) AS findings,
       r.impression
FROM members AS m
JOIN images AS i USING (dicom_id)
LEFT JOIN positive AS p USING (dicom_id)
LEFT JOIN reports AS r ON r.study_id = i.study_id
WHERE ($split IS NULL OR m.split = $split)
  AND ($view IS NULL OR i.view_position = $view)
  AND ($finding IS NULL OR list_contains(coalesce(p.findings, []), $finding))
ORDER BY m.split, m.dicom_id
