-- The dicom ids of one split ($split) of a cohort Parquet file ($path), sorted so that hashes over them are stable.
SELECT dicom_id
FROM read_parquet($path)
WHERE split = $split
ORDER BY dicom_id
