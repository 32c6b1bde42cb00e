"""Stage 4: train RayGen on the cached tokens and text states, in an MLflow child run with metrics and sample
grids from fixed validation prompts as training goes. Wiring only; the work is in tasks/raygen_generator.py and
tasks/generator_training.py.
"""

from __future__ import annotations

import mlflow
import torch
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from models import raygen as raygen_model
from tasks import embeddings, generator_training, raygen_generator, stages, text, tokens, tracking, vqgan_training
from tasks.config import Config
from tasks.generator_training import resolve_device
from tasks.curate import cohorts_dir

fit_raygen = task(raygen_generator.fit_raygen, name="fit-raygen", cache_policy=NO_CACHE)


def inputs(config: Config) -> stages.StageInputs:
    data_root = config.run.data_root
    return stages.StageInputs(
        sections=("text", "vqgan", "raygen", "ingest"),
        files=((cohorts_dir(data_root), "generator.parquet"), (data_root / "tables" / "tokens", "*.parquet"),
               (data_root / "tables" / "text_embeddings", "*.parquet")),
        modules=(raygen_generator, generator_training, raygen_model, tokens, embeddings),
        sql=("vqgan_tokens", "text_embedding_locations"),
    )


@flow(name="train_generator", log_prints=True)
def train_generator(config: Config, parent_run_id: str) -> dict:
    device = resolve_device()
    vqgan = vqgan_training.prepare_vqgan(config, device)  # trained by tokenize: loaded here, not retrained
    encoder = text.load_text_encoder(config.text.encoder, device)
    params = {f"raygen.{key}": value for key, value in config.raygen.model_dump(mode="json").items()}
    with tracking.child_run(config, parent_run_id, "generator", params,
                            {"vqgan_id": vqgan.vqgan_id, "encoder_id": encoder.encoder_id}) as run:
        mlflow.log_metrics({f"vqgan/{name}": value for name, value in vqgan.metrics.items()})

        def log_samples(step: int, sample_tokens: torch.Tensor) -> None:
            images = raygen_generator.to_uint8(vqgan.model.decode_indices(sample_tokens.to(device), grayscale=True))
            mlflow.log_image(raygen_generator.tile(images), f"samples/step-{step:06d}.png")

        generator_id, result = fit_raygen(config, vqgan.model, vqgan.vqgan_id, encoder.encoder_id, encoder.dim,
                                          on_eval=lambda step, metrics: mlflow.log_metrics(metrics, step=step),
                                          on_samples=log_samples)
        mlflow.set_tag(tracking.GENERATOR_RUN_TAG, generator_id)
        run_id = run.info.run_id
    get_run_logger().info("generator %s trained to step %d: %s", generator_id, result.step, result.metrics)
    return {"generator_id": generator_id, "generator_run_id": run_id, "vqgan_id": vqgan.vqgan_id,
            "encoder_id": encoder.encoder_id, "steps": result.step, "metrics": result.metrics}
