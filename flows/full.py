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

import mlflow
from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows import curate, evaluate_generator, ingest, retrain, synthesize, tokenize, train_generator
from flows.runners import make_task_runner
from tasks import stages, tracking
from tasks.config import Config, load_config
from tasks.curate import cohorts_dir


def run_stage(config: Config, name: str, inputs: stages.StageInputs, subflow: Callable[[], dict]) -> dict:
    logger = get_run_logger()
    stage_fingerprint = stages.fingerprint(config, inputs)
    summary = stages.completed_summary(config.run.data_root, name, stage_fingerprint)
    if summary is not None:
        logger.info("stage %s skipped: its inputs are unchanged since its last completed run (fingerprint %s)",
                    name, stage_fingerprint)
        return summary
    summary = subflow()
    # Fingerprinted again after the run: ingest's demo source writes the very files it then reads.
    stages.record_completed(config.run.data_root, name, stages.fingerprint(config, inputs), summary)
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
        for name, inputs, run in plan[:STAGES.index(stop_after) + 1]:
            results[name] = run_stage(config, name, inputs(), run)
            if name == "curate":  # the cohorts are the data every later stage learns from
                mlflow.set_tag(tracking.DATA_FINGERPRINT_TAG,
                               stages.files_fingerprint(cohorts_dir(config.run.data_root), ["*.parquet"])[:16])
            if name == "train_generator":
                mlflow.set_tag(tracking.GENERATOR_RUN_TAG, generator_id())
            if name == "retrain":
                # The table is what a person opens the parent run for, also when retraining was skipped.
                mlflow.log_text(results["retrain"]["comparison_markdown"] + "\n", "comparison.md")
    return results
