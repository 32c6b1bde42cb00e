"""The downstream classifier: torchxrayvision's DenseNet-121, trained on real (and synthetic) images.

Images enter as uint8 [R, R] and are mapped to xrv's [-1024, 1024] by models.densenet.to_xrv, the one place
that does so for training, evaluation and feature extraction. Labels are float vectors over PATHOLOGIES with NaN for a
masked (uncertain, 'ignore' policy) entry, which contributes neither to the loss nor to that class's AUROC.
Every evaluation runs the model in eval mode, so batch norm uses its running statistics and dropout is off.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from models.densenet import build_densenet, evaluating, load_densenet, save_densenet, to_xrv
from tasks.config import ClassifierSection
from tasks.evaluation.metrics import auroc_per_class
from tasks.pathologies import PATHOLOGIES
from tasks.progress import ProgressBar

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
        model = build_densenet(len(PATHOLOGIES)).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        loader = DataLoader(
            train, batch_size=config.batch_size, shuffle=True, num_workers=config.num_workers,
            generator=torch.Generator().manual_seed(seed),
        )
        history: list[EpochRecord] = []
        best_auroc, best_epoch, best_state = -np.inf, 0, None
        epochs = ProgressBar(total=config.epochs, desc=f"classifier seed {seed}", unit="epoch", disable=not progress)
        for epoch in range(1, config.epochs + 1):
            model.train()
            total, seen = 0.0, 0
            batches = ProgressBar(loader, desc=f"epoch {epoch}/{config.epochs}", disable=not progress, leave=False)
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
            epochs.update()
            epochs.set_postfix(loss=f"{total / seen:.4f}", val_auroc=f"{val_macro:.4f}")
            if val_macro > best_auroc:
                best_auroc, best_epoch, best_state = val_macro, epoch, copy.deepcopy(model.state_dict())
            elif epoch - best_epoch >= config.patience:
                break
        epochs.close()
    model.load_state_dict(best_state)
    return TrainedClassifier(model.eval(), config, seed, best_epoch, history)


def predict(
    model: nn.Module, dataset: Dataset, image_size: int, batch_size: int = 64, device: str = "cpu"
) -> np.ndarray:
    """Probabilities [n, C] in dataset order, computed in eval mode; the model's mode is restored afterwards."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    with evaluating(model):
        return np.concatenate(
            [torch.sigmoid(model(to_xrv(images, image_size).to(device))).cpu().numpy() for images, _ in loader]
        )


def save_classifier(trained: TrainedClassifier, directory: Path) -> None:
    save_densenet(trained.model, directory, {
        "config": trained.config.model_dump(mode="json"), "seed": trained.seed, "best_epoch": trained.best_epoch,
        "history": [asdict(record) for record in trained.history]})


def load_classifier(directory: Path, device: str = "cpu") -> TrainedClassifier:
    model, meta = load_densenet(directory, device)
    return TrainedClassifier(model, ClassifierSection.model_validate(meta["config"]), meta["seed"],
                             meta["best_epoch"], [EpochRecord(**record) for record in meta["history"]])


def _augmentation() -> v2.Transform:
    # No flips: laterality carries meaning on a chest film (the heart sits on the left).
    return v2.RandomAffine(degrees=5, translate=(0.05, 0.05), scale=(0.95, 1.05))
