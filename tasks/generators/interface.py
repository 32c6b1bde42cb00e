"""The one small interface every image generator sits behind, so synthesis, evaluation and retraining never name
RayGen: a later latent-diffusion or label-conditioned GAN baseline plugs in the same way and is compared on the
same downstream protocol.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch


@dataclass(frozen=True)
class Conditions:
    """What the families that do not read the prompt's text generate from, one row per prompt; built for any rows
    of studies by tasks.generators.conditions.study_conditions. Text-conditioned families ignore it."""

    labels: np.ndarray  # float32 [n, len(PATHOLOGIES)] in {0, 1}: the study's labels, masked or unlabelled as 0
    references: np.ndarray | None = None  # uint8 [n, R, R]: the study's image, for "variations of this radiograph"
    views: np.ndarray | None = None  # str [n]: the view to draw ("AP", "PA"), read by a RayGen with a view token

    def take(self, rows: slice | np.ndarray) -> Conditions:
        """The conditions of some of the rows (a batch of the prompts)."""
        return Conditions(self.labels[rows], None if self.references is None else self.references[rows],
                          None if self.views is None else self.views[rows])


@dataclass(frozen=True)
class GeneratedBatch:
    images: np.ndarray  # uint8 [n, R, R], the pixel convention of tasks/data/pixels.py
    provenance: list[dict]  # one per image: what made it (sampling parameters, seed, ...), JSON-serialisable


class ImageGenerator(Protocol):
    generator_id: str  # names the trained weights (and so the run that made them); part of every provenance record
    # Names what generate() draws from: the weights and the sampling settings. Synthetic images are stored and found
    # under it, so new sampling settings make new images from the same weights (tasks/generators/synthesis.py).
    output_id: str
    resolution: int
    # The conditions generate() needs beside the prompts: None (the text alone), "labels" or "references".
    needs: str | None

    def generate(self, prompts: list[str], seeds: list[int], conditions: Conditions | None = None) -> GeneratedBatch:
        """One image per prompt; the same (prompt, conditions row, seed) always gives the same image. A family
        conditioned on labels or a reference image needs `conditions` and says so when they are missing."""
        ...

# A family that works in the latent space of a tokenizer or autoencoder also offers
#     reconstruct(images: uint8 [n, R, R]) -> uint8 [n, R, R]
# (the images through that latent space and back), and the evaluation measures it as the family's ceiling.


def check_batch(prompts: list[str], seeds: list[int], conditions: Conditions | None = None,
                needs: str | None = None) -> None:
    """generate()'s arguments agree: a seed (and a conditions row) per prompt, and the conditions a family needs
    ("labels" or "references") are there."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    if needs is not None and (conditions is None or getattr(conditions, needs) is None):
        raise ValueError(f"this generator is conditioned on {needs}: pass conditions with {needs} "
                         "(tasks.generators.conditions.study_conditions)")
    if conditions is not None and len(conditions.labels) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(conditions.labels)} rows of conditions")


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, 1, H, W] in [-1, 1] -> uint8 [B, H, W], the inverse of the [-1, 1] scaling the VQ-GAN was fed."""
    return ((images[:, 0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()


def output_id(generator_id: str, sampling: dict) -> str:
    """The weights' id and a digest of the sampling settings: what a generator's images are stored under."""
    return f"{generator_id}-{hashlib.sha256(json.dumps(sampling, sort_keys=True).encode()).hexdigest()[:8]}"


def tile(images: np.ndarray, columns: int = 4) -> np.ndarray:
    """uint8 [k, R, R] -> one uint8 grid image, `columns` wide, for a look at samples."""
    rows = -(-len(images) // columns)
    side = images.shape[1]
    grid = np.zeros((rows * side, columns * side), dtype=np.uint8)
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        grid[row * side:(row + 1) * side, column * side:(column + 1) * side] = image
    return grid
