import logging
import time
import traceback
from pathlib import Path

import pytest

from physionet_server import PhysioNetServer, serve, write_fake_mirror
from tasks.config import PhysioNetSource
from tasks.data.mirror import CSV_NAMES, image_relpath, report_relpath, SHA256SUMS
from tasks.data.physionet import (
    AuthenticationError, DownloadError, DownloadReport, download, local_mirror, select_studies,
)
from tasks.data.secrets import Credentials, CredentialsError, parse_secret_value, resolve_credentials

USER, PASSWORD = "alice", "Pa55-word:with-colon"
CXR, JPG = "mimic-cxr/2.0.0", "mimic-cxr-jpg/2.0.0"
IMAGE = image_relpath(10000764, 57375967, "096052b7-d256dc40-453a102b-fa7d01c6-1b22c6b4", "dcm")
OTHER_IMAGE = image_relpath(11000011, 51029426, "3f6b5a2c-1d9e8f70-0a4b3c2d-5e6f7a8b-9c0d1e2f", "dcm")


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "physionet" / "mimic-cxr"
    write_fake_mirror(root)
    return root


@pytest.fixture
def server(tree: Path):
    with serve({CXR: tree}, USER, PASSWORD) as running:
        yield running


def files(root: Path) -> dict[str, bytes]:
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in root.rglob("*") if path.is_file()}


def source(server: PhysioNetServer, **settings) -> PhysioNetSource:
    fast = {"base_url": server.base_url, "retries": 2, "backoff_s": 0.01, "timeout_s": 5}
    return PhysioNetSource(kind="physionet", **(fast | settings))


def fetch(server: PhysioNetServer, dest: Path, **settings) -> DownloadReport:
    return download(source(server, **settings), dest, Credentials(USER, PASSWORD), progress=False)


def test_full_download_then_a_second_run_downloads_nothing(server: PhysioNetServer, tree: Path, tmp_path: Path):
    dest = tmp_path / "dest"
    report = fetch(server, dest)
    assert files(dest) == files(tree)  # every file, verified, and no .part left behind
    assert (report.files_downloaded, report.files_skipped, report.rejects) == (len(files(tree)), 0, [])
    assert report.bytes_downloaded == sum(len(data) for data in files(tree).values())
    assert local_mirror(source(server), dest).metadata_csv.is_file()
    assert PASSWORD not in repr(report)

    served = sum(server.requests.values())
    again = fetch(server, dest)
    assert (again.files_downloaded, again.bytes_downloaded, again.files_skipped) == (0, 0, len(files(tree)))
    assert sum(server.requests.values()) == served


def test_a_file_changed_on_disk_is_fetched_again(server: PhysioNetServer, tree: Path, tmp_path: Path):
    dest = tmp_path / "dest"
    fetch(server, dest)
    (dest / IMAGE).write_bytes(b"truncated")
    report = fetch(server, dest)
    assert report.files_downloaded == 1
    assert (dest / IMAGE).read_bytes() == (tree / IMAGE).read_bytes()


def test_a_dropped_connection_is_resumed_with_a_range_request(tmp_path: Path):
    tree = tmp_path / "physionet" / "mimic-cxr"
    write_fake_mirror(tree, image_bytes=300_000)  # several network chunks, so that some arrive before the drop
    size = len((tree / IMAGE).read_bytes())
    with serve({CXR: tree}, USER, PASSWORD) as server:
        server.inject(f"{CXR}/{IMAGE}", "drop")
        report = fetch(server, tmp_path / "dest")
    first, resumed = server.ranges[f"{CXR}/{IMAGE}"]
    offset = int(resumed.removeprefix("bytes=").removesuffix("-"))
    assert first is None and 0 < offset <= size // 2  # what arrived before the drop is kept, not fetched again
    assert (tmp_path / "dest" / IMAGE).read_bytes() == (tree / IMAGE).read_bytes()
    assert report.rejects == []


def test_a_part_file_is_never_taken_for_the_whole_file(server: PhysioNetServer, tree: Path, tmp_path: Path):
    dest = tmp_path / "dest"
    size = len((tree / IMAGE).read_bytes())
    part = dest / f"{IMAGE}.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"\0" * size)  # full length, wrong bytes: left by an earlier, corrupted run
    report = fetch(server, dest)
    # The server answers 416 (nothing left to send); the hash rejects the part and the file is fetched whole.
    assert server.ranges[f"{CXR}/{IMAGE}"] == [f"bytes={size}-", None]
    assert (dest / IMAGE).read_bytes() == (tree / IMAGE).read_bytes()
    assert not part.exists() and report.rejects == []


