"""Where everything lives: the repository's own folders, and the layout of a run's data root.

This is the one module that builds those paths; every other module asks it. A data root holds:

    source/<kind>/                  the PhysioNet-layout tree a demo or PhysioNet source writes (a local mirror is read
                                    where it is)
    tables/<table>/*.parquet        the tables (tasks/data/catalog.py has their schemas)
    catalog.duckdb                  DuckDB views over the tables, for people and tools
    pixels/<resolution>/<shard>.npy preprocessed uint8 images, memory-mapped
    cohorts/<name>.parquet          the curated cohorts: generator, classifier
    text/<encoder>/<shard>.npy      cached text-encoder states
    models/<kind>/<id>/             checkpoints and final weights: vqgan, raygen, classifier, and any later family
    exports/<output_id>/<format>/   a synthetic set exported for other tools: dicom, mimic-cxr-jpg (tasks/export/)
    synthetic/<output_id>/          generated images, by the generator's weights and sampling settings
    synthetic/plan.parquet          the synthesis plan, for the stages after synthesize (the same for every generator)
    evaluation/<output_id>/         what the generator evaluation keeps of a generator output beyond MLflow: the
                                    in-domain features the comparison across families plots
    stages/<stage>.json             what each stage last completed, with its fingerprint; a stage run per generator
                                    is '<stage>-<family>' when config.generators lists several
    mlflow/                         the local MLflow store (mlflow.db, artifacts/)
    .lock                           held by the one flow run working on this data root
"""

from __future__ import annotations

import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SQL_DIR = REPO_ROOT / "sql"
PROJECT_PACKAGES = ("flows", "tasks", "models", "commands", "app")  # the code a stage fingerprint follows
APP_SCRIPT = REPO_ROOT / "app" / "main.py"  # the Streamlit app `augment app` starts


def source_dir(data_root: Path, kind: str) -> Path:
    return Path(data_root) / "source" / kind


def tables_dir(data_root: Path) -> Path:
    return Path(data_root) / "tables"


def table_dir(data_root: Path, table: str) -> Path:
    return tables_dir(data_root) / table


def catalog_file(data_root: Path) -> Path:
    return Path(data_root) / "catalog.duckdb"


def pixels_dir(data_root: Path) -> Path:
    return Path(data_root) / "pixels"


def pixel_shard(data_root: Path, resolution: int, shard: str) -> Path:
    return pixels_dir(data_root) / str(resolution) / f"{shard}.npy"


def cohorts_dir(data_root: Path) -> Path:
    return Path(data_root) / "cohorts"


def cohort_file(data_root: Path, name: str) -> Path:
    return cohorts_dir(data_root) / f"{name}.parquet"


def text_dir(data_root: Path, encoder_id: str) -> Path:
    # Encoder ids hold ':', '/' and '@'. Two ids with the same slug never share a shard: unit names hash the full id.
    return Path(data_root) / "text" / re.sub(r"[^A-Za-z0-9._-]+", "-", encoder_id)


def models_dir(data_root: Path, kind: str) -> Path:
    """The folder of every trained model of a family or role (vqgan, raygen, classifier, ...), one folder each."""
    return Path(data_root) / "models" / kind


def model_dir(data_root: Path, kind: str, model_id: str) -> Path:
    """A trained model's folder: kind is the family or role (vqgan, raygen, classifier, ...), model_id its id."""
    return models_dir(data_root, kind) / model_id


def classifier_dir(data_root: Path, output_id: str, arm: str, ratio: float, seed: int) -> Path:
    """Where a retrained classifier is saved, by the synthetic images it saw (a generator's output_id) and its arm;
    at ratio 0 it does not depend on the generator."""
    owner = output_id if ratio > 0 else "real-only"
    return model_dir(data_root, "classifier", owner) / classifier_run_name(arm, ratio, seed)


def classifier_run_name(arm: str, ratio: float, seed: int) -> str:
    """A retrained classifier's name, in MLflow and on disk: '<arm>-ratio-<r>-seed-<s>'."""
    return f"{arm}-ratio-{ratio:g}-seed-{seed}"


def synthetic_dir(data_root: Path, generator_id: str) -> Path:
    return Path(data_root) / "synthetic" / generator_id


def evaluation_dir(data_root: Path, output_id: str) -> Path:
    """What the generator evaluation keeps of one generator output (weights + sampling settings)."""
    return Path(data_root) / "evaluation" / output_id


def export_dir(data_root: Path, output_id: str, export_format: str) -> Path:
    """Where a synthetic set (a generator's output_id) is exported in a format of tasks/export/."""
    return Path(data_root) / "exports" / output_id / export_format


def synthesis_plan_file(data_root: Path) -> Path:
    return Path(data_root) / "synthetic" / "plan.parquet"


def stage_record(data_root: Path, stage: str) -> Path:
    return Path(data_root) / "stages" / f"{stage}.json"


def mlflow_dir(data_root: Path) -> Path:
    return Path(data_root) / "mlflow"


def lock_file(data_root: Path) -> Path:
    return Path(data_root) / ".lock"
