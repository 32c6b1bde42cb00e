"""The local services, on 127.0.0.1 only: a Prefect server, a worker for the work pool, and an MLflow server.

    python -m commands.services start [--config configs/demo.yaml] [--state-dir runs/services]
                                   [--prefect-port 4200] [--mlflow-port 5000]      (a port of 0: any free port)
    python -m commands.services stop [--state-dir runs/services]
    python -m commands.services crash-detection      (on the server PREFECT_API_URL names; `start` does it itself)

The Prefect server keeps its SQLite database under <state-dir>/prefect. The MLflow server serves the tracking store
the flows of the config write to (<data_root>/mlflow), so runs appear in its UI as they are logged. Each process
logs to <state-dir>/<name>.log; their PIDs (and start times, so that a reused PID is never killed) are in
<state-dir>/services.json, written as each one starts, so `stop` can end whatever a failed `start` left behind.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import requests

from tasks import layout
from tasks.config import Config, ConfigError, load_config
from tasks.tracking import experiment_name, tracking_uri, use_tracking

BIN = Path(sys.executable).parent  # prefect and mlflow of this environment, whatever PATH says
WORK_POOL = "cxr-local"
HOST = "127.0.0.1"
STOP_ORDER = ("worker", "prefect-server", "mlflow-server")  # the worker first: it reports to the server
# A flow run whose process dies without a word (worker or machine killed) would stay RUNNING, holding the
# deployment's concurrency slot. Its heartbeats (every HEARTBEAT_S, set in prefect.yaml's job variables) stop, and
# this automation marks it CRASHED once none came for five periods (a busy box delays one, never five), which
# frees the slot for the next run.
HEARTBEAT_S = 30  # Prefect's minimum
CRASH_AFTER_S = 5 * HEARTBEAT_S
CRASH_AUTOMATION = "crash-unresponsive-flow-runs"
# How long the Prefect clients of the worker, its flow runs and a shell that sourced env.sh wait for a busy server
# (prefect.yaml's job variables repeat it for runs of another worker). Prefect's client already retries read, connect
# and pool timeouts, and 408/429/502/503 answers (a "database is locked" on the server is a 503), with backoff 2, 4,
# 8, ... s; but a loaded 2-core box can take longer than its default 60 s to answer, so twice that and one more
# retry: a request gives up after about 16 minutes. No PREFECT_CLIENT_RETRY_EXTRA_CODES: a 500 is a bug to see,
# and a retried POST can create a flow run twice.
CLIENT_PATIENCE = {"PREFECT_API_REQUEST_TIMEOUT": "120", "PREFECT_CLIENT_MAX_RETRIES": "6"}
QUIET = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true",
         "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


class ServiceError(RuntimeError):
    """A service did not start; the message names it and its log file."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _port(requested: int, name: str) -> int:
    if requested == 0:
        return free_port()
    with socket.socket() as sock:
        try:
            sock.bind((HOST, requested))
        except OSError:
            raise ServiceError(f"{name}: port {requested} on {HOST} is in use; pass another port, or 0 for any "
                               "free port") from None
    return requested


def _state_file(state_dir: Path) -> Path:
    return state_dir / "services.json"


def _read_state(state_dir: Path) -> dict[str, dict]:
    path = _state_file(state_dir)
    return json.loads(path.read_text()) if path.exists() else {}


def _process(entry: dict) -> psutil.Process | None:
    """The recorded process if it still runs (a zombie or a PID taken by another process counts as gone)."""
    try:
        process = psutil.Process(entry["pid"])
        if process.create_time() != entry["create_time"] or process.status() == psutil.STATUS_ZOMBIE:
            return None
        return process
    except psutil.NoSuchProcess:
        return None


