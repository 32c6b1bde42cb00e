"""The downstream classifier: torchxrayvision's DenseNet-121, trained on real (and synthetic) images.

Images enter as uint8 [R, R] and are mapped to xrv's [-1024, 1024] by models.densenet.to_xrv, the one place
that does so for training, evaluation and feature extraction. Labels are float vectors over PATHOLOGIES with NaN for a
masked (uncertain, 'ignore' policy) entry, which contributes neither to the loss nor to that class's AUROC.
Every evaluation runs the model in eval mode, so batch norm uses its running statistics and dropout is off.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset
from torchvision.transforms import v2

from models.densenet import build_densenet, evaluating, load_densenet, save_densenet, to_xrv
from tasks.config import ClassifierSection
from tasks.evaluation.metrics import auroc_per_class
from tasks.pathologies import PATHOLOGIES
from tasks.progress import ProgressBar

@dataclass(frozen=True)
class EvalRecord:
    step: int  # optimizer steps done when the validation set was scored
    train_loss: float  # mean over the steps since the previous validation
    val_macro_auroc: float


@dataclass
class TrainedClassifier:
    model: nn.Module  # the best epoch's weights, in eval mode
    config: ClassifierSection
    seed: int
    best_step: int
    history: list[EvalRecord]


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


def mixed_batches(n_real: int, n_synthetic: int, batch_size: int, synthetic_share: float, seed: int
                  ) -> Iterator[list[int]]:
    """Endless batches of row indices into ConcatDataset([real, synthetic]): each holds round(batch_size x
    synthetic_share) synthetic rows and real ones for the rest, each source walking through its own reshuffled
    passes, so every batch has the run's mix whatever the sizes."""
    rng = np.random.default_rng(seed)
    k = min(round(batch_size * synthetic_share), batch_size) if n_synthetic else 0
    if n_real == 0 and k < batch_size:
        raise ValueError(f"a batch of {batch_size} needs real rows, and there are {n_real}")

    def stream(n: int, offset: int) -> Iterator[int]:
        while True:
            yield from (offset + int(i) for i in rng.permutation(n))

    real, synthetic = stream(n_real, 0) if n_real else iter(()), stream(n_synthetic, n_real) if k else iter(())
    while True:
        yield [next(real) for _ in range(batch_size - k)] + [next(synthetic) for _ in range(k)]


def train_classifier(real: Dataset, val: Dataset, config: ClassifierSection, seed: int, device: str = "cpu",
                     progress: bool = True, synthetic: Dataset | None = None, synthetic_share: float = 0.0,
                     pretrain_steps: int = 0) -> TrainedClassifier:
    """Train with AdamW on the masked loss for config.steps optimizer steps, whatever the share of synthetic
    images, so that compute never differs between the arms compared. The first `pretrain_steps` batches are
    synthetic rows only (pretraining); every later batch mixes synthetic rows in at `synthetic_share` (0: real
    only, fine-tuning). Every eval_every steps after pretraining the validation macro AUROC is measured; training
    stops after `patience` validations without a better one and returns the best validation's weights, so the
    weights kept are always fine-tuned ones. Deterministic for a seed on CPU."""
    if pretrain_steps and (synthetic is None or not 0 < pretrain_steps < config.steps):
        raise ValueError(f"pretraining for {pretrain_steps} of {config.steps} steps needs synthetic images and "
                         "at least one step after it")
    val_labels = np.stack([val[i][1] for i in range(len(val))])
    if auroc_per_class(val_labels, np.zeros_like(val_labels)).macro is None:
        raise ValueError("the validation set has no class with both positive and negative labels")
    augment = _augmentation() if config.augment else None
    rows = ConcatDataset([real, synthetic]) if synthetic is not None else real
    # A private RNG stream: the seed fixes init, the batches and augmentation without disturbing the caller's.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_densenet(len(PATHOLOGIES)).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        n_synthetic = len(synthetic) if synthetic is not None else 0
        batches = itertools.chain(
            itertools.islice(mixed_batches(len(real), n_synthetic, config.batch_size, 1.0, seed), pretrain_steps),
            mixed_batches(len(real), n_synthetic, config.batch_size, synthetic_share, seed))
        loader = DataLoader(rows, batch_sampler=batches, num_workers=config.num_workers)
        history: list[EvalRecord] = []
        best_auroc, best_step, best_state, since_best = -np.inf, 0, None, 0
        bar = ProgressBar(total=config.steps, desc=f"classifier seed {seed}", unit="step", disable=not progress)
        total = seen = 0.0
        model.train()
        for step, (images, labels) in enumerate(loader, start=1):
            if augment is not None:
                images = torch.stack([augment(image[None])[0] for image in images])
            loss = masked_bce_loss(model(to_xrv(images, config.image_size).to(device)), labels.to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total, seen = total + loss.item() * len(images), seen + len(images)
            bar.update()
            if step == pretrain_steps:  # the first record's loss is the fine-tune phase's alone
                total = seen = 0.0
            if step <= pretrain_steps or ((step - pretrain_steps) % config.eval_every and step < config.steps):
                continue
            val_macro = auroc_per_class(val_labels, predict(model, val, config.image_size, config.batch_size,
                                                            device)).macro
            history.append(EvalRecord(step, total / seen, val_macro))
            bar.set_postfix(loss=f"{total / seen:.4f}", val_auroc=f"{val_macro:.4f}")
            total = seen = 0.0
            if val_macro > best_auroc:
                best_auroc, best_step, best_state, since_best = val_macro, step, copy.deepcopy(model.state_dict()), 0
            else:
                since_best += 1
            if since_best >= config.patience or step >= config.steps:
                break
        bar.close()
    model.load_state_dict(best_state)
    return TrainedClassifier(model.eval(), config, seed, best_step, history)


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
        "config": trained.config.model_dump(mode="json"), "seed": trained.seed, "best_step": trained.best_step,
        "history": [asdict(record) for record in trained.history]})


def load_classifier(directory: Path, device: str = "cpu") -> TrainedClassifier:
    model, meta = load_densenet(directory, device)
    return TrainedClassifier(model, ClassifierSection.model_validate(meta["config"]), meta["seed"],
                             meta["best_step"], [EvalRecord(**record) for record in meta["history"]])


def _augmentation() -> v2.Transform:
    # No flips: laterality carries meaning on a chest film (the heart sits on the left).
    return v2.RandomAffine(degrees=5, translate=(0.05, 0.05), scale=(0.95, 1.05))
