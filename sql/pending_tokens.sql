-- The images asked for ($dicom_ids, in the order given) that have no tokens yet for $vqgan_id.
SELECT asked.dicom_id
FROM unnest($dicom_ids) WITH ORDINALITY AS asked(dicom_id, position)
WHERE NOT EXISTS (SELECT 1 FROM tokens AS t WHERE t.vqgan_id = $vqgan_id AND t.dicom_id = asked.dicom_id)
ORDER BY asked.position
