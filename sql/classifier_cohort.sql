-- Classifier cohort: every ingested frontal image ($classifier_views, AP and PA by default) from curate_images
-- (so each patient is in one split), with the study's labels from one labeler ($labeler: 'chexpert' or 'negbio').
-- The label columns are those named in $label_columns (the project's pathologies), each through label_value()
-- with the uncertainty policy $uncertainty (see curate_label_macro.sql). A study with no row from the labeler
-- is left out: it is unlabelled, not negative.
SELECT c.dicom_id, c.subject_id, c.study_id, c.split, c.view_position,
       label_value(COLUMNS(lambda col: list_contains($label_columns, col)), $uncertainty)
FROM curate_images AS c
JOIN labels AS l ON l.study_id = c.study_id AND l.labeler = $labeler
WHERE list_contains($classifier_views, c.view_position)
ORDER BY c.dicom_id
