-- curate_images: every ingested image that has an official split, with the split of its patient.
-- Ingested = a row in `images` (ingest writes only decoded, stored images there; failures go to `rejects`).
-- Official split = the image's row in `splits` (mimic-cxr-2.0.0-split.csv); images without one are left out.
-- No patient in two splits: a subject whose images are in several splits goes wholly to the most held-out of
-- them (test, then validate, then train; any other name after those), so the official test set never loses a
-- patient and training never sees a test patient. MIMIC-CXR's official split is patient-level already, so
-- there this rule changes nothing. Both cohorts read this view, so generator and classifier agree on every split.
-- study_date / study_time come from the metadata CSV, for the generator's one-image-per-study rule.
CREATE OR REPLACE TEMP VIEW curate_images AS
WITH subject_split AS (
    SELECT subject_id,
           arg_min(split, CASE split WHEN 'test' THEN 0 WHEN 'validate' THEN 1 WHEN 'train' THEN 2 ELSE 3 END)
               AS split
    FROM splits
    GROUP BY subject_id
)
SELECT i.dicom_id, i.subject_id, i.study_id, i.view_position, ss.split, m.study_date, m.study_time
FROM images AS i
JOIN splits AS s ON s.dicom_id = i.dicom_id
JOIN subject_split AS ss ON ss.subject_id = i.subject_id
LEFT JOIN metadata AS m ON m.dicom_id = i.dicom_id
