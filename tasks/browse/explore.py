"""The dataset explorer: a cohort's members and the rejects through DuckDB (sql/browse_*.sql), their images from
the pixel shards, counts per class."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from tasks import layout
from tasks.browse import BadInput
from tasks.data import catalog
from tasks.data.curate import LABEL_COLUMNS
from tasks.data.pixels import PixelStore
from tasks.pathologies import PATHOLOGIES

COHORTS = ("generator", "classifier")
PATHOLOGY_OF = dict(zip(LABEL_COLUMNS, PATHOLOGIES))
COLUMN_OF = dict(zip(PATHOLOGIES, LABEL_COLUMNS))


def require_cohorts(data_root: Path) -> None:
    """A data root the app can show has both cohorts; otherwise the message names the missing file."""
    for name in COHORTS:
        path = layout.cohort_file(data_root, name)
        if not path.is_file():
            raise BadInput(f"{path} does not exist: this data root has no cohorts yet. Run the pipeline on it "
                           "first (augment run --config ...), or point the app at the data root of a run.")


def cohort_rows(data_root: Path, cohort: str, split: str | None = None, view: str | None = None,
                finding: str | None = None) -> pd.DataFrame:
    """The members of a cohort with their split, view, impression and positive findings (PATHOLOGIES' names),
    filtered by split, view and finding (None: any)."""
    if cohort not in COHORTS:
        raise BadInput(f"unknown cohort {cohort!r}; expected one of {', '.join(COHORTS)}")
    if finding is not None and finding not in COLUMN_OF:
        raise BadInput(f"unknown finding {finding!r}; expected one of {', '.join(PATHOLOGIES)}")
    require_cohorts(data_root)
    with catalog.connect(data_root) as con:
        for name in COHORTS:
            con.register(f"{name}_cohort", pq.read_table(layout.cohort_file(data_root, name)))
        params = {"cohort": cohort, "label_columns": LABEL_COLUMNS, "split": split, "view": view,
                  "finding": None if finding is None else COLUMN_OF[finding]}
        rows = con.sql(catalog.read_sql("browse_cohort"), params=params).df()
    rows["findings"] = [[PATHOLOGY_OF[column] for column in found] for found in rows["findings"]]
    return rows


def class_counts(rows: pd.DataFrame) -> pd.DataFrame:
    """Positive images per pathology and split among cohort_rows' rows (every pathology, zeros included)."""
    exploded = rows[["split", "findings"]].explode("findings").dropna()
    counts = pd.crosstab(exploded["findings"], exploded["split"]) if len(exploded) else pd.DataFrame()
    return counts.reindex(list(PATHOLOGIES), fill_value=0).rename_axis(index="pathology", columns="split")


def rejects(data_root: Path, reason: str | None = None, stage: str | None = None) -> pd.DataFrame:
    with catalog.connect(data_root) as con:
        return con.sql(catalog.read_sql("browse_rejects"), params={"reason": reason, "stage": stage}).df()


def images(data_root: Path, resolution: int, dicom_ids: list[str]) -> np.ndarray:
    """uint8 [n, R, R] from the pixel shards, in the order asked."""
    return PixelStore(data_root, resolution).get_many(dicom_ids)


def synthetic_outputs(data_root: Path) -> pd.DataFrame:
    """The stored synthetic sets (output_id, generator_id, images), what can be exported."""
    with catalog.connect(data_root) as con:
        return con.sql(catalog.read_sql("browse_synthetic_outputs")).df()
