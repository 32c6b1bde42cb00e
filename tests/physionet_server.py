"""A local stand-in for PhysioNet's file server, and a small fake MIMIC-CXR tree to serve, for tests.

`serve({"mimic-cxr/2.0.0": root}, user, password)` serves root/<relpath> at <base_url>/mimic-cxr/2.0.0/<relpath> with
HTTP basic auth and Range requests, on 127.0.0.1 and a free port, and always stops. Faults are queued per path:
`server.inject("mimic-cxr/2.0.0/files/...", "drop", 503)` makes the next request of that path send half the body
and close the connection, the one after answer 503, and later ones succeed. "corrupt" serves the bytes with one
flipped. The server counts requests and records Range headers per path.
"""

from __future__ import annotations

import base64
import csv
import gzip
import hashlib
import io
import threading
from collections import Counter, defaultdict, deque
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tasks.data.mirror import CSV_COLUMNS, CSV_NAMES, IMAGE_EXT, image_relpath, report_relpath, SHA256SUMS
from tasks.pathologies import CHEXPERT_LABELS

Fault = str | int  # "drop", "corrupt", or an HTTP status to answer with


class PhysioNetServer:
    def __init__(self, trees: Mapping[str, Path], username: str, password: str):
        self.trees = {prefix.strip("/"): Path(root) for prefix, root in trees.items()}
        self._authorization = "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()
        self._lock = threading.Lock()
        self._faults: dict[str, deque[Fault]] = defaultdict(deque)
        self.requests: Counter[str] = Counter()  # path (without /files/) -> number of requests
        self.ranges: dict[str, list[str | None]] = defaultdict(list)  # path -> the Range header of each request
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="physionet-test-server", daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/files"

    def inject(self, path: str, *faults: Fault) -> None:
        """Queue faults for the next requests of `path` ('mimic-cxr/2.0.0/files/...'), one per request."""
        with self._lock:
            self._faults[path.strip("/")].extend(faults)

    def _next_fault(self, path: str, range_header: str | None) -> Fault | None:
        with self._lock:
            self.requests[path] += 1
            self.ranges[path].append(range_header)
            queue = self._faults[path]
            return queue.popleft() if queue else None

    def _resolve(self, path: str) -> Path | None:
        for prefix, root in self.trees.items():
            if path.startswith(prefix + "/"):
                file = (root / path[len(prefix) + 1:]).resolve()
                if file.is_relative_to(root.resolve()) and file.is_file():
                    return file
        return None


def _handler_for(server: PhysioNetServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as PhysioNet: a drop must really cut a reused connection
        disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms delayed-ACK stall

        def log_message(self, format: str, *args: object) -> None:  # keep pytest output clean
            pass

        def _reply(self, status: int, body: bytes = b"", headers: Mapping[str, str] | None = None) -> None:
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.headers.get("Authorization") != server._authorization:
                return self._reply(401, b"Authorization required\n", {"WWW-Authenticate": 'Basic realm="PhysioNet"'})
            path = self.path.split("?", 1)[0].removeprefix("/files/")
            range_header = self.headers.get("Range")
            fault = server._next_fault(path, range_header)
            file = server._resolve(path)
            if isinstance(fault, int):
                return self._reply(fault, f"injected HTTP {fault}\n".encode())
            if file is None:
                return self._reply(404, b"Not found\n")
            data = file.read_bytes()
            if fault == "corrupt":
                data = bytes([data[0] ^ 0xFF]) + data[1:]
            start = int(range_header.removeprefix("bytes=").split("-")[0]) if range_header else 0
            if start >= len(data) > 0:
                return self._reply(416, headers={"Content-Range": f"bytes */{len(data)}"})
            body = data[start:]
            self.send_response(206 if range_header else 200)
            if range_header:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if fault == "drop":
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
                return None
            self.wfile.write(body)
            return None

    return Handler


@contextmanager
def serve(trees: Mapping[str, Path], username: str, password: str) -> Iterator[PhysioNetServer]:
    """Run a PhysioNetServer for the duration of the block; it is stopped even when the block fails."""
    server = PhysioNetServer(trees, username, password)
    server._thread.start()
    try:
        yield server
    finally:
        server._httpd.shutdown()
        server._httpd.server_close()
        server._thread.join(timeout=5)


def write_sha256sums(root: Path) -> None:
    """Write root/SHA256SUMS.txt over every file under root, as PhysioNet lists them."""
    lines = [f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.relative_to(root).as_posix()}"
             for path in sorted(root.rglob("*")) if path.is_file() and path.name != SHA256SUMS]
    (root / SHA256SUMS).write_text("\n".join(lines) + "\n")


