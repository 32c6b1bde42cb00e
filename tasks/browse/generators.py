"""Trained generators of every family, found in the runs' model folders (models/<family>/<id>/, trained once final/
exists), opened with the family's loader and the config's section for it, and grids of their images from one prompt
(and, for the families that draw from labels or a reference image, one row of conditions) and several seeds."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks import layout
from tasks.browse import BadInput
from tasks.config import Config, FamilySection
from tasks.generators import families
from tasks.generators.checkpoints import is_trained, latest_checkpoint
from tasks.generators.interface import Conditions, ImageGenerator
from tasks.pathologies import PATHOLOGIES

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
             for family in families.FAMILIES if layout.models_dir(data_root, family).is_dir()
             for folder in layout.models_dir(data_root, family).iterdir() if folder.is_dir()]
    return sorted(found, key=lambda generator: -generator.modified)


def family_section(config: Config, family: str) -> FamilySection:
    """The config's section of the family, whose sampler settings the app offers; a family the config has no
    section for is a BadInput (its loader needs the section the generator was trained with)."""
    if family not in families.FAMILIES:
        raise BadInput(f"unknown generator family {family!r}; this app knows {', '.join(families.FAMILIES)}")
    found = getattr(config, family)
    if found is None:
        raise BadInput(f"the config has no {family} section: open the app with the config that trained this "
                       f"{family} generator (augment app --config ...)")
    return found


def open_generator(config: Config, data_root: Path, family: str, generator_id: str,
                   section: FamilySection) -> ImageGenerator:
    """A trained generator ready to generate as `section` (the config's section of its family, sampler settings
    changed as the user chose) says; one not trained yet is a BadInput."""
    family_section(config, family)
    folder = layout.model_dir(data_root, family, generator_id)
    if not is_trained(folder):
        checkpoint = latest_checkpoint(folder) if folder.is_dir() else None
        state = f"its latest checkpoint is {checkpoint.name}" if checkpoint else "it has no checkpoint either"
        raise BadInput(f"{family} generator {generator_id} is not trained yet: {folder} has no final weights "
                       f"({state}). Let train_generator finish (augment run --config ...) and reload.")
    return families.load(family, data_root, generator_id, section, config.ingest.resolution, config.vqgan,
                         config.text)


def impression(findings: list[str]) -> str:
    """The impression the finding picker writes: one sentence a finding, or a normal study's."""
    return " ".join(f"{finding}." for finding in findings) if findings else NO_FINDING


def findings_conditions(findings: list[str], view: str | None = None) -> Conditions:
    """One row of conditions: the label vector of the findings picked (none: a normal study), and the view picked
    for a RayGen with a view token (None: no view)."""
    unknown = sorted(set(findings) - set(PATHOLOGIES))
    if unknown:
        raise BadInput(f"unknown findings {unknown}: the labels are {', '.join(PATHOLOGIES)}")
    return Conditions(labels=np.array([[float(name in findings) for name in PATHOLOGIES]], np.float32),
                      views=None if view is None else np.array([view]))


def generate_grid(generator: ImageGenerator, prompt: str, seeds: list[int], conditions: Conditions | None = None,
                  on_image: Callable[[int], None] | None = None) -> tuple[np.ndarray, list[dict]]:
    """One image a seed from the prompt and one row of conditions (what a label or reference family draws from: the
    generator's `needs`), uint8 [n, R, R], each with its provenance (generator, prompt, seed, sampling
    settings); on_image(done) after each, for a progress bar."""
    if not prompt.strip():
        raise BadInput("the prompt is empty: write an impression, or pick findings to write one")
    if not seeds:
        raise BadInput("no seeds: give at least one image to generate")
    if generator.needs is not None and (conditions is None or getattr(conditions, generator.needs) is None):
        raise BadInput(f"{generator.generator_id} draws from {generator.needs}, not from the prompt's text: "
                       + ("pick findings" if generator.needs == "labels" else "pick a reference study"))
    images, provenance = [], []
    for done, seed in enumerate(seeds, start=1):
        made = generator.generate([prompt], [seed], conditions)
        images.append(made.images[0])
        provenance.append({"prompt": prompt, **made.provenance[0]})
        if on_image is not None:
            on_image(done)
    return np.stack(images), provenance
