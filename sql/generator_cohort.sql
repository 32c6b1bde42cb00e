-- Generator cohort: the (image, impression) pairs RayGen learns from.
-- Images of the generator views ($generator_views, AP by default) from curate_images (ingested, with the
-- patient's split), whose study has a non-empty impression. One image per study, by a deterministic rule:
-- the earliest StudyDate, then the earliest StudyTime (missing dates/times last), then the smallest dicom_id.
-- view_position is that image's view: with a view token, RayGen learns it and draws it
-- (tasks/generators/conditions.py).
SELECT c.dicom_id, c.subject_id, c.study_id, c.split, c.view_position, r.impression
FROM curate_images AS c
JOIN reports AS r ON r.study_id = c.study_id
WHERE list_contains($generator_views, c.view_position)
  AND trim(coalesce(r.impression, '')) <> ''
QUALIFY row_number() OVER (PARTITION BY c.study_id
                           ORDER BY c.study_date NULLS LAST, c.study_time NULLS LAST, c.dicom_id) = 1
ORDER BY c.study_id
