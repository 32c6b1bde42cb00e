"""Stage 2: sql/ -> cohorts (generator cohort, classifier splits). Wiring only; the work is in tasks/curate.py."""

from __future__ import annotations

import dataclasses

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from tasks import catalog, stages
from tasks import curate as curate_tasks
from tasks.config import Config
from tasks.curate import build_cohorts

build_cohorts_task = task(build_cohorts, name="build-cohorts")
INGESTED_TABLES = ("images", "pixels", "reports", "labels", "metadata", "splits", "rejects")


def inputs(config: Config) -> stages.StageInputs:
    """What curation reads: the tables ingest writes (not those of later stages), and the curate section."""
    return stages.StageInputs(
        sections=("curate",),
        files=tuple((catalog.tables_root(config.run.data_root) / table, "*.parquet") for table in INGESTED_TABLES),
        modules=(curate_tasks,),
        sql=("curate_images", "curate_label_macro", "generator_cohort", "classifier_cohort", "cohort_summary"),
    )


@flow(name="curate", log_prints=True)
def curate(config: Config) -> dict:
    summary = build_cohorts_task(config.run.data_root, config.curate)
    create_markdown_artifact(key="cohort-summary", markdown=summary.to_markdown())
    get_run_logger().info("cohorts:\n%s", summary.to_markdown())
    return dataclasses.asdict(summary)
