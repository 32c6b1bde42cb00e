"""Stage 3: the cached inputs of RayGen — VQ-GAN image tokens and text-encoder states of the generator cohort.

The VQ-GAN is UniXGen's checkpoint when configured, else one trained here on the cohort (skipped once trained).
Wiring only; the work is in tasks/vqgan_training.py, tasks/tokens.py, tasks/embeddings.py.
"""

from __future__ import annotations

import pyarrow.parquet as pq
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from models import vqgan as vqgan_model
from tasks import embeddings, stages, text, tokens, vqgan_training
from tasks.config import Config
from tasks.generator_training import resolve_device
from tasks.curate import cohorts_dir

# Models are task arguments here: hashing them for a cache key is pointless, so no caching.
prepare_vqgan = task(vqgan_training.prepare_vqgan, name="prepare-vqgan", cache_policy=NO_CACHE)
encode_tokens = task(tokens.encode_cohort, name="encode-image-tokens", cache_policy=NO_CACHE)
embed_impressions = task(embeddings.embed_cohort, name="embed-impressions", cache_policy=NO_CACHE)


def inputs(config: Config) -> stages.StageInputs:
    return stages.StageInputs(
        sections=("ingest", "text", "vqgan"),
        files=((cohorts_dir(config.run.data_root), "generator.parquet"),),
        modules=(vqgan_training, tokens, embeddings, text, vqgan_model),
        sql=("cohort_split_ids", "pending_tokens", "pending_text_embeddings"),
    )


@flow(name="tokenize", log_prints=True)
def tokenize(config: Config) -> dict:
    data_root = config.run.data_root
    device = resolve_device()
    cohort = pq.read_table(cohorts_dir(data_root) / "generator.parquet")
    vqgan = prepare_vqgan(config, device)
    token_counts = encode_tokens(data_root, vqgan.model, vqgan.vqgan_id, cohort["dicom_id"].to_pylist(),
                                 config.ingest.resolution, config.vqgan.encode_batch_size, config.ingest.shard_size)
    encoder = text.load_text_encoder(config.text.encoder, device)
    text_counts = embed_impressions(data_root, encoder, cohort.select(["study_id", "impression"]),
                                    config.text.max_tokens, config.text.batch_size, config.ingest.shard_size)
    summary = {
        "vqgan_id": vqgan.vqgan_id, "encoder_id": encoder.encoder_id, "vqgan_metrics": vqgan.metrics,
        "tokens_encoded": token_counts.encoded, "tokens_skipped": token_counts.skipped,
        "texts_embedded": text_counts.embedded, "texts_skipped": text_counts.skipped,
    }
    create_markdown_artifact(key="tokenize-summary", markdown="\n".join(f"- {k}: {v}" for k, v in summary.items()))
    get_run_logger().info("tokenize: %s", summary)
    return summary
