"""Stage fingerprints: a stage reruns exactly when its config sections, input files or code change."""

from pathlib import Path

import pytest

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
    stages.record_completed(tmp_path, "curate", "abc", {"images": 3})
    assert stages.completed_summary(tmp_path, "curate", "abc") == {"images": 3}
    assert stages.completed_summary(tmp_path, "curate", "def") is None
