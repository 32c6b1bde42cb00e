-- Studies of the cohort (registered by tasks.embeddings as the relation `cohort`: study_id, impression) with no
-- embedding yet for the encoder id given as the parameter. Ordered by study_id, so a re-run after a kill cuts the
-- same units.
SELECT c.study_id, c.impression
FROM cohort AS c
WHERE NOT EXISTS (SELECT 1 FROM text_embeddings AS e WHERE e.encoder_id = ? AND e.study_id = c.study_id)
ORDER BY c.study_id
