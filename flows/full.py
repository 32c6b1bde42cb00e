"""The `augment` flow: the whole DAG of ../shared/DESIGN.md, one subflow per stage.

    ingest -> curate -> tokenize -> train_generator -> synthesize -> retrain -> evaluate_generator

The stages from train_generator on run once per family of config.generators (PER_GENERATOR); with several, the
parent run also gets the comparison across families (tasks/evaluation/family_comparison.py).

Deployed as `augment/full` (prefect.yaml). Parameters are the config path and `section.key=value` overrides; the
config is validated before any stage starts, and each stage gets the config sections it uses (its module's
`stage()` picks them). A stage whose inputs (those arguments, the files it reads, the code it reaches) are
unchanged since its last completed run is not run again: it still appears in the run graph, as a subflow that
completes at once in a Cached state whose message gives the fingerprint and the reason. Each flow run has one
MLflow parent run; stages log into it or into child runs under it. Runs on the same data root take turns
(stages.exclusive_data_root).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import mlflow
from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.states import Completed, State

from flows import curate, evaluate_generator, ingest, retrain, synthesize, tokenize, train_generator
from tasks import layout, stages, tracking
from tasks.config import load_config
from tasks.evaluation import family_comparison

STAGES = ("ingest", "curate", "tokenize", "train_generator", "synthesize", "retrain", "evaluate_generator")
PER_GENERATOR = ("train_generator", "synthesize", "retrain", "evaluate_generator")  # results: family -> summary


@flow(name="unchanged-stage")
def unchanged_stage(summary: dict, reason: str) -> State:
    """Stands in the graph for a stage that did not need to run: a Completed state named Cached (Prefect's name for
    a result reused from an earlier run) whose message says why, returning what the stage's last run returned."""
    return Completed(name="Cached", data=summary, message=reason)


def run_stage(stage: stages.Stage, data_root, keep_for: timedelta | None = None,
              why_not_keep: Callable[[dict], str | None] = lambda summary: None) -> dict:
    """Run a stage unless its last completed run had the same inputs; or, with keep_for, the same config and code
    less than keep_for ago, and why_not_keep finds nothing against its summary (new data alone does not rerun it)."""
    logger = get_run_logger()
    stage_fingerprint = stages.fingerprint(stage)
    config_and_code = stages.config_and_code_fingerprint(stage)
    summary = stages.completed_summary(data_root, stage.name, stage_fingerprint)
    reason = f"inputs unchanged since its last completed run (fingerprint {stage_fingerprint})"
    if summary is None and keep_for is not None:
        summary = stages.recent_summary(data_root, stage.name, config_and_code, keep_for)
        refusal = why_not_keep(summary) if summary is not None else "no run with this config and code is that recent"
        if refusal is None:
            reason = (f"kept: only its data changed since its last completed run, which is less than {keep_for} old "
                      f"(config and code fingerprint {config_and_code})")
        else:
            logger.info("stage %s runs again: %s", stage.name, refusal)
            summary = None
    if summary is not None:
        logger.info("stage %s skipped: %s", stage.name, reason)
        return unchanged_stage.with_options(name=stage.name, flow_run_name=f"{stage.name} (unchanged)")(
            summary, reason)
    summary = stage.run()
    # Fingerprinted again after the run: ingest's demo source writes the very files it then reads.
    stages.record_completed(data_root, stage.name, stages.fingerprint(stage), config_and_code, summary)
    return summary


@flow(name="augment", log_prints=True)
def augment(config_path: str = "configs/demo.yaml", overrides: list[str] | None = None,
            stop_after: str = STAGES[-1]) -> dict[str, dict]:
    """Run the stages in order up to and including `stop_after`, each stage of PER_GENERATOR for every family of
    config.generators in turn; returns each stage's summary (for PER_GENERATOR: family -> summary)."""
    if stop_after not in STAGES:
        raise ValueError(f"stop_after {stop_after!r} is not one of {', '.join(STAGES)}")
    config = load_config(config_path, overrides or [])
    data_root = config.run.data_root
    results: dict[str, dict] = {}
    with (stages.exclusive_data_root(data_root, get_run_logger().info),
          tracking.start_parent_run(config, str(flow_run.get_id())) as run):
        parent = tracking.ParentRun.of(config, run)
        # How each stage is built from the config (and the family) and what earlier stages returned (hence the
        # lambdas).
        build = {
            "ingest": lambda: ingest.stage(config),
            "curate": lambda: curate.stage(config),
            "tokenize": lambda: tokenize.stage(config),
            "train_generator": lambda family: train_generator.stage(config, family, parent),
            "synthesize": lambda family: synthesize.stage(config, family,
                                                          results["train_generator"][family]["generator_id"]),
            "retrain": lambda family: retrain.stage(config, family, results["synthesize"][family], parent),
            "evaluate_generator": lambda family: evaluate_generator.stage(config, family,
                                                                          results["synthesize"][family], parent),
        }
        several = len(config.generators) > 1

        def why_not_keep_generator(kept: dict) -> str | None:
            # A kept generator's tokens index the codebook of the VQ-GAN it was trained with.
            now = results["tokenize"]["vqgan_id"]
            return None if kept["vqgan_id"] == now else f"it learned VQ-GAN {kept['vqgan_id']}'s tokens, not {now}'s"

        keep_days = config.schedule.keep_generator_days
        keep_generator = ({"keep_for": timedelta(days=keep_days), "why_not_keep": why_not_keep_generator}
                          if keep_days else {})
        for name in STAGES[:STAGES.index(stop_after) + 1]:
            if name in PER_GENERATOR:
                results[name] = {family: run_stage(build[name](family), data_root,
                                                   **(keep_generator if name == "train_generator" else {}))
                                 for family in config.generators}
            else:
                results[name] = run_stage(build[name](), data_root)
            if name == "curate":  # the cohorts are the data every later stage learns from
                mlflow.set_tag(tracking.DATA_FINGERPRINT_TAG,
                               stages.files_fingerprint(layout.cohorts_dir(data_root), ["*.parquet"])[:16])
            if name == "train_generator" and not several:  # several: each generator's own run says which it is
                mlflow.set_tag(tracking.GENERATOR_RUN_TAG, results[name][config.generators[0]]["generator_id"])
            if name == "retrain":
                # The table is what a person opens the results run for, also when retraining was skipped.
                for family, summary in results[name].items():
                    with tracking.results_run(parent, tracking.results_run_name(family, config.generators),
                                              summary["generator_id"]):
                        mlflow.log_text(summary["comparison_markdown"] + "\n", "comparison.md")
                if several:
                    family_comparison.log_downstream(results[name], config.retrain.arms[0].name)
            if name == "evaluate_generator" and several:
                family_comparison.log_features(data_root, {family: summary["output_id"]
                                                           for family, summary in results[name].items()})
    return results
