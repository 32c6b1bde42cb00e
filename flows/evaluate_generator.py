"""Stage 7: the generator protocol of tasks/evaluation/generator_eval.py on held-out studies -> MLflow: fidelity and
coverage in each feature space beside the real-vs-real floor and the tokenizer's ceiling, per-class KID, diversity
within and across prompts, label faithfulness, memorisation with the closest pairs, sample grids per class; the
sampler sweep for the family whose sampler it sets. For one generator of config.generators (run once per listed
family), into its results run (tracking.results_run); the in-domain features are kept for the comparison across
families (tasks/evaluation/family_comparison.py).

It runs after retraining because its in-domain feature extractor and its judge is the classifier trained on real
images only (ratio 0). Wiring only."""

from __future__ import annotations

from pathlib import Path

import mlflow
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from tasks import layout, stages, tracking
from tasks.config import Config, FamilySection, GeneratorEvalSection, TextSection, VQGANSection
from tasks.data.pixels import PixelStore
from tasks.evaluation import family_comparison, generator_eval
from tasks.generators import families
from tasks.generators.checkpoints import FINAL_DIR
from tasks.pathologies import PATHOLOGIES

evaluate = task(generator_eval.evaluate_generator, name="evaluate-generator", cache_policy=NO_CACHE)
sampler_sweep = task(generator_eval.sampler_sweep, name="sampler-sweep", cache_policy=NO_CACHE)


def sweep_label(point: dict) -> str:
    """A sweep point as its settings, in characters MLflow takes in a metric name: 'guidance_scale:3 steps:8'."""
    return " ".join(f"{key}:{value:g}" if isinstance(value, float) else f"{key}:{value}"
                    for key, value in sorted(point.items()))


def stage(config: Config, family: str, synthesized: dict, parent: tracking.ParentRun) -> stages.Stage:
    data_root = config.run.data_root
    real_only = config.retrain.judge_dir(data_root)
    return stages.Stage(
        stages.per_generator("evaluate_generator", family, config.generators), evaluate_generator,
        {"data_root": data_root, "family": family, "generator_id": synthesized["generator_id"],
         "settings": config.generator_eval, "seed": config.run.seed, "real_only_classifier": real_only,
         "resolution": config.ingest.resolution, "vqgan": config.vqgan, "text_settings": config.text,
         "generator_settings": families.section(config, family),
         "results_in": tracking.results_run_name(family, config.generators)},
        files=((layout.cohorts_dir(data_root), "*.parquet"), (real_only, "*"),
               (layout.model_dir(data_root, family, synthesized["generator_id"]), f"{FINAL_DIR}/*")),
        context={"parent": parent})


@flow(name="evaluate_generator", log_prints=True)
def evaluate_generator(data_root: Path, family: str, generator_id: str, settings: GeneratorEvalSection, seed: int,
                       real_only_classifier: Path, resolution: int, vqgan: VQGANSection, text_settings: TextSection,
                       generator_settings: FamilySection, results_in: str | None, parent: tracking.ParentRun) -> dict:
    def load(section: FamilySection):
        return families.load(family, data_root, generator_id, section, resolution, vqgan, text_settings)

    generator = load(generator_settings)
    cohort, labels = generator_eval.cohort_and_labels(data_root)
    pixels = PixelStore(data_root, resolution)
    studies = generator_eval.evaluation_set(cohort, labels, pixels, settings.images, seed)
    train = generator_eval.training_studies(cohort, labels, pixels)
    result = evaluate(generator, studies, train, real_only_classifier, settings, seed)
    metrics = generator_eval.metrics(result)
    family_comparison.save_features(data_root, generator.output_id, result.in_domain_features["reference"],
                                    result.in_domain_features["generated"])
    markdown = generator_eval.to_markdown(result)
    # The configured sampler first, measured as every point is (same prompts, seeds and sizes).
    variants = families.sweep_sections(family, generator_settings, settings.sweep)
    points = (sampler_sweep({"configured": generator} | {
        sweep_label(point): load(section) for point, section in zip(settings.sweep, variants)},
        studies, real_only_classifier, settings, seed) if variants else [])
    if points:
        markdown += ("\n\nSampler sweep (the first {n} prompts of half B):\n\n".format(
            n=min(settings.sweep_prompts, len(studies.prompted.prompts))) + generator_eval.sweep_markdown(points))
    with tracking.results_run(parent, results_in, generator_id):
        mlflow.log_metrics(metrics)
        mlflow.set_tags({f"generator/skipped/{name}": reason for name, reason in result.skipped.items()})
        real_samples = {name: studies.reference.images[studies.reference.labels[:, c] == 1][:4]
                        for c, name in enumerate(PATHOLOGIES)}
        tracking.log_sample_grid(real_samples, result.samples)
        tracking.log_closest_pairs(result.closest_pairs, result.memorisation["held_out_p1_distance"])
        tracking.log_feature_pca(result.in_domain_features["reference"],
                                 {"generated": result.in_domain_features["generated"]})
        if points:
            tracking.log_fidelity_diversity(points)
            for point in points[1:]:
                mlflow.log_metrics({f"generator/sweep/{point.label}/{name}": value for name, value in (
                    ("fid", point.fid), ("precision", point.precision), ("recall", point.recall),
                    ("ms_ssim", point.ms_ssim), ("faithfulness", point.faithfulness),
                    ("faithfulness_populated", point.faithfulness_populated)) if value is not None})
        mlflow.log_text(markdown + "\n", "generator_evaluation.md")
    create_markdown_artifact(key="generator-evaluation", markdown=markdown)
    get_run_logger().info("generator %s:\n%s", generator.output_id, markdown)
    return {"family": family, "generator_id": generator_id, "output_id": generator.output_id, "metrics": metrics,
            "skipped": result.skipped, "markdown": markdown}
