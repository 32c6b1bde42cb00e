"""MLflow tracking: one experiment per config, a parent run per flow run, child runs per model, figures, the registry.

The store is a SQLite file under <data_root>/mlflow by default (artifacts beside it), or the server of tracking.uri.
Runs are found again by their tags, so a retried flow run or a resumed stage logs into the run it started instead
of duplicating it. Every param and tag is checked against the PhysioNet password before it leaves the process.
Child runs take the config and their parent's id explicitly, because Prefect tasks may run them in another
thread or process, where MLflow's active run of the flow is not visible.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # read by MLflow on import

import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402  (no pyplot: no global figure state, safe in threads)
from mlflow import ActiveRun, MlflowClient  # noqa: E402
from mlflow.entities.model_registry import ModelVersion  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from sklearn.decomposition import PCA  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from tasks import layout  # noqa: E402
from tasks.config import Config, PhysioNetSource  # noqa: E402
from tasks.evaluation.metrics import BootstrapReport, PairedReport, auroc_per_class  # noqa: E402
from tasks.pathologies import PATHOLOGIES  # noqa: E402


GIT_COMMIT_TAG = "git_commit"
FLOW_RUN_TAG = "prefect.flow_run_id"
CONFIG_FINGERPRINT_TAG = "config_fingerprint"
DATA_FINGERPRINT_TAG = "data_fingerprint"
GENERATOR_RUN_TAG = "generator_run_id"  # on every run trained or evaluated on a generator's images
SYNTHETIC_OUTPUT_TAG = "synthetic_output_id"  # the generator's weights and sampling settings those images came from
# On a generator's own child run when several are compared: it holds that generator's evaluation and downstream
# table (with one generator they are the parent run's, as they always were).
RESULTS_TAG = "generator_results"


class SecretLeakError(ValueError):
    """A param or tag would carry a secret; the message names the key, never the value."""


def tracking_uri(config: Config) -> str:
    if config.tracking.uri:
        return config.tracking.uri
    return f"sqlite:///{(layout.mlflow_dir(config.run.data_root) / 'mlflow.db').resolve()}"


def experiment_name(config: Config) -> str:
    return config.tracking.experiment or f"augment-{config.run.name}"


def use_tracking(config: Config) -> str:
    """Point this process's MLflow at the config's store and experiment (created if new); the experiment id."""
    if config.tracking.uri and config.tracking.uri.startswith(("http://", "https://")):
        # MLflow's REST client retries connection errors and 429/5xx answers with exponential backoff, reading
        # these variables on every request.
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(config.tracking.retries)
        os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = str(config.tracking.backoff_s)
        os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_JITTER"] = str(config.tracking.backoff_s)
        os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(config.tracking.timeout_s)
    elif not config.tracking.uri:
        layout.mlflow_dir(config.run.data_root).mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(tracking_uri(config))
    name = experiment_name(config)
    client = MlflowClient()
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        # The client that creates an experiment decides where its artifacts go: the local store keeps them
        # beside the database; a server uses its own artifact root.
        location = None
        if not config.tracking.uri:
            location = (layout.mlflow_dir(config.run.data_root) / "artifacts").resolve().as_uri()
        try:
            client.create_experiment(name, artifact_location=location)
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":  # another process created it first
                raise
        experiment = client.get_experiment_by_name(name)
    mlflow.set_experiment(experiment_id=experiment.experiment_id)
    return experiment.experiment_id


def git_commit() -> str:
    """The checked-out commit of this repository, or "unknown" without git or without a commit."""
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=layout.REPO_ROOT, capture_output=True, text=True,
                                timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return result.stdout.strip() if result.returncode == 0 else "unknown"


def _password_env(config: Config) -> str | None:
    return config.source.password_env if isinstance(config.source, PhysioNetSource) else None


def _secrets(password_env: str | None) -> list[str]:
    password = os.environ.get(password_env, "") if password_env else ""
    return [password] if password else []


def known_secrets(config: Config) -> list[str]:
    """Values that must never be logged: the PhysioNet password, from the environment variable the source names."""
    return _secrets(_password_env(config))


@dataclass(frozen=True)
class ParentRun:
    """What a stage needs of the flow run's MLflow run to nest its own runs under it: never a secret itself (it is
    a Prefect parameter), only the name of the variable that holds one, so children refuse to log it too."""

    run_id: str
    experiment_id: str
    password_env: str | None = None

    @classmethod
    def of(cls, config: Config, run: ActiveRun) -> ParentRun:
        return cls(run.info.run_id, run.info.experiment_id, _password_env(config))


def refuse_secrets(values: Mapping[str, object], secrets: list[str], what: str) -> None:
    """Raise SecretLeakError if any key or value equals or contains a secret."""
    for key, value in values.items():
        for secret in secrets:
            if secret in str(value) or secret in key:
                named = "a key" if secret in key else repr(key)
                raise SecretLeakError(f"refusing to log {what} {named} to MLflow: it contains the PhysioNet "
                                      "password; remove the credential from the config or the value")


def _config_params(config: Config) -> dict[str, str]:
    """The config flattened to section.key params, so runs can be compared on any setting."""
    params: dict[str, str] = {}

    def flatten(prefix: str, node: object) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                flatten(f"{prefix}.{key}" if prefix else key, value)
        else:
            params[prefix] = str(node)

    flatten("", config.model_dump(mode="json"))
    return params


def _start_run(secrets: list[str], existing: str | None, name: str, parent_run_id: str | None,
               params: Mapping[str, object], tags: dict[str, str]) -> ActiveRun:
    refuse_secrets(params, secrets, "param")
    refuse_secrets(tags, secrets, "tag")
    if existing:
        run = mlflow.start_run(run_id=existing, nested=parent_run_id is not None, tags=tags)
    else:
        run = mlflow.start_run(run_name=name, nested=parent_run_id is not None, parent_run_id=parent_run_id,
                               tags=tags)
    try:
        mlflow.log_params(params)
    except Exception:
        mlflow.end_run("FAILED")
        raise
    return run


def start_parent_run(config: Config, flow_run_id: str, data_fingerprint: str | None = None) -> ActiveRun:
    """The run of one flow run (a context manager), with the config as params; a retried flow run resumes it."""
    experiment_id = use_tracking(config)
    tags = {GIT_COMMIT_TAG: git_commit(), FLOW_RUN_TAG: flow_run_id,
            CONFIG_FINGERPRINT_TAG: config.section_fingerprint(*type(config).model_fields)}
    if data_fingerprint:
        tags[DATA_FINGERPRINT_TAG] = data_fingerprint
    # Only parents carry the flow run tag; the id is Prefect's UUID, safe inside the quotes.
    found = MlflowClient().search_runs([experiment_id], f"tags.`{FLOW_RUN_TAG}` = '{flow_run_id}'", max_results=1)
    existing = found[0].info.run_id if found else None
    return _start_run(known_secrets(config), existing, f"augment-{config.run.name}", None, _config_params(config),
                      tags)


def child_run(parent: ParentRun, name: str, params: Mapping[str, object],
              tags: Mapping[str, str] | None = None) -> ActiveRun:
    """A run nested under the parent (a context manager); a child of that name that already exists is resumed.
    MLflow must already point at the parent's store (start_parent_run did so in this process)."""
    siblings = MlflowClient().search_runs([parent.experiment_id], f"tags.mlflow.parentRunId = '{parent.run_id}'")
    existing = next((run.info.run_id for run in siblings if run.info.run_name == name), None)
    all_tags = {GIT_COMMIT_TAG: git_commit(), **(tags or {})}
    return _start_run(_secrets(parent.password_env), existing, name, parent.run_id, params, all_tags)


