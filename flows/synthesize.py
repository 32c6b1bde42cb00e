"""Stage 5: the class-balanced plan (SQL) -> generated images + labels + provenance, for the largest ratio (smaller
ratios are prefixes). The plan is kept beside the images for the stages after this one. Wiring only; the work is in
tasks/generators/synthesis.py and the generator's family (tasks/generators/raygen/)."""

from __future__ import annotations

from pathlib import Path

import mlflow
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from tasks import layout, stages
from tasks.config import Config, RayGenSampling, SynthesisSection, TextSection, VQGANSection
from tasks.generators import synthesis
from tasks.generators.checkpoints import FINAL_DIR
from tasks.generators.raygen.generator import load_generator

synthesize_images = task(synthesis.synthesize, name="synthesize-images", cache_policy=NO_CACHE)


def stage(config: Config, generator_id: str) -> stages.Stage:
    data_root = config.run.data_root
    return stages.Stage(
        "synthesize", synthesize,
        {"data_root": data_root, "generator_id": generator_id, "settings": config.synthesis,
         "resolution": config.ingest.resolution, "vqgan": config.vqgan, "text_settings": config.text,
         "sampling": config.raygen.sampling},
        files=((layout.cohorts_dir(data_root), "*.parquet"),
               (layout.model_dir(data_root, "raygen", generator_id), f"{FINAL_DIR}/*")))


@flow(name="synthesize", log_prints=True)
def synthesize(data_root: Path, generator_id: str, settings: SynthesisSection, resolution: int,
               vqgan: VQGANSection, text_settings: TextSection, sampling: RayGenSampling) -> dict:
    plan = synthesis.plan_synthesis(data_root, settings.ratios, settings.seed, settings.max_uses_per_prompt,
                                    settings.no_finding)
    synthesis.save_plan(data_root, plan)
    generator = load_generator(data_root, generator_id, resolution, vqgan, text_settings, sampling)
    counts = synthesize_images(data_root, generator, plan.rows, settings.batch_size, settings.seed)
    markdown = plan.to_markdown()
    mlflow.log_text(markdown + "\n", "synthesis_plan.md")  # into the active (parent) run
    if plan.without_prompts:
        mlflow.set_tag("synthesis.classes_without_prompts", ", ".join(plan.without_prompts))
    create_markdown_artifact(key="synthesis-plan", markdown=markdown)
    get_run_logger().info("synthesis with %s: %d generated, %d already stored\n%s",
                          generator_id, counts.generated, counts.skipped, markdown)
    return {"generator_id": generator_id, "output_id": generator.output_id, "generated": counts.generated,
            "skipped": counts.skipped,
            "images": len(plan.rows), "without_prompts": plan.without_prompts, "plan_markdown": markdown}