def _write_csv(path: Path, columns: tuple[str, ...], rows: list[dict[str, object]]) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    # mtime=0: the same tree gives the same bytes, hence the same SHA256SUMS.txt
    path.write_bytes(gzip.compress(text.getvalue().encode(), mtime=0))


# subject -> study -> dicom ids: two p-folders, one study with two images.
FAKE_STUDIES: dict[int, dict[int, list[str]]] = {
    10000032: {50414267: ["02aa804e-bde0afdd-112c0b34-7bc16630-4e384014"],
               53189527: ["2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab",
                          "e084de3b-be89b11e-20fe3f9f-9c8d8dfe-4cfd4c99"]},
    10000764: {57375967: ["096052b7-d256dc40-453a102b-fa7d01c6-1b22c6b4"]},
    11000011: {51029426: ["3f6b5a2c-1d9e8f70-0a4b3c2d-5e6f7a8b-9c0d1e2f"]},
    11000022: {52000001: ["4a5b6c7d-8e9f0a1b-2c3d4e5f-6a7b8c9d-0e1f2a3b"]},
}


def write_fake_mirror(root: Path, dataset: str = "mimic-cxr", with_reports: bool = True,
                      image_bytes: int = 4096) -> None:
    """A few subjects of MIMIC-CXR(-JPG) in the PhysioNet layout: the four CSVs with their real headers, images
    whose bytes are distinct per file, reports, and SHA256SUMS.txt. Enough to exercise layout and download."""
    ext = IMAGE_EXT[dataset]
    metadata, labels, splits = [], [], []
    for subject_id, studies in FAKE_STUDIES.items():
        for study_id, dicom_ids in studies.items():
            labels.append({"subject_id": subject_id, "study_id": study_id, **{name: "" for name in CHEXPERT_LABELS},
                           "No Finding": "1.0"})
            if with_reports:
                report = root / report_relpath(subject_id, study_id)
                report.parent.mkdir(parents=True, exist_ok=True)
                report.write_text(f"FINAL REPORT\n\nIMPRESSION: No acute process in study {study_id}.\n")
            for dicom_id in dicom_ids:
                image = root / image_relpath(subject_id, study_id, dicom_id, ext)
                image.parent.mkdir(parents=True, exist_ok=True)
                seed = hashlib.sha256(dicom_id.encode()).digest()
                image.write_bytes((seed * (image_bytes // len(seed) + 1))[:image_bytes])
                metadata.append({"dicom_id": dicom_id, "subject_id": subject_id, "study_id": study_id,
                                 "PerformedProcedureStepDescription": "CHEST (PORTABLE AP)", "ViewPosition": "AP",
                                 "Rows": 3056, "Columns": 2544, "StudyDate": 21800506, "StudyTime": 213014.531,
                                 "ProcedureCodeSequence_CodeMeaning": "CHEST (PORTABLE AP)",
                                 "ViewCodeSequence_CodeMeaning": "antero-posterior",
                                 "PatientOrientationCodeSequence_CodeMeaning": "Erect"})
                splits.append({"dicom_id": dicom_id, "study_id": study_id, "subject_id": subject_id, "split": "train"})
    for kind, rows in (("metadata", metadata), ("chexpert", labels), ("negbio", labels), ("split", splits)):
        _write_csv(root / CSV_NAMES[kind], CSV_COLUMNS[kind], rows)
    write_sha256sums(root)
