"""The per-shard ingest worker: image files -> one pixel shard plus its rows in images, pixels and rejects.

Order makes a shard all-or-nothing: the .npy first, then the Parquet parts, "images" last. A shard whose images
part exists is complete; a run killed earlier leaves at most an orphan .npy (or pixels/rejects parts) that the
re-run, given the same shard name by the caller, overwrites. Every item ends up in images or in rejects.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.data import catalog
from tasks.data.dicom import decode_dicom, decode_jpg, DicomHeader, ImageRejected, read_source
from tasks.data.pixels import write_shard

# Keyed by the mirror's image extension (tasks.data.mirror.IMAGE_EXT).
LOADERS = {"dcm": decode_dicom, "jpg": decode_jpg}


@dataclass(frozen=True)
class ImageItem:
    dicom_id: str
    subject_id: int
    study_id: int
    view_position: str | None
    source_path: Path  # absolute
    sha256: str | None  # from SHA256SUMS.txt when the source publishes it; None: hashed from the bytes read


@dataclass(frozen=True)
class ShardCounts:
    shard: str
    ingested: int
    rejected: int


def ingest_shard(data_root: Path, shard: str, items: list[ImageItem], resolution: int,
                 loader: str = "dcm") -> ShardCounts:
    """Decode `items` into pixels/<resolution>/<shard>.npy and write the shard's table parts.

    Bad input never raises: each failed item is a rejects row. `loader` is the image extension, "dcm" or "jpg".
    """
    if loader not in LOADERS:
        raise ValueError(f"unknown image loader {loader!r}; expected one of {sorted(LOADERS)}")
    decode = LOADERS[loader]
    images = np.empty((len(items), resolution, resolution), dtype=np.uint8)
    image_rows: list[dict] = []
    pixel_rows: list[dict] = []
    reject_rows: list[dict] = []
    for item in items:
        try:
            data = read_source(item.source_path)
            pixels, header = decode(data, item.source_path, resolution)
        except ImageRejected as err:
            reject_rows.append({
                "item_id": item.dicom_id, "item_kind": "image", "stage": "ingest", "reason": err.reason,
                "detail": err.detail, "source_path": str(item.source_path),
            })
            continue
        row = len(image_rows)
        images[row] = pixels
        image_rows.append(_image_row(item, header, item.sha256 or hashlib.sha256(data).hexdigest()))
        pixel_rows.append({"dicom_id": item.dicom_id, "resolution": resolution, "shard": shard, "shard_row": row})
    write_shard(data_root, resolution, shard, images[:len(image_rows)])
    catalog.write_part(data_root, "pixels", shard, pixel_rows)
    catalog.write_part(data_root, "rejects", shard, reject_rows)
    catalog.write_part(data_root, "images", shard, image_rows)
    return ShardCounts(shard=shard, ingested=len(image_rows), rejected=len(reject_rows))


def _image_row(item: ImageItem, header: DicomHeader, sha256: str) -> dict:
    return {
        "dicom_id": item.dicom_id, "subject_id": item.subject_id, "study_id": item.study_id,
        # The metadata CSV's view is the source of truth in MIMIC; the file's tag fills in when the CSV has none.
        "view_position": item.view_position or header.view_position,
        "rows": header.rows, "columns": header.columns, "photometric": header.photometric,
        "source_path": str(item.source_path), "sha256": sha256, "status": "ingested",
    }
