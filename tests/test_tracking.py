"""MLflow tracking against a temporary SQLite store: runs, metric names, artifacts, the registry, the secret guard."""

import re
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import StringIO
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from tasks import tracking
from tasks.config import Config, load_config
from tasks.evaluation.metrics import bootstrap_auroc, paired_bootstrap_difference
from tasks.pathologies import PATHOLOGIES

SMOKE = Path(__file__).resolve().parent.parent / "configs" / "smoke.yaml"
RATIOS = (0.0, 0.5, 1.0)
FRACTURE = PATHOLOGIES.index("Fracture")


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Config:
    root = tmp_path_factory.mktemp("tracking")
    return load_config(SMOKE, [f"run.data_root={root}"])


def _test_set(seed: int):
    """Labels of 60 images of 20 patients, Fracture without positives; scores that get better with `seed`."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, size=(60, len(PATHOLOGIES))).astype(float)
    labels[:, FRACTURE] = 0.0
    labels[::7, 0] = np.nan  # a masked (uncertain) label
    scores = np.nan_to_num(labels) * (0.5 + seed) + np.random.default_rng(seed).normal(size=labels.shape)
    return labels, scores, np.repeat(np.arange(20), 3)


def _png(client: MlflowClient, run_id: str, path: str) -> bytes:
    return open(client.download_artifacts(run_id, path), "rb").read()


def test_parent_and_children_metrics_and_artifacts(config):
    flow_run_id = str(uuid.uuid4())
    reports, differences = {}, {}
    with tracking.start_parent_run(config, flow_run_id, data_fingerprint="abc123") as parent:
        parent_id, nest = parent.info.run_id, tracking.ParentRun.of(config, parent)
        with tracking.child_run(nest, "generator", {"steps": 10}) as generator:
            generator_id = generator.info.run_id
        for ratio in RATIOS:
            labels, scores, groups = _test_set(seed=int(ratio * 2))
            with tracking.child_run(nest, f"classifier ratio={ratio} seed=0", {"ratio": ratio},
                                    {tracking.GENERATOR_RUN_TAG: generator_id}):
                reports[ratio] = bootstrap_auroc(labels, scores, groups, n_resamples=50)
                logged = tracking.log_metrics_per_pathology("test/auroc", reports[ratio])
                if ratio == 1.0:  # one figure is enough to check (each costs about a second)
                    tracking.log_roc_curves(labels, scores)
            differences[ratio] = paired_bootstrap_difference(labels, _test_set(0)[1], scores, groups, n_resamples=50)
        table = tracking.comparison_table(reports, differences)
        markdown = tracking.log_comparison_table(table)
        tracking.log_auroc_bars(table)
        images = {name: np.full((2, 16, 16), 25 * i, np.uint8) for i, name in enumerate(PATHOLOGIES)}
        tracking.log_sample_grid(real=images, synthetic={"Edema": images["Edema"][:1]})

    # Metric names with '/' and spaces, queried back with backticks; every class but Fracture (no positives).
    client = MlflowClient()  # created after start_parent_run pointed MLflow at the store
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent_id}' AND metrics.`test/auroc/macro` > 0")
    assert sorted(run.data.params["ratio"] for run in children) == ["0.0", "0.5", "1.0"]
    for run in children:
        metrics = run.data.metrics
        ratio = float(run.data.params["ratio"])
        assert metrics["test/auroc/macro"] == pytest.approx(reports[ratio].macro.estimate)
        for name in PATHOLOGIES:
            if name == "Fracture":
                assert "test/auroc/Fracture" not in metrics
                assert "positive" in run.data.tags["test/auroc/skipped/Fracture"]
            else:
                interval = reports[ratio].per_class[name]
                assert metrics[f"test/auroc/{name}"] == pytest.approx(interval.estimate)
                assert metrics[f"test/auroc/{name}/ci_low"] <= metrics[f"test/auroc/{name}"] \
                    <= metrics[f"test/auroc/{name}/ci_high"]
        assert run.data.tags[tracking.GENERATOR_RUN_TAG] == generator_id
        assert re.fullmatch(r"[0-9a-f]{40}|unknown", run.data.tags[tracking.GIT_COMMIT_TAG])
        if ratio == 1.0:
            assert _png(client, run.info.run_id, "roc_curves.png").startswith(b"\x89PNG")
    assert len(logged) == 3 * len(PATHOLOGIES)  # 9 classes + macro, each with two interval ends

    parent_run = client.get_run(parent_id)
    assert parent_run.data.tags[tracking.DATA_FINGERPRINT_TAG] == "abc123"
    assert parent_run.data.params["ingest.resolution"] == str(config.ingest.resolution)
    assert {a.path for a in client.list_artifacts(parent_id)} == {
        "comparison.csv", "comparison.md", "verdict.md", "auroc_by_ratio.png", "samples_by_class.png"}
    for png in ("auroc_by_ratio.png", "samples_by_class.png"):
        assert _png(client, parent_id, png).startswith(b"\x89PNG")
    csv = pd.read_csv(StringIO(open(client.download_artifacts(parent_id, "comparison.csv")).read()))
    macro_half = csv[(csv.pathology == "macro") & (csv.ratio == 0.5)].iloc[0]
    assert macro_half.auroc == pytest.approx(reports[0.5].macro.estimate)
    assert macro_half.diff_vs_0 == pytest.approx(differences[0.5].macro.estimate)
    assert csv[csv.pathology == "Fracture"].auroc.isna().all()
    lines = markdown.splitlines()
    assert "AUROC 50% synthetic" in lines[0] and "Δ 100% vs 0%" in lines[0]
    assert sum(line.startswith("| Pleural Effusion") for line in lines) == 1
    assert open(client.download_artifacts(parent_id, "comparison.md")).read().strip() == markdown
    # Artifacts live beside the SQLite store, under the run's data root.
    assert (config.run.data_root / "mlflow" / "mlflow.db").is_file()
    assert list((config.run.data_root / "mlflow" / "artifacts").rglob("comparison.md"))

    # A retried flow run (same flow run id) and a resumed stage log into their runs, never into duplicates.
    with tracking.start_parent_run(config, flow_run_id) as again:
        assert again.info.run_id == parent_id
        with tracking.child_run(tracking.ParentRun.of(config, again), "generator", {"steps": 10}) as generator_again:
            assert generator_again.info.run_id == generator_id
    assert len(client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")) == 4
    assert client.get_experiment(parent.info.experiment_id).name == "augment-smoke"


def test_register_best_model_alias(config):
    model = torch.nn.Linear(3, 2)
    with tracking.start_parent_run(config, str(uuid.uuid4())) as parent:
        with tracking.child_run(tracking.ParentRun.of(config, parent), "classifier", {"ratio": 0.5}) as run:
            tracking.log_classifier(model)
    first = tracking.register_best_model(run.info.run_id, "classifier", "cxr-densenet", "best")
    second = tracking.register_best_model(run.info.run_id, "classifier", "cxr-densenet", "best",
                                          {"ratio": "0.5", "seed": "0"})

    by_alias = MlflowClient().get_model_version_by_alias("cxr-densenet", "best")
    assert (first.version, second.version, by_alias.version) == (1, 2, 2)
    assert by_alias.run_id == run.info.run_id and by_alias.tags == {"ratio": "0.5", "seed": "0"}
    loaded = mlflow.pytorch.load_model("models:/cxr-densenet@best")
    assert torch.equal(loaded.weight, model.weight)
    # The requirements are the given pins, not inferred (which would cost a subprocess per model).
    requirements = Path(mlflow.artifacts.download_artifacts(f"runs:/{run.info.run_id}/classifier/requirements.txt"))
    assert set(requirements.read_text().split()) >= set(tracking.MODEL_REQUIREMENTS)


def test_secret_guard_refuses_and_hides_the_secret(config, monkeypatch):
    secret = "s3cr3t-Pa55"
    monkeypatch.setenv("CXR_TEST_PASSWORD", secret)
    raw = {"run": {"name": "guarded", "data_root": str(config.run.data_root)}, "ingest": {"resolution": 64},
           "source": {"kind": "physionet", "password_env": "CXR_TEST_PASSWORD",
                      "base_url": f"https://user:{secret}@physionet.org/files"}}
    guarded = Config.model_validate(raw)
    assert tracking.known_secrets(guarded) == [secret]

    with pytest.raises(tracking.SecretLeakError) as refused:
        tracking.start_parent_run(guarded, str(uuid.uuid4()))
    assert "source.base_url" in str(refused.value) and secret not in repr(refused.value)
    experiment_id = tracking.use_tracking(guarded)
    assert mlflow.active_run() is None and mlflow.search_runs([experiment_id]).empty

    raw["source"]["base_url"] = "https://physionet.org/files"
    guarded = Config.model_validate(raw)
    with tracking.start_parent_run(guarded, str(uuid.uuid4())) as parent:
        nest = tracking.ParentRun.of(guarded, parent)
        assert secret not in repr(nest)  # it travels as a Prefect parameter: the variable's name only
        with pytest.raises(tracking.SecretLeakError) as refused:
            tracking.child_run(nest, "classifier", {"note": f"pw={secret}"})
        assert "'note'" in str(refused.value) and secret not in repr(refused.value)
        with pytest.raises(tracking.SecretLeakError):
            tracking.child_run(nest, "classifier", {}, {"login": secret})
    runs = mlflow.search_runs([experiment_id])
    assert len(runs) == 1 and not runs.astype(str).apply(lambda col: col.str.contains(secret)).any().any()


def test_server_uri_retries(tmp_path, monkeypatch):
    for name in ("MAX_RETRIES", "BACKOFF_FACTOR", "BACKOFF_JITTER", "TIMEOUT"):
        monkeypatch.delenv(f"MLFLOW_HTTP_REQUEST_{name}", raising=False)  # restored after the test
    requests_seen = []

    class Unavailable(BaseHTTPRequestHandler):
        def do_GET(self):
            requests_seen.append(self.path)
            self.send_response(503)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Unavailable)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        config = load_config(SMOKE, [
            f"run.data_root={tmp_path}", f"tracking.uri=http://127.0.0.1:{server.server_port}",
            "tracking.retries=2", "tracking.backoff_s=0"])
        with pytest.raises(MlflowException):
            tracking.use_tracking(config)
    finally:
        server.shutdown()
    assert len(requests_seen) == 3  # the first try and two retries
    assert not (tmp_path / "mlflow").exists()  # a server URI writes nothing locally


def test_the_verdict_says_helped_hurt_or_no_evidence_from_the_paired_interval():
    import pandas as pd

    rows = [{"pathology": name, "ratio": 0.5, "auroc": 0.8, "ci_low": 0.7, "ci_high": 0.9, "diff_vs_0": diff,
             "diff_ci_low": low, "diff_ci_high": high, "test_positives": positives}
            for name, diff, low, high, positives in [("Edema", 0.05, 0.01, 0.09, 40),
                                                     ("Fracture", -0.1, -0.2, -0.01, 4),
                                                     ("Pneumonia", 0.01, -0.03, 0.05, 30)]]
    lines = tracking.verdict_markdown(pd.DataFrame(rows)).splitlines()[2:]
    assert lines == ["| Edema | 50% | helped | +0.050 [+0.010, +0.090] |",
                     "| Fracture (4 test positives) | 50% | hurt | -0.100 [-0.200, -0.010] |",
                     "| Pneumonia | 50% | no evidence | +0.010 [-0.030, +0.050] |"]
