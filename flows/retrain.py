"""Stage: DenseNet-121 x synthetic ratios x seeds -> per-pathology AUROC with intervals -> MLflow.

One child run per (ratio, seed) under the active parent run; the parent gets the comparison table (CSV and
markdown), the bar chart of AUROC per pathology across ratios, and the best classifier is registered with the alias
"best". Wiring only; the work is in tasks/retrain.py, tasks/classifier.py, tasks/metrics.py, tasks/tracking.py.
"""

from __future__ import annotations

import mlflow
import numpy as np
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from tasks import classifier, metrics, retrain as retrain_tasks, stages, synthesis, tracking
from tasks.config import Config
from tasks.generator_training import resolve_device
from tasks.curate import cohorts_dir

train_one = task(retrain_tasks.train_one, name="train-classifier", cache_policy=NO_CACHE)


def inputs(config: Config, generator_id: str) -> stages.StageInputs:
    return stages.StageInputs(
        sections=("run", "ingest", "synthesis", "retrain"),
        files=((cohorts_dir(config.run.data_root), "*.parquet"),
               (config.run.data_root / "tables" / "synthetic", "*.parquet")),
        modules=(retrain_tasks, classifier, metrics, synthesis, tracking),
        sql=("synthesis_candidates", "synthesis_class_counts", "synthesis_locations"),
    )


@flow(name="retrain", log_prints=True)
def retrain(config: Config, parent_run_id: str, generator_id: str) -> dict:
    logger = get_run_logger()
    data_root, resolution = config.run.data_root, config.ingest.resolution
    device = resolve_device()
    train, val, test = (retrain_tasks.load_real_split(data_root, resolution, split)
                        for split in ("train", "validate", "test"))
    plan = synthesis.plan_synthesis(data_root, config.synthesis.ratios, config.synthesis.seed)
    scores_by_ratio, child_runs = {}, {}
    for ratio in sorted(config.synthesis.ratios):
        train_set = retrain_tasks.training_set(config, train, plan, ratio, generator_id)
        seed_scores = []
        for seed in config.retrain.seeds:
            name = f"ratio-{ratio:g}-seed-{seed}"
            params = {"ratio": ratio, "seed": seed, "real_train_images": len(train.labels),
                      "synthetic_images": len(train_set) - len(train.labels)}
            with tracking.child_run(config, parent_run_id, name, params,
                                    {tracking.GENERATOR_RUN_TAG: generator_id}) as run:
                out_dir = retrain_tasks.classifier_dir(data_root, generator_id, ratio, seed)
                trained, scores = train_one(config, train_set, val, test, seed, out_dir, device)
                for record in trained.history:
                    mlflow.log_metrics({"train/loss": record.train_loss, "val/auroc/macro": record.val_macro_auroc},
                                       step=record.epoch)
                tracking.log_metrics_per_pathology("test/auroc", retrain_tasks.report_on_test_set(config, test, scores))
                tracking.log_roc_curves(test.labels, scores)
                mlflow.pytorch.log_model(trained.model, name="classifier", serialization_format="pickle")
                child_runs[name] = run.info.run_id
            seed_scores.append(scores)
        scores_by_ratio[ratio] = np.mean(seed_scores, axis=0)

    reports = {ratio: retrain_tasks.report_on_test_set(config, test, scores) for ratio, scores in scores_by_ratio.items()}
    differences = ({ratio: retrain_tasks.difference_to_real_only(config, test, scores_by_ratio[0.0], scores)
                    for ratio, scores in scores_by_ratio.items() if ratio != 0.0}
                   if 0.0 in scores_by_ratio else {})
    table = tracking.comparison_table(reports, differences)
    markdown = tracking.log_comparison_table(table)  # into the active (parent) run
    tracking.log_auroc_bars(table)
    best_ratio = max(reports, key=lambda ratio: reports[ratio].macro.estimate if reports[ratio].macro else -1.0)
    best_run = child_runs[f"ratio-{best_ratio:g}-seed-{config.retrain.seeds[0]}"]
    tracking.register_best_model(config, best_run, "classifier", f"cxr-densenet-{config.run.name}", "best")
    create_markdown_artifact(key="auroc-comparison", markdown=markdown)
    logger.info("test AUROC per pathology and ratio:\n%s", markdown)
    return {"comparison_markdown": markdown, "comparison": table.to_dict("records"), "child_runs": child_runs,
            "best_ratio": best_ratio, "best_run_id": best_run}
