"""Skipping stages whose inputs are unchanged, so the nightly run redoes only what changed.

A stage's fingerprint hashes what it reads: its config sections, the files it consumes (content for files up to
HASH_LIMIT bytes, size and mtime above it: pixel shards are never rewritten once committed), and its code (the
source of the modules it runs). When a stage completes, the fingerprint and a JSON summary are recorded under
<data_root>/stages/<stage>.json; the next run with the same fingerprint skips the stage and reuses the summary.
One flow run at a time works on a data root (exclusive_data_root), whichever deployment or shell started it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType

from tasks.catalog import SQL_DIR, atomic_write_bytes
from tasks.config import Config

HASH_LIMIT = 64 << 20


def _file_digest(path: Path, root: Path) -> str:
    stat = path.stat()
    if stat.st_size > HASH_LIMIT:
        content = f"{stat.st_size}:{stat.st_mtime_ns}"
    else:
        content = hashlib.sha256(path.read_bytes()).hexdigest()
    return f"{path.relative_to(root).as_posix()}={content}"


def files_fingerprint(root: Path, patterns: Iterable[str]) -> str:
    """Hash of the files under root matching the glob patterns; temp files (".*.tmp") never count."""
    root = Path(root)
    files = sorted({path for pattern in patterns for path in root.glob(pattern)
                    if path.is_file() and not path.name.endswith(".tmp")})
    digest = hashlib.sha256()
    for path in files:
        digest.update(_file_digest(path, root).encode() + b"\n")
    return digest.hexdigest()


def code_fingerprint(modules: Iterable[ModuleType]) -> str:
    digest = hashlib.sha256()
    for module in sorted(modules, key=lambda m: m.__name__):
        digest.update(module.__name__.encode() + Path(module.__file__).read_bytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class StageInputs:
    sections: tuple[str, ...]  # config sections the stage reads
    files: tuple[tuple[Path, str], ...]  # (root, glob) pairs: the files it consumes
    modules: tuple[ModuleType, ...]  # the code it runs
    sql: tuple[str, ...] = ()  # the sql/ files it runs, by name


def fingerprint(config: Config, inputs: StageInputs) -> str:
    parts = {
        "config": config.section_fingerprint(*inputs.sections),
        "data": [files_fingerprint(root, [pattern]) for root, pattern in inputs.files],
        "code": code_fingerprint(inputs.modules),
        "sql": files_fingerprint(SQL_DIR, [f"{name}.sql" for name in inputs.sql]),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def config_and_code_fingerprint(config: Config, inputs: StageInputs) -> str:
    """The fingerprint of what a stage runs (config sections, code, SQL), without the data it reads."""
    return fingerprint(config, replace(inputs, files=()))


def _record_path(data_root: Path, stage: str) -> Path:
    return Path(data_root) / "stages" / f"{stage}.json"


def _read_record(data_root: Path, stage: str) -> dict:
    """What the stage's last completed run recorded; {} when it never completed."""
    path = _record_path(data_root, stage)
    return json.loads(path.read_text()) if path.exists() else {}


def completed_summary(data_root: Path, stage: str, stage_fingerprint: str) -> dict | None:
    """The summary a completed run of this stage recorded with the same fingerprint, or None (run the stage)."""
    record = _read_record(data_root, stage)
    return record["summary"] if record.get("fingerprint") == stage_fingerprint else None


def recent_summary(data_root: Path, stage: str, config_and_code: str, max_age: timedelta) -> dict | None:
    """The summary of the stage's last completed run if that run had the same config and code (its data may have
    changed since) and completed less than max_age ago; else None."""
    record = _read_record(data_root, stage)
    if record.get("config_and_code") != config_and_code or "completed_at" not in record:
        return None
    age = datetime.now(UTC) - datetime.fromisoformat(record["completed_at"])
    return record["summary"] if age < max_age else None


def record_completed(data_root: Path, stage: str, stage_fingerprint: str, config_and_code: str,
                     summary: dict) -> None:
    payload = {"stage": stage, "fingerprint": stage_fingerprint, "config_and_code": config_and_code,
               "completed_at": datetime.now(UTC).isoformat(), "summary": summary}
    atomic_write_bytes(_record_path(data_root, stage), json.dumps(payload, indent=2, default=str).encode())


@contextmanager
def exclusive_data_root(data_root: Path, on_wait: Callable[[str], None]) -> Iterator[None]:
    """Hold <data_root>/.lock for the duration; a second run on the same data root waits here (on_wait says so).

    A deployment's concurrency limit orders the runs of that deployment only; this also orders the nightly run, an
    on-demand refresh and `augment run` in a shell. The kernel releases the lock when the holder dies, so a killed
    run never leaves it held."""
    data_root = Path(data_root)
    data_root.mkdir(parents=True, exist_ok=True)
    with open(data_root / ".lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            on_wait(f"another run is working on {data_root}; waiting until it finishes")
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield
