-- Images listed in the metadata table that are neither ingested nor rejected at the ingest stage yet.
-- Rejected images are not retried automatically: delete their rejects rows to retry them.
SELECT m.dicom_id, m.subject_id, m.study_id, m.view_position
FROM metadata AS m
WHERE NOT EXISTS (SELECT 1 FROM images AS i WHERE i.dicom_id = m.dicom_id)
  AND NOT EXISTS (SELECT 1 FROM rejects AS r
                  WHERE r.item_kind = 'image' AND r.stage = 'ingest' AND r.item_id = m.dicom_id)
ORDER BY m.subject_id, m.study_id, m.dicom_id
