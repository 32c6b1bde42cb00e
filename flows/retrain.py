"""Stage 6: DenseNet-121 x arms x synthetic ratios x seeds -> per-pathology AUROC with intervals -> MLflow, on the
synthetic images of one generator of config.generators (run once per listed family).

One child run per (arm, ratio, seed) under the generator's results run (tracking.results_run: the flow run's
parent run with one generator, the generator's own child run beside others); that run gets, per arm, the
comparison table (CSV and markdown), the verdict and the bar chart of AUROC per pathology across ratios (the
reference arm at the top, the others under arms/<arm>/); the classifier that validated best is registered with the
alias "best" and tags saying its arm, ratio and seed. Wiring only; the protocol is tasks/evaluation/retrain.py.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from tasks import layout, stages, tracking
from tasks.config import Config, FamilySection, RetrainSection, TextSection, VQGANSection
from tasks.evaluation import retrain as retrain_tasks
from tasks.generators import families
from tasks.generators.device import resolve_device
from tasks.generators.synthesis import load_plan

train_one = task(retrain_tasks.train_one, name="train-classifier", cache_policy=NO_CACHE)


def stage(config: Config, family: str, synthesized: dict, parent: tracking.ParentRun) -> stages.Stage:
    data_root = config.run.data_root
    return stages.Stage(
        stages.per_generator("retrain", family, config.generators), retrain,
        {"data_root": data_root, "model_name": tracking.classifier_model_name(config.run.name, family,
                                                                               config.generators),
         "resolution": config.ingest.resolution,
         "settings": config.retrain, "synthesis_seed": config.synthesis.seed, "bootstrap_seed": config.run.seed,
         "generator_id": synthesized["generator_id"], "output_id": synthesized["output_id"],
         "results_in": tracking.results_run_name(family, config.generators), "family": family,
         "generator_settings": families.section(config, family), "vqgan": config.vqgan, "text_settings": config.text},
        files=((layout.cohorts_dir(data_root), "*.parquet"), (layout.table_dir(data_root, "synthetic"), "*.parquet"),
               (layout.synthesis_plan_file(data_root).parent, layout.synthesis_plan_file(data_root).name)),
        context={"parent": parent})


@flow(name="retrain", log_prints=True)
def retrain(data_root: Path, model_name: str, resolution: int, settings: RetrainSection, synthesis_seed: int,
            bootstrap_seed: int, generator_id: str, output_id: str, results_in: str | None, family: str,
            generator_settings: FamilySection, vqgan: VQGANSection, text_settings: TextSection,
            parent: tracking.ParentRun) -> dict:
    reconstruct = None  # for a quality gate judging in the decoded domain of a generator with a latent space
    if settings.gate_judge == "decoded" and any(arm.quality_gate for arm in settings.arms):
        generator = families.load(family, data_root, generator_id, generator_settings, resolution, vqgan,
                                  text_settings)
        reconstruct = getattr(generator, "reconstruct", None)
    with tracking.results_run(parent, results_in, generator_id) as home:
        result = retrain_tasks.retrain(data_root, resolution, settings, load_plan(data_root), synthesis_seed,
                                       generator_id, output_id, bootstrap_seed, home, str(resolve_device()),
                                       train=train_one, reconstruct=reconstruct)
        sections = []
        for arm, table in result.tables.items():
            folder = tracking.arm_folder(list(result.tables), arm)
            arm_markdown = tracking.log_comparison_table(table, folder)
            tracking.log_auroc_bars(table, f"{folder}/auroc_by_ratio.png" if folder else "auroc_by_ratio.png")
            sections.append(f"Arm {arm} ({retrain_tasks.arm_description(settings, arm)}):\n\n{arm_markdown}")
    markdown = "\n\n".join(sections)
    arm, ratio, seed = result.best
    tracking.register_best_model(result.child_runs[result.best_run], "classifier", model_name, "best",
                                 {"arm": arm, "ratio": f"{ratio:g}", "seed": str(seed), "output_id": output_id,
                                  "val_auroc_macro": f"{result.best_validation_auroc:.4f}"})
    create_markdown_artifact(key="auroc-comparison", markdown=markdown)
    get_run_logger().info("test AUROC per pathology and ratio:\n%s\nregistered: %s (validation macro AUROC %.3f)",
                          markdown, result.best_run, result.best_validation_auroc)
    return {"generator_id": generator_id, "output_id": output_id, "comparison_markdown": markdown,
            "comparison": {arm: table.to_dict("records") for arm, table in result.tables.items()},
            "child_runs": result.child_runs, "best_arm": arm, "best_ratio": ratio,
            "best_run_id": result.child_runs[result.best_run]}
