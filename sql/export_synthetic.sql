-- Every stored synthetic image of one generator output ($output_id), in plan order: what an export writes, with
-- its provenance (generator, prompt, seed, sampling settings). Read by tasks.export.tree.
SELECT synth_id, generator_id, output_id, plan_position, target, prompt, source_study_id, seed, sampling, resolution
FROM synthetic
WHERE output_id = $output_id
ORDER BY plan_position, synth_id
