"""The condition of a study, for the families that generate from labels or from a reference image rather than
from the impression's text: one definition for training, synthesis and evaluation alike, keyed by study_id.

Labels: the classifier cohort's label vector of the study (the curate stage's labeler and uncertainty policy), with
masked (NULL) and unlabelled studies as absent, since a generator has no "unknown" to draw. They are the labels a
synthesis plan row carries, as it is drawn from the same cohort. The reference image: the study's image in the
generator cohort (one a study), from the pixel store. The report labeller is not rerun on the prompt: the prompts
of synthesis and evaluation are real impressions of cohort studies, whose labels are already there.

An image embedding comes from an in-domain classifier trained here (models.densenet.save_densenet's folder): its
pooled features, the feature space of the in-domain FID.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from models.densenet import densenet_features, load_densenet, WEIGHTS_FILE
from tasks import layout
from tasks.data.curate import LABEL_COLUMNS
from tasks.data.pixels import PixelStore
from tasks.generators.interface import Conditions


def study_conditions(data_root: Path, study_ids: Sequence[int], resolution: int | None = None) -> Conditions:
    """The studies' conditions in the order asked; with a resolution, their reference images too."""
    classifier = pq.read_table(layout.cohort_file(data_root, "classifier"),
                               columns=["study_id", *LABEL_COLUMNS]).to_pandas()
    by_study = classifier.groupby("study_id")[LABEL_COLUMNS].first()  # labels are per study: its images agree
    labels = by_study.reindex(list(study_ids)).fillna(0.0).to_numpy(np.float32, copy=True)
    references = None
    if resolution is not None:
        generator = pq.read_table(layout.cohort_file(data_root, "generator"), columns=["study_id", "dicom_id"])
        dicom_of = dict(zip(generator["study_id"].to_pylist(), generator["dicom_id"].to_pylist()))
        missing = [study_id for study_id in study_ids if study_id not in dicom_of]
        if missing:
            raise KeyError(f"{len(missing)} studies have no image in the generator cohort (first: {missing[0]})")
        references = PixelStore(data_root, resolution).get_many([dicom_of[study_id] for study_id in study_ids])
    return Conditions(labels=labels, references=references)


def labels_digest(labels: np.ndarray) -> str:
    """Names a label matrix, so a generator trained on other labels (another labeler or policy) gets another id."""
    return hashlib.sha256(np.ascontiguousarray(labels, dtype=np.float32).tobytes()).hexdigest()[:12]


class ImageEncoder:
    """A reference radiograph -> one feature vector: the pooled features of a classifier trained here."""

    def __init__(self, directory: Path, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.model, meta = load_densenet(Path(directory), str(self.device))
        self.image_size: int = meta["config"]["image_size"]
        self.dim: int = self.model.classifier.in_features
        with open(Path(directory) / WEIGHTS_FILE, "rb") as handle:
            weights = hashlib.file_digest(handle, "sha256").hexdigest()[:12]
        self.encoder_id = f"densenet@{weights}-{self.image_size}px"

    def embed(self, images: np.ndarray) -> torch.Tensor:
        """uint8 [n, R, R] -> float32 [n, dim] on the encoder's device."""
        features = densenet_features(self.model, images, self.image_size, device=str(self.device))
        return torch.from_numpy(features).to(self.device)
