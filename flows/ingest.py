"""Stage 1: source -> raw tables (Parquet) + preprocessed pixel shards. Wiring only; the work is in tasks/."""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.futures import as_completed

from tasks import catalog, demo_source, dicom, ingest_images, physionet, reports, sources, stages
from tasks import ingest as ingest_tasks
from tasks.config import Config
from tasks.text import load_tokenizer
from tasks.ingest import (check_resolution, ingest_summary, load_source_csvs, plan_image_units, plan_report_units,
                          remove_uncommitted_units)

# I/O that can fail for passing reasons is retried; deterministic compute is not.
acquire_source = task(sources.acquire_source, name="acquire-source", retries=2, retry_delay_seconds=[10, 60])
load_csvs = task(load_source_csvs, name="load-source-csvs")
ingest_shard = task(ingest_images.ingest_shard, name="ingest-shard")
parse_reports = task(reports.parse_reports, name="parse-reports")


def inputs(config: Config) -> stages.StageInputs:
    """What ingest reads: the source's listing (CSVs and checksums; a grown source changes them) and its config."""
    return stages.StageInputs(
        sections=("source", "ingest", "text"),
        files=((config.source_root, "*.csv.gz"), (config.source_root, "SHA256SUMS.txt")),
        modules=(ingest_tasks, ingest_images, reports, sources, dicom, demo_source, physionet),
        sql=("pending_images", "pending_reports", "ingest_summary", "ingested_resolutions"),
    )


@flow(name="ingest", log_prints=True)
def ingest(config: Config) -> dict[str, int]:
    logger = get_run_logger()
    data_root = config.run.data_root
    catalog.ensure_tables(data_root)
    remove_uncommitted_units(data_root)
    check_resolution(data_root, config.ingest.resolution)
    source = acquire_source(config)  # a checked Mirror
    load_csvs(data_root, source, sources.study_selection(config))

    image_units = plan_image_units(data_root, source, config.ingest.shard_size)
    report_units = plan_report_units(data_root, source, config.ingest.shard_size)
    logger.info("ingest: %d image units, %d report units pending", len(image_units), len(report_units))
    futures = [ingest_shard.submit(data_root, name, items, config.ingest.resolution, source.image_ext)
               for name, items in image_units]
    tokenizer = load_tokenizer(config.text.encoder) if report_units else None
    futures += [parse_reports.submit(data_root, items, config.text.max_tokens, tokenizer, name)
                for name, items in report_units]
    if futures:
        progress = create_progress_artifact(0.0, key="ingest-progress", description="ingest work units done")
        for done, future in enumerate(as_completed(futures), start=1):
            future.result()  # a unit that raised is a bug, not bad input: fail the stage with its error
            update_progress_artifact(progress, 100.0 * done / len(futures))

    summary = ingest_summary(data_root)
    catalog.refresh_catalog(data_root)
    create_markdown_artifact(
        key="ingest-summary",
        markdown="| count | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in summary.items()),
    )
    logger.info("ingest summary: %s", summary)
    return summary
