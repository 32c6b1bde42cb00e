"""Stage 5: the class-balanced plan (SQL) -> generated images + labels + provenance, for the largest ratio (smaller
ratios are prefixes), with one generator of config.generators (run once per listed family). The plan is the same
for every generator and kept beside the images for the stages after this one. Each batch gets its source studies'
conditions (labels, reference images), which the label and image families generate from. Wiring only; the work
is in tasks/generators/synthesis.py and the generator's family, reached through tasks/generators/families.py."""

from __future__ import annotations

from pathlib import Path

import mlflow
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from tasks import layout, stages
from tasks.config import Config, FamilySection, SynthesisSection, TextSection, VQGANSection
from tasks.generators import families, synthesis
from tasks.generators.checkpoints import FINAL_DIR
from tasks.generators.conditions import StudyConditions

synthesize_images = task(synthesis.synthesize, name="synthesize-images", cache_policy=NO_CACHE)


def stage(config: Config, family: str, generator_id: str) -> stages.Stage:
    data_root = config.run.data_root
    return stages.Stage(
        stages.per_generator("synthesize", family, config.generators), synthesize,
        {"data_root": data_root, "family": family, "generator_id": generator_id, "settings": config.synthesis,
         "resolution": config.ingest.resolution, "vqgan": config.vqgan, "text_settings": config.text,
         "generator_settings": families.section(config, family)},
        files=((layout.cohorts_dir(data_root), "*.parquet"),
               (layout.model_dir(data_root, family, generator_id), f"{FINAL_DIR}/*")))


@flow(name="synthesize", log_prints=True)
def synthesize(data_root: Path, family: str, generator_id: str, settings: SynthesisSection, resolution: int,
               vqgan: VQGANSection, text_settings: TextSection, generator_settings: FamilySection) -> dict:
    plan = synthesis.plan_synthesis(data_root, settings.ratios, settings.seed, settings.max_uses_per_prompt,
                                    settings.no_finding)
    synthesis.save_plan(data_root, plan)
    generator = families.load(family, data_root, generator_id, generator_settings, resolution, vqgan, text_settings)
    counts = synthesize_images(data_root, generator, plan.rows, settings.batch_size, settings.seed,
                               conditions=StudyConditions(data_root, resolution))
    markdown = plan.to_markdown()
    mlflow.log_text(markdown + "\n", "synthesis_plan.md")  # into the active (parent) run: one plan for every generator
    if plan.without_prompts:
        mlflow.set_tag("synthesis.classes_without_prompts", ", ".join(plan.without_prompts))
    create_markdown_artifact(key="synthesis-plan", markdown=markdown)
    get_run_logger().info("synthesis with %s: %d generated, %d already stored\n%s",
                          generator_id, counts.generated, counts.skipped, markdown)
    return {"family": family, "generator_id": generator_id, "output_id": generator.output_id,
            "generated": counts.generated, "skipped": counts.skipped,
            "images": len(plan.rows), "without_prompts": plan.without_prompts, "plan_markdown": markdown}
