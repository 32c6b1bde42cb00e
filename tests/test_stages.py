"""Stage fingerprints: a stage reruns exactly when its config sections, input files or code change."""

import json
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from prefect import flow

from flows.full import run_stage
from tasks import metrics, pathologies, stages
from tasks.config import load_config

CONFIG = """
run: {name: t, data_root: %s}
source: {kind: demo, studies: 10}
ingest: {resolution: 64}
"""


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(CONFIG % (tmp_path / "data"))
    (tmp_path / "data" / "tables" / "images").mkdir(parents=True)
    (tmp_path / "data" / "tables" / "images" / "a.parquet").write_bytes(b"one")
    return path


def fp(config_path: Path, overrides=(), modules=(pathologies,)) -> str:
    config = load_config(config_path, list(overrides))
    inputs = stages.StageInputs(sections=("curate",), files=((config.run.data_root / "tables", "*/*.parquet"),),
                                modules=modules, sql=("generator_cohort",))
    return stages.fingerprint(config, inputs)


def test_unchanged_inputs_give_the_same_fingerprint(config_path):
    assert fp(config_path) == fp(config_path)


def test_other_sections_do_not_count(config_path):
    assert fp(config_path, ["ingest.resolution=128"]) == fp(config_path)


def test_its_section_counts(config_path):
    assert fp(config_path, ["curate.uncertainty=ones"]) != fp(config_path)


def test_input_content_counts_and_temp_files_do_not(config_path):
    before = fp(config_path)
    images = config_path.parent / "data" / "tables" / "images"
    (images / ".b.parquet.123.tmp").write_bytes(b"half-written")
    assert fp(config_path) == before
    (images / "a.parquet").write_bytes(b"two")
    assert fp(config_path) != before
    (images / "a.parquet").write_bytes(b"one")
    assert fp(config_path) == before  # content, not mtime, for small files
    (images / "b.parquet").write_bytes(b"new part")
    assert fp(config_path) != before


def test_code_counts(config_path):
    assert fp(config_path, modules=(pathologies, metrics)) != fp(config_path)


def test_completed_summary_only_for_the_same_fingerprint(tmp_path):
    assert stages.completed_summary(tmp_path, "curate", "abc") is None
    stages.record_completed(tmp_path, "curate", "abc", "config-1", {"images": 3})
    assert stages.completed_summary(tmp_path, "curate", "abc") == {"images": 3}
    assert stages.completed_summary(tmp_path, "curate", "def") is None


def test_config_and_code_fingerprint_ignores_the_data_only(config_path):
    def config_and_code(overrides=(), modules=(pathologies,)):
        config = load_config(config_path, list(overrides))
        inputs = stages.StageInputs(sections=("curate",), files=((config.run.data_root / "tables", "*/*.parquet"),),
                                    modules=modules)
        return stages.config_and_code_fingerprint(config, inputs)

    before = config_and_code()
    (config_path.parent / "data" / "tables" / "images" / "b.parquet").write_bytes(b"new studies")
    assert config_and_code() == before
    assert config_and_code(["curate.uncertainty=ones"]) != before
    assert config_and_code(modules=(pathologies, metrics)) != before


def test_recent_summary_needs_the_same_config_and_code_and_a_young_enough_run(tmp_path):
    stages.record_completed(tmp_path, "train_generator", "fp-1", "config-1", {"generator_id": "g1"})
    week = timedelta(days=7)
    assert stages.recent_summary(tmp_path, "train_generator", "config-1", week) == {"generator_id": "g1"}
    assert stages.recent_summary(tmp_path, "train_generator", "config-2", week) is None
    assert stages.recent_summary(tmp_path, "tokenize", "config-1", week) is None
    record_path = tmp_path / "stages" / "train_generator.json"
    record = json.loads(record_path.read_text())
    record["completed_at"] = (datetime.now(UTC) - timedelta(days=8)).isoformat()
    record_path.write_text(json.dumps(record))
    assert stages.recent_summary(tmp_path, "train_generator", "config-1", week) is None
    assert stages.recent_summary(tmp_path, "train_generator", "config-1", timedelta(days=9)) == {"generator_id": "g1"}


def test_the_flow_keeps_a_recent_stage_when_only_its_data_changed(config_path, prefect_harness):
    config = load_config(config_path)
    images = config.run.data_root / "tables" / "images"
    inputs = stages.StageInputs(sections=("curate",), files=((images, "*.parquet"),), modules=(pathologies,))
    runs = []

    def subflow():
        runs.append(len(runs) + 1)
        return {"vqgan_id": "v1", "run": runs[-1]}

    @flow
    def stage(keep_for: timedelta | None, refusal: str | None = None):
        return run_stage(config, "train_generator", inputs, subflow, keep_for, lambda summary: refusal)

    week = timedelta(days=7)
    assert stage(week) == {"vqgan_id": "v1", "run": 1}
    assert stage(week)["run"] == 1  # nothing changed: skipped
    (images / "b.parquet").write_bytes(b"new studies")
    assert stage(week)["run"] == 1  # only the data changed, and the run is recent: kept
    assert stage(None)["run"] == 2  # without keep_for new data reruns the stage
    (images / "c.parquet").write_bytes(b"more studies")
    assert stage(week, "the tokens are another VQ-GAN's")["run"] == 3  # it would be kept, but is refused
    config = load_config(config_path, ["curate.uncertainty=ones"])
    assert stage(week)["run"] == 4  # a config change always reruns it


def test_a_second_run_on_the_data_root_waits_for_the_first(tmp_path):
    holding, release = threading.Event(), threading.Event()

    def first_run():
        with stages.exclusive_data_root(tmp_path, on_wait=pytest.fail):
            holding.set()
            release.wait(10)

    first = threading.Thread(target=first_run)
    first.start()
    holding.wait(10)
    waits = []
    second = threading.Thread(target=lambda: stages.exclusive_data_root(tmp_path, waits.append).__enter__())
    second.start()
    second.join(0.5)
    assert second.is_alive() and waits == [f"another run is working on {tmp_path}; waiting until it finishes"]
    release.set()
    first.join(10)
    second.join(10)
    assert not second.is_alive()  # it got the lock once the first let go


def test_a_killed_holder_leaves_the_data_root_free(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom tasks import stages\n"
                               f"with stages.exclusive_data_root({str(tmp_path)!r}, print):\n"
                               "    print('held', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.kill()
    holder.wait(10)
    with stages.exclusive_data_root(tmp_path, on_wait=pytest.fail):
        pass