def test_a_wrong_password_is_a_clear_error_that_never_shows_it(server: PhysioNetServer, tmp_path: Path, caplog):
    wrong = "Wr0ng-Secret-42"
    with caplog.at_level(logging.DEBUG), pytest.raises(AuthenticationError) as raised:
        download(source(server), tmp_path / "dest", Credentials(USER, wrong), progress=False)
    message = str(raised.value)
    assert f"user {USER!r}" in message and f"{server.base_url}/{CXR}/{SHA256SUMS}" in message and "401" in message
    assert caplog.text  # urllib3's debug lines were captured, and must not leak either
    assert wrong not in "".join(traceback.format_exception(raised.value)) + repr(raised.value) + caplog.text


@pytest.mark.parametrize("corruptions", [1, 2])
def test_a_checksum_mismatch_is_fetched_once_more_then_rejected(server: PhysioNetServer, tree: Path,
                                                                tmp_path: Path, corruptions: int):
    server.inject(f"{CXR}/{IMAGE}", *["corrupt"] * corruptions)
    dest = tmp_path / "dest"
    report = fetch(server, dest)
    assert server.requests[f"{CXR}/{IMAGE}"] == 2
    assert not (dest / f"{IMAGE}.part").exists()
    expected = files(tree)
    if corruptions == 1:
        assert report.rejects == []
    else:  # the run goes on without the file
        assert [(r["item_id"], r["reason"], r["stage"], r["item_kind"]) for r in report.rejects] == \
            [(IMAGE, "checksum_mismatch", "download", "file")]
        assert report.rejects[0]["source_path"] == f"{server.base_url}/{CXR}/{IMAGE}"
        assert PASSWORD not in repr(report)
        del expected[IMAGE]
    assert files(dest) == expected


def test_missing_and_unlisted_images_are_rejects(server: PhysioNetServer, tree: Path, tmp_path: Path):
    (tree / IMAGE).unlink()  # listed in SHA256SUMS.txt, gone from the server: 404
    sums = tree / SHA256SUMS
    sums.write_text("".join(line for line in sums.read_text().splitlines(True) if OTHER_IMAGE not in line))
    report = fetch(server, tmp_path / "dest")
    assert sorted((r["item_id"], r["reason"]) for r in report.rejects) == \
        [(IMAGE, "not_found"), (OTHER_IMAGE, "not_in_sha256sums")]
    assert server.requests[f"{CXR}/{OTHER_IMAGE}"] == 0  # never fetched: it could not be verified
    assert report.files_downloaded == len(files(tree)) - 1


def test_a_missing_csv_stops_the_run(server: PhysioNetServer, tree: Path, tmp_path: Path):
    (tree / CSV_NAMES["negbio"]).unlink()
    with pytest.raises(DownloadError, match=rf"{CXR}/mimic-cxr-2\.0\.0-negbio\.csv\.gz: not_found"):
        fetch(server, tmp_path / "dest")


def test_server_errors_are_retried_with_backoff(server: PhysioNetServer, tree: Path, tmp_path: Path):
    server.inject(f"{CXR}/{IMAGE}", 503, 502)
    fetch(server, tmp_path / "dest", retries=2)
    assert server.requests[f"{CXR}/{IMAGE}"] == 3
    assert (tmp_path / "dest" / IMAGE).read_bytes() == (tree / IMAGE).read_bytes()

    server.inject(f"{CXR}/{OTHER_IMAGE}", 500, 500, 500)
    started = time.monotonic()
    with pytest.raises(DownloadError, match=rf"{OTHER_IMAGE}: gave up after 3 attempts; last error: .*HTTP 500"):
        fetch(server, tmp_path / "fresh", retries=2, backoff_s=0.1)
    assert time.monotonic() - started >= 0.1 + 0.2


def test_select_studies_is_sorted_filtered_and_skips_malformed_ids():
    rows = [{"subject_id": s, "study_id": t} for s, t in
            [("11000022", "52000001"), ("10000032", "53189527"), ("10000032", "50414267"),
             ("10000032", "50414267"), ("x1000000", "50000000"), ("12000001", "59999999")]]
    assert select_studies(rows, None, None) == \
        [(10000032, 50414267), (10000032, 53189527), (11000022, 52000001), (12000001, 59999999)]
    assert select_studies(rows, ["p11", "p12"], None) == [(11000022, 52000001), (12000001, 59999999)]
    assert select_studies(rows, None, 1) == [(10000032, 50414267)]


