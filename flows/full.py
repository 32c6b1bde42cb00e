"""The `augment` flow: the whole DAG of ../shared/DESIGN.md, one subflow per stage (later stages join as they land).

Deployed as `augment/full` (prefect.yaml). Parameters are the config path and `section.key=value` overrides; the
config is validated before any stage starts.
"""

from __future__ import annotations

from prefect import flow

from flows.curate import curate
from flows.ingest import ingest
from flows.runners import make_task_runner
from tasks.config import load_config


@flow(name="augment", log_prints=True)
def augment(config_path: str = "configs/demo.yaml", overrides: list[str] | None = None):
    config = load_config(config_path, overrides or [])
    ingest_summary = ingest.with_options(task_runner=make_task_runner(config.ingest))(config)
    cohorts = curate(config)
    return {"ingest": ingest_summary, "cohorts": cohorts}
