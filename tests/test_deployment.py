"""The deployment as people run it, and as CI proves it: the local services on free ports, `prefect deploy --all`,
`prefect deployment run augment/full` on the smoke config through the worker, then MLflow, the nightly schedule,
a second trigger that skips every stage, the PhysioNet password absent from everything logged, two triggers at once,
and a worker killed in the middle of a stage. One services start (and one full run) serves the whole module."""

import json
import re
import subprocess
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import psutil
import pytest
from mlflow import MlflowClient

from commands import services
from flows.full import STAGES
from http_retry import request_json
from tasks import stages, tracking
from tasks.config import load_config
from tasks.data import catalog
from tasks.pathologies import PATHOLOGIES

REPO_ROOT = Path(__file__).resolve().parent.parent
SMOKE = "configs/smoke.yaml"  # relative on purpose: the flow run resolves it in the deployment's working directory
PASSWORD = "pn-7f3a9c1e-DISTINCTIVE-password"  # what the worker's environment carries; must be found nowhere
RATIO_RUNS = ("full-data-ratio-0-seed-0", "full-data-ratio-0.5-seed-0", "full-data-ratio-1-seed-0",
              "low-data-50-ratio-0-seed-0", "low-data-50-ratio-1-seed-0")
# The full smoke run: about 5 minutes on an idle 2-core box, 23 measured with the cores shared (load average 6).
WATCH_TIMEOUT_S = 2100
# The reliability tests need the stages' writes, not a good VQ-GAN: its training is most of tokenize's minutes.
QUICK_VQGAN = ("vqgan.steps=2",)
# The key of every catalog table: a part written twice, or a unit redone under another name, shows as a repeat.
TABLE_KEYS = {
    "images": ["dicom_id"], "pixels": ["dicom_id", "resolution"], "reports": ["study_id"],
    "labels": ["study_id", "labeler"], "metadata": ["dicom_id"], "splits": ["dicom_id"],
    "rejects": ["item_id", "item_kind", "stage", "reason", "detail", "source_path"],
    "text_embeddings": ["study_id", "encoder_id"], "tokens": ["dicom_id", "vqgan_id"], "synthetic": ["synth_id"],
}

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Services:
    api_url: str
    state_dir: Path
    data_root: Path  # the store the MLflow server serves, and the first runs' data


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    """The services started on free ports with the password in their environment, and the deployment deployed."""
    tmp = tmp_path_factory.mktemp("deployment")
    state_dir, data_root = tmp / "services", tmp / "data"
    config = load_config(REPO_ROOT / SMOKE, [f"run.data_root={data_root}"])
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PHYSIONET_PASSWORD", PASSWORD)  # inherited by the servers, the worker and its flow runs
        try:
            urls = services.start(config, state_dir, prefect_port=0, mlflow_port=0)
            # As env.sh sets them: without PREFECT_API_URL the CLI talks to a throw-away server, and the client's
            # patience keeps a slow server from failing a `prefect deployment run`.
            for name, value in services.client_env(urls["prefect_api"]).items():
                env.setenv(name, value)
            prefect(state_dir, "--no-prompt", "deploy", "--all")
            yield Services(urls["prefect_api"], state_dir, data_root)
        finally:
            services.stop(state_dir)  # by PID, also when a test (or the start itself) failed


def prefect(state_dir: Path, *args: str, timeout_s: float = 120) -> str:
    """Run the prefect CLI from the repo root (where prefect.yaml resolves); its stdout, or a failure that shows
    the worker's log (where a flow run's traceback lands)."""
    result = subprocess.run([str(services.BIN / "prefect"), *args], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=timeout_s, check=False)
    if result.returncode != 0:
        worker_log = (state_dir / "worker.log").read_text()[-6000:] if (state_dir / "worker.log").exists() else ""
        pytest.fail(f"prefect {' '.join(args)} exited {result.returncode}\n{result.stdout[-3000:]}\n"
                    f"{result.stderr[-3000:]}\n--- worker.log (tail) ---\n{worker_log}")
    return result.stdout


