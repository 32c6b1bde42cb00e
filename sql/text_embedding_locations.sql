-- Where each study's embedding lies for one encoder id (the parameter): rows start .. start + length - 1 of
-- text/<encoder slug>/<shard>.npy. Read whole by tasks.embeddings.EmbeddingStore.
SELECT study_id, shard, start, length
FROM text_embeddings
WHERE encoder_id = ?
ORDER BY shard, start
