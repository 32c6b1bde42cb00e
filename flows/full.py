"""The `augment` flow: the whole DAG of ../shared/DESIGN.md, one subflow per stage.

    ingest -> curate -> tokenize -> train_generator -> synthesize -> retrain -> evaluate_generator

Deployed as `augment/full` (prefect.yaml). Parameters are the config path and `section.key=value` overrides; the
config is validated before any stage starts. A stage whose inputs (config sections, data, code) are unchanged since
its last completed run is skipped with a log line saying so, so the nightly run redoes only what changed. Each flow
run has one MLflow parent run; stages log into it or into child runs under it. Runs on the same data root take
turns (stages.exclusive_data_root).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import mlflow
from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows import curate, evaluate_generator, ingest, retrain, synthesize, tokenize, train_generator
from flows.runners import make_task_runner
from tasks import stages, tracking
from tasks.config import Config, load_config
from tasks.curate import cohorts_dir


def run_stage(config: Config, name: str, inputs: stages.StageInputs, subflow: Callable[[], dict],
              keep_for: timedelta | None = None, why_not_keep: Callable[[dict], str | None] = lambda summary: None,
              ) -> dict:
    """Run a stage unless its last completed run had the same inputs; or, with keep_for, the same config and code
    less than keep_for ago, and why_not_keep finds nothing against its summary (new data alone does not rerun it)."""
    logger = get_run_logger()
    data_root = config.run.data_root
    stage_fingerprint = stages.fingerprint(config, inputs)
    config_and_code = stages.config_and_code_fingerprint(config, inputs)
    summary = stages.completed_summary(data_root, name, stage_fingerprint)
    if summary is not None:
        logger.info("stage %s skipped: its inputs are unchanged since its last completed run (fingerprint %s)",
                    name, stage_fingerprint)
        return summary
    if keep_for is not None:
        summary = stages.recent_summary(data_root, name, config_and_code, keep_for)
        reason = why_not_keep(summary) if summary is not None else "no run with this config and code is that recent"
        if reason is None:
            logger.info("stage %s kept: only its data changed since its last completed run, which is less than %s "
                        "old", name, keep_for)
            return summary
        logger.info("stage %s runs again: %s", name, reason)
    summary = subflow()
    # Fingerprinted again after the run: ingest's demo source writes the very files it then reads.
    stages.record_completed(data_root, name, stages.fingerprint(config, inputs), config_and_code, summary)
    return summary


STAGES = ("ingest", "curate", "tokenize", "train_generator", "synthesize", "retrain", "evaluate_generator")


@flow(name="augment", log_prints=True)
def augment(config_path: str = "configs/demo.yaml", overrides: list[str] | None = None,
            stop_after: str = STAGES[-1]) -> dict[str, dict]:
    """Run the stages in order up to and including `stop_after`; returns each stage's summary."""
    if stop_after not in STAGES:
        raise ValueError(f"stop_after {stop_after!r} is not one of {', '.join(STAGES)}")
    config = load_config(config_path, overrides or [])
    results: dict[str, dict] = {}
    with (stages.exclusive_data_root(config.run.data_root, get_run_logger().info),
          tracking.start_parent_run(config, str(flow_run.get_id())) as parent):
        parent_id = parent.info.run_id
        ingest_flow = ingest.ingest.with_options(task_runner=make_task_runner(config.ingest))

        def generator_id() -> str:
            return results["train_generator"]["generator_id"]

        # (stage, its inputs, how to run it); later stages read what earlier ones returned, hence the lambdas.
        plan = [
            ("ingest", lambda: ingest.inputs(config), lambda: ingest_flow(config)),
            ("curate", lambda: curate.inputs(config), lambda: curate.curate(config)),
            ("tokenize", lambda: tokenize.inputs(config), lambda: tokenize.tokenize(config)),
            ("train_generator", lambda: train_generator.inputs(config),
             lambda: train_generator.train_generator(config, parent_id)),
            ("synthesize", lambda: synthesize.inputs(config, generator_id()),
             lambda: synthesize.synthesize(config, generator_id())),
            ("retrain", lambda: retrain.inputs(config, generator_id()),
             lambda: retrain.retrain(config, parent_id, generator_id())),
            ("evaluate_generator", lambda: evaluate_generator.inputs(config, generator_id()),
             lambda: evaluate_generator.evaluate_generator(config, generator_id())),
        ]

        def why_not_keep_generator(kept: dict) -> str | None:
            # A kept generator's tokens index the codebook of the VQ-GAN it was trained with.
            now = results["tokenize"]["vqgan_id"]
            return None if kept["vqgan_id"] == now else f"it learned VQ-GAN {kept['vqgan_id']}'s tokens, not {now}'s"

        keep_days = config.schedule.keep_generator_days
        keep_generator = ({"keep_for": timedelta(days=keep_days), "why_not_keep": why_not_keep_generator}
                          if keep_days else {})
        for name, inputs, run in plan[:STAGES.index(stop_after) + 1]:
            results[name] = run_stage(config, name, inputs(), run,
                                      **(keep_generator if name == "train_generator" else {}))
            if name == "curate":  # the cohorts are the data every later stage learns from
                mlflow.set_tag(tracking.DATA_FINGERPRINT_TAG,
                               stages.files_fingerprint(cohorts_dir(config.run.data_root), ["*.parquet"])[:16])
            if name == "train_generator":
                mlflow.set_tag(tracking.GENERATOR_RUN_TAG, generator_id())
            if name == "retrain":
                # The table is what a person opens the parent run for, also when retraining was skipped.
                mlflow.log_text(results["retrain"]["comparison_markdown"] + "\n", "comparison.md")
    return results