def downloaded_images(dest: Path) -> set[str]:
    return {name for name in files(dest) if name.endswith((".dcm", ".jpg"))}


@pytest.mark.parametrize(("settings", "studies"), [
    ({"p_folders": ["p11"]}, [(11000011, 51029426), (11000022, 52000001)]),
    ({"max_studies": 2}, [(10000032, 50414267), (10000032, 53189527)]),
])
def test_selective_download_fetches_only_the_selected_studies(server: PhysioNetServer, tree: Path,
                                                              tmp_path: Path, settings, studies):
    dest = tmp_path / "dest"
    report = fetch(server, dest, **settings)
    wanted = {name for name in downloaded_images(tree)
              if any(f"/p{subject}/s{study}/" in name for subject, study in studies)}
    assert downloaded_images(dest) == wanted
    assert {path.removeprefix(f"{CXR}/") for path in server.requests if path.endswith(".dcm")} == wanted
    assert {name for name in files(dest) if name.endswith(".txt") and name != SHA256SUMS} == \
        {report_relpath(subject, study) for subject, study in studies}
    assert all((dest / name).is_file() for name in CSV_NAMES.values()) and report.rejects == []


def test_jpg_images_with_reports_from_mimic_cxr(tmp_path: Path):
    jpg_tree, cxr_tree = tmp_path / "physionet" / "mimic-cxr-jpg", tmp_path / "physionet" / "mimic-cxr"
    write_fake_mirror(jpg_tree, "mimic-cxr-jpg", with_reports=False)
    write_fake_mirror(cxr_tree, "mimic-cxr")
    dest = tmp_path / "dest"
    with serve({JPG: jpg_tree, CXR: cxr_tree}, USER, PASSWORD) as server:
        cfg = source(server, dataset="mimic-cxr-jpg", reports_url=f"{server.base_url}/{CXR}", max_studies=1)
        report = download(cfg, dest, Credentials(USER, PASSWORD), progress=False)
        assert sorted(path for path in server.requests if path.startswith(CXR)) == \
            [f"{CXR}/{SHA256SUMS}", f"{CXR}/{report_relpath(10000032, 50414267)}"]
    mirror = local_mirror(cfg, dest)
    assert mirror.report_path(10000032, 50414267).read_bytes() == \
        (cxr_tree / report_relpath(10000032, 50414267)).read_bytes()
    jpg = image_relpath(10000032, 50414267, "02aa804e-bde0afdd-112c0b34-7bc16630-4e384014", "jpg")
    assert downloaded_images(dest) == {jpg} and report.rejects == []

    with pytest.raises(DownloadError, match="reports_url"):
        download(cfg.model_copy(update={"reports_url": None}), dest, Credentials(USER, PASSWORD), progress=False)


def test_credentials_never_show_the_password():
    credentials = Credentials(USER, PASSWORD)
    assert repr(credentials) == str(credentials) == f"Credentials(username={USER!r})"


def test_credentials_from_the_environment(monkeypatch):
    cfg = PhysioNetSource(kind="physionet", username_env="TEST_PN_USER", password_env="TEST_PN_PASSWORD")
    monkeypatch.setenv("TEST_PN_USER", USER)
    monkeypatch.setenv("TEST_PN_PASSWORD", PASSWORD)
    assert resolve_credentials(cfg) == Credentials(USER, PASSWORD)
    monkeypatch.delenv("TEST_PN_PASSWORD")
    with pytest.raises(CredentialsError, match="environment variable\\(s\\) TEST_PN_PASSWORD, or name a Prefect"):
        resolve_credentials(cfg)


def test_secret_block_value_is_parsed_without_echoing_it():
    assert parse_secret_value(f"{USER}:{PASSWORD}", "physionet") == Credentials(USER, PASSWORD)
    for bad in ("no-colon-secret", ":only-password", {"username": USER}):
        with pytest.raises(CredentialsError, match="'physionet' must hold") as raised:
            parse_secret_value(bad, "physionet")
        assert str(bad) not in str(raised.value)


def test_credentials_from_a_prefect_secret_block(prefect_harness):
    from prefect.blocks.system import Secret

    Secret(value=f"{USER}:{PASSWORD}").save("physionet-test", overwrite=True)
    cfg = PhysioNetSource(kind="physionet", secret_block="physionet-test")
    assert resolve_credentials(cfg) == Credentials(USER, PASSWORD)
    with pytest.raises(CredentialsError, match="'no-such-block'"):
        resolve_credentials(cfg.model_copy(update={"secret_block": "no-such-block"}))