def generator_run_name(family: str, generators: Sequence[str]) -> str:
    """The child run of a generator's training: 'generator' when it is the only one, 'generator-<family>' beside
    others."""
    return "generator" if len(generators) == 1 else f"generator-{family}"


def results_run_name(family: str, generators: Sequence[str]) -> str | None:
    """The run that holds a generator's evaluation panel, downstream table and classifier runs: None (the parent
    run itself) with one generator; with several, the generator's own child run, beside its training curves, which
    the parent's comparison across families sums up."""
    return None if len(generators) == 1 else generator_run_name(family, generators)


@contextmanager
def results_run(parent: ParentRun, name: str | None, generator_id: str) -> Iterator[ParentRun]:
    """The run results_run_name names, as the active run and as the run to nest under (resumed by its name, or
    started under the parent)."""
    if name is None:
        yield parent
        return
    with child_run(parent, name, {}, {GENERATOR_RUN_TAG: generator_id, RESULTS_TAG: "true"}) as run:
        yield ParentRun(run.info.run_id, parent.experiment_id, parent.password_env)


def classifier_model_name(run_name: str, family: str, generators: Sequence[str]) -> str:
    """The registered name of the best classifier retrained on a generator's images: one per generator compared."""
    return f"cxr-densenet-{run_name}" if len(generators) == 1 else f"cxr-densenet-{run_name}-{family}"


