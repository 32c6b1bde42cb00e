import csv
import gzip
import io
from pathlib import Path

import pytest

from tasks.data.mirror import (
    CSV_NAMES, MirrorError, check_mirror, image_relpath, read_csv_header, read_sha256sums, report_relpath,
)
from physionet_server import write_fake_mirror


@pytest.fixture
def mirror_root(tmp_path: Path) -> Path:
    write_fake_mirror(tmp_path / "mimic-cxr")
    return tmp_path / "mimic-cxr"


def test_relpaths_follow_physionet_layout():
    assert image_relpath(10000032, 50414267, "02aa804e-bde0afdd", "dcm") == \
        "files/p10/p10000032/s50414267/02aa804e-bde0afdd.dcm"
    assert report_relpath(19999987, 58971208) == "files/p19/p19999987/s58971208.txt"


def test_check_mirror_resolves_paths_of_a_dicom_mirror(mirror_root: Path):
    mirror = check_mirror(mirror_root, "mimic-cxr")
    assert mirror.image_ext == "dcm"
    assert mirror.metadata_csv == mirror_root / "mimic-cxr-2.0.0-metadata.csv.gz"
    assert mirror.split_csv == mirror_root / "mimic-cxr-2.0.0-split.csv.gz"
    assert mirror.image_path(10000032, 50414267, "02aa804e-bde0afdd-112c0b34-7bc16630-4e384014").is_file()
    assert mirror.report_path(10000032, 50414267).read_text().startswith("FINAL REPORT")


def test_jpg_mirror_reads_reports_from_a_mimic_cxr_tree(tmp_path: Path, mirror_root: Path):
    jpg_root = tmp_path / "mimic-cxr-jpg"
    write_fake_mirror(jpg_root, "mimic-cxr-jpg", with_reports=False)
    with pytest.raises(MirrorError, match="reports_root"):
        check_mirror(jpg_root, "mimic-cxr-jpg")
    mirror = check_mirror(jpg_root, "mimic-cxr-jpg", reports_root=mirror_root)
    assert mirror.image_path(10000764, 57375967, "096052b7-d256dc40-453a102b-fa7d01c6-1b22c6b4").suffix == ".jpg"
    assert mirror.image_path(10000764, 57375967, "096052b7-d256dc40-453a102b-fa7d01c6-1b22c6b4").is_file()
    assert mirror.report_path(10000764, 57375967).is_file()


def test_missing_csv_is_named(mirror_root: Path):
    (mirror_root / CSV_NAMES["negbio"]).unlink()
    with pytest.raises(MirrorError, match=r"mimic-cxr-2\.0\.0-negbio\.csv\.gz: file missing"):
        check_mirror(mirror_root, "mimic-cxr")


def test_missing_files_folder_is_named(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(MirrorError, match=r"empty/files: folder missing"):
        check_mirror(tmp_path / "empty", "mimic-cxr")


def test_missing_columns_are_named_with_their_csv(mirror_root: Path):
    path = mirror_root / CSV_NAMES["metadata"]
    with gzip.open(path, "rt", newline="") as stream:
        rows = list(csv.reader(stream))
    keep = [i for i, name in enumerate(rows[0]) if name not in ("ViewPosition", "StudyDate")]
    text = io.StringIO()
    csv.writer(text).writerows([[row[i] for i in keep] for row in rows])
    path.write_bytes(gzip.compress(text.getvalue().encode()))
    with pytest.raises(MirrorError) as raised:
        check_mirror(mirror_root, "mimic-cxr")
    assert str(raised.value) == f"{path}: missing columns ViewPosition, StudyDate"


def test_a_csv_that_is_not_gzip_is_a_clear_error(mirror_root: Path):
    path = mirror_root / CSV_NAMES["split"]
    path.write_text("dicom_id,study_id,subject_id,split\n")
    with pytest.raises(MirrorError, match=r"split\.csv\.gz: cannot read the header"):
        read_csv_header(path)


def test_read_sha256sums_parses_sha256sum_output(tmp_path: Path):
    digest = "ab" * 32
    path = tmp_path / "SHA256SUMS.txt"
    path.write_text(f"{digest}  files/p10/p10000032/s50414267.txt\n\n{digest.upper()} *LICENSE.txt\n")
    assert read_sha256sums(path) == {"files/p10/p10000032/s50414267.txt": digest, "LICENSE.txt": digest}


def test_read_sha256sums_names_the_bad_line(tmp_path: Path):
    path = tmp_path / "SHA256SUMS.txt"
    path.write_text(f"{'ab' * 32}  LICENSE.txt\n<html>Login</html>\n")
    with pytest.raises(MirrorError, match=r"SHA256SUMS\.txt, line 2: not a"):
        read_sha256sums(path)
