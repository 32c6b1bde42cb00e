"""The results as MLflow holds them (tasks/tracking.py): per generator's results run (the flow run's parent run
with one generator, the generator's own child run when several are compared: tracking.results_run), the
per-pathology test AUROC by synthetic ratio with its intervals (its comparison.csv) and the generator measures
beside their real references and the tokenizer's ceiling (its generator/* metrics), per generator family; with
links into the MLflow UI."""

from __future__ import annotations

import io
from dataclasses import dataclass

import pandas as pd
from mlflow import MlflowClient
from mlflow.artifacts import load_text
from mlflow.entities import Run

from tasks import layout
from tasks.browse import BadInput
from tasks.config import Config
from tasks.tracking import arm_folder, experiment_name, GENERATOR_RUN_TAG, RESULTS_TAG, tracking_uri

REFERENCE, CEILING = "_real_reference", "_tokenizer"
MLFLOW_UI = "http://127.0.0.1:5000"  # `make services-start` and the README's `mlflow ui` serve it here


@dataclass(frozen=True)
class RunResults:
    run_id: str
    run_name: str
    family: str  # the generator family, from the generator id ("raygen-..." -> "raygen")
    generator_id: str
    # tracking.comparison_table's columns (pathology, ratio, auroc, ci_low, ci_high, ...) and the arm of each row
    comparison: pd.DataFrame
    generator: pd.DataFrame  # measure, space, generated, real reference, tokenizer
    link: str  # the run in the MLflow UI


def latest_results(config: Config, ui: str = MLFLOW_UI) -> list[RunResults]:
    """The latest finished results run of each generator in the config's experiment, newest first."""
    store = layout.mlflow_dir(config.run.data_root)
    if not config.tracking.uri and not store.is_dir():
        raise BadInput(f"{store} does not exist: no MLflow store under this data root yet; run the pipeline on it "
                       "first (augment run --config ...)")
    client = MlflowClient(tracking_uri(config))
    experiment = client.get_experiment_by_name(experiment_name(config))
    if experiment is None:
        raise BadInput(f"no MLflow experiment {experiment_name(config)!r} in {tracking_uri(config)}: run the "
                       "pipeline on this config first")
    # A parent run tagged with its one generator, or a generator's own run beside others (its RESULTS_TAG); the
    # generator's training run and the classifier runs carry the generator's tag too, and are neither.
    holders = [run for run in client.search_runs([experiment.experiment_id], "attributes.status = 'FINISHED'",
                                                 order_by=["attributes.start_time DESC"])
               if GENERATOR_RUN_TAG in run.data.tags
               and ("mlflow.parentRunId" not in run.data.tags or RESULTS_TAG in run.data.tags)]
    # Per generator the newest run that logged its tables: a run whose stages were all unchanged (skipped) logs
    # none, and must not hide the results it skipped recomputing. The newest run stands in while none has them.
    latest: dict[str, tuple[Run, pd.DataFrame]] = {}
    for run in holders:
        generator_id = run.data.tags[GENERATOR_RUN_TAG]
        if generator_id not in latest or latest[generator_id][1].empty:
            comparison = _comparison(client, run, config)
            if generator_id not in latest or not comparison.empty:
                latest[generator_id] = run, comparison
    if not latest:
        raise BadInput(f"experiment {experiment.name!r} in {tracking_uri(config)} has no finished run with a "
                       "generator yet: let a pipeline run finish")
    return [RunResults(run.info.run_id, run.info.run_name, generator_id.split("-")[0], generator_id, comparison,
                       generator_measures(run.data.metrics),
                       f"{ui}/#/experiments/{experiment.experiment_id}/runs/{run.info.run_id}")
            for generator_id, (run, comparison) in latest.items()]


def _comparison(client: MlflowClient, run: Run, config: Config) -> pd.DataFrame:
    """Each arm's comparison.csv (where tracking.arm_folder puts it), with an arm column; empty while retrain has not
    logged them."""
    names = [arm.name for arm in config.retrain.arms]
    tables = []
    for name in names:
        folder = arm_folder(names, name)
        path = f"{folder}/comparison.csv" if folder else "comparison.csv"
        if path in {artifact.path for artifact in client.list_artifacts(run.info.run_id, folder or None)}:
            text = load_text(f"{run.info.artifact_uri}/{path}")
            tables.append(pd.read_csv(io.StringIO(text)).assign(arm=name))
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()


def generator_measures(metrics: dict[str, float]) -> pd.DataFrame:
    """generator/<measure>/<space> beside generator/<measure>_real_reference/<space> and .._tokenizer/<space>, and
    the MS-SSIM diversity beside real pairs' (space '-'): one row each."""
    rows = []
    for key, value in sorted(metrics.items()):
        parts = key.split("/")
        if len(parts) != 3 or parts[0] != "generator" or parts[1].endswith((REFERENCE, CEILING)):
            continue
        _, measure, space = parts
        reference = metrics.get(f"generator/{measure}{REFERENCE}/{space}")
        if reference is not None:
            rows.append({"measure": measure, "space": space, "generated": value, "real reference": reference,
                         "tokenizer": metrics.get(f"generator/{measure}{CEILING}/{space}")})
    if "generator/ms_ssim" in metrics:
        rows.append({"measure": "ms_ssim", "space": "-", "generated": metrics["generator/ms_ssim"],
                     "real reference": metrics.get(f"generator/ms_ssim{REFERENCE}"), "tokenizer": None})
    return pd.DataFrame(rows, columns=["measure", "space", "generated", "real reference", "tokenizer"])