def trigger(deployed: Services, data_root: Path, *params: str, overrides: tuple[str, ...] = (),
            watch: bool = True, deployment: str = "augment/full") -> str:
    """`prefect deployment run augment/full` on the smoke config; with watch, waits for completion. The flow run id."""
    overrides_json = json.dumps([f"run.data_root={data_root}", *overrides])
    args = ["deployment", "run", deployment, "--param", f"config_path={SMOKE}",
            "--param", f"overrides={overrides_json}"]
    for param in params:
        args += ["--param", param]
    if watch:
        args += ["--watch", "--watch-timeout", str(WATCH_TIMEOUT_S)]
    stdout = prefect(deployed.state_dir, *args, timeout_s=WATCH_TIMEOUT_S + 60)
    return re.search(r"UUID: ([0-9a-f-]{36})", stdout).group(1)


def api(deployed: Services, method: str, path: str, body: dict | None = None):
    # Retried: with three runs active on two cores the server has taken more than 30 s to answer a GET.
    return request_json(method, f"{deployed.api_url}{path}", body)


def flow_run_logs(deployed: Services, flow_run_id: str | None = None) -> list[str]:
    """Log messages in the Prefect server: of one flow run, or of every run (the API pages by 200)."""
    where = {"logs": {"flow_run_id": {"any_": [flow_run_id]}}} if flow_run_id else {}
    messages: list[str] = []
    while page := api(deployed, "POST", "/logs/filter", {**where, "offset": len(messages), "limit": 200}):
        messages += [entry["message"] for entry in page]
    return messages


