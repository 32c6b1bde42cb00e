"""The whole augment flow on the smoke config, as `make demo` runs it on the demo config: every stage runs, MLflow
holds what a person opens (a parent run with the comparison, child runs per ratio, the generator's run), a second
run with nothing changed skips every stage (and shows each in the run graph as Cached), and a run from another empty
data root gives the same cohorts, tokens, synthetic images and tables."""

import asyncio
from pathlib import Path

import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient

from flows.full import STAGES
from tasks import layout
from tasks.data import catalog
from tasks.generators.synthesis import load_plan, load_synthetic, synth_ids
from tasks.pathologies import PATHOLOGIES

SMOKE = str(Path(__file__).resolve().parent.parent / "configs" / "smoke.yaml")
# The whole pipeline trains three models: minutes on an idle 2-core machine, far more on a busy one.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]


def run_from_empty(tmp_path_factory, name: str) -> tuple[Path, dict]:
    from flows.full import augment

    root = tmp_path_factory.mktemp(name)
    return root, augment(config_path=SMOKE, overrides=[f"run.data_root={root}"])


@pytest.fixture(scope="module")
def full_run(smoke_run):
    return smoke_run


def runs(root: Path):
    client = MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow/mlflow.db")
    experiment = client.get_experiment_by_name("augment-smoke")
    return client, client.search_runs([experiment.experiment_id])


def test_every_stage_ran_and_recorded_completion(full_run):
    root, result = full_run
    assert list(result) == list(STAGES)
    assert {path.stem for path in (root / "stages").glob("*.json")} == set(STAGES)
    synthesized = result["synthesize"]["raygen"]  # the per-generator stages' summaries, by family
    assert synthesized["generated"] == synthesized["images"] > 0


FULL_DATA_RUNS = ("full-data-ratio-0-seed-0", "full-data-ratio-0.5-seed-0", "full-data-ratio-1-seed-0")
LOW_DATA_RUNS = ("low-data-50-ratio-0-seed-0", "low-data-50-ratio-1-seed-0")


def test_mlflow_parent_has_children_per_ratio_with_auroc_per_pathology(full_run):
    root, result = full_run
    client, found = runs(root)
    parents = [run for run in found if "mlflow.parentRunId" not in run.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    children = {run.info.run_name: run for run in found if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {"generator", *FULL_DATA_RUNS, *LOW_DATA_RUNS}
    generator_id = result["train_generator"]["raygen"]["generator_id"]
    assert parent.data.tags["generator_run_id"] == generator_id
    assert parent.data.tags["git_commit"] and parent.data.tags["data_fingerprint"]
    for name in (*FULL_DATA_RUNS, *LOW_DATA_RUNS):
        run = children[name]
        assert run.data.tags["generator_run_id"] == generator_id
        assert "test/auroc/macro" in run.data.metrics
        for pathology in PATHOLOGIES:
            # Scored, or skipped with the reason (the smoke test set is small): never silently missing.
            assert (f"test/auroc/{pathology}" in run.data.metrics
                    or f"test/auroc/skipped/{pathology}" in run.data.tags), (name, pathology)
        assert "roc_curves.png" in {a.path for a in client.list_artifacts(run.info.run_id)}
    parent_artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"comparison.csv", "comparison.md", "verdict.md", "auroc_by_ratio.png", "samples_by_class.png",
            "synthesis_plan.md", "generator_evaluation.md", "memorisation_closest_pairs.png", "feature_pca.png",
            "fidelity_diversity.png"} <= parent_artifacts
    # The low-data arm: its own table, verdict and plot, its classifiers on half the real training patients.
    arm_artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "arms/low-data-50")}
    assert {f"arms/low-data-50/{name}" for name in ("comparison.csv", "comparison.md", "verdict.md",
                                                      "auroc_by_ratio.png")} <= arm_artifacts
    low, full = children[LOW_DATA_RUNS[0]].data.params, children[FULL_DATA_RUNS[0]].data.params
    assert 0 < int(low["real_train_images"]) < int(full["real_train_images"])
    assert (low["arm"], full["arm"]) == ("low-data-50", "full-data")
    # The sampler sweep: each point's measures, beside the curve.
    for point in ("configured", "guidance_scale:1", "confidence_temperature:4.5 temperature_decay:constant"):
        assert f"generator/sweep/{point}/fid" in parent.data.metrics, point
    assert "generator/fid/densenet121-xrv" in parent.data.metrics
    assert "generator/ms_ssim" in parent.data.metrics
    for measure in ("kid", "precision", "recall", "density", "coverage"):  # each beside its real reference
        assert {f"generator/{measure}/densenet121-xrv", f"generator/{measure}_real_reference/densenet121-xrv",
                f"generator/{measure}_tokenizer/densenet121-xrv"} <= set(parent.data.metrics), measure
    assert 0 <= parent.data.metrics["generator/memorisation/share_closer_than_held_out_p1"] <= 1
    # Beside each, its real-data reference. At smoke size (a dozen images a half) the values are noise: what they
    # say about a generator is tested on a task that can tell (tests/test_generator_eval.py).
    for name in ("fid", "fid_real_reference", "fid_tokenizer"):
        assert 0 <= parent.data.metrics[f"generator/{name}/densenet121-xrv"] < float("inf"), name
    assert 0 < parent.data.metrics["generator/ms_ssim_real_reference"] < 1
    samples = client.list_artifacts(children["generator"].info.run_id, "samples")
    assert samples, "the generator run logged no sample grid"


