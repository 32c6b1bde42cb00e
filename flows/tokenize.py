"""Stage 3: the cached inputs of RayGen — VQ-GAN image tokens and text-encoder states of the generator cohort.

The VQ-GAN is UniXGen's checkpoint when configured, else one trained here on every training image of the classifier
cohort (skipped once trained).
Wiring only; the work is in tasks/generators/vqgan/training.py, tasks/generators/tokens.py and embeddings.py.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from tasks import layout, stages
from tasks.config import Config, TextSection, VQGANSection
from tasks.generators import embeddings, text, tokens
from tasks.generators.device import resolve_device
from tasks.generators.vqgan.training import prepare_vqgan

# Models are task arguments here: hashing them for a cache key is pointless, so no caching.
prepare_vqgan_task = task(prepare_vqgan, name="prepare-vqgan", cache_policy=NO_CACHE)
encode_tokens = task(tokens.encode_cohort, name="encode-image-tokens", cache_policy=NO_CACHE)
embed_impressions = task(embeddings.embed_cohort, name="embed-impressions", cache_policy=NO_CACHE)


def stage(config: Config) -> stages.Stage:
    data_root = config.run.data_root
    return stages.Stage(
        "tokenize", tokenize,
        {"data_root": data_root, "resolution": config.ingest.resolution, "shard_size": config.ingest.shard_size,
         "vqgan": config.vqgan, "text_settings": config.text},
        files=((layout.cohorts_dir(data_root), "generator.parquet"),
               (layout.cohorts_dir(data_root), "classifier.parquet")))


@flow(name="tokenize", log_prints=True)
def tokenize(data_root: Path, resolution: int, shard_size: int, vqgan: VQGANSection, text_settings: TextSection
             ) -> dict:
    device = resolve_device()
    cohort = pq.read_table(layout.cohort_file(data_root, "generator"))
    prepared = prepare_vqgan_task(data_root, vqgan, resolution, device)
    token_counts = encode_tokens(data_root, prepared.model, prepared.vqgan_id, cohort["dicom_id"].to_pylist(),
                                 resolution, vqgan.encode_batch_size, shard_size)
    encoder = text.load_text_encoder(text_settings.encoder, device)
    text_counts = embed_impressions(data_root, encoder, cohort.select(["study_id", "impression"]),
                                    text_settings.max_tokens, text_settings.batch_size, shard_size)
    summary = {
        "vqgan_id": prepared.vqgan_id, "encoder_id": encoder.encoder_id, "vqgan_metrics": prepared.metrics,
        "tokens_encoded": token_counts.encoded, "tokens_skipped": token_counts.skipped,
        "texts_embedded": text_counts.embedded, "texts_skipped": text_counts.skipped,
    }
    create_markdown_artifact(key="tokenize-summary", markdown="\n".join(f"- {k}: {v}" for k, v in summary.items()))
    get_run_logger().info("tokenize: %s", summary)
    return summary
