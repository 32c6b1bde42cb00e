"""Stage 7: FID (in-domain DenseNet features; Inception when its weights are local), MS-SSIM diversity and label
faithfulness of the generator, with a grid of synthetic samples per class beside real ones -> MLflow.

It runs after retraining because its in-domain feature extractor and its judge is the classifier trained on real
images only (ratio 0). Wiring only; the work is in tasks/generator_eval.py."""

from __future__ import annotations

import mlflow
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.synthesize import load_generator
from tasks import generator_eval, retrain as retrain_tasks, stages, synthesis, tracking
from tasks.config import Config
from tasks.curate import cohorts_dir
from tasks.pathologies import PATHOLOGIES

evaluate = task(generator_eval.evaluate_generator, name="evaluate-generator", cache_policy=NO_CACHE)


def inputs(config: Config, generator_id: str) -> stages.StageInputs:
    data_root = config.run.data_root
    return stages.StageInputs(
        sections=("generator_eval", "synthesis", "retrain"),
        files=((cohorts_dir(data_root), "*.parquet"), (data_root / "tables" / "synthetic", "*.parquet"),
               (retrain_tasks.classifier_dir(data_root, generator_id, 0.0, config.retrain.seeds[0]), "*")),
        modules=(generator_eval,),
    )


@flow(name="evaluate_generator", log_prints=True)
def evaluate_generator(config: Config, generator_id: str) -> dict:
    data_root = config.run.data_root
    plan = synthesis.plan_synthesis(data_root, config.synthesis.ratios, config.synthesis.seed)
    synthetic, labels = synthesis.load_synthetic(data_root, generator_id,
                                                 synthesis.synth_ids(plan.rows, config.synthesis.seed))
    real = retrain_tasks.load_real_split(data_root, config.ingest.resolution, "train")
    real_only = retrain_tasks.classifier_dir(data_root, generator_id, 0.0, config.retrain.seeds[0])
    result = evaluate(load_generator(config, generator_id), plan.rows, synthetic, labels, real.images, real_only,
                      config.generator_eval, config.synthesis.seed)
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
    get_run_logger().info("generator %s: %s", generator_id, metrics)
    return {"metrics": metrics, "fid_skipped": result.fid_skipped}