def _launch(state_dir: Path, name: str, argv: list[str], env: dict[str, str], url: str) -> subprocess.Popen:
    log = state_dir / f"{name}.log"
    with open(log, "ab") as out:
        # A new session, so `stop` can signal the service with everything it spawned. SIGINT back to default:
        # a shell without job control starts background jobs with SIGINT ignored, and Prefect's worker turns
        # SIGTERM into SIGINT, so it would never stop.
        process = subprocess.Popen(argv, cwd=layout.REPO_ROOT, env={**os.environ, **QUIET, **env}, stdout=out,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    state = _read_state(state_dir)
    state[name] = {"pid": process.pid, "create_time": psutil.Process(process.pid).create_time(), "url": url,
                   "log": str(log)}
    _state_file(state_dir).write_text(json.dumps(state, indent=2))
    return process


def _wait(name: str, process: subprocess.Popen, ready: Callable[[], bool], state_dir: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServiceError(f"{name} exited with code {process.returncode}; see {state_dir / f'{name}.log'}")
        try:
            if ready():
                return
        except requests.RequestException:
            pass  # not listening yet
        time.sleep(0.5)
    raise ServiceError(f"{name} did not answer within {timeout_s:.0f} s; see {state_dir / f'{name}.log'}")


def _answers(url: str) -> Callable[[], bool]:
    return lambda: requests.get(url, timeout=2).ok


def _pool_ready(api_url: str) -> Callable[[], bool]:
    """The pool is READY once a worker has polled it (the worker creates the pool if it does not exist)."""
    def ready() -> bool:
        answer = requests.get(f"{api_url}/work_pools/{WORK_POOL}", timeout=2)
        return answer.ok and answer.json()["status"] == "READY"
    return ready


def ensure_crash_detection(api_url: str) -> str:
    """Create the automation that marks flow runs without heartbeats CRASHED, unless it exists; its id."""
    found = requests.post(f"{api_url}/automations/filter", json={"automations": {"name": {"any_": [CRASH_AUTOMATION]}}},
                          timeout=30)
    found.raise_for_status()
    if found.json():
        return found.json()[0]["id"]
    terminal = [f"prefect.flow-run.{state}" for state in ("Completed", "Failed", "Cancelled", "Crashed")]
    created = requests.post(f"{api_url}/automations/", timeout=30, json={
        "name": CRASH_AUTOMATION,
        "description": f"A flow run that sent no heartbeat for {CRASH_AFTER_S} s (its process died) is CRASHED.",
        "trigger": {
            "type": "event", "posture": "Proactive", "after": ["prefect.flow-run.heartbeat"],
            "expect": ["prefect.flow-run.heartbeat", *terminal], "match": {"prefect.resource.id": ["prefect.flow-run.*"]},
            "for_each": ["prefect.resource.id"], "threshold": 1, "within": CRASH_AFTER_S,
        },
        "actions": [{"type": "change-flow-run-state", "state": "CRASHED", "force": True,
                     "message": f"no heartbeat for {CRASH_AFTER_S} s: the flow run's process died"}],
    })
    created.raise_for_status()
    return created.json()["id"]


def _prefect_home(state_dir: Path) -> dict[str, str]:
    """The server's database and the worker's result storage, in one folder of the state dir."""
    return {"PREFECT_HOME": str((state_dir / "prefect").resolve())}


def client_env(api_url: str) -> dict[str, str]:
    """The environment of a Prefect client of this server: the worker's (and so its flow runs'), and env.sh's."""
    return {"PREFECT_API_URL": api_url, **CLIENT_PATIENCE}


def start_worker(state_dir: Path, api_url: str, timeout_s: float = 120) -> None:
    """Start a process worker on WORK_POOL (creating the pool) and wait until it has polled the pool."""
    worker = _launch(state_dir, "worker",
                     [str(BIN / "prefect"), "worker", "start", "--pool", WORK_POOL, "--type", "process"],
                     {**_prefect_home(state_dir), **client_env(api_url)}, api_url)
    _wait("worker", worker, _pool_ready(api_url), state_dir, timeout_s)


def start(config: Config, state_dir: Path, prefect_port: int = 4200, mlflow_port: int = 5000,
          timeout_s: float = 120) -> dict[str, str]:
    """Start the three services and wait until each answers; returns the Prefect API, Prefect UI and MLflow UI URLs.

    On failure, what was started is stopped again and a ServiceError names the log to read."""
    if config.tracking.uri:
        raise ServiceError(f"tracking.uri is {config.tracking.uri}: the flows log to that server, and this command "
                           "serves only the local store (<data_root>/mlflow); unset tracking.uri to use it")
    state_dir.mkdir(parents=True, exist_ok=True)
    running = [name for name, entry in _read_state(state_dir).items() if _process(entry)]
    if running:
        raise ServiceError(f"already running from {state_dir}: {', '.join(running)}; stop them first")
    _state_file(state_dir).unlink(missing_ok=True)
    prefect_port, mlflow_port = _port(prefect_port, "prefect-server"), _port(mlflow_port, "mlflow-server")
    prefect_url, mlflow_url = f"http://{HOST}:{prefect_port}", f"http://{HOST}:{mlflow_port}"
    api_url = f"{prefect_url}/api"
    try:
        # --port moves the server, not the API URL its UI is given: that defaults to PREFECT_API_URL, else to
        # PREFECT_SERVER_API_PORT (4200), and the UI on any other port would call a server that is not there.
        prefect = _launch(state_dir, "prefect-server",
                          [str(BIN / "prefect"), "server", "start", "--host", HOST, "--port", str(prefect_port)],
                          {**_prefect_home(state_dir), "PREFECT_SERVER_UI_API_URL": api_url}, prefect_url)
        # Creating the store and the experiment here (while Prefect boots) gives the UI link its experiment id,
        # and the server an up-to-date database instead of two processes migrating one file.
        experiment_id = use_tracking(config)
        artifacts = (layout.mlflow_dir(config.run.data_root) / "artifacts").resolve()
        mlflow_server = _launch(state_dir, "mlflow-server", [
            str(BIN / "mlflow"), "server", "--backend-store-uri", tracking_uri(config), "--artifacts-destination",
            artifacts.as_uri(), "--host", HOST, "--port", str(mlflow_port), "--workers", "1",
        ], {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, mlflow_url)
        _wait("prefect-server", prefect, _answers(f"{api_url}/health"), state_dir, timeout_s)
        ensure_crash_detection(api_url)
        _wait("mlflow-server", mlflow_server, _answers(f"{mlflow_url}/health"), state_dir, timeout_s)
        start_worker(state_dir, api_url, timeout_s)
    except BaseException:
        stop(state_dir)
        raise
    (state_dir / "env.sh").write_text("".join(f"export {name}={value}\n"
                                              for name, value in client_env(api_url).items()))
    # The UI opens in GenAI mode; the runs page of the experiment is what people want.
    return {"prefect_api": api_url, "prefect_ui": prefect_url,
            "mlflow_ui": f"{mlflow_url}/#/experiments/{experiment_id}/runs"}


def stop(state_dir: Path, timeout_s: float = 30) -> list[str]:
    """Stop the recorded services, worker first: SIGTERM to each one's process group, SIGKILL after timeout_s.

    Returns the names of those that were running."""
    state = _read_state(state_dir)
    stopped = []
    for name in STOP_ORDER:
        process = _process(state[name]) if name in state else None
        if process is None:
            continue
        family = [process, *process.children(recursive=True)]
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        _, alive = psutil.wait_procs(family, timeout=timeout_s)
        for leftover in alive:
            leftover.kill()
        psutil.wait_procs(alive, timeout=5)
        stopped.append(name)
    _state_file(state_dir).unlink(missing_ok=True)
    return stopped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m commands.services", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    start_cmd = commands.add_parser("start", help="start the Prefect server, a worker and the MLflow server")
    start_cmd.add_argument("--config", default="configs/demo.yaml", help="run config whose MLflow store is served")
    start_cmd.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    start_cmd.add_argument("--prefect-port", type=int, default=4200)
    start_cmd.add_argument("--mlflow-port", type=int, default=5000)
    stop_cmd = commands.add_parser("stop", help="stop the services started from the state dir")
    commands.add_parser("crash-detection", help="create the automation that marks flow runs whose heartbeats "
                        "stopped CRASHED, on the Prefect server of PREFECT_API_URL")
    for command in (start_cmd, stop_cmd):
        command.add_argument("--state-dir", type=Path, default=Path("runs/services"))
    args = parser.parse_args(argv)

    if args.command == "crash-detection":
        api_url = os.environ.get("PREFECT_API_URL")
        if not api_url:
            print("error: set PREFECT_API_URL to the Prefect server's API", file=sys.stderr)
            return 1
        print(f"automation {CRASH_AUTOMATION}: {ensure_crash_detection(api_url)}")
        return 0
    if args.command == "stop":
        stopped = stop(args.state_dir)
        print(f"stopped: {', '.join(stopped)}" if stopped else f"nothing running from {args.state_dir}")
        return 0
    try:
        config = load_config(args.config, args.overrides)
        urls = start(config, args.state_dir, args.prefect_port, args.mlflow_port)
    except (ConfigError, ServiceError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"Prefect UI  {urls['prefect_ui']}\n"
          f"MLflow UI   {urls['mlflow_ui']}   (experiment {experiment_name(config)})\n"
          f"Worker polling work pool {WORK_POOL!r}; logs and PIDs in {args.state_dir}/\n\n"
          f"In your shell:  source {args.state_dir}/env.sh   (sets PREFECT_API_URL={urls['prefect_api']})\n"
          "Then:           prefect --no-prompt deploy --all && prefect deployment run augment/full\n"
          f"Stop with:      python -m commands.services stop --state-dir {args.state_dir}   (make services-stop)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
