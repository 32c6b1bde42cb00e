"""http_retry.request_json against a server on 127.0.0.1 that stalls or is busy before it answers."""

from __future__ import annotations

import json
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from http_retry import request_json

FAST = {"timeout_s": 0.3, "backoff_s": 0.01}


class FaultyServer(ThreadingHTTPServer):
    """Answers every request with {"method": ..., "body": ...}, after the queued faults, one per request:
    "stall" (no answer at all), "stall_body" (the headers and part of the body, then nothing) or an HTTP status."""

    def __init__(self, faults: tuple[str | int, ...]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.faults, self.requests, self.release = deque(faults), 0, threading.Event()
        self.url = f"http://127.0.0.1:{self.server_port}/api"


class _Handler(BaseHTTPRequestHandler):
    server: FaultyServer

    def _answer(self) -> None:
        self.server.requests += 1
        fault = self.server.faults.popleft() if self.server.faults else None
        length = int(self.headers.get("Content-Length") or 0)
        body = json.dumps({"method": self.command, "body": json.loads(self.rfile.read(length)) if length else None})
        if fault == "stall":
            self.server.release.wait(10)
            return
        self.send_response(fault if isinstance(fault, int) else 200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if fault == "stall_body":
            self.wfile.write(body[:5].encode())
            self.wfile.flush()
            self.server.release.wait(10)
            return
        self.wfile.write(body.encode())

    do_GET = do_POST = _answer

    def log_message(self, format, *args) -> None:  # quiet: no line per request on stderr
        pass


@contextmanager
def serve(*faults: str | int) -> Iterator[FaultyServer]:
    server = FaultyServer(faults)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.release.set()  # the stalled handlers end
        server.shutdown()
        server.server_close()


def test_stalls_and_busy_answers_are_retried_until_it_answers() -> None:
    with serve("stall", "stall_body", 503) as server:
        answer = request_json("POST", f"{server.url}/flow_runs/filter", {"limit": 2}, retries=3, **FAST)
    assert answer == {"method": "POST", "body": {"limit": 2}}  # the body is sent again with each attempt
    assert server.requests == 4


def test_it_gives_up_after_its_retries() -> None:
    with serve("stall", "stall", "stall") as server:
        with pytest.raises(requests.Timeout):
            request_json("GET", f"{server.url}/health", retries=1, **FAST)
    assert server.requests == 2
    with serve(503, 503) as server:
        with pytest.raises(requests.HTTPError, match="503"):
            request_json("GET", f"{server.url}/health", retries=1, **FAST)
    assert server.requests == 2


def test_other_errors_are_not_retried() -> None:
    with serve(404) as server:
        with pytest.raises(requests.HTTPError, match="404"):
            request_json("GET", f"{server.url}/flow_runs/missing", **FAST)
    assert server.requests == 1
