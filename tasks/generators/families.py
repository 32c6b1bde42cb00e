"""The one place that names the generator families. Flows fit and load by the names in config.generators, and
synthesis, evaluation and retraining only ever see the ImageGenerator that load returns.

A family is (its config section, fit, load): fit(section, inputs) trains it on the generator cohort, or resumes or
skips it, and returns (generator_id, TrainResult); load(...) gives the trained generator. Generator ids start with
the family's name, so family_of tells which family a stored id belongs to.
"""

from __future__ import annotations

from pathlib import Path

from tasks.config import Config, TextSection, VQGANSection, WeightsSection
from tasks.generators.diffusion.generator import fit_diffusion, load_diffusion_generator
from tasks.generators.gan.generator import fit_gan, load_gan_generator
from tasks.generators.interface import ImageGenerator, to_uint8
from tasks.generators.raygen.generator import fit_raygen, load_generator
from tasks.generators.training import FitInputs, TrainResult

FAMILIES = ("raygen", "diffusion", "gan")


def section(config: Config, family: str) -> WeightsSection:
    """The family's config section (config validation guarantees one for every family in config.generators)."""
    _check(family)
    return getattr(config, family)


def family_of(generator_id: str) -> str:
    family = generator_id.split("-", 1)[0]
    _check(family)
    return family


def fit(family: str, settings: WeightsSection, inputs: FitInputs, on_eval=None,
        on_samples=None) -> tuple[str, TrainResult]:
    """Train the family on the generator cohort (see each family's fit). on_eval(step, metrics) for every family;
    on_samples(step, images uint8 [k, R, R]) with samples of fixed validation prompts as training goes, for the
    families that draw them (RayGen)."""
    _check(family)
    if family == "raygen":
        def decoded(step, tokens):  # RayGen samples tokens: shown as the VQ-GAN decodes them
            device = next(inputs.vqgan.parameters()).device
            on_samples(step, to_uint8(inputs.vqgan.decode_indices(tokens.to(device), grayscale=True)))

        return fit_raygen(inputs.data_root, settings, inputs.max_text_tokens, inputs.vqgan, inputs.vqgan_id,
                          inputs.encoder_id, inputs.text_dim, on_eval=on_eval,
                          on_samples=decoded if on_samples is not None else None)
    if family == "diffusion":
        return fit_diffusion(settings, inputs, on_eval=on_eval)
    return fit_gan(settings, inputs, on_eval=on_eval)


def load(family: str, data_root: Path, generator_id: str, settings: WeightsSection, resolution: int,
         vqgan: VQGANSection, text_settings: TextSection) -> ImageGenerator:
    """A trained generator of the family, sampling as its section says."""
    _check(family)
    if family == "raygen":
        return load_generator(data_root, generator_id, resolution, vqgan, text_settings, settings.sampling)
    if family == "diffusion":
        return load_diffusion_generator(data_root, generator_id, resolution, vqgan, text_settings, settings)
    return load_gan_generator(data_root, generator_id)


def sweep_sections(family: str, settings: WeightsSection, points: list[dict]) -> list[WeightsSection]:
    """The family's section at each point of generator_eval.sweep. The points are raygen.sampling settings (config
    validation checks them as such), so a family with another sampler has no sweep: []."""
    _check(family)
    if family != "raygen":
        return []
    return [settings.model_copy(update={"sampling": settings.sampling.updated(point)}) for point in points]


def _check(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown generator family {family!r}: one of {', '.join(FAMILIES)}")
