"""A synthetic set in the MIMIC-CXR-JPG layout (tree.py): files/pXX/p<subject>/s<study>/<dicom_id>.jpg with the
metadata, chexpert, negbio and split CSVs, so tools that read MIMIC-CXR-JPG (torchxrayvision's MIMIC_Dataset, this
project's ingest with source.dataset=mimic-cxr-jpg) read it as they read MIMIC. The JPEGs are greyscale at QUALITY,
as MIMIC-CXR-JPG's are (lossy). Each study's report, whose IMPRESSION is the prompt, lies beside its folder."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

from tasks.export.tree import SyntheticImage, write_tree

QUALITY = 95  # MIMIC-CXR-JPG was written at quality 95


def jpg_bytes(item: SyntheticImage) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(item.image, mode="L").save(buffer, format="JPEG", quality=QUALITY)
    return buffer.getvalue()


def export_mimic_jpg(items: list[SyntheticImage], dest: Path) -> Path:
    return write_tree(dest, items, "jpg", jpg_bytes)
