"""Credentialed, resumable, verified download of MIMIC-CXR / MIMIC-CXR-JPG from PhysioNet into a local mirror.

Order: SHA256SUMS.txt, the four CSVs, the selected studies' reports, then only the selected studies' images. A file
is written to '<name>.part' (resumed with an HTTP Range request after a dropped connection) and takes its real name
only once its SHA256 matches SHA256SUMS.txt, so a file under its real name is always a verified one. The password
goes into the Authorization header only: never into a URL, a message, a log line or the report.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import requests
from requests.auth import HTTPBasicAuth

from tasks.config import PhysioNetSource
from tasks.data.mirror import (
    CSV_NAMES, IMAGE_EXT, SHA256SUMS, Mirror, check_mirror, image_relpath, p_folder, read_csv_rows, read_sha256sums,
    report_relpath,
)
from tasks.data.secrets import Credentials
from tasks.progress import ProgressBar

log = logging.getLogger(__name__)

# Bytes per read from the network: a dropped connection loses the chunk in flight (urllib3 drops a partial read),
# so the resume point is at most this far behind what arrived.
_CHUNK = 1 << 16


class DownloadError(RuntimeError):
    """A download that cannot go on (a required file missing or corrupt, the server unreachable)."""


class AuthenticationError(DownloadError):
    """PhysioNet refused the credentials (HTTP 401/403)."""


class _ServerError(Exception):
    """An HTTP 5xx: worth retrying."""


@dataclass
class DownloadReport:
    files_downloaded: int = 0
    files_skipped: int = 0  # already present with the right SHA256
    bytes_downloaded: int = 0
    rejects: list[dict] = field(default_factory=list)  # rows of the catalog's "rejects" table


def study_key(row: Mapping[str, object]) -> tuple[int, int] | None:
    """(subject_id, study_id) of a CSV row, or None when an id is not an integer (ingestion rejects such rows)."""
    try:
        return int(row["subject_id"]), int(row["study_id"])
    except (TypeError, ValueError):
        return None


def select_studies(metadata_rows: Iterable[Mapping[str, object]], p_folders: Sequence[str] | None,
                   max_studies: int | None) -> list[tuple[int, int]]:
    """The (subject_id, study_id) pairs a run works on: those in `p_folders` (None: all), sorted by subject then
    study, the first `max_studies` (None: all). Download and ingestion both call this, so they agree."""
    studies = {key for key in map(study_key, metadata_rows)
               if key is not None and (p_folders is None or p_folder(key[0]) in p_folders)}
    return sorted(studies)[:max_studies]


def reports_root(source_cfg: PhysioNetSource, dest: Path) -> Path:
    """Where the reports land: MIMIC-CXR-JPG has none, so MIMIC-CXR's are kept in a tree of their own."""
    return dest / "reports" if source_cfg.dataset == "mimic-cxr-jpg" else dest


