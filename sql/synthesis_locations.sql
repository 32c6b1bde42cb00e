-- The stored synthetic images of $output_id among $synth_ids, in the order asked: where their pixels lie
-- (row shard_row of synthetic/<output_id>/<shard>.npy) and their labels (the columns in $label_columns).
-- An id not generated yet has no row. Read by tasks.generators.synthesis (to skip finished work, and to load images).
SELECT s.synth_id, s.resolution, s.shard, s.shard_row, COLUMNS(lambda col: list_contains($label_columns, col))
FROM unnest($synth_ids) WITH ORDINALITY AS asked(synth_id, position)
JOIN synthetic AS s ON s.synth_id = asked.synth_id AND s.output_id = $output_id
ORDER BY asked.position
