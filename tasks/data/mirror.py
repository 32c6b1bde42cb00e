"""The PhysioNet layout of MIMIC-CXR (DICOM) and MIMIC-CXR-JPG, versions 2.0.0 and 2.1.0.

<root>/files/p10/p10000032/s50414267/<dicom_id>.dcm (.jpg for MIMIC-CXR-JPG), the report
<root>/files/p10/p10000032/s50414267.txt, the CSVs <root>/mimic-cxr-2.0.0-{metadata,chexpert,negbio,split}.csv.gz
(named 2.0.0 in every version) and <root>/SHA256SUMS.txt. MIMIC-CXR-JPG carries no reports: they are read from a
MIMIC-CXR tree (`reports_root`, the folder that holds its files/).
"""

from __future__ import annotations

import csv
import gzip
from dataclasses import dataclass
from pathlib import Path

from tasks.pathologies import CHEXPERT_LABELS

IMAGE_EXT: dict[str, str] = {"mimic-cxr": "dcm", "mimic-cxr-jpg": "jpg"}

CSV_NAMES: dict[str, str] = {
    kind: f"mimic-cxr-2.0.0-{kind}.csv.gz" for kind in ("metadata", "chexpert", "negbio", "split")
}

# The columns the pipeline reads; the real files may carry more.
CSV_COLUMNS: dict[str, tuple[str, ...]] = {
    "metadata": (
        "dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows", "Columns",
        "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
        "PatientOrientationCodeSequence_CodeMeaning",
    ),
    "chexpert": ("subject_id", "study_id", *CHEXPERT_LABELS),
    "negbio": ("subject_id", "study_id", *CHEXPERT_LABELS),
    "split": ("dicom_id", "study_id", "subject_id", "split"),
}

SHA256SUMS = "SHA256SUMS.txt"


class MirrorError(ValueError):
    """A mirror that cannot be read; the message names the file and the problem."""


@dataclass(frozen=True)
class Mirror:
    dataset: str
    root: Path
    files_root: Path  # <root>/files: the images
    reports_root: Path  # the folder whose files/ holds the reports (<root> itself for MIMIC-CXR)
    image_ext: str  # "dcm" or "jpg", without the dot
    metadata_csv: Path
    chexpert_csv: Path
    negbio_csv: Path
    split_csv: Path

    def image_path(self, subject_id: int, study_id: int, dicom_id: str) -> Path:
        return self.root / image_relpath(subject_id, study_id, dicom_id, self.image_ext)

    def report_path(self, subject_id: int, study_id: int) -> Path:
        return self.reports_root / report_relpath(subject_id, study_id)


def p_folder(subject_id: int) -> str:
    """PhysioNet groups subjects by the first two digits of their id: 10000032 -> 'p10'."""
    return f"p{str(subject_id)[:2]}"


def _study_relpath(subject_id: int, study_id: int) -> str:
    return f"files/{p_folder(subject_id)}/p{subject_id}/s{study_id}"


def image_relpath(subject_id: int, study_id: int, dicom_id: str, ext: str) -> str:
    """'files/p10/p10000032/s50414267/<dicom_id>.dcm' for ext 'dcm'."""
    return f"{_study_relpath(subject_id, study_id)}/{dicom_id}.{ext}"


def report_relpath(subject_id: int, study_id: int) -> str:
    """'files/p10/p10000032/s50414267.txt'."""
    return f"{_study_relpath(subject_id, study_id)}.txt"


def read_csv_header(path: Path) -> list[str]:
    """The column names of a gzip CSV, reading only its first line (the metadata CSV of MIMIC is 377k rows)."""
    try:
        with gzip.open(path, "rt", newline="") as stream:
            first_line = stream.readline()
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise MirrorError(f"{path}: cannot read the header of this gzip CSV: {err}") from None
    if not first_line.strip():
        raise MirrorError(f"{path}: the CSV is empty (no header line)")
    return next(csv.reader([first_line]))


def read_csv_rows(path: Path) -> list[dict[str, str]]:
    """All rows of a gzip CSV as dicts of strings (values are parsed by whoever reads them)."""
    with gzip.open(path, "rt", newline="") as stream:
        return list(csv.DictReader(stream))


def check_mirror(root: Path, dataset: str, reports_root: Path | None = None) -> Mirror:
    """Check that `root` is a MIMIC-CXR(-JPG) mirror the pipeline can read and return its resolved paths.

    reports_root: the folder holding the reports' files/ tree; defaults to `root` for MIMIC-CXR and is required
    for MIMIC-CXR-JPG, which carries no reports.
    """
    if dataset not in IMAGE_EXT:
        raise MirrorError(f"{root}: unknown dataset {dataset!r}; expected one of {sorted(IMAGE_EXT)}")
    root = Path(root)
    if reports_root is None:
        if dataset == "mimic-cxr-jpg":
            raise MirrorError(f"{root}: MIMIC-CXR-JPG carries no reports; give reports_root, a MIMIC-CXR tree "
                              "(the folder holding its files/ with the sXXXXXXXX.txt reports)")
        reports_root = root
    files_root = root / "files"
    reports_root = Path(reports_root)
    for folder in (files_root, reports_root / "files"):
        if not folder.is_dir():
            raise MirrorError(f"{folder}: folder missing; a {dataset} mirror holds files/pXX/pXXXXXXXX/...")
    csvs: dict[str, Path] = {}
    for kind, name in CSV_NAMES.items():
        path = root / name
        if not path.is_file():
            raise MirrorError(f"{path}: file missing from the {dataset} mirror")
        missing = [column for column in CSV_COLUMNS[kind] if column not in read_csv_header(path)]
        if missing:
            raise MirrorError(f"{path}: missing columns {', '.join(missing)}")
        csvs[kind] = path
    return Mirror(
        dataset=dataset, root=root, files_root=files_root, reports_root=reports_root,
        image_ext=IMAGE_EXT[dataset], metadata_csv=csvs["metadata"], chexpert_csv=csvs["chexpert"],
        negbio_csv=csvs["negbio"], split_csv=csvs["split"],
    )


def read_sha256sums(path: Path) -> dict[str, str]:
    """Parse PhysioNet's SHA256SUMS.txt ('<sha256>  <relpath>' lines, as sha256sum writes them) into relpath -> hex."""
    sums: dict[str, str] = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        digest, _, relpath = line.partition(" ")
        relpath = relpath.lstrip(" ").removeprefix("*")  # '*' marks binary mode in sha256sum's output
        if len(digest) != 64 or not relpath or any(c not in "0123456789abcdefABCDEF" for c in digest):
            raise MirrorError(f"{path}, line {number}: not a '<sha256>  <path>' line: {line[:120]!r}")
        sums[relpath] = digest.lower()
    return sums
