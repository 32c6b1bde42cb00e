"""Stage 2: sql/ -> cohorts (generator cohort, classifier splits). Wiring only; the work is in tasks/curate.py."""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from tasks.config import Config
from tasks.curate import build_cohorts

build_cohorts_task = task(build_cohorts, name="build-cohorts")


@flow(name="curate", log_prints=True)
def curate(config: Config):
    summary = build_cohorts_task(config.run.data_root, config.curate)
    create_markdown_artifact(key="cohort-summary", markdown=summary.to_markdown())
    get_run_logger().info("cohorts:\n%s", summary.to_markdown())
    return summary
