"""The local services: start on free loopback ports, both servers and the worker answer, stop by PID, nothing left."""

import json
from pathlib import Path

import yaml

import mlflow
import psutil
import pytest
import requests

from commands import services
from tasks import tracking
from tasks.config import load_config

SMOKE = Path(__file__).resolve().parent.parent / "configs" / "smoke.yaml"


@pytest.fixture
def state_dir(tmp_path):
    state = tmp_path / "services"
    yield state
    services.stop(state)  # also when the test failed halfway


@pytest.mark.slow
def test_start_answer_stop(tmp_path, state_dir):
    config = load_config(SMOKE, [f"run.data_root={tmp_path / 'data'}"])
    urls = services.start(config, state_dir, prefect_port=0, mlflow_port=0)

    assert requests.get(f"{urls['prefect_api']}/health", timeout=5).json() is True
    # The UI page calls the API it is told of here: the server's own port, not Prefect's default 4200.
    ui_settings = requests.get(f"{urls['prefect_ui']}/ui-settings", timeout=5).json()
    assert ui_settings["api_url"] == urls["prefect_api"]
    mlflow_root = urls["mlflow_ui"].split("/#/")[0]
    assert requests.get(f"{mlflow_root}/health", timeout=5).text == "OK"
    pool = requests.get(f"{urls['prefect_api']}/work_pools/{services.WORK_POOL}", timeout=5).json()
    assert (pool["type"], pool["status"]) == ("process", "READY")
    [automation] = requests.post(f"{urls['prefect_api']}/automations/filter", json={}, timeout=5).json()
    assert automation["name"] == services.CRASH_AUTOMATION and automation["enabled"]
    assert automation["trigger"]["within"] == services.CRASH_AFTER_S
    assert automation["actions"][0]["state"] == "CRASHED"
    assert services.ensure_crash_detection(urls["prefect_api"]) == automation["id"]  # not a second one
    # The MLflow server serves the store the flows write to: a run logged there, and its artifact, are in its API.
    with tracking.start_parent_run(config, "flow-run-1") as run:
        mlflow.log_text("hello", "note.txt")
    assert urls["mlflow_ui"].endswith(f"/#/experiments/{run.info.experiment_id}/runs")
    answer = requests.get(f"{mlflow_root}/api/2.0/mlflow/runs/get", params={"run_id": run.info.run_id}, timeout=5)
    assert answer.json()["run"]["info"]["run_name"] == "augment-smoke"
    artifact = requests.get(f"{mlflow_root}/get-artifact", params={"path": "note.txt", "run_uuid": run.info.run_id},
                            timeout=5)
    assert artifact.text == "hello"
    assert (state_dir / "env.sh").read_text().splitlines() == [
        f"export PREFECT_API_URL={urls['prefect_api']}", "export PREFECT_API_REQUEST_TIMEOUT=120",
        "export PREFECT_CLIENT_MAX_RETRIES=6"]
    worker = json.loads((state_dir / "services.json").read_text())["worker"]
    assert services.CLIENT_PATIENCE.items() <= psutil.Process(worker["pid"]).environ().items()  # and its flow runs'
    assert all(url.startswith("http://127.0.0.1:") for url in urls.values())

    with pytest.raises(services.ServiceError, match="already running"):
        services.start(config, state_dir, prefect_port=0, mlflow_port=0)

    family = []
    for entry in json.loads((state_dir / "services.json").read_text()).values():
        process = psutil.Process(entry["pid"])
        family += [process, *process.children(recursive=True)]
    assert services.stop(state_dir) == list(services.STOP_ORDER)
    still_running = [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not still_running
    assert not (state_dir / "services.json").exists()
    assert services.stop(state_dir) == []


def test_every_deployment_sends_the_heartbeats_crash_detection_expects_and_waits_for_a_busy_server():
    deployments = yaml.safe_load((SMOKE.parent.parent / "prefect.yaml").read_text())["deployments"]
    assert {deployment["name"] for deployment in deployments} >= {"full", "refresh-data"}
    for deployment in deployments:
        env = deployment["work_pool"]["job_variables"]["env"]
        assert int(env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"]) == services.HEARTBEAT_S, deployment["name"]
        assert services.CLIENT_PATIENCE.items() <= env.items(), deployment["name"]
        assert deployment["concurrency_limit"]["limit"] == 1, deployment["name"]
