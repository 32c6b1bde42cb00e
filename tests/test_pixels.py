"""The per-shard ingest worker (tasks.data.ingest_images) and the memory-mapped pixel store (tasks.data.pixels)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from test_dicom import dicom_dataset, phantom, save

from tasks import layout
from tasks.data import catalog
from tasks.data.dicom import load_dicom
from tasks.data.ingest_images import ImageItem, ingest_shard
from tasks.data.pixels import PixelStore, write_shard

RESOLUTION = 32


def table_rows(data_root: Path, table: str) -> list[dict]:
    with catalog.connect(data_root) as con:
        return con.table(table).to_arrow_table().to_pylist()


def item(path: Path, dicom_id: str, sha256: str | None = None) -> ImageItem:
    return ImageItem(dicom_id=dicom_id, subject_id=10000032, study_id=50414267, view_position="AP",
                     source_path=path, sha256=sha256)


@pytest.fixture
def mixed_items(tmp_path) -> list[ImageItem]:
    """Three good films (one MONOCHROME1, one with a published checksum) among a truncated and a missing file."""
    source = tmp_path / "source"
    source.mkdir()
    good = [save(dicom_dataset(phantom(70 + 10 * index, 60), photometric), source / f"good{index}.dcm")
            for index, photometric in enumerate(["MONOCHROME2", "MONOCHROME1", "MONOCHROME2"])]
    truncated = source / "truncated.dcm"
    truncated.write_bytes(good[0].read_bytes()[:1000])
    return [
        item(good[0], "good-0"),
        item(truncated, "bad-truncated"),
        item(good[1], "good-1", sha256="published-checksum"),
        item(source / "absent.dcm", "bad-missing"),
        item(good[2], "good-2"),
    ]


def test_mixed_shard_ingests_the_good_and_rejects_the_bad(tmp_path, mixed_items):
    data_root = tmp_path / "data"
    assert not catalog.part_exists(data_root, "images", "images-a")
    counts = ingest_shard(data_root, "images-a", mixed_items, RESOLUTION)
    assert (counts.ingested, counts.rejected) == (3, 2)
    assert catalog.part_exists(data_root, "images", "images-a")

    images = {row["dicom_id"]: row for row in table_rows(data_root, "images")}
    assert sorted(images) == ["good-0", "good-1", "good-2"]
    assert {row["status"] for row in images.values()} == {"ingested"}
    assert (images["good-1"]["photometric"], images["good-1"]["rows"], images["good-1"]["columns"]) == \
        ("MONOCHROME1", 80, 60)
    assert images["good-1"]["sha256"] == "published-checksum"
    assert images["good-0"]["sha256"] == hashlib.sha256(mixed_items[0].source_path.read_bytes()).hexdigest()

    rejects = {row["item_id"]: row for row in table_rows(data_root, "rejects")}
    assert {dicom_id: row["reason"] for dicom_id, row in rejects.items()} == \
        {"bad-truncated": "truncated", "bad-missing": "missing_file"}
    assert {(row["stage"], row["item_kind"]) for row in rejects.values()} == {("ingest", "image")}
    assert "absent.dcm" in rejects["bad-missing"]["detail"]

    pixels = table_rows(data_root, "pixels")
    assert sorted((row["dicom_id"], row["shard_row"]) for row in pixels) == \
        [("good-0", 0), ("good-1", 1), ("good-2", 2)]
    assert np.load(layout.pixel_shard(data_root, RESOLUTION, "images-a")).shape == (3, RESOLUTION, RESOLUTION)


def test_pixel_store_returns_what_load_dicom_decodes(tmp_path, mixed_items):
    data_root = tmp_path / "data"
    ingest_shard(data_root, "images-a", mixed_items[:2], RESOLUTION)
    ingest_shard(data_root, "images-b", mixed_items[2:], RESOLUTION)
    store = PixelStore(data_root, RESOLUTION)
    assert len(store) == 3
    expected = {entry.dicom_id: load_dicom(entry.source_path, RESOLUTION)[0]
                for entry in mixed_items if entry.dicom_id.startswith("good")}
    np.testing.assert_array_equal(store.get("good-1"), expected["good-1"])
    order = ["good-2", "good-0", "good-1", "good-2"]  # across both shards, out of order, one repeated
    np.testing.assert_array_equal(store.get_many(order), np.stack([expected[dicom_id] for dicom_id in order]))
    with pytest.raises(KeyError, match="bad-missing"):
        store.get("bad-missing")


def test_rerun_replaces_the_shard_and_adds_no_duplicate_rows(tmp_path, mixed_items):
    data_root = tmp_path / "data"
    # A run killed after writing a (here garbage) .npy and before its parts: the re-run overwrites it.
    write_shard(data_root, RESOLUTION, "images-a", np.full((1, RESOLUTION, RESOLUTION), 7, dtype=np.uint8))
    first = ingest_shard(data_root, "images-a", mixed_items, RESOLUTION)
    second = ingest_shard(data_root, "images-a", mixed_items, RESOLUTION)
    assert first == second
    for table, expected_rows in (("images", 3), ("pixels", 3), ("rejects", 2)):
        assert len(table_rows(data_root, table)) == expected_rows, table
    np.testing.assert_array_equal(PixelStore(data_root, RESOLUTION).get("good-0"),
                                  load_dicom(mixed_items[0].source_path, RESOLUTION)[0])
    leftovers = [path.name for path in layout.pixel_shard(data_root, RESOLUTION, "images-a").parent.iterdir()]
    assert leftovers == ["images-a.npy"]  # no temporary files left behind


def test_all_rejected_shard_is_complete_and_empty(tmp_path, mixed_items):
    data_root = tmp_path / "data"
    counts = ingest_shard(data_root, "images-bad", [mixed_items[1], mixed_items[3]], RESOLUTION)
    assert (counts.ingested, counts.rejected) == (0, 2)
    assert catalog.part_exists(data_root, "images", "images-bad")
    assert len(PixelStore(data_root, RESOLUTION)) == 0


def test_unknown_loader_is_a_clear_error(tmp_path, mixed_items):
    with pytest.raises(ValueError, match="png"):
        ingest_shard(tmp_path, "images-a", mixed_items, RESOLUTION, loader="png")
