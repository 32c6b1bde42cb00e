"""Trained generators, found in the runs' model folders (models/<family>/<id>/, trained once final/ exists), opened
with a family's own loader, and grids of their images from one prompt and several seeds."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks import layout
from tasks.browse import BadInput
from tasks.config import Config, RayGenSampling
from tasks.generators.checkpoints import is_trained, latest_checkpoint
from tasks.generators.interface import ImageGenerator
from tasks.generators.raygen.generator import load_generator

# family -> loader(data_root, generator_id, resolution, vqgan, text settings, sampling); a later family adds its own.
FAMILIES: dict[str, Callable[..., ImageGenerator]] = {"raygen": load_generator}
NO_FINDING = "No acute cardiopulmonary process."


@dataclass(frozen=True)
class TrainedGenerator:
    family: str
    generator_id: str  # the weights' id: the version
    trained: bool  # final weights written; otherwise only checkpoints (training under way or stopped)
    modified: float  # the folder's mtime, newest first in listings

    @property
    def label(self) -> str:
        return f"{self.family}: {self.generator_id}" + ("" if self.trained else " (not trained yet)")


def list_generators(data_root: Path) -> list[TrainedGenerator]:
    """Every generator folder of every family under the data root, trained or not, newest first."""
    found = [TrainedGenerator(family, folder.name, is_trained(folder), folder.stat().st_mtime)
             for family in FAMILIES if layout.models_dir(data_root, family).is_dir()
             for folder in layout.models_dir(data_root, family).iterdir() if folder.is_dir()]
    return sorted(found, key=lambda generator: -generator.modified)


def open_generator(config: Config, data_root: Path, family: str, generator_id: str,
                   sampling: RayGenSampling) -> ImageGenerator:
    """A trained generator ready to generate with these sampling settings; one not trained yet is a BadInput."""
    if family not in FAMILIES:
        raise BadInput(f"unknown generator family {family!r}; this app knows {', '.join(FAMILIES)}")
    folder = layout.model_dir(data_root, family, generator_id)
    if not is_trained(folder):
        checkpoint = latest_checkpoint(folder) if folder.is_dir() else None
        state = f"its latest checkpoint is {checkpoint.name}" if checkpoint else "it has no checkpoint either"
        raise BadInput(f"{family} generator {generator_id} is not trained yet: {folder} has no final weights "
                       f"({state}). Let train_generator finish (augment run --config ...) and reload.")
    return FAMILIES[family](data_root, generator_id, config.ingest.resolution, config.vqgan, config.text, sampling)


def impression(findings: list[str]) -> str:
    """The impression the finding picker writes: one sentence a finding, or a normal study's."""
    return " ".join(f"{finding}." for finding in findings) if findings else NO_FINDING


def generate_grid(generator: ImageGenerator, prompt: str, seeds: list[int],
                  on_image: Callable[[int], None] | None = None) -> tuple[np.ndarray, list[dict]]:
    """One image a seed from the prompt, uint8 [n, R, R], each with its provenance (generator, prompt, seed,
    sampling settings); on_image(done) after each, for a progress bar."""
    if not prompt.strip():
        raise BadInput("the prompt is empty: write an impression, or pick findings to write one")
    if not seeds:
        raise BadInput("no seeds: give at least one image to generate")
    images, provenance = [], []
    for done, seed in enumerate(seeds, start=1):
        made = generator.generate([prompt], [seed])
        images.append(made.images[0])
        provenance.append({"prompt": prompt, **made.provenance[0]})
        if on_image is not None:
            on_image(done)
    return np.stack(images), provenance
