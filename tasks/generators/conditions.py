"""The condition of a study, for the families that generate from labels or from a reference image rather than
from the impression's text: one definition for training, synthesis and evaluation alike, keyed by study_id.

Labels: the classifier cohort's label vector of the study (the curate stage's labeler and uncertainty policy), with
masked (NULL) and unlabelled studies as absent, since a generator has no "unknown" to draw. They are the labels a
synthesis plan row carries, as it is drawn from the same cohort. The reference image: the study's image in the
generator cohort (one a study), from the pixel store; the view: that image's view, so that synthetic images come
in the view mix of the studies that prompt them. The report labeller is not rerun on the prompt: the prompts
of synthesis and evaluation are real impressions of cohort studies, whose labels are already there.

An image embedding comes from an in-domain classifier trained here (models.densenet.save_densenet's folder): its
pooled features, the feature space of the in-domain FID; or from a pretrained vision backbone given as a local
Hugging Face folder (ImageEncoder).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from models.densenet import densenet_features, load_densenet, WEIGHTS_FILE
from models.vision_encoder import is_vision_folder, VisionEncoder
from tasks import layout
from tasks.data.curate import LABEL_COLUMNS
from tasks.data.pixels import PixelStore
from tasks.generators.interface import Conditions


def study_conditions(data_root: Path, study_ids: Sequence[int], resolution: int | None = None) -> Conditions:
    """The studies' conditions in the order asked; with a resolution, their reference images too."""
    return StudyConditions(data_root, resolution)(study_ids)


class StudyConditions:
    """study_conditions for many calls (a batch of prompts each): the cohorts are read once."""

    def __init__(self, data_root: Path, resolution: int | None = None):
        classifier = pq.read_table(layout.cohort_file(data_root, "classifier"),
                                   columns=["study_id", *LABEL_COLUMNS]).to_pandas()
        self.labels = classifier.groupby("study_id")[LABEL_COLUMNS].first()  # per study: its images agree
        self.pixels = PixelStore(data_root, resolution) if resolution is not None else None
        generator = pq.read_table(layout.cohort_file(data_root, "generator"),
                                  columns=["study_id", "dicom_id", "view_position"]).to_pandas()
        self.image_of = generator.set_index("study_id")[["dicom_id", "view_position"]]

    def __call__(self, study_ids: Sequence[int]) -> Conditions:
        """Labels for any studies; views only where every study has an image in the generator cohort (None
        otherwise); reference images (with a resolution) only there too, or KeyError."""
        labels = absent_if_unknown(self.labels.reindex(list(study_ids)).to_numpy(np.float32))
        images = self.image_of.reindex(list(study_ids))
        missing = images["dicom_id"].isna()
        views = None if missing.any() else images["view_position"].to_numpy(dtype=str)
        if self.pixels is None:
            return Conditions(labels=labels, views=views)
        if missing.any():
            raise KeyError(f"{int(missing.sum())} studies have no image in the generator cohort "
                           f"(first: {images.index[missing.to_numpy()][0]})")
        return Conditions(labels=labels, references=self.pixels.get_many(images["dicom_id"].tolist()), views=views)


def absent_if_unknown(labels: np.ndarray) -> np.ndarray:
    """Label rows (NaN: masked by the policy, or a study without labels) as a generator's condition: NaN is absent,
    since a generator has no "unknown" to draw."""
    return np.nan_to_num(np.asarray(labels, dtype=np.float32), nan=0.0)


def labels_digest(labels: np.ndarray) -> str:
    """Names a label matrix, so a generator trained on other labels (another labeler or policy) gets another id."""
    return hashlib.sha256(np.ascontiguousarray(labels, dtype=np.float32).tobytes()).hexdigest()[:12]


class ImageEncoder:
    """A reference radiograph -> one feature vector, from either kind of folder: a classifier trained here
    (models.densenet.save_densenet: its pooled features, the feature space of the in-domain FID), or a pretrained
    vision backbone as a local Hugging Face folder (models.vision_encoder: RAD-DINO, DINOv2, CLIP's vision tower)."""

    def __init__(self, directory: Path, device: torch.device | str = "cpu"):
        directory, self.device = Path(directory), torch.device(device)
        if (directory / WEIGHTS_FILE).is_file():
            self.model, meta = load_densenet(directory, str(self.device))
            self.image_size: int | None = meta["config"]["image_size"]
            self.dim: int = self.model.classifier.in_features
            with open(directory / WEIGHTS_FILE, "rb") as handle:
                weights = hashlib.file_digest(handle, "sha256").hexdigest()[:12]
            self.encoder_id = f"densenet@{weights}-{self.image_size}px"
        elif is_vision_folder(directory):
            self.model, self.image_size = VisionEncoder(directory).to(self.device), None
            self.dim = self.model.dim
            self.encoder_id = f"{self.model.model.config.model_type}@{self.model.weights_digest}"
        else:
            raise ValueError(f"{directory}: neither a classifier folder ({WEIGHTS_FILE}) nor a Hugging Face vision "
                             "model folder (config.json and preprocessor_config.json)")

    def embed(self, images: np.ndarray, batch_size: int = 64) -> torch.Tensor:
        """uint8 [n, R, R] -> float32 [n, dim] on the encoder's device."""
        if self.image_size is not None:
            features = densenet_features(self.model, images, self.image_size, device=str(self.device))
            return torch.from_numpy(features).to(self.device)
        return torch.cat([self.model(torch.from_numpy(images[start:start + batch_size]).to(self.device)).float()
                          for start in range(0, len(images), batch_size)])
