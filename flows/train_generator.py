"""Stage 4: train one generator family of config.generators on the cached tokens, text states, images and labels,
in an MLflow child run with metrics (and, for the families that draw them, sample grids from fixed validation
prompts) as training goes. Run once per listed family. Wiring only; the work is in the family's package, reached
through tasks/generators/families.py.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks import layout, stages, tracking
from tasks.config import Config, FamilySection, TextSection, VQGANSection
from tasks.generators import families, text
from tasks.generators.device import resolve_device
from tasks.generators.interface import tile
from tasks.generators.training import FitInputs
from tasks.generators.vqgan.training import prepare_vqgan

fit_generator = task(families.fit, name="fit-generator", cache_policy=NO_CACHE)


def stage(config: Config, family: str, parent: tracking.ParentRun) -> stages.Stage:
    data_root = config.run.data_root
    return stages.Stage(
        stages.per_generator("train_generator", family, config.generators), train_generator,
        {"data_root": data_root, "resolution": config.ingest.resolution, "vqgan": config.vqgan,
         "text_settings": config.text, "family": family, "settings": families.section(config, family),
         "run_name": tracking.generator_run_name(family, config.generators)},
        files=((layout.cohorts_dir(data_root), "*.parquet"),
               (layout.table_dir(data_root, "tokens"), "*.parquet"),
               (layout.table_dir(data_root, "text_embeddings"), "*.parquet")),
        context={"parent": parent})


@flow(name="train_generator", log_prints=True)
def train_generator(data_root: Path, resolution: int, vqgan: VQGANSection, text_settings: TextSection, family: str,
                    settings: FamilySection, run_name: str, parent: tracking.ParentRun) -> dict:
    device = resolve_device()
    prepared = prepare_vqgan(data_root, vqgan, resolution, device)  # trained by tokenize: loaded here
    encoder = text.load_text_encoder(text_settings.encoder, device)
    params = {f"{family}.{key}": value for key, value in settings.model_dump(mode="json").items()}
    with tracking.child_run(parent, run_name, params,
                            {"vqgan_id": prepared.vqgan_id, "encoder_id": encoder.encoder_id}) as run:
        mlflow.log_metrics({f"vqgan/{name}": value for name, value in prepared.metrics.items()})

        def log_samples(step: int, images: np.ndarray) -> None:
            mlflow.log_image(tile(images), f"samples/step-{step:06d}.png")

        inputs = FitInputs(data_root, resolution, prepared.model, prepared.vqgan_id, encoder.encoder_id, encoder.dim,
                           text_settings.max_tokens)
        generator_id, result = fit_generator(family, settings, inputs,
                                             on_eval=lambda step, metrics: mlflow.log_metrics(metrics, step=step),
                                             on_samples=log_samples)
        mlflow.set_tag(tracking.GENERATOR_RUN_TAG, generator_id)
        run_id = run.info.run_id
    get_run_logger().info("%s generator %s trained to step %d: %s", family, generator_id, result.step, result.metrics)
    return {"family": family, "generator_id": generator_id, "generator_run_id": run_id,
            "vqgan_id": prepared.vqgan_id, "encoder_id": encoder.encoder_id, "steps": result.step,
            "metrics": result.metrics}
