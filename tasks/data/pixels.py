"""Preprocessed pixels in memory-mapped shards: <data_root>/pixels/<resolution>/<shard>.npy, [n, R, R] uint8.

A shard is written to a temporary name and renamed into place, so a reader never sees half of one. Row i of a
shard belongs to the dicom_id that the "pixels" table places at (shard, shard_row=i).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tasks import layout
from tasks.data import catalog


def write_shard(data_root: Path, resolution: int, shard: str, images: np.ndarray) -> Path:
    """Write (or replace) one shard atomically; `images` is [n, resolution, resolution] uint8."""
    return write_images(layout.pixel_shard(data_root, resolution, shard), resolution, images)


def write_images(path: Path, resolution: int, images: np.ndarray) -> Path:
    """Write (or replace) a shard at any path (synthetic images use their own folders), atomically."""
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (resolution, resolution):
        raise ValueError(f"shard {path}: expected uint8 [n, {resolution}, {resolution}], got "
                         f"{images.dtype} {list(images.shape)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as handle:  # a file handle, or np.save would append ".npy" to the temporary name
        np.save(handle, images)
    os.replace(tmp, path)
    return path


class PixelStore:
    """Read-only access to one resolution's pixels by dicom_id; shards are memory-mapped on first use."""

    def __init__(self, data_root: Path, resolution: int):
        self.data_root = Path(data_root)
        self.resolution = resolution
        with catalog.connect(self.data_root) as con:
            rows = con.execute(catalog.read_sql("pixel_locations"), [resolution]).fetchall()
        self._locations: dict[str, tuple[str, int]] = {dicom_id: (shard, row) for dicom_id, shard, row in rows}
        self._shards: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self._locations)

    def get(self, dicom_id: str) -> np.ndarray:
        """One image, [R, R] uint8 (a read-only view into the memory-mapped shard)."""
        try:
            shard, row = self._locations[dicom_id]
        except KeyError:
            raise KeyError(f"{dicom_id}: no pixels at resolution {self.resolution} under {self.data_root}") from None
        return self._shard(shard)[row]

    def get_many(self, dicom_ids: Sequence[str]) -> np.ndarray:
        """Images in the order asked, [n, R, R] uint8 (a copy)."""
        out = np.empty((len(dicom_ids), self.resolution, self.resolution), dtype=np.uint8)
        for index, dicom_id in enumerate(dicom_ids):
            out[index] = self.get(dicom_id)
        return out

    def _shard(self, shard: str) -> np.ndarray:
        if shard not in self._shards:
            path = layout.pixel_shard(self.data_root, self.resolution, shard)
            self._shards[shard] = open_images(path, self.resolution)
        return self._shards[shard]


def open_images(path: Path, resolution: int) -> np.ndarray:
    """A shard written by write_images, memory-mapped read-only: [n, resolution, resolution] uint8."""
    try:
        images = np.load(path, mmap_mode="r")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: shard listed in the catalog is missing") from None
    if images.ndim != 3 or images.shape[1:] != (resolution, resolution):
        raise ValueError(f"{path}: shape {list(images.shape)} is not [n, {resolution}, {resolution}]")
    return images
