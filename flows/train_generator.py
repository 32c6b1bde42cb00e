"""Stage 4: train RayGen on the cached tokens and text states, in an MLflow child run with metrics and sample
grids from fixed validation prompts as training goes. Wiring only; the work is in tasks/generators/raygen/.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import torch
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks import layout, stages, tracking
from tasks.config import Config, RayGenSection, TextSection, VQGANSection
from tasks.generators import text
from tasks.generators.device import resolve_device
from tasks.generators.raygen import generator as raygen_generator
from tasks.generators.vqgan.training import prepare_vqgan

fit_raygen = task(raygen_generator.fit_raygen, name="fit-raygen", cache_policy=NO_CACHE)


def stage(config: Config, parent: tracking.ParentRun) -> stages.Stage:
    data_root = config.run.data_root
    return stages.Stage(
        "train_generator", train_generator,
        {"data_root": data_root, "resolution": config.ingest.resolution, "vqgan": config.vqgan,
         "text_settings": config.text, "raygen": config.raygen},
        files=((layout.cohorts_dir(data_root), "generator.parquet"),
               (layout.table_dir(data_root, "tokens"), "*.parquet"),
               (layout.table_dir(data_root, "text_embeddings"), "*.parquet")),
        context={"parent": parent})


@flow(name="train_generator", log_prints=True)
def train_generator(data_root: Path, resolution: int, vqgan: VQGANSection, text_settings: TextSection,
                    raygen: RayGenSection, parent: tracking.ParentRun) -> dict:
    device = resolve_device()
    prepared = prepare_vqgan(data_root, vqgan, resolution, device)  # trained by tokenize: loaded here
    encoder = text.load_text_encoder(text_settings.encoder, device)
    params = {f"raygen.{key}": value for key, value in raygen.model_dump(mode="json").items()}
    with tracking.child_run(parent, "generator", params,
                            {"vqgan_id": prepared.vqgan_id, "encoder_id": encoder.encoder_id}) as run:
        mlflow.log_metrics({f"vqgan/{name}": value for name, value in prepared.metrics.items()})

        def log_samples(step: int, sample_tokens: torch.Tensor) -> None:
            images = raygen_generator.to_uint8(prepared.model.decode_indices(sample_tokens.to(device),
                                                                             grayscale=True))
            mlflow.log_image(raygen_generator.tile(images), f"samples/step-{step:06d}.png")

        generator_id, result = fit_raygen(data_root, raygen, text_settings.max_tokens, prepared.model,
                                          prepared.vqgan_id, encoder.encoder_id, encoder.dim,
                                          on_eval=lambda step, metrics: mlflow.log_metrics(metrics, step=step),
                                          on_samples=log_samples)
        mlflow.set_tag(tracking.GENERATOR_RUN_TAG, generator_id)
        run_id = run.info.run_id
    get_run_logger().info("generator %s trained to step %d: %s", generator_id, result.step, result.metrics)
    return {"generator_id": generator_id, "generator_run_id": run_id, "vqgan_id": prepared.vqgan_id,
            "encoder_id": encoder.encoder_id, "steps": result.step, "metrics": result.metrics}