# What a logged classifier needs to load (its pickle holds torchxrayvision's DenseNet). Given, MLflow does not infer
# them, which costs a subprocess that imports torch: about 10 s per model, a minute and a half of the demo.
MODEL_REQUIREMENTS = [f"{package}=={metadata.version(package)}" for package in ("torch", "torchxrayvision")]


def log_classifier(model, name: str = "classifier") -> None:
    """The classifier into the active run as an MLflow PyTorch model (load it with mlflow.pytorch.load_model)."""
    mlflow.pytorch.log_model(model, name=name, serialization_format="pickle", pip_requirements=MODEL_REQUIREMENTS)


def log_metrics_per_pathology(prefix: str, report: BootstrapReport | PairedReport,
                              step: int | None = None) -> dict[str, float]:
    """Log <prefix>/<Pathology> and <prefix>/macro with /ci_low and /ci_high to the active run.

    A class that could not be scored gets a tag <prefix>/skipped/<Pathology> with the reason instead."""
    metrics: dict[str, float] = {}
    for name, interval in [*report.per_class.items(), ("macro", report.macro)]:
        if interval is not None:
            metrics[f"{prefix}/{name}"] = interval.estimate
            metrics[f"{prefix}/{name}/ci_low"] = interval.ci_low
            metrics[f"{prefix}/{name}/ci_high"] = interval.ci_high
    mlflow.log_metrics(metrics, step=step)
    if report.skipped:
        mlflow.set_tags({f"{prefix}/skipped/{name}": reason for name, reason in report.skipped.items()})
    return metrics


def log_roc_curves(labels: np.ndarray, scores: np.ndarray, artifact_file: str = "roc_curves.png") -> None:
    """One ROC panel per pathology (NaN labels masked) into the active run; an unscorable class says why."""
    report = auroc_per_class(labels, scores)
    fig = Figure(figsize=(16, 7), layout="constrained")
    for ax, (c, name) in zip(fig.subplots(2, 5).flat, enumerate(PATHOLOGIES)):
        ax.plot([0, 1], [0, 1], ls=":", color="grey")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="false positive rate", ylabel="true positive rate", aspect="equal")
        if report.per_class[name] is None:
            ax.set_title(f"{name}\nno AUROC: {report.skipped[name]}", fontsize=9)
            continue
        known = ~np.isnan(labels[:, c])
        fpr, tpr, _ = roc_curve(labels[known, c], scores[known, c])
        ax.plot(fpr, tpr)
        ax.set_title(f"{name}\nAUROC {report.per_class[name]:.3f}", fontsize=9)
    mlflow.log_figure(fig, artifact_file)


FEW_TEST_POSITIVES = 20  # below this a class's AUROC rests on too few positives to say much: marked


def comparison_table(reports: Mapping[float, BootstrapReport],
                     differences: Mapping[float, PairedReport] | None = None,
                     test_positives: Mapping[str, int] | None = None) -> pd.DataFrame:
    """One row per (pathology or macro, ratio): AUROC with its interval, the paired difference to ratio 0, and the
    class's positive test images (NaN for the macro, or when not given)."""
    rows = []
    for ratio, report in sorted(reports.items()):
        paired = (differences or {}).get(ratio)
        for name in [*PATHOLOGIES, "macro"]:
            interval = report.macro if name == "macro" else report.per_class[name]
            diff = None if paired is None else (paired.macro if name == "macro" else paired.per_class[name])
            rows.append({
                "pathology": name, "ratio": ratio,
                "auroc": np.nan if interval is None else interval.estimate,
                "ci_low": np.nan if interval is None else interval.ci_low,
                "ci_high": np.nan if interval is None else interval.ci_high,
                "diff_vs_0": np.nan if diff is None else diff.estimate,
                "diff_ci_low": np.nan if diff is None else diff.ci_low,
                "diff_ci_high": np.nan if diff is None else diff.ci_high,
                "test_positives": (test_positives or {}).get(name, np.nan),
            })
    return pd.DataFrame(rows)


