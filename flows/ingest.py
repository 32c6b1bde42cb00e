"""Stage 1: source -> raw tables (Parquet) + preprocessed pixel shards. Wiring only; the work is in tasks/data/."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.futures import as_completed

from flows.runners import make_task_runner
from tasks import stages
from tasks.config import Config, IngestSection, SourceSection
from tasks.data import catalog, ingest_images, reports, sources
from tasks.data.ingest import (check_resolution, ingest_summary, load_source_csvs, plan_image_units, plan_report_units,
                               remove_uncommitted_units)
from tasks.generators.text import load_tokenizer

# I/O that can fail for passing reasons is retried; deterministic compute is not.
acquire_source = task(sources.acquire_source, name="acquire-source", retries=2, retry_delay_seconds=[10, 60])
load_csvs = task(load_source_csvs, name="load-source-csvs")
ingest_shard = task(ingest_images.ingest_shard, name="ingest-shard")
parse_reports = task(reports.parse_reports, name="parse-reports")


def stage(config: Config) -> stages.Stage:
    """What ingest reads: the source's listing (CSVs and checksums; a grown source changes them) and its config."""
    root = sources.source_root(config.run.data_root, config.source)
    return stages.Stage(
        "ingest", ingest.with_options(task_runner=make_task_runner(config.ingest)),
        {"data_root": config.run.data_root, "source": config.source, "settings": config.ingest,
         "text_encoder": config.text.encoder, "max_text_tokens": config.text.max_tokens},
        files=((root, "*.csv.gz"), (root, "SHA256SUMS.txt")))


@flow(name="ingest", log_prints=True)
def ingest(data_root: Path, source: SourceSection, settings: IngestSection, text_encoder: str,
           max_text_tokens: int) -> dict[str, int]:
    logger = get_run_logger()
    catalog.ensure_tables(data_root)
    remove_uncommitted_units(data_root)
    check_resolution(data_root, settings.resolution)
    mirror = acquire_source(data_root, source, settings.workers)  # a checked Mirror
    load_csvs(data_root, mirror, sources.study_selection(source))

    image_units = plan_image_units(data_root, mirror, settings.shard_size)
    report_units = plan_report_units(data_root, mirror, settings.shard_size)
    logger.info("ingest: %d image units, %d report units pending", len(image_units), len(report_units))
    futures = [ingest_shard.submit(data_root, name, items, settings.resolution, mirror.image_ext)
               for name, items in image_units]
    tokenizer = load_tokenizer(text_encoder) if report_units else None
    futures += [parse_reports.submit(data_root, items, max_text_tokens, tokenizer, name)
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
