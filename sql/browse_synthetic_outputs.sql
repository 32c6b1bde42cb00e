-- The synthetic sets stored under a data root: one row per generator output (weights and sampling settings), with
-- its image count. Read by tasks.browse.explore for the export.
SELECT output_id, generator_id, count(*) AS images
FROM synthetic
GROUP BY output_id, generator_id
ORDER BY output_id
