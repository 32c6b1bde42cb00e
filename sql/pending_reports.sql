-- Studies listed in the metadata table whose report is neither parsed nor rejected yet.
SELECT DISTINCT m.study_id, m.subject_id
FROM metadata AS m
WHERE NOT EXISTS (SELECT 1 FROM reports AS r WHERE r.study_id = m.study_id)
  AND NOT EXISTS (SELECT 1 FROM rejects AS r
                  WHERE r.item_kind = 'report' AND r.item_id = CAST(m.study_id AS VARCHAR))
ORDER BY m.subject_id, m.study_id
