-- The resolutions the pixel shards of this data root were written at (one per data root).
SELECT DISTINCT resolution FROM pixels ORDER BY resolution