def test_best_classifier_is_registered(full_run):
    root, result = full_run
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow/mlflow.db")
    version = MlflowClient().get_model_version_by_alias("cxr-densenet-smoke", "best")
    assert version.run_id == result["retrain"]["raygen"]["best_run_id"]


def test_second_run_with_nothing_changed_skips_every_stage_and_shows_each_as_cached(full_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    from flows.full import augment

    root, first = full_run
    records = {path.name: path.stat().st_mtime_ns for path in (root / "stages").glob("*.json")}
    state = augment(config_path=SMOKE, overrides=[f"run.data_root={root}"], return_state=True)
    second = state.result()
    assert {path.name: path.stat().st_mtime_ns for path in (root / "stages").glob("*.json")} == records
    assert second["retrain"]["raygen"]["comparison_markdown"] == first["retrain"]["raygen"]["comparison_markdown"]

    async def stage_runs():
        async with get_client() as client:
            return await client.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[state.state_details.flow_run_id])))

    shown = {run.name: run.state for run in asyncio.run(stage_runs())}
    assert set(shown) == {f"{name} (unchanged)" for name in STAGES}
    assert all(state.name == "Cached" and state.is_completed() and "fingerprint" in state.message
               for state in shown.values())
    # The app still shows the tables of the run that computed them, not the newer run that skipped them.
    from tasks.browse.results import latest_results
    from tasks.config import load_config

    _, found = runs(root)
    first_parent, _ = sorted((run for run in found if "mlflow.parentRunId" not in run.data.tags),
                                         key=lambda run: run.info.start_time)
    (results,) = latest_results(load_config(SMOKE, [f"run.data_root={root}"]))
    assert results.run_id == first_parent.info.run_id and not results.comparison.empty


def test_two_runs_from_empty_data_roots_give_the_same_results(full_run, tmp_path_factory):
    (root, first), (other, second) = full_run, run_from_empty(tmp_path_factory, "again")
    for name in ("generator", "classifier"):
        assert pq.read_table(layout.cohort_file(root, name)).equals(pq.read_table(layout.cohort_file(other, name)))

    def tokens(data_root: Path):
        with catalog.connect(data_root) as con:
            return con.sql("SELECT dicom_id, vqgan_id, tokens FROM tokens ORDER BY dicom_id").fetchall()

    assert tokens(root) == tokens(other)
    first, second = ({name: result[name]["raygen"] for name in ("synthesize", "retrain", "evaluate_generator")}
                     for result in (first, second))
    assert first["synthesize"]["output_id"] == second["synthesize"]["output_id"]
    ids = synth_ids(load_plan(root).rows, seed=0)
    assert load_plan(root).rows == load_plan(other).rows
    images, labels = load_synthetic(root, first["synthesize"]["output_id"], ids)
    again, labels_again = load_synthetic(other, second["synthesize"]["output_id"], ids)
    np.testing.assert_array_equal(images, again)
    np.testing.assert_array_equal(labels, labels_again)
    assert second["retrain"]["comparison_markdown"] == first["retrain"]["comparison_markdown"]
    assert second["evaluate_generator"]["metrics"] == first["evaluate_generator"]["metrics"]


def test_replicates_recompute_each_runs_differences_and_pool_them(full_run, tmp_path, capsys):
    from commands.cli import main
    from tasks.config import load_config
    from tasks.evaluation.replicates import pooled_markdown, replicate_scores

    root, result = full_run
    config = load_config(SMOKE, [f"run.data_root={root}"])
    scores = replicate_scores(config, root, "raygen")
    assert set(scores) == {arm.name for arm in config.retrain.arms}
    assert set(scores["low-data-50"].by_ratio) == {0.0, 1.0}
    table = pooled_markdown(config, {"first": scores, "again": scores})
    block = table.split("Arm low-data-50, 100% synthetic against 0%, over 2 replicates:")[1]
    macro = next(line for line in block.splitlines() if line.startswith("| macro"))
    first, again, pooled = (cell.strip() for cell in macro.split("|")[2:5])
    # Scored again from the saved classifiers, a replicate's column is its retrain stage's own paired difference.
    own = next(row for row in result["retrain"]["raygen"]["comparison"]["low-data-50"]
               if row["pathology"] == "macro" and row["ratio"] == 1.0)
    assert first == f"{own['diff_vs_0']:+.3f} [{own['diff_ci_low']:+.3f}, {own['diff_ci_high']:+.3f}]"
    # The same run twice: the pooled estimate is its own, from resamples of both copies.
    assert first.split()[0] == again.split()[0] == pooled.split()[0]

    assert main(["replicates", "--config", SMOKE, "--set", f"run.data_root={root}", str(root), str(tmp_path)]) == 2
    assert f"{tmp_path}/stages/retrain.json: no completed retrain stage of raygen" in capsys.readouterr().err
