-- The held-out (validate, test) studies of the generator cohort (registered as generator_cohort) that the
-- real-vs-generated view offers: one image a study, its impression the prompt. Read by tasks.browse.compare.
SELECT dicom_id, subject_id, study_id, split, impression
FROM generator_cohort
WHERE split IN ('validate', 'test')
ORDER BY split, study_id
