"""What every page shares: the run's config and data root (sidebar), the display presets, the generator picker with
its sampling settings, image grids, and bad input shown as a message in the page."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import streamlit as st

from tasks.browse import BadInput
from tasks.browse.compare import held_out_studies
from tasks.browse.generators import family_section, list_generators, open_generator, TrainedGenerator
from tasks.config import Config, ConfigError, DiffusionSection, FamilySection, load_config, RayGenSection
from tasks.enhance import enhance, Enhancement, WINDOWS
from tasks.generators.interface import ImageGenerator

IMAGE_WIDTH = 192  # pixels on the page; the smoke and demo images are 64-128 px


@dataclass(frozen=True)
class Context:
    config: Config
    config_key: str  # the config file and overrides, what cached resources are keyed by
    data_root: Path
    enhancement: Enhancement


def _arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="app/main.py")
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    return parser.parse_known_args(argv)[0]


def sidebar(argv: list[str]) -> Context | None:
    """The config named on the command line, the data root (editable), the display presets; None (with the
    message shown) when the config cannot be used."""
    args = _arguments(argv)
    st.sidebar.title("cxr-augment")
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as err:
        st.error(f"The config cannot be used: {err}")
        return None
    st.sidebar.caption(f"config {args.config}" + "".join(f" · {override}" for override in args.overrides))
    data_root = Path(st.sidebar.text_input("Data root", str(config.run.data_root), key="data_root"))
    config = config.model_copy(update={"run": config.run.model_copy(update={"data_root": data_root})})
    st.sidebar.subheader("Display")
    enhancement = Enhancement(
        window=st.sidebar.selectbox("Window", list(WINDOWS), key="window"),
        clahe=st.sidebar.checkbox("CLAHE", key="clahe"),
        unsharp=st.sidebar.checkbox("Unsharp mask", key="unsharp"),
        gamma=st.sidebar.slider("Gamma", 0.3, 3.0, 1.0, 0.1, key="gamma"))
    return Context(config, f"{args.config}|{args.overrides}", data_root, enhancement)


@contextmanager
def shown_errors() -> Iterator[None]:
    """Bad input (and a missing or malformed file, whose messages name it) as a message in the page."""
    try:
        yield
    except (BadInput, FileNotFoundError, KeyError, ValueError) as err:
        st.error(str(err).strip("'\""))


def show_images(images: np.ndarray, captions: list[str], enhancement: Enhancement, columns: int = 4) -> None:
    """A grid of uint8 [R, R] images through the display presets, a caption under each."""
    for start in range(0, len(images), columns):
        for column, image, caption in zip(st.columns(columns), images[start:start + columns],
                                          captions[start:start + columns]):
            column.image(enhance(np.asarray(image), enhancement), caption=caption, width=IMAGE_WIDTH)


def held_out_study(context: Context, label: str, key: str):
    """A held-out (validate, test) study of the generator cohort picked by the user, as a row of
    tasks.browse.compare.held_out_studies; None, with a warning shown, when the cohort has none."""
    studies = held_out_studies(context.data_root)
    if studies.empty:
        st.warning("The generator cohort has no held-out (validate, test) study.")
        return None
    index = st.selectbox(label, range(len(studies)), key=key, format_func=lambda i: (
        f"{studies.split[i]} · s{studies.study_id[i]} · {studies.impression[i][:70]}"))
    return studies.iloc[index]


def generator_picker(context: Context, key: str) -> tuple[TrainedGenerator, FamilySection]:
    """A generator found under the data root (its family and version), and its family's config section with the
    sampler settings chosen here (the config's as defaults); a data root without any generator is a BadInput."""
    found = list_generators(context.data_root)
    if not found:
        raise BadInput(f"no generator under {context.data_root}/models: run the pipeline through train_generator "
                       "first (augment run --config ... --stop-after train_generator)")
    chosen = st.selectbox("Generator", found, format_func=lambda generator: generator.label, key=f"{key}_generator")
    section = family_section(context.config, chosen.family)
    return chosen, _sampler_controls(section, key)


def _sampler_controls(section: FamilySection, key: str) -> FamilySection:
    """The section with the sampler settings a person would change: RayGen's steps, temperature, codebook share and
    guidance; diffusion's scheduler, steps and guidance; the GAN has none (z ~ N(0, I))."""
    if isinstance(section, RayGenSection):
        defaults = section.sampling
        steps, temperature, share, guidance = st.columns(4)
        sampling = defaults.updated({
            "steps": steps.slider("Steps", 1, 32, defaults.steps, key=f"{key}_steps"),
            "temperature": temperature.slider("Temperature", 0.0, 5.0, float(defaults.temperature), 0.1,
                                              key=f"{key}_temperature"),
            # The share of the codebook each token is drawn from: the lever of FID on the demo (docs/RESULTS.md).
            "top_k_frac": share.slider("Codebook share", 0.01, 1.0, float(defaults.top_k_frac), 0.01,
                                       key=f"{key}_top_k_frac"),
            "guidance_scale": guidance.slider("Guidance", 0.0, 8.0, float(defaults.guidance_scale), 0.5,
                                              key=f"{key}_guidance")})
    elif isinstance(section, DiffusionSection):
        defaults = section.sampling
        left, middle, right = st.columns(3)
        sampling = defaults.model_copy(update={
            "scheduler": left.radio("Scheduler", ["ddim", "ddpm"], ["ddim", "ddpm"].index(defaults.scheduler),
                                    key=f"{key}_scheduler", horizontal=True),
            "steps": middle.slider("DDIM steps", 1, 100, defaults.steps, key=f"{key}_steps"),
            "guidance_scale": right.slider("Guidance", 0.0, 8.0, float(defaults.guidance_scale), 0.5,
                                           key=f"{key}_guidance")})
    else:
        st.caption("The GAN has no sampler settings: each seed draws z ~ N(0, I).")
        return section
    return section.model_copy(update={"sampling": sampling})


@st.cache_resource(max_entries=2, show_spinner="Loading the generator ...")
def _generator(_config: Config, config_key: str, data_root: str, family: str, generator_id: str,
               section: str) -> ImageGenerator:
    chosen = type(family_section(_config, family)).model_validate_json(section)
    return open_generator(_config, Path(data_root), family, generator_id, chosen)


def generator(context: Context, chosen: TrainedGenerator, section: FamilySection) -> ImageGenerator:
    """The generator, loaded once per (config, data root, version, section with its sampler settings) for the whole
    app."""
    return _generator(context.config, context.config_key, str(context.data_root), chosen.family,
                      chosen.generator_id, section.model_dump_json())


def needs(context: Context, chosen: TrainedGenerator, section: FamilySection) -> str | None:
    """What the generator draws from besides the prompt ("labels", "references" or None: ImageGenerator.needs); a
    generator not trained yet is not opened (asking it to generate says why)."""
    return generator(context, chosen, section).needs if chosen.trained else None


def views(context: Context, chosen: TrainedGenerator, section: FamilySection) -> list[str]:
    """The views a RayGen with a view token draws (what the view picker offers); [] for any other generator."""
    return getattr(generator(context, chosen, section), "views", []) if chosen.trained else []
