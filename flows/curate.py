"""Stage 2: sql/ -> cohorts (generator cohort, classifier splits). Wiring only; the work is in tasks/data/curate.py."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from tasks import layout, stages
from tasks.config import Config, CurateSection
from tasks.data.curate import build_cohorts

build_cohorts_task = task(build_cohorts, name="build-cohorts")
INGESTED_TABLES = ("images", "pixels", "reports", "labels", "metadata", "splits", "rejects")


def stage(config: Config) -> stages.Stage:
    """What curation reads: the tables ingest writes (not those of later stages), and the curate section."""
    data_root = config.run.data_root
    return stages.Stage("curate", curate, {"data_root": data_root, "settings": config.curate},
                        files=tuple((layout.table_dir(data_root, table), "*.parquet") for table in INGESTED_TABLES))


@flow(name="curate", log_prints=True)
def curate(data_root: Path, settings: CurateSection) -> dict:
    summary = build_cohorts_task(data_root, settings)
    create_markdown_artifact(key="cohort-summary", markdown=summary.to_markdown())
    get_run_logger().info("cohorts:\n%s", summary.to_markdown())
    return dataclasses.asdict(summary)
