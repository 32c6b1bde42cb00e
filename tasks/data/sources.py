"""Where the PhysioNet-layout tree comes from: written here (demo), already on disk (local), or downloaded (physionet).

Whatever the source, the result is a checked mirror that ingestion reads the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from tasks import layout
from tasks.config import DemoSource, LocalSource, SourceSection
from tasks.data import catalog, physionet, secrets
from tasks.data.mirror import check_mirror, Mirror
from tasks.demo import source as demo_source

log = logging.getLogger(__name__)


def source_root(data_root: Path, source: SourceSection) -> Path:
    """Where the PhysioNet-layout tree is read from: a local mirror where it is, else under the data root."""
    return source.root if isinstance(source, LocalSource) else layout.source_dir(data_root, source.kind)


def acquire_source(data_root: Path, source: SourceSection, workers: int) -> Mirror:
    """Make the configured source available on disk and check its layout; download rejects land in the table."""
    root = source_root(data_root, source)
    if isinstance(source, DemoSource):
        summary = demo_source.write_demo_tree(root, studies=source.studies, seed=source.seed,
                                              image_size=source.image_size, workers=workers)
        log.info("demo tree at %s: %s", root, summary)
        return check_mirror(root, "mimic-cxr")
    if isinstance(source, LocalSource):
        return check_mirror(root, source.dataset, source.reports_root)
    report = physionet.download(source, root, secrets.resolve_credentials(source))
    catalog.write_part(data_root, "rejects", "download", report.rejects)
    log.info("physionet: %d files downloaded, %d already present, %d rejected",
             report.files_downloaded, report.files_skipped, len(report.rejects))
    return physionet.local_mirror(source, root)


def study_selection(source: SourceSection) -> Callable[[list[dict]], list[dict]] | None:
    """The narrowing of the metadata listing that a selective download applied (None: the whole listing)."""
    if isinstance(source, (DemoSource, LocalSource)) or (source.p_folders is None and source.max_studies is None):
        return None

    def select(rows: list[dict]) -> list[dict]:
        chosen = set(physionet.select_studies(rows, source.p_folders, source.max_studies))
        return [row for row in rows if (row["subject_id"], row["study_id"]) in chosen]

    return select
