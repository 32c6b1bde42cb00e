"""Feature spaces of FID as torch-fidelity extractors: the DenseNet trained here on real images (in-domain), and
RAD-DINO (a chest X-ray DINOv2, microsoft/rad-dino) from a local Hugging Face folder."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor
from torch_fidelity.feature_extractor_base import FeatureExtractorBase

from models.densenet import densenet_features, load_densenet
from models.vision_encoder import VisionEncoder


class _OneFeature(FeatureExtractorBase):
    """torch-fidelity's extractor interface for a network that gives one feature vector, named FEATURE."""

    FEATURE: ClassVar[str]

    @classmethod
    def get_provided_features_list(cls) -> tuple[str, ...]:
        return (cls.FEATURE,)

    @classmethod
    def get_default_feature_layer_for_metric(cls, metric: str) -> str:
        return cls.FEATURE

    @staticmethod
    def can_be_compiled() -> bool:
        return False


class DenseNetFeatures(_OneFeature):
    """torch-fidelity's view of the real-trained classifier: uint8 [B, 3, H, W] -> pooled features [B, 1024].

    torch-fidelity builds extractors from their registered class and its own keyword arguments, so the
    classifier arrives as `feature_extractor_weights_path`: the folder written by save_densenet."""

    FEATURE = "pool"

    def __init__(self, name: str, features_list: list[str], feature_extractor_weights_path: str | None = None,
                 **calculate_metrics_kwargs):  # torch-fidelity passes all of its kwargs; only the path matters
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise ValueError(f"feature extractor {name} needs feature_extractor_weights_path: "
                             "a classifier folder written by save_densenet")
        self.model, meta = load_densenet(Path(feature_extractor_weights_path))
        self.image_size = meta["config"]["image_size"]

    def forward(self, images: Tensor) -> tuple[Tensor]:
        # The three channels are copies of one grey image (see _GreyAsRGB); xrv's DenseNet takes one.
        features = densenet_features(self.model, images[:, 0].cpu(), self.image_size, len(images), str(images.device))
        return (torch.from_numpy(features),)


class RadDinoFeatures(_OneFeature):
    """torch-fidelity's view of RAD-DINO: uint8 [B, 3, H, W] -> the CLS embedding (pooler_output) [B, D].

    `feature_extractor_weights_path` is a local Hugging Face folder (config.json, the weights,
    preprocessor_config.json), loaded offline by models.vision_encoder.VisionEncoder, which prepares images as the
    folder's image processor says."""

    FEATURE = "cls"

    def __init__(self, name: str, features_list: list[str], feature_extractor_weights_path: str | None = None,
                 **calculate_metrics_kwargs):  # torch-fidelity passes all of its kwargs; only the path matters
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise ValueError(f"feature extractor {name} needs feature_extractor_weights_path: a local Hugging Face "
                             "folder of RAD-DINO")
        self.encoder = VisionEncoder(Path(feature_extractor_weights_path))

    def forward(self, images: Tensor) -> tuple[Tensor]:
        return (self.encoder(images),)
