"""The generator families side by side, in the flow run's parent run, when config.generators lists several: per
pathology the downstream AUROC difference to ratio 0 of each family (the reference arm's paired differences), and
the held-out real images' in-domain features beside each family's generated ones on one PCA.

The features are kept by the evaluation of each generator under layout.evaluation_dir, so that the comparison is
drawn also when a family's evaluation was skipped as unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from tasks import layout, tracking
from tasks.data import catalog

FEATURES_FILE = "in_domain_features.npz"


def save_features(data_root: Path, output_id: str, reference: np.ndarray, generated: np.ndarray) -> Path:
    """The in-domain features [n, D] of the held-out real images (half A) and of the generator's images."""
    path = layout.evaluation_dir(data_root, output_id) / FEATURES_FILE
    with catalog.atomic_output(path) as tmp:
        with open(tmp, "wb") as handle:  # np.savez appends .npz to a bare name
            np.savez(handle, reference=reference, generated=generated)
    return path


def load_features(data_root: Path, output_id: str) -> dict[str, np.ndarray]:
    path = layout.evaluation_dir(data_root, output_id) / FEATURES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run evaluate_generator for {output_id} first")
    with np.load(path) as stored:
        return {name: stored[name] for name in ("reference", "generated")}


def log_downstream(retrained: Mapping[str, dict], arm: str) -> str:
    """family -> its retrain stage's summary: the families' differences to ratio 0 in `arm` into the active run
    (tracking.log_family_comparison); returns the markdown."""
    return tracking.log_family_comparison(tracking.family_deltas(
        {family: pd.DataFrame(summary["comparison"][arm]) for family, summary in retrained.items()}))


def log_features(data_root: Path, output_ids: Mapping[str, str]) -> None:
    """family -> the output_id its evaluation measured: every family's generated features beside the real ones on
    the real features' principal components, families/feature_pca.png. Every evaluation draws the same held-out
    studies and embeds them with the same real-only classifier, so the first family's real features stand for
    all."""
    features = {family: load_features(data_root, output_id) for family, output_id in output_ids.items()}
    reference = next(iter(features.values()))["reference"]
    tracking.log_feature_pca(reference, {family: stored["generated"] for family, stored in features.items()},
                             "families/feature_pca.png")
