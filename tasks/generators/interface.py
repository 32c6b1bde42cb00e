"""The one small interface every image generator sits behind, so synthesis, evaluation and retraining never name
RayGen: a later latent-diffusion or label-conditioned GAN baseline plugs in the same way and is compared on the
same downstream protocol.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


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

    def generate(self, prompts: list[str], seeds: list[int]) -> GeneratedBatch:
        """One image per prompt; the same (prompt, seed) always gives the same image."""
        ...

# A family that works in the latent space of a tokenizer or autoencoder also offers
#     reconstruct(images: uint8 [n, R, R]) -> uint8 [n, R, R]
# (the images through that latent space and back), and the evaluation measures it as the family's ceiling.