def comparison_markdown(table: pd.DataFrame) -> str:
    """The comparison table for people: a row per pathology, AUROC [95% CI] per ratio, then differences to 0%."""

    def cell(value: float, low: float, high: float, signed: bool = False) -> str:
        if np.isnan(value):
            return "n/a"
        return f"{value:+.3f} [{low:+.3f}, {high:+.3f}]" if signed else f"{value:.3f} [{low:.3f}, {high:.3f}]"

    names = list(table["pathology"].unique())

    def column(rows: pd.DataFrame, keys: list[str], signed: bool = False) -> list[str]:
        return [cell(*values, signed) for values in rows.set_index("pathology").loc[names, keys].itertuples(False)]

    by_ratio = dict(list(table.groupby("ratio", sort=True)))
    wide = pd.DataFrame({f"AUROC {ratio:.0%} synthetic": column(rows, ["auroc", "ci_low", "ci_high"])
                         for ratio, rows in by_ratio.items()}, index=pd.Index(names, name="pathology"))
    for ratio, rows in by_ratio.items():
        if rows["diff_vs_0"].notna().any():
            wide[f"Δ {ratio:.0%} vs 0%"] = column(rows, ["diff_vs_0", "diff_ci_low", "diff_ci_high"], signed=True)
    positives = table.drop_duplicates("pathology").set_index("pathology")["test_positives"]
    if positives.notna().any():
        wide["test positives"] = [
            "" if np.isnan(count)
            else f"{int(count)}" + (f" (<{FEW_TEST_POSITIVES})" if count < FEW_TEST_POSITIVES else "")
            for count in positives.loc[names]]
    return wide.to_markdown()


def verdict_markdown(table: pd.DataFrame) -> str:
    """Per pathology and synthetic ratio, what the paired interval says: helped (it lies above 0), hurt (below 0)
    or no evidence (it contains 0), with the interval; classes with few test positives are marked."""
    lines = ["| pathology | ratio | verdict | Δ AUROC vs 0% [95% CI] |", "|---|---|---|---|"]
    for row in table[table["diff_vs_0"].notna()].sort_values(["pathology", "ratio"], key=_pathology_order
                                                            ).itertuples():
        verdict = ("helped" if row.diff_ci_low > 0 else "hurt" if row.diff_ci_high < 0 else "no evidence")
        few = (f" ({int(row.test_positives)} test positives)"
               if not np.isnan(row.test_positives) and row.test_positives < FEW_TEST_POSITIVES else "")
        lines.append(f"| {row.pathology}{few} | {row.ratio:.0%} | {verdict} | "
                     f"{row.diff_vs_0:+.3f} [{row.diff_ci_low:+.3f}, {row.diff_ci_high:+.3f}] |")
    return "\n".join(lines)


def _pathology_order(column: pd.Series) -> pd.Series:
    order = {name: k for k, name in enumerate([*PATHOLOGIES, "macro"])}
    return column.map(order) if column.name == "pathology" else column


def arm_folder(arm_names: list[str], arm: str) -> str:
    """Where an arm's comparison table, verdict and plot sit in the parent run: the reference (first) arm's at the
    top, where a person looks first; every other arm's under arms/<arm>."""
    return "" if arm == arm_names[0] else f"arms/{arm}"


def log_comparison_table(table: pd.DataFrame, folder: str = "") -> str:
    """Log comparison.csv (numbers), comparison.md (for people) and verdict.md (helped / hurt / no evidence per
    pathology) to the active run, in an artifact folder if given; returns the markdown."""
    prefix = f"{folder}/" if folder else ""
    markdown = comparison_markdown(table)
    mlflow.log_text(table.to_csv(index=False), f"{prefix}comparison.csv")
    mlflow.log_text(markdown + "\n", f"{prefix}comparison.md")
    if table["diff_vs_0"].notna().any():
        mlflow.log_text(verdict_markdown(table) + "\n", f"{prefix}verdict.md")
    return markdown


def log_auroc_bars(table: pd.DataFrame, artifact_file: str = "auroc_by_ratio.png") -> None:
    """Bars of AUROC per pathology (and macro), one colour per synthetic ratio, 95% intervals as error bars."""
    names = list(table["pathology"].unique())
    ratios = sorted(table["ratio"].unique())
    width = 0.8 / len(ratios)
    fig = Figure(figsize=(14, 5), layout="constrained")
    ax = fig.subplots()
    for i, ratio in enumerate(ratios):
        rows = table[table["ratio"] == ratio].set_index("pathology").loc[names]
        errors = [rows["auroc"] - rows["ci_low"], rows["ci_high"] - rows["auroc"]]
        x = np.arange(len(names)) + (i - (len(ratios) - 1) / 2) * width
        ax.bar(x, rows["auroc"], width, yerr=errors, capsize=2, label=f"{ratio:.0%} synthetic")
    ax.axhline(0.5, ls=":", color="grey")
    ax.set(xticks=np.arange(len(names)), ylim=(0, 1), ylabel="test AUROC (95% CI)")
    ax.set_xticklabels(names, rotation=30, ha="right")
    ax.legend()
    mlflow.log_figure(fig, artifact_file)