def local_mirror(source_cfg: PhysioNetSource, dest: Path) -> Mirror:
    """The downloaded tree, checked and opened as a local mirror."""
    return check_mirror(dest, source_cfg.dataset, reports_root(source_cfg, dest))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class _Fetcher:
    session: requests.Session
    cfg: PhysioNetSource
    username: str
    report: DownloadReport
    bar: ProgressBar

    def checksums(self, base_url: str, root: Path) -> dict[str, str]:
        """SHA256SUMS.txt of `base_url`, fetched once. It is the trust anchor, nothing lists its hash, so it is
        fetched whole (never resumed) and a complete response (urllib3 enforces Content-Length) makes it whole."""
        target = root / SHA256SUMS
        if target.is_file():
            self.report.files_skipped += 1
        else:
            url = f"{base_url}/{SHA256SUMS}"
            part = target.with_name(target.name + ".part")
            part.unlink(missing_ok=True)
            if not self._get(url, part):
                raise DownloadError(f"{url}: not found (HTTP 404); check source.base_url, dataset and version")
            os.replace(part, target)
            self.report.files_downloaded += 1
        return read_sha256sums(target)

    def fetch(self, base_url: str, root: Path, relpath: str, sums: Mapping[str, str], required: bool) -> None:
        """Download `relpath` unless it is already there and verified. A missing or corrupt optional file becomes a
        reject; a required one stops the run."""
        url = f"{base_url}/{relpath}"
        expected = sums.get(relpath)
        if expected is None:
            self._reject(relpath, url, "not_in_sha256sums", f"{relpath} is not listed in {base_url}/{SHA256SUMS}",
                         required)
            return
        target = root / relpath
        if target.is_file():
            if _sha256(target) == expected:
                self.report.files_skipped += 1
                return
            target.unlink()  # changed on disk: only verified files may keep the real name
        part = target.with_name(target.name + ".part")
        for _ in range(2):  # a mismatch discards the part and fetches the whole file once more
            if not self._get(url, part):
                self._reject(relpath, url, "not_found", f"HTTP 404 for {url}", required)
                return
            actual = _sha256(part)
            if actual == expected:
                os.replace(part, target)
                self.report.files_downloaded += 1
                self.bar.set_postfix(files=self.report.files_downloaded, refresh=False)
                return
            part.unlink()
        self._reject(relpath, url, "checksum_mismatch",
                     f"sha256 {actual}, SHA256SUMS.txt says {expected} (downloaded twice)", required)

    def _reject(self, relpath: str, url: str, reason: str, detail: str, required: bool) -> None:
        if required:
            raise DownloadError(f"{url}: {reason}: {detail}")
        log.warning("rejected %s: %s (%s)", url, reason, detail)
        self.report.rejects.append({"item_id": relpath, "item_kind": "file", "stage": "download", "reason": reason,
                                    "detail": detail, "source_path": url})

    def _get(self, url: str, part: Path) -> bool:
        """Complete `part` from `url`, retrying transient failures with exponential backoff. False on HTTP 404."""
        for attempt in range(self.cfg.retries + 1):
            if attempt:
                time.sleep(self.cfg.backoff_s * 2 ** (attempt - 1))
            try:
                return self._get_once(url, part)
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
                    _ServerError) as err:
                failure = f"{type(err).__name__}: {err}"
                log.warning("attempt %d/%d for %s failed: %s", attempt + 1, self.cfg.retries + 1, url, failure)
        raise DownloadError(f"{url}: gave up after {self.cfg.retries + 1} attempts; last error: {failure}")

    def _get_once(self, url: str, part: Path) -> bool:
        offset = part.stat().st_size if part.exists() else 0
        # identity: a Range must count the file's bytes, not those of a gzip-encoded response
        headers = {"Accept-Encoding": "identity"} | ({"Range": f"bytes={offset}-"} if offset else {})
        with self.session.get(url, headers=headers, stream=True, timeout=self.cfg.timeout_s) as response:
            status = response.status_code
            if status in (401, 403):
                raise AuthenticationError(
                    f"PhysioNet refused user {self.username!r} for {url} (HTTP {status}): check the username and "
                    f"password, and that this account has signed the data use agreement of {self.cfg.dataset}")
            if status == 404:
                return False
            if status == 416:  # the part already holds every byte; its hash decides whether it is the file
                return True
            if status >= 500:
                raise _ServerError(f"HTTP {status}")
            if status not in (200, 206):
                raise DownloadError(f"{url}: unexpected HTTP {status}")
            resumed = status == 206
            if resumed and not response.headers.get("Content-Range", "").startswith(f"bytes {offset}-"):
                raise DownloadError(f"{url}: asked for bytes from {offset}, got Content-Range "
                                    f"{response.headers.get('Content-Range')!r}")
            part.parent.mkdir(parents=True, exist_ok=True)
            # A server that ignores Range answers 200 with the whole file: start the part over.
            with part.open("ab" if resumed else "wb") as out:
                for chunk in response.iter_content(_CHUNK):
                    out.write(chunk)
                    self.report.bytes_downloaded += len(chunk)
                    self.bar.update(len(chunk))
        return True


def download(source_cfg: PhysioNetSource, dest: Path, credentials: Credentials,
             progress: bool = True) -> DownloadReport:
    """Mirror the selected part of the configured PhysioNet project under `dest`; see the module docstring."""
    if source_cfg.dataset == "mimic-cxr-jpg" and not source_cfg.reports_url:
        raise DownloadError("mimic-cxr-jpg carries no reports: set source.reports_url to a MIMIC-CXR project "
                            "(e.g. https://physionet.org/files/mimic-cxr/2.0.0)")
    dest = Path(dest)
    base_url = f"{source_cfg.base_url.rstrip('/')}/{source_cfg.dataset}/{source_cfg.version}"
    report = DownloadReport()
    with requests.Session() as session, ProgressBar(desc=f"{source_cfg.dataset} {source_cfg.version}", unit="B",
                                                    unit_scale=True, disable=not progress) as bar:
        session.auth = HTTPBasicAuth(credentials.username, credentials.password)
        fetcher = _Fetcher(session, source_cfg, credentials.username, report, bar)
        sums = fetcher.checksums(base_url, dest)
        for name in CSV_NAMES.values():
            fetcher.fetch(base_url, dest, name, sums, required=True)
        rows = read_csv_rows(dest / CSV_NAMES["metadata"])
        studies = select_studies(rows, source_cfg.p_folders, source_cfg.max_studies)

        reports_dest = reports_root(source_cfg, dest)
        if reports_dest == dest:
            reports_url, report_sums = base_url, sums
        else:
            reports_url = source_cfg.reports_url.rstrip("/")
            report_sums = fetcher.checksums(reports_url, reports_dest)
        for subject_id, study_id in studies:
            fetcher.fetch(reports_url, reports_dest, report_relpath(subject_id, study_id), report_sums, required=False)

        selected = set(studies)
        ext = IMAGE_EXT[source_cfg.dataset]
        for row in rows:
            key = study_key(row)
            if key in selected:
                fetcher.fetch(base_url, dest, image_relpath(*key, row["dicom_id"], ext), sums, required=False)
    log.info("%s %s: %d files downloaded (%d bytes), %d already present, %d rejected", source_cfg.dataset,
             source_cfg.version, report.files_downloaded, report.bytes_downloaded, report.files_skipped,
             len(report.rejects))
    return report
