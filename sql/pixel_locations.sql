-- Where each image's preprocessed pixels lie at one resolution (the parameter): row shard_row of
-- pixels/<resolution>/<shard>.npy. Read whole by tasks.pixels.PixelStore.
SELECT dicom_id, shard, shard_row
FROM pixels
WHERE resolution = ?
ORDER BY shard, shard_row
