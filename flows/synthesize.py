"""Stage 5: the class-balanced plan (SQL) -> generated images + labels + provenance, for the largest ratio (smaller
ratios are prefixes). Wiring only; the work is in tasks/synthesis.py and tasks/raygen_generator.py."""

from __future__ import annotations

import mlflow
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from tasks import raygen_generator, stages, synthesis, text, vqgan_training
from tasks.config import Config
from tasks.generator_training import resolve_device
from tasks.curate import cohorts_dir

synthesize_images = task(synthesis.synthesize, name="synthesize-images", cache_policy=NO_CACHE)


def load_generator(config: Config, generator_id: str) -> raygen_generator.RayGenImageGenerator:
    device = resolve_device()
    vqgan = vqgan_training.prepare_vqgan(config, device)
    encoder = text.load_text_encoder(config.text.encoder, device)
    return raygen_generator.load_raygen_generator(config, generator_id, vqgan.model, encoder)


def inputs(config: Config, generator_id: str) -> stages.StageInputs:
    return stages.StageInputs(
        sections=("synthesis", "raygen", "text"),
        files=((cohorts_dir(config.run.data_root), "*.parquet"),
               (raygen_generator.raygen_dir(config.run.data_root, generator_id), "final/*")),
        modules=(synthesis, raygen_generator),
        sql=("synthesis_candidates", "synthesis_class_counts", "synthesis_locations"),
    )


@flow(name="synthesize", log_prints=True)
def synthesize(config: Config, generator_id: str) -> dict:
    plan = synthesis.plan_synthesis(config.run.data_root, config.synthesis.ratios, config.synthesis.seed)
    generator = load_generator(config, generator_id)
    counts = synthesize_images(config.run.data_root, generator, plan.rows, config.synthesis.batch_size,
                               config.synthesis.seed)
    markdown = plan.to_markdown()
    mlflow.log_text(markdown + "\n", "synthesis_plan.md")  # into the active (parent) run
    if plan.without_prompts:
        mlflow.set_tag("synthesis.classes_without_prompts", ", ".join(plan.without_prompts))
    create_markdown_artifact(key="synthesis-plan", markdown=markdown)
    get_run_logger().info("synthesis with %s: %d generated, %d already stored\n%s",
                          generator_id, counts.generated, counts.skipped, markdown)
    return {"generator_id": generator_id, "generated": counts.generated, "skipped": counts.skipped,
            "images": len(plan.rows), "without_prompts": plan.without_prompts, "plan_markdown": markdown}
