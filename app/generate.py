"""Generate: a generator of any family, its sampler settings, what it draws from (a prompt in free text or written
from findings; the findings' labels for a label family; a held-out study for "variations of this radiograph"; the
view, for a RayGen with a view token), seeds and count; a grid of results, each with its provenance; progress while
it decodes."""

from __future__ import annotations

import json

import streamlit as st

from app import common
from tasks.browse.explore import images as pixels
from tasks.browse.generators import findings_conditions, generate_grid, impression
from tasks.generators.conditions import study_conditions
from tasks.pathologies import PATHOLOGIES


def page(context: common.Context) -> None:
    chosen, section = common.generator_picker(context, "generate")
    drawn_from = _what_it_draws_from(context, common.needs(context, chosen, section),
                                     common.views(context, chosen, section))
    if drawn_from is None:
        return
    prompt, conditions = drawn_from
    left, right = st.columns(2)
    first_seed = int(left.number_input("First seed", 0, 2**31 - 1, 0, key="seed"))
    count = int(right.number_input("Images", 1, 16, 4, key="count"))
    if st.button("Generate", key="generate", type="primary"):
        st.session_state.pop("grid", None)
        model = common.generator(context, chosen, section)
        bar = st.progress(0.0, text="decoding ...")
        images, provenance = generate_grid(model, prompt, list(range(first_seed, first_seed + count)), conditions,
                                           lambda done: bar.progress(done / count, text=f"decoded {done}/{count}"))
        bar.empty()
        st.session_state["grid"] = (images, provenance)
    if "grid" in st.session_state:
        images, provenance = st.session_state["grid"]
        common.show_images(images, [f"seed {record['seed']} · {record['generator_id']}" for record in provenance],
                           context.enhancement)
        with st.expander("Provenance"):
            st.code(json.dumps(provenance, indent=1), language="json")


def _what_it_draws_from(context: common.Context, needs: str | None, views: list[str]):
    """(prompt, conditions or None) from the controls that fit what the generator reads; None when a reference
    family has no held-out study to draw from (the warning is shown). A held-out study brings its own view."""
    if needs == "references":
        study = common.held_out_study(context, "Reference study (held out)", "reference")
        if study is None:
            return None
        resolution = context.config.ingest.resolution
        common.show_images(pixels(context.data_root, resolution, [study.dicom_id]), ["reference"],
                           context.enhancement, columns=4)
        st.caption(f"Variations of this radiograph, with its labels. Its impression: {study.impression}")
        return study.impression, study_conditions(context.data_root, [study.study_id], resolution)
    modes = ["Free text", "Findings"] if needs is None else ["Findings"]
    mode = st.radio("Prompt", modes, horizontal=True, key="prompt_mode")
    view = st.radio("View", views, horizontal=True, key="view") if views else None
    if needs == "labels":
        st.caption("This generator draws from labels, not from text: pick the findings.")
    if mode == "Findings":
        findings = st.multiselect("Findings", PATHOLOGIES, key="findings")
        prompt = impression(findings)
        st.caption(f"Impression: {prompt}")
        return prompt, findings_conditions(findings, view)
    prompt = st.text_area("Impression", key="prompt", placeholder="e.g. Moderate right pleural effusion.")
    return prompt, None if view is None else findings_conditions([], view)  # a text-only RayGen reads the view alone