def log_sample_grid(real: Mapping[str, np.ndarray], synthetic: Mapping[str, np.ndarray],
                    artifact_file: str = "samples_by_class.png") -> None:
    """A row per pathology: real uint8 images [k, R, R] on the left, synthetic ones on the right."""
    per_side = max(len(images) for images in [*real.values(), *synthetic.values()])
    fig = Figure(figsize=(1.3 * 2 * per_side, 1.5 * len(PATHOLOGIES)), layout="constrained")
    axes = fig.subplots(len(PATHOLOGIES), 2 * per_side, squeeze=False)
    for row, name in enumerate(PATHOLOGIES):
        for side, (kind, images) in enumerate((("real", real.get(name, ())), ("synthetic", synthetic.get(name, ())))):
            for k in range(per_side):
                ax = axes[row, side * per_side + k]
                ax.set_axis_off()
                if k < len(images):
                    ax.imshow(images[k], cmap="gray", vmin=0, vmax=255)
            title = f"{name}: {kind}" if len(images) else f"{name}: no {kind} images"
            axes[row, side * per_side].set_title(title, loc="left", fontsize=8)
    mlflow.log_figure(fig, artifact_file)


def log_closest_pairs(pairs: list[tuple[np.ndarray, np.ndarray, float]], held_out_p1: float,
                      artifact_file: str = "memorisation_closest_pairs.png") -> None:
    """The generated images nearest to a training image, each above its nearest training image, into the active
    run: what a person checks for copies. The title gives the distance beside the held-out 1st percentile."""
    if not pairs:
        return
    fig = Figure(figsize=(1.6 * len(pairs), 3.6), layout="constrained")
    axes = fig.subplots(2, len(pairs), squeeze=False)
    for k, (generated, training, distance) in enumerate(pairs):
        for row, image in enumerate((generated, training)):
            axes[row, k].imshow(image, cmap="gray", vmin=0, vmax=255)
            axes[row, k].set_axis_off()
        axes[0, k].set_title(f"d={distance:.3g}", fontsize=8)
    axes[0, 0].text(0, -0.35, "generated", transform=axes[0, 0].transAxes, fontsize=8)
    axes[1, 0].text(0, -0.15, "nearest training image", transform=axes[1, 0].transAxes, fontsize=8)
    fig.suptitle(f"Closest generated-training pairs (held-out 1st percentile: {held_out_p1:.3g})", fontsize=9)
    mlflow.log_figure(fig, artifact_file)


def log_fidelity_diversity(points, artifact_file: str = "fidelity_diversity.png") -> None:
    """The sampler sweep (generator_eval.SweepPoint list, the real floor first) as two panels: FID against
    within-prompt MS-SSIM (lower left is sharp and diverse) and precision against recall (upper right is best)."""
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    left, right = fig.subplots(1, 2)
    for index, point in enumerate(points):
        style = {"marker": "*", "s": 120, "color": "black"} if index == 0 else {"marker": "o", "s": 40}
        if point.ms_ssim is not None:
            left.scatter(point.ms_ssim, point.fid, **style)
            left.annotate(point.label, (point.ms_ssim, point.fid), fontsize=7, xytext=(4, 2),
                          textcoords="offset points")
        right.scatter(point.recall, point.precision, **style)
        right.annotate(point.label, (point.recall, point.precision), fontsize=7, xytext=(4, 2),
                       textcoords="offset points")
    left.set(xlabel="MS-SSIM within a prompt (real: across studies); lower is more diverse",
             ylabel="FID, in-domain features (lower is better)")
    right.set(xlabel="recall (diversity)", ylabel="precision (fidelity)", xlim=(-0.02, 1.02), ylim=(-0.02, 1.02))
    fig.suptitle("Sampler sweep: fidelity against diversity (star: real held-out images)", fontsize=10)
    mlflow.log_figure(fig, artifact_file)