def wait_until_finished(deployed: Services, flow_run_ids: list[str], timeout_s: float = 600) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        runs = [api(deployed, "GET", f"/flow_runs/{run_id}") for run_id in flow_run_ids]
        if all(run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") for run in runs):
            return runs
        time.sleep(2)
    pytest.fail(f"flow runs {flow_run_ids} did not finish within {timeout_s:.0f} s")


def mlflow_client(data_root: Path) -> tuple[MlflowClient, str]:
    config = load_config(REPO_ROOT / SMOKE, [f"run.data_root={data_root}"])
    return MlflowClient(tracking.tracking_uri(config)), tracking.use_tracking(config)


def assert_no_duplicates_or_temp_files(data_root: Path) -> None:
    assert set(TABLE_KEYS) == set(catalog.SCHEMAS), "a new table needs its key in TABLE_KEYS"
    con = catalog.connect(data_root)
    for table, keys in TABLE_KEYS.items():
        rows = con.table(table).df()
        repeated = rows[rows.duplicated(subset=keys, keep=False)]
        assert repeated.empty, f"{table}: {len(repeated)} rows repeat a key {keys}:\n{repeated.head()}"
    assert not list(data_root.rglob("*.tmp")), "temp files were left behind"


@pytest.fixture(scope="module")
def first_run(deployed):
    return trigger(deployed, deployed.data_root)


@pytest.fixture(scope="module")
def second_run(deployed, first_run):
    records = {path.name: path.read_bytes() for path in (deployed.data_root / "stages").glob("*.json")}
    flow_run_id = trigger(deployed, deployed.data_root)
    return flow_run_id, records


@pytest.mark.timeout(2400)  # the module's setup (services, deploy, the full smoke run) lands on this test
def test_deployed_run_logs_auroc_per_ratio_and_the_comparison(deployed, first_run):
    client, experiment_id = mlflow_client(deployed.data_root)
    parents = client.search_runs([experiment_id], f"tags.`{tracking.FLOW_RUN_TAG}` = '{first_run}'")
    assert len(parents) == 1, "no MLflow parent run for the flow run"
    parent = parents[0]
    children = {run.info.run_name: run
                for run in client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")}
    assert set(RATIO_RUNS) <= set(children)
    for name in RATIO_RUNS:
        run = children[name]
        assert "test/auroc/macro" in run.data.metrics
        for pathology in PATHOLOGIES:
            assert (f"test/auroc/{pathology}" in run.data.metrics
                    or f"test/auroc/skipped/{pathology}" in run.data.tags), (name, pathology)
    artifacts = {artifact.path for artifact in client.list_artifacts(parent.info.run_id)}
    assert {"comparison.csv", "comparison.md", "auroc_by_ratio.png"} <= artifacts
    table = Path(client.download_artifacts(parent.info.run_id, "comparison.md", str(deployed.data_root.parent)))
    assert all(pathology in table.read_text() for pathology in [*PATHOLOGIES, "macro"])


def test_nightly_schedule_has_created_its_next_run(deployed, first_run):
    deployment = api(deployed, "GET", "/deployments/name/augment/full")
    assert deployment["parameters"]["config_path"] == "configs/demo.yaml"  # the test overrides the default
    # With sqlalchemy>=2.1 the server's scheduler fails every loop and never creates these (../shared/STACK.md).
    # Runs the scheduler made are auto_scheduled; it loops every 60 s, the first run gave it minutes.
    deadline = time.monotonic() + 90
    while True:
        runs = api(deployed, "POST", "/flow_runs/filter", {"flow_runs": {
            "deployment_id": {"any_": [deployment["id"]]}, "state": {"type": {"any_": ["SCHEDULED"]}}}})
        now = datetime.now(UTC)
        upcoming = sorted(datetime.fromisoformat(run["expected_start_time"]) for run in runs
                          if run["auto_scheduled"] and datetime.fromisoformat(run["expected_start_time"]) > now)
        if upcoming or time.monotonic() > deadline:
            break
        time.sleep(5)
    assert upcoming, "the scheduler created no future run of augment/full; see prefect-server.log"
    assert (upcoming[0].hour, upcoming[0].minute) == (2, 0)  # cron "0 2 * * *" in UTC
    assert (upcoming[0] - now).total_seconds() <= 24 * 3600


def test_second_trigger_with_nothing_changed_skips_every_stage(deployed, second_run):
    flow_run_id, records_before = second_run
    messages = flow_run_logs(deployed, flow_run_id)
    for stage in STAGES:
        assert any(message.startswith(f"stage {stage} skipped") for message in messages), stage
    assert {path.name: path.read_bytes() for path in (deployed.data_root / "stages").glob("*.json")} == records_before


def test_password_in_the_environment_is_in_no_log_param_tag_or_artifact(deployed, first_run, second_run):
    worker = json.loads((deployed.state_dir / "services.json").read_text())["worker"]
    assert psutil.Process(worker["pid"]).environ()["PHYSIONET_PASSWORD"] == PASSWORD  # it was there to leak

    assert flow_run_logs(deployed, first_run)
    assert not [message for message in flow_run_logs(deployed) if PASSWORD in message]  # every run's logs

    client, _ = mlflow_client(deployed.data_root)
    runs = [run for experiment in client.search_experiments()
            for run in client.search_runs([experiment.experiment_id])]
    assert len(runs) >= 1 + len(RATIO_RUNS)
    for run in runs:
        for key, value in {**run.data.params, **run.data.tags}.items():
            assert PASSWORD not in key and PASSWORD not in value, (run.info.run_name, key)

    files = [*deployed.state_dir.glob("*.log"), *(p for p in (deployed.data_root / "mlflow").rglob("*") if p.is_file())]
    assert any(path.suffix == ".png" for path in files)  # artifacts are among them
    assert not [path for path in files if PASSWORD.encode() in path.read_bytes()]


@pytest.fixture(scope="module")
def reliability_root(deployed):
    return deployed.data_root.parent / "reliability"


def test_two_triggers_at_once_run_one_after_the_other(deployed, reliability_root):
    # ingest and curate only: the stages that write the catalog tables, on a fresh data root, so the runs would
    # ingest the same studies if they overlapped. Two of augment/full (its concurrency limit queues the second) and
    # one of augment/refresh-data, another deployment: the data root's lock makes it and a full run take turns.
    # The test holds the data root's lock until a run has said that it waits for it: on a loaded machine the refresh
    # run could otherwise finish before the first full run starts, and the runs would never meet.
    with stages.exclusive_data_root(reliability_root, on_wait=pytest.fail):
        refresh = trigger(deployed, reliability_root, overrides=QUICK_VQGAN, watch=False,
                          deployment="augment/refresh-data")
        full_ids = [trigger(deployed, reliability_root, "stop_after=curate", overrides=QUICK_VQGAN, watch=False)
                    for _ in range(2)]
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not any(
                message.startswith("another run is working on") for run_id in (refresh, full_ids[0])
                for message in flow_run_logs(deployed, run_id)):
            time.sleep(2)
    runs = wait_until_finished(deployed, [refresh, *full_ids])
    assert [run["state"]["type"] for run in runs] == ["COMPLETED"] * 3
    assert runs[0]["parameters"]["stop_after"] == "curate"  # the refresh deployment's default
    first, second = sorted(runs[1:], key=lambda run: run["start_time"])
    assert datetime.fromisoformat(second["start_time"]) >= datetime.fromisoformat(first["end_time"])
    states = api(deployed, "GET", f"/flow_run_states/?flow_run_id={second['id']}")
    assert "AwaitingConcurrencySlot" in {state["name"] for state in states}
    waited = [message for run in runs for message in flow_run_logs(deployed, run["id"])
              if message.startswith("another run is working on")]
    assert waited, "the refresh run and a full run were never on the data root at the same time"
    assert_no_duplicates_or_temp_files(reliability_root)


def test_worker_killed_mid_stage_then_a_new_run_completes_cleanly(deployed, reliability_root):
    stage_records = reliability_root / "stages"
    tokens = reliability_root / "tables" / "tokens"
    killed_run = trigger(deployed, reliability_root, "stop_after=tokenize", overrides=QUICK_VQGAN, watch=False)
    # Killed once tokenize has committed a part of the tokens table but not finished: a stage half done.
    deadline = time.monotonic() + 600
    while not any(path.stem != "_schema" for path in tokens.glob("*.parquet")):
        assert not (stage_records / "tokenize.json").exists(), "tokenize finished before the worker was killed"
        assert time.monotonic() < deadline, "tokenize never started writing tokens"
        time.sleep(0.2)
    entry = json.loads((deployed.state_dir / "services.json").read_text())["worker"]
    worker = psutil.Process(entry["pid"])
    family = [worker, *worker.children(recursive=True)]  # the flow-run process too: a crash, not a shutdown
    for process in family:
        process.kill()
    psutil.wait_procs(family, timeout=30)
    assert not (stage_records / "tokenize.json").exists()

    # Nothing reports the death; the run's heartbeats stop, and the services' automation marks it CRASHED, which
    # frees the deployment's concurrency slot for the next run.
    assert api(deployed, "GET", f"/flow_runs/{killed_run}")["state"]["type"] == "RUNNING"
    [crashed] = wait_until_finished(deployed, [killed_run], timeout_s=services.CRASH_AFTER_S + 120)
    assert crashed["state"]["type"] == "CRASHED"
    assert "no heartbeat" in crashed["state"]["message"]

    services.start_worker(deployed.state_dir, deployed.api_url)  # recorded in services.json: the finalizer stops it
    trigger(deployed, reliability_root, "stop_after=tokenize", overrides=QUICK_VQGAN)
    assert (stage_records / "tokenize.json").exists()
    assert_no_duplicates_or_temp_files(reliability_root)
    assert not catalog.connect(reliability_root).table("tokens").df().empty
