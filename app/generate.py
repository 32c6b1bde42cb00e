"""Generate: a prompt (free text, or findings that write an impression), a generator, seeds, count and sampling
settings; a grid of results, each with its provenance; progress while it decodes."""

from __future__ import annotations

import json

import streamlit as st

from app import common
from tasks.browse.generators import generate_grid, impression
from tasks.pathologies import PATHOLOGIES


def page(context: common.Context) -> None:
    family, generator_id, sampling = common.generator_picker(context, "generate")
    mode = st.radio("Prompt", ["Free text", "Findings"], horizontal=True, key="prompt_mode")
    if mode == "Findings":
        prompt = impression(st.multiselect("Findings", PATHOLOGIES, key="findings"))
        st.caption(f"Impression: {prompt}")
    else:
        prompt = st.text_area("Impression", key="prompt", placeholder="e.g. Moderate right pleural effusion.")
    left, right = st.columns(2)
    first_seed = int(left.number_input("First seed", 0, 2**31 - 1, 0, key="seed"))
    count = int(right.number_input("Images", 1, 16, 4, key="count"))
    if st.button("Generate", key="generate", type="primary"):
        st.session_state.pop("grid", None)
        model = common.generator(context, family, generator_id, sampling)
        bar = st.progress(0.0, text="decoding ...")
        images, provenance = generate_grid(model, prompt, list(range(first_seed, first_seed + count)),
                                           lambda done: bar.progress(done / count, text=f"decoded {done}/{count}"))
        bar.empty()
        st.session_state["grid"] = (images, provenance)
    if "grid" in st.session_state:
        images, provenance = st.session_state["grid"]
        common.show_images(images, [f"seed {record['seed']} · {record['generator_id']}" for record in provenance],
                           context.enhancement)
        with st.expander("Provenance"):
            st.code(json.dumps(provenance, indent=1), language="json")
