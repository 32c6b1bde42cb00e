"""The `augment` flow: the whole DAG of ../shared/DESIGN.md, one subflow per stage (later stages join as they land).

Deployed as `augment/full` (prefect.yaml). Parameters are the config path and `section.key=value` overrides; the
config is validated before any stage starts. A stage whose inputs (config sections, data, code) are unchanged since
its last completed run is skipped with a log line saying so, so the nightly run redoes only what changed.
"""

from __future__ import annotations

from collections.abc import Callable

from prefect import flow, get_run_logger

from flows import curate, ingest
from flows.runners import make_task_runner
from tasks import stages
from tasks.config import Config, load_config


def run_stage(config: Config, name: str, inputs: stages.StageInputs, subflow: Callable[[Config], dict]) -> dict:
    logger = get_run_logger()
    stage_fingerprint = stages.fingerprint(config, inputs)
    summary = stages.completed_summary(config.run.data_root, name, stage_fingerprint)
    if summary is not None:
        logger.info("stage %s skipped: its inputs are unchanged since its last completed run (fingerprint %s)",
                    name, stage_fingerprint)
        return summary
    summary = subflow(config)
    # Fingerprinted again after the run: ingest's demo source writes the very files it then reads.
    stages.record_completed(config.run.data_root, name, stages.fingerprint(config, inputs), summary)
    return summary


@flow(name="augment", log_prints=True)
def augment(config_path: str = "configs/demo.yaml", overrides: list[str] | None = None) -> dict[str, dict]:
    config = load_config(config_path, overrides or [])
    ingest_flow = ingest.ingest.with_options(task_runner=make_task_runner(config.ingest))
    return {
        "ingest": run_stage(config, "ingest", ingest.inputs(config), ingest_flow),
        "curate": run_stage(config, "curate", curate.inputs(config), curate.curate),
    }
