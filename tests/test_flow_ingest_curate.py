"""The first two stages on the smoke config: the augment flow ingests the demo source and curates cohorts.

Checks what a person relies on: every listed item is stored or rejected (planted defects among the rejects), a
second run does no pixel work, a grown source processes only the new studies, and a run killed mid-stage is
followed by a clean re-run.
"""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks.data import catalog

REPO = Path(__file__).resolve().parent.parent
SMOKE = str(REPO / "configs" / "smoke.yaml")


def overrides(root: Path, *extra: str) -> list[str]:
    return [f"run.data_root={root}", *extra]


def image_parts(root: Path) -> dict[str, float]:
    return {p.name: p.stat().st_mtime_ns for p in (root / "tables" / "images").glob("images-*.parquet")}


def duplicate_count(root: Path, table: str, key: str) -> int:
    with catalog.connect(root) as con:
        return con.execute(f"SELECT count(*) - count(DISTINCT {key}) FROM {table}").fetchone()[0]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, prefect_harness):
    from flows.full import augment

    root = tmp_path_factory.mktemp("smoke")
    result = augment(config_path=SMOKE, stop_after="curate", overrides=overrides(root))
    return root, result


def test_every_listed_item_is_stored_or_rejected(smoke_run):
    root, result = smoke_run
    summary = result["ingest"]
    assert summary["images_listed"] > 0
    assert summary["images_ingested"] + summary["images_rejected"] == summary["images_listed"]
    assert summary["reports_parsed"] + summary["reports_rejected"] == summary["studies_listed"]
    with catalog.connect(root) as con:
        rejects = con.execute("SELECT item_id, detail FROM rejects").fetchall()
    with open(root / "source" / "demo" / "demo-defects.csv") as handle:
        planted = list(csv.DictReader(handle))
    assert {row["kind"] for row in planted} >= {"truncated_dicom", "not_dicom", "missing_image", "empty_report"}
    # Images and reports are rejected under their own ids; a malformed CSV row under file:line, its ids in the detail.
    missed = [row for row in planted
              if not any(row["item_id"] == item_id or row["item_id"] in (detail or "") for item_id, detail in rejects)]
    assert missed == []


def test_cohorts_are_written(smoke_run):
    root, result = smoke_run
    assert (root / "cohorts" / "generator.parquet").exists()
    assert (root / "cohorts" / "classifier.parquet").exists()
    assert (root / "catalog.duckdb").exists()
    with catalog.connect(root) as con:
        views = con.execute(f"SELECT g.view_position, i.view_position "
                            f"FROM read_parquet('{root}/cohorts/generator.parquet') AS g "
                            f"JOIN images AS i USING (dicom_id) GROUP BY ALL").fetchall()
    assert views == [("AP", "AP")]  # the smoke config's AP only, and the cohort's view is the image's


def test_second_run_does_no_pixel_work(smoke_run):
    from flows.full import augment

    root, first = smoke_run
    before = image_parts(root)
    records = {path.name: path.stat().st_mtime_ns for path in (root / "stages").glob("*.json")}
    assert set(records) == {"ingest.json", "curate.json"}
    second = augment(config_path=SMOKE, stop_after="curate", overrides=overrides(root))
    assert image_parts(root) == before
    assert second == first
    # Both stages were skipped: neither re-recorded its completion.
    assert {path.name: path.stat().st_mtime_ns for path in (root / "stages").glob("*.json")} == records


def test_a_changed_config_section_reruns_only_its_stage(smoke_run):
    from flows.full import augment

    root, first = smoke_run
    ingest_record = (root / "stages" / "ingest.json").stat().st_mtime_ns
    rerun = augment(config_path=SMOKE, stop_after="curate", overrides=overrides(root, "curate.uncertainty=ones"))
    assert (root / "stages" / "ingest.json").stat().st_mtime_ns == ingest_record
    assert rerun["ingest"] == first["ingest"]
    # Back to the module's config for the tests that follow.
    augment(config_path=SMOKE, stop_after="curate", overrides=overrides(root))


def test_grown_source_processes_only_new_studies(tmp_path, prefect_harness):
    from flows.full import augment

    small = augment(config_path=SMOKE, stop_after="curate", overrides=overrides(tmp_path, "source.studies=40"))
    before = image_parts(tmp_path)
    grown = augment(config_path=SMOKE, stop_after="curate", overrides=overrides(tmp_path, "source.studies=80"))
    after = image_parts(tmp_path)
    assert {name: after[name] for name in before} == before  # old shards untouched
    assert len(after) > len(before)
    assert grown["ingest"]["images_listed"] > small["ingest"]["images_listed"]
    assert grown["ingest"]["images_ingested"] + grown["ingest"]["images_rejected"] == grown["ingest"]["images_listed"]
    assert duplicate_count(tmp_path, "images", "dicom_id") == 0


def test_killed_run_is_followed_by_a_clean_rerun(tmp_path):
    """Kill the CLI once the first image shard is stored, run again: complete, no duplicates, no temp files."""
    command = [sys.executable, "-m", "commands.cli", "run", "--config", SMOKE,
               "--set", f"run.data_root={tmp_path}", "--set", "ingest.shard_size=8", "--set", "ingest.workers=1",
               "--stop-after", "curate"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("PREFECT_API_URL", None)
    log = tmp_path.parent / "killed-run.log"
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.time() + 240
        while not image_parts(tmp_path) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert image_parts(tmp_path), f"the run never stored a shard: {log.read_text()[-3000:]}"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    rerun = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = catalog.connect(tmp_path).execute(catalog.read_sql("ingest_summary")).fetchone()
    listed, ingested, rejected = summary[0], summary[1], summary[2]
    assert ingested + rejected == listed
    assert duplicate_count(tmp_path, "images", "dicom_id") == 0
    assert duplicate_count(tmp_path, "pixels", "dicom_id") == 0
    assert duplicate_count(tmp_path, "reports", "study_id") == 0
    leftovers = [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp") or p.name.endswith(".part")]
    assert leftovers == []


@pytest.mark.parametrize("runner", ["process", "dask"])
def test_ingest_runs_on_processes_and_on_a_dask_cluster(tmp_path, prefect_harness, runner, monkeypatch):
    """The per-shard tasks on a process pool and on a 2-worker Dask LocalCluster give the same tables."""
    from prefect.settings import PREFECT_API_URL

    from flows.full import augment

    # Worker processes read the API from the environment: point them at the test server, not a temporary one each.
    monkeypatch.setenv("PREFECT_API_URL", PREFECT_API_URL.value())

    result = augment(config_path=SMOKE, stop_after="ingest", overrides=overrides(
        tmp_path, "source.studies=24", "ingest.shard_size=8", f"ingest.task_runner={runner}", "ingest.workers=2"))
    summary = result["ingest"]
    assert summary["images_ingested"] > 0
    assert summary["images_ingested"] + summary["images_rejected"] == summary["images_listed"]
    assert len(image_parts(tmp_path)) >= 3  # several shards, spread over the workers
    assert duplicate_count(tmp_path, "images", "dicom_id") == 0
