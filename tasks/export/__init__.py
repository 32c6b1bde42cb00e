"""Synthetic sets exported for the tools hospitals already use: DICOM (dicom.py) and MIMIC-CXR-JPG (mimic_jpg.py),
both in the PhysioNet layout with MIMIC's CSVs (tree.py)."""

from __future__ import annotations

from pathlib import Path

from tasks import layout
from tasks.export.dicom import export_dicom
from tasks.export.mimic_jpg import export_mimic_jpg
from tasks.export.tree import synthetic_images

FORMATS = {"dicom": export_dicom, "mimic-cxr-jpg": export_mimic_jpg}


def export_set(data_root: Path, output_id: str, export_format: str, dest: Path | None = None) -> Path:
    """Export every stored image of a generator output in a format of FORMATS, under dest (default:
    layout.export_dir); returns the folder written."""
    if export_format not in FORMATS:
        raise ValueError(f"unknown export format {export_format!r}; expected one of {sorted(FORMATS)}")
    dest = layout.export_dir(data_root, output_id, export_format) if dest is None else Path(dest)
    return FORMATS[export_format](synthetic_images(data_root, output_id), dest)
