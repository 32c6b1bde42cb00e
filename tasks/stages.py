"""Skipping stages whose inputs are unchanged, so the nightly run redoes only what changed.

A stage's fingerprint hashes what it reads: its config sections, the files it consumes (content for files up to
HASH_LIMIT bytes, size and mtime above it: pixel shards are never rewritten once committed), and its code (the
source of the modules it runs). When a stage completes, the fingerprint and a JSON summary are recorded under
<data_root>/stages/<stage>.json; the next run with the same fingerprint skips the stage and reuses the summary.
One flow run at a time works on a data root (exclusive_data_root), whichever deployment or shell started it.
"""

from __future__ import annotations

import ast
import fcntl
import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from pydantic import BaseModel

from tasks import layout
from tasks.data.catalog import atomic_write_bytes

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


def _module_file(root: Path, module: str) -> Path | None:
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported_names(tree: ast.Module, module: str, is_package: bool) -> set[str]:
    """Every module name this module's imports may refer to, wherever they stand (a lazy import inside a function
    counts too): `from a import b` may name the module a.b, so both are candidates."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against this module's package
                package = module.split(".") if is_package else module.split(".")[:-1]
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _string_constants(tree: ast.Module) -> set[str]:
    return {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)}


def project_code(entry: str, root: Path = layout.REPO_ROOT) -> tuple[dict[str, Path], list[Path]]:
    """The project modules `entry` runs, followed through every import, and the sql/ files they name.

    A module counts with its parent packages (their __init__ runs first); a SQL file counts when a module holds its
    name as a string (read_sql("pending_images"), or a name picked from a tuple), so no list is kept by hand."""
    root = Path(root)
    sql_names = {path.stem: path for path in (root / layout.SQL_DIR.name).glob("*.sql")}
    modules: dict[str, Path] = {}
    sql: set[Path] = set()
    pending = [entry]
    while pending:
        name = pending.pop()
        parts = name.split(".")
        if name in modules or parts[0] not in layout.PROJECT_PACKAGES:
            continue
        path = _module_file(root, name)
        if path is None:  # `from package import function`: the candidate name is not a module
            continue
        modules[name] = path
        tree = ast.parse(path.read_bytes(), filename=str(path))
        pending += [".".join(parts[:k]) for k in range(1, len(parts))]
        pending += _imported_names(tree, name, path.name == "__init__.py")
        sql.update(sql_names[value] for value in _string_constants(tree) if value in sql_names)
    if entry not in modules:
        raise ValueError(f"module {entry} is not a project module under {root}")
    return modules, sorted(sql)


def code_fingerprint(entry: str, root: Path = layout.REPO_ROOT) -> str:
    """Hash of the source of every project module `entry` reaches, and of the SQL files they name."""
    modules, sql = project_code(entry, root)
    digest = hashlib.sha256()
    for name in sorted(modules):
        digest.update(name.encode() + b"\0" + modules[name].read_bytes() + b"\0")
    for path in sql:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _canonical(value: object) -> object:
    """Stage arguments as JSON: config sections by their values, paths as strings."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, Mapping):
        return {str(key): _canonical(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    return value


@dataclass(frozen=True)
class Stage:
    """One stage of the DAG as it will be called: its subflow, the arguments it gets (config sections, the ids
    earlier stages returned), the files it reads, and what it is handed that is no input (the MLflow parent run).

    Its fingerprint hashes exactly the arguments it is called with, the files, and the code its module reaches,
    so nothing the stage uses can change without the stage running again."""

    name: str
    subflow: Callable[..., dict]
    arguments: Mapping[str, object]
    files: tuple[tuple[Path, str], ...] = ()  # (root, glob) pairs: the files it consumes
    context: Mapping[str, object] = field(default_factory=dict)  # passed, never fingerprinted

    @property
    def module(self) -> str:
        return getattr(self.subflow, "fn", self.subflow).__module__

    def run(self) -> dict:
        return self.subflow(**self.arguments, **self.context)


def per_generator(name: str, family: str, generators: list[str]) -> str:
    """The name of a stage run once per generator family, which names its record and its node in the run graph:
    the stage's own with one generator (where its record always was), '<stage>-<family>' beside others."""
    return name if len(generators) == 1 else f"{name}-{family}"


def fingerprint(stage: Stage, with_data: bool = True) -> str:
    parts = {
        "arguments": _canonical(stage.arguments),
        "data": [files_fingerprint(root, [pattern]) for root, pattern in stage.files] if with_data else [],
        "code": code_fingerprint(stage.module),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def config_and_code_fingerprint(stage: Stage) -> str:
    """The fingerprint of what a stage runs (its arguments and code), without the data it reads."""
    return fingerprint(stage, with_data=False)


def _read_record(data_root: Path, stage: str) -> dict:
    """What the stage's last completed run recorded; {} when it never completed."""
    path = layout.stage_record(data_root, stage)
    return json.loads(path.read_text()) if path.exists() else {}


def recorded_summary(data_root: Path, stage: str) -> dict | None:
    """The summary the stage's last completed run recorded, whatever its fingerprint; None when it never completed."""
    return _read_record(data_root, stage).get("summary")


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
    atomic_write_bytes(layout.stage_record(data_root, stage), json.dumps(payload, indent=2, default=str).encode())


@contextmanager
def exclusive_data_root(data_root: Path, on_wait: Callable[[str], None]) -> Iterator[None]:
    """Hold <data_root>/.lock for the duration; a second run on the same data root waits here (on_wait says so).

    A deployment's concurrency limit orders the runs of that deployment only; this also orders the nightly run, an
    on-demand refresh and `augment run` in a shell. The kernel releases the lock when the holder dies, so a killed
    run never leaves it held."""
    data_root = Path(data_root)
    data_root.mkdir(parents=True, exist_ok=True)
    with open(layout.lock_file(data_root), "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            on_wait(f"another run is working on {data_root}; waiting until it finishes")
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield
