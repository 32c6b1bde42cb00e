"""The downstream classifier's network: torchxrayvision's DenseNet-121, its input convention, its pooled features
(the in-domain feature space of FID) and its save/load."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchxrayvision as xrv
from torch import Tensor, nn

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.pt"


def build_densenet(n_classes: int) -> nn.Module:
    """xrv's DenseNet-121, untrained (weights=None: nothing is downloaded), one input channel, raw logits out."""
    return xrv.models.DenseNet(weights=None, num_classes=n_classes, in_channels=1, op_threshs=None)


def to_xrv(images: np.ndarray | Tensor, image_size: int) -> Tensor:
    """uint8 [n, R, R] -> float32 [n, 1, image_size, image_size] in xrv's [-1024, 1024]."""
    images = images.numpy() if isinstance(images, Tensor) else np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise ValueError(f"expected uint8 images [n, R, R], got {images.dtype} {list(images.shape)}")
    x = torch.from_numpy(xrv.utils.normalize(images, 255))[:, None]
    if x.shape[-1] != image_size or x.shape[-2] != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
    return x


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode (batch norm on running statistics, dropout off) and no gradients; the mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def densenet_features(
    model: nn.Module, images: np.ndarray | Tensor, image_size: int, batch_size: int = 64, device: str = "cpu"
) -> np.ndarray:
    """Pooled penultimate activations [n, 1024] of uint8 images [n, R, R], in eval mode (for in-domain FID)."""
    with evaluating(model):
        return np.concatenate(
            [
                model.features2(to_xrv(images[start:start + batch_size], image_size).to(device)).cpu().numpy()
                for start in range(0, len(images), batch_size)
            ]
        )


def save_densenet(model: nn.Module, directory: Path, meta: dict) -> None:
    """The weights and a JSON of what made them (meta must hold "config" with "image_size"), each written whole."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, write in ((WEIGHTS_FILE, lambda tmp: torch.save(model.state_dict(), tmp)),
                        (CONFIG_FILE, lambda tmp: tmp.write_text(json.dumps(meta, indent=2)))):
        tmp = directory / f".{name}.tmp"
        write(tmp)
        tmp.replace(directory / name)


def load_densenet(directory: Path, device: str = "cpu") -> tuple[nn.Module, dict]:
    """(the model in eval mode, its meta) as save_densenet wrote them; the head's width says how many classes."""
    directory = Path(directory)
    meta = json.loads((directory / CONFIG_FILE).read_text())
    state = torch.load(directory / WEIGHTS_FILE, map_location=device, weights_only=True)
    model = build_densenet(len(state["classifier.bias"]))
    model.load_state_dict(state)
    return model.to(device).eval(), meta
