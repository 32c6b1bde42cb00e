"""Stage 7: FID (in-domain DenseNet features; Inception when its weights are local), MS-SSIM diversity and label
faithfulness of the generator, with a grid of synthetic samples per class beside real ones -> MLflow.

It runs after retraining because its in-domain feature extractor and its judge is the classifier trained on real
images only (ratio 0). Wiring only; the work is in tasks/evaluation/generator_eval.py."""

from __future__ import annotations

from pathlib import Path

import mlflow
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks import layout, stages, tracking
from tasks.config import Config, GeneratorEvalSection, RayGenSampling, TextSection, VQGANSection
from tasks.evaluation import generator_eval
from tasks.evaluation.retrain import load_real_split
from tasks.generators import synthesis
from tasks.generators.raygen.generator import load_generator
from tasks.pathologies import PATHOLOGIES

evaluate = task(generator_eval.evaluate_generator, name="evaluate-generator", cache_policy=NO_CACHE)


def stage(config: Config, synthesized: dict) -> stages.Stage:
    data_root = config.run.data_root
    real_only = layout.classifier_dir(data_root, synthesized["output_id"], 0.0, config.retrain.seeds[0])
    return stages.Stage(
        "evaluate_generator", evaluate_generator,
        {"data_root": data_root, "generator_id": synthesized["generator_id"], "settings": config.generator_eval,
         "synthesis_seed": config.synthesis.seed, "real_only_classifier": real_only,
         "resolution": config.ingest.resolution, "vqgan": config.vqgan, "text_settings": config.text,
         "sampling": config.raygen.sampling},
        files=((layout.cohorts_dir(data_root), "*.parquet"), (layout.table_dir(data_root, "synthetic"), "*.parquet"),
               (layout.synthesis_plan_file(data_root).parent, layout.synthesis_plan_file(data_root).name),
               (real_only, "*")))


@flow(name="evaluate_generator", log_prints=True)
def evaluate_generator(data_root: Path, generator_id: str, settings: GeneratorEvalSection, synthesis_seed: int,
                       real_only_classifier: Path, resolution: int, vqgan: VQGANSection, text_settings: TextSection,
                       sampling: RayGenSampling) -> dict:
    plan = synthesis.load_plan(data_root)
    generator = load_generator(data_root, generator_id, resolution, vqgan, text_settings, sampling)
    synthetic, labels = synthesis.load_synthetic(data_root, generator.output_id,
                                                 synthesis.synth_ids(plan.rows, synthesis_seed))
    real = load_real_split(data_root, resolution, "train")
    result = evaluate(generator, plan.rows, synthetic, labels, real.images, real_only_classifier, settings,
                      synthesis_seed)
    metrics = {f"generator/fid/{name}": value for name, value in result.fid.items()}
    metrics |= {f"generator/fid_real_reference/{name}": value for name, value in result.fid_reference.items()}
    metrics["generator/ms_ssim"] = result.ms_ssim
    metrics["generator/ms_ssim_real_reference"] = result.ms_ssim_reference
    metrics |= {f"generator/faithfulness/auroc/{name}": value
                for name, value in result.faithfulness.per_class.items() if value is not None}
    if result.faithfulness.macro is not None:
        metrics["generator/faithfulness/auroc/macro"] = result.faithfulness.macro
    mlflow.log_metrics(metrics)  # into the active (parent) run
    mlflow.set_tags({f"generator/fid/skipped/{name}": reason for name, reason in result.fid_skipped.items()})
    real_samples = {name: real.images[real.labels[:, c] == 1][:4] for c, name in enumerate(PATHOLOGIES)}
    tracking.log_sample_grid(real_samples, result.samples)
    get_run_logger().info("generator %s: %s", generator.output_id, metrics)
    return {"metrics": metrics, "fid_skipped": result.fid_skipped}
