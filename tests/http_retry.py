"""JSON requests to a local server that a loaded box can make slow, retried with backoff, for tests.

Prefect's own client retries timeouts (prefect/client/base.py); `requests`, which the tests use to query the
server's API, does not. Use it only for requests that are safe to repeat: reads, and POST .../filter queries.
"""

from __future__ import annotations

import time

import requests

# The answers of a busy server that Prefect's client retries too; a "database is locked" on the server is a 503.
RETRY_STATUSES = frozenset({408, 429, 502, 503})


def request_json(method: str, url: str, body: dict | None = None, *, timeout_s: float = 60, retries: int = 3,
                 backoff_s: float = 2) -> object:
    """The JSON answer to `method url`. A timeout, a dropped connection or an answer in RETRY_STATUSES is retried up
    to `retries` times, after backoff_s, 2 * backoff_s, 4 * backoff_s, ... seconds; then it raises, as does any other
    error status (requests.HTTPError)."""
    for attempt in range(retries + 1):
        last = attempt == retries
        try:
            answer = requests.request(method, url, json=body, timeout=timeout_s)
        # requests reports a stall in the middle of a body as a ConnectionError, not as a Timeout.
        except (requests.Timeout, requests.ConnectionError):
            if last:
                raise
        else:
            if last or answer.status_code not in RETRY_STATUSES:
                answer.raise_for_status()
                return answer.json()
        time.sleep(backoff_s * 2**attempt)
