"""The in-domain feature space of FID: torch-fidelity's view of the DenseNet trained here on real images."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor
from torch_fidelity.feature_extractor_base import FeatureExtractorBase

from models.densenet import densenet_features, load_densenet


class DenseNetFeatures(FeatureExtractorBase):
    """torch-fidelity's view of the real-trained classifier: uint8 [B, 3, H, W] -> pooled features [B, 1024].

    torch-fidelity builds extractors from their registered class and its own keyword arguments, so the
    classifier arrives as `feature_extractor_weights_path`: the folder written by save_densenet."""

    def __init__(self, name: str, features_list: list[str], feature_extractor_weights_path: str | None = None,
                 **calculate_metrics_kwargs):  # torch-fidelity passes all of its kwargs; only the path matters
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise ValueError(f"feature extractor {name} needs feature_extractor_weights_path: "
                             "a classifier folder written by save_densenet")
        self.model, meta = load_densenet(Path(feature_extractor_weights_path))
        self.image_size = meta["config"]["image_size"]

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return ("pool",)

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return "pool"

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    def forward(self, images: Tensor) -> tuple[Tensor]:
        # The three channels are copies of one grey image (see _GreyAsRGB); xrv's DenseNet takes one.
        features = densenet_features(self.model, images[:, 0].cpu(), self.image_size, len(images), str(images.device))
        return (torch.from_numpy(features),)