def log_feature_pca(real: np.ndarray, generated: Mapping[str, np.ndarray], artifact_file: str = "feature_pca.png"
                    ) -> None:
    """Real and generated in-domain features [n, D] (one set per label: a generator, or a family beside others) on
    the first two principal components of the real ones: a generator that covers the real distribution overlaps
    it; a mode-collapsed one sits in a corner."""
    pca = PCA(n_components=2).fit(real)
    fig = Figure(figsize=(5.5, 5), layout="constrained")
    ax = fig.subplots()
    for name, features in (("real held-out", real), *generated.items()):
        projected = pca.transform(features)
        ax.scatter(projected[:, 0], projected[:, 1], s=8, alpha=0.6, label=f"{name} ({len(features)})")
    share = pca.explained_variance_ratio_
    ax.set(xlabel=f"PC 1 of the real features ({share[0]:.0%})", ylabel=f"PC 2 ({share[1]:.0%})")
    ax.legend(fontsize=8)
    mlflow.log_figure(fig, artifact_file)


def family_deltas(tables: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """family -> its comparison_table (one arm's) as one table of the paired differences to ratio 0: a row per
    (family, ratio > 0, pathology or macro) with diff_vs_0 and its interval (NaN: a class that cannot be scored)."""
    rows = [table[table["ratio"] > 0].assign(family=family) for family, table in tables.items()]
    columns = ["family", "ratio", "pathology", "diff_vs_0", "diff_ci_low", "diff_ci_high", "test_positives"]
    return pd.concat(rows, ignore_index=True)[columns]


def log_family_comparison(deltas: pd.DataFrame, folder: str = "families") -> str:
    """The families side by side (family_deltas' table) into the active run: families/auroc_delta.csv, a markdown
    table (a row per pathology, Δ AUROC [95% CI] per family and ratio) and families/auroc_delta.png (bars per
    family, a panel per ratio); returns the markdown."""
    names = [*PATHOLOGIES, "macro"]
    wide = pd.DataFrame(index=pd.Index(names, name="pathology"))
    for (ratio, family), rows in deltas.groupby(["ratio", "family"], sort=False):
        wide[f"{family} Δ {ratio:.0%} vs 0%"] = [
            "n/a" if np.isnan(row.diff_vs_0)
            else f"{row.diff_vs_0:+.3f} [{row.diff_ci_low:+.3f}, {row.diff_ci_high:+.3f}]"
            for row in rows.set_index("pathology").reindex(names).itertuples()]
    markdown = wide.to_markdown()
    mlflow.log_text(deltas.to_csv(index=False), f"{folder}/auroc_delta.csv")
    mlflow.log_text(markdown + "\n", f"{folder}/auroc_delta.md")
    ratios = sorted(deltas["ratio"].unique())
    families = list(dict.fromkeys(deltas["family"]))
    panels = max(1, len(ratios))  # no ratio above 0: an empty panel, as the table says n/a
    fig = Figure(figsize=(14, 4 * panels), layout="constrained")
    axes = fig.subplots(panels, 1, squeeze=False)[:, 0]
    width = 0.8 / len(families) if families else 0.8
    for ax, ratio in zip(axes, ratios):
        for i, family in enumerate(families):
            chosen = (deltas["ratio"] == ratio) & (deltas["family"] == family)
            rows = deltas[chosen].set_index("pathology").reindex(names)
            errors = [rows["diff_vs_0"] - rows["diff_ci_low"], rows["diff_ci_high"] - rows["diff_vs_0"]]
            x = np.arange(len(names)) + (i - (len(families) - 1) / 2) * width
            ax.bar(x, rows["diff_vs_0"], width, yerr=errors, capsize=2, label=family)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set(xticks=np.arange(len(names)), ylabel=f"Δ test AUROC, {ratio:.0%} vs 0% (95% CI)")
        ax.set_xticklabels(names, rotation=30, ha="right")
        ax.legend()
    mlflow.log_figure(fig, f"{folder}/auroc_delta.png")
    return markdown


def register_best_model(run_id: str, artifact_path: str, name: str, alias: str,
                        tags: Mapping[str, str] | None = None) -> ModelVersion:
    """Register the model logged at runs:/<run_id>/<artifact_path> as a new version of `name` with tags saying what
    it is, and point the alias at it (load it back with models:/<name>@<alias>)."""
    version = mlflow.register_model(f"runs:/{run_id}/{artifact_path}", name, tags=dict(tags or {}))
    MlflowClient().set_registered_model_alias(name, alias, version.version)
    return version
