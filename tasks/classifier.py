"""The downstream classifier: torchxrayvision's DenseNet-121, trained on real (and synthetic) images.

Images enter as uint8 [R, R] and are mapped to xrv's [-1024, 1024] by `to_xrv`, the one place that does so
for training, evaluation and feature extraction. Labels are float vectors over PATHOLOGIES with NaN for a
masked (uncertain, 'ignore' policy) entry, which contributes neither to the loss nor to that class's AUROC.
Every evaluation runs the model in eval mode, so batch norm uses its running statistics and dropout is off.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchxrayvision as xrv
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2
from tqdm.auto import tqdm

from tasks.catalog import atomic_output
from tasks.config import ClassifierSection
from tasks.metrics import auroc_per_class
from tasks.pathologies import PATHOLOGIES

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.pt"


@dataclass(frozen=True)
class EpochRecord:
    epoch: int
    train_loss: float
    val_macro_auroc: float


@dataclass
class TrainedClassifier:
    model: nn.Module  # the best epoch's weights, in eval mode
    config: ClassifierSection
    seed: int
    best_epoch: int
    history: list[EpochRecord]


class LabelledImages(Dataset):
    """(uint8 image [R, R], float32 labels [C] with NaN = masked) pairs.

    `images` is anything indexable by row that gives a uint8 [R, R] array: an in-memory array, a memmap, or a
    lazy view onto a PixelStore. Real and synthetic sets are mixed with torch's ConcatDataset."""

    def __init__(self, images, labels: np.ndarray):
        labels = np.array(labels, dtype=np.float32)  # writable: Arrow hands out read-only arrays
        if labels.ndim != 2 or labels.shape[1] != len(PATHOLOGIES) or len(labels) != len(images):
            raise ValueError(
                f"labels {list(labels.shape)} do not fit {len(images)} images x {len(PATHOLOGIES)} classes"
            )
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        # A copy: rows of a memory-mapped shard are read-only, which torch's collate warns about.
        return np.array(self.images[index], dtype=np.uint8), self.labels[index]


def build_densenet(n_classes: int = len(PATHOLOGIES)) -> nn.Module:
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


def masked_bce_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean binary cross-entropy over the labelled (non-NaN) entries; masked entries get zero gradient."""
    labelled = ~torch.isnan(labels)
    per_entry = F.binary_cross_entropy_with_logits(logits, torch.nan_to_num(labels), reduction="none")
    # where() rather than multiplying by the mask: a NaN times 0 would still be NaN.
    return torch.where(labelled, per_entry, 0.0).sum() / labelled.sum().clamp(min=1)


def train_classifier(
    train: Dataset, val: Dataset, config: ClassifierSection, seed: int, device: str = "cpu", progress: bool = True
) -> TrainedClassifier:
    """Train with AdamW on the masked loss; stop when the validation macro AUROC has not improved for
    `patience` epochs and return the model with the best epoch's weights. Deterministic for a seed on CPU."""
    val_labels = np.stack([val[i][1] for i in range(len(val))])
    if auroc_per_class(val_labels, np.zeros_like(val_labels)).macro is None:
        raise ValueError("the validation set has no class with both positive and negative labels")
    augment = _augmentation() if config.augment else None
    # A private RNG stream: the seed fixes init, shuffling and augmentation without disturbing the caller's.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_densenet().to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        loader = DataLoader(
            train, batch_size=config.batch_size, shuffle=True, num_workers=config.num_workers,
            generator=torch.Generator().manual_seed(seed),
        )
        history: list[EpochRecord] = []
        best_auroc, best_epoch, best_state = -np.inf, 0, None
        for epoch in range(1, config.epochs + 1):
            model.train()
            total, seen = 0.0, 0
            batches = tqdm(loader, desc=f"epoch {epoch}/{config.epochs}", disable=not progress, leave=False)
            for images, labels in batches:
                if augment is not None:
                    images = torch.stack([augment(image[None])[0] for image in images])
                logits = model(to_xrv(images, config.image_size).to(device))
                loss = masked_bce_loss(logits, labels.to(device))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total, seen = total + loss.item() * len(images), seen + len(images)
                batches.set_postfix(loss=total / seen)
            val_scores = predict(model, val, config.image_size, config.batch_size, device)
            val_macro = auroc_per_class(val_labels, val_scores).macro
            history.append(EpochRecord(epoch, total / seen, val_macro))
            if val_macro > best_auroc:
                best_auroc, best_epoch, best_state = val_macro, epoch, copy.deepcopy(model.state_dict())
            elif epoch - best_epoch >= config.patience:
                break
    model.load_state_dict(best_state)
    return TrainedClassifier(model.eval(), config, seed, best_epoch, history)


def predict(
    model: nn.Module, dataset: Dataset, image_size: int, batch_size: int = 64, device: str = "cpu"
) -> np.ndarray:
    """Probabilities [n, C] in dataset order, computed in eval mode; the model's mode is restored afterwards."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    with _evaluating(model):
        return np.concatenate(
            [torch.sigmoid(model(to_xrv(images, image_size).to(device))).cpu().numpy() for images, _ in loader]
        )


def densenet_features(
    model: nn.Module, images: np.ndarray | Tensor, image_size: int, batch_size: int = 64, device: str = "cpu"
) -> np.ndarray:
    """Pooled penultimate activations [n, 1024] of uint8 images [n, R, R], in eval mode (for in-domain FID)."""
    with _evaluating(model):
        return np.concatenate(
            [
                model.features2(to_xrv(images[start:start + batch_size], image_size).to(device)).cpu().numpy()
                for start in range(0, len(images), batch_size)
            ]
        )


def save_classifier(trained: TrainedClassifier, directory: Path) -> None:
    directory = Path(directory)
    meta = {"config": trained.config.model_dump(mode="json"), "seed": trained.seed, "best_epoch": trained.best_epoch,
            "history": [asdict(record) for record in trained.history]}
    with atomic_output(directory / WEIGHTS_FILE) as tmp:
        torch.save(trained.model.state_dict(), tmp)
    with atomic_output(directory / CONFIG_FILE) as tmp:
        tmp.write_text(json.dumps(meta, indent=2))


def load_classifier(directory: Path, device: str = "cpu") -> TrainedClassifier:
    directory = Path(directory)
    meta = json.loads((directory / CONFIG_FILE).read_text())
    model = build_densenet()
    model.load_state_dict(torch.load(directory / WEIGHTS_FILE, map_location=device, weights_only=True))
    return TrainedClassifier(
        model.to(device).eval(), ClassifierSection.model_validate(meta["config"]), meta["seed"], meta["best_epoch"],
        [EpochRecord(**record) for record in meta["history"]],
    )


@contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _augmentation() -> v2.Transform:
    # No flips: laterality carries meaning on a chest film (the heart sits on the left).
    return v2.RandomAffine(degrees=5, translate=(0.05, 0.05), scale=(0.95, 1.05))
