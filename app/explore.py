"""Dataset explorer: a cohort and the rejects through DuckDB, filtered by finding, view, split and reason; images
from the pixel shards; counts per class; the synthetic sets, exported as DICOM or in the MIMIC-CXR-JPG layout."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from app import common
from tasks import layout
from tasks.browse.explore import class_counts, COHORTS, cohort_rows, images, rejects, require_cohorts, \
    synthetic_outputs
from tasks.export import export_set, FORMATS
from tasks.pathologies import PATHOLOGIES

ANY = "any"
SHOWN = 8  # images shown of the filtered rows


def _choice(value: str) -> str | None:
    return None if value == ANY else value


def page(context: common.Context) -> None:
    require_cohorts(context.data_root)
    columns = st.columns(4)
    cohort = columns[0].selectbox("Cohort", COHORTS, key="cohort")
    split = columns[1].selectbox("Split", [ANY, "train", "validate", "test"], key="split")
    curate = context.config.curate
    view = columns[2].selectbox("View", [ANY, *sorted({*curate.generator_views, *curate.classifier_views})],
                                key="view")
    finding = columns[3].selectbox("Finding", [ANY, *PATHOLOGIES], key="finding")
    rows = cohort_rows(context.data_root, cohort, _choice(split), _choice(view), _choice(finding))
    st.metric("Images", len(rows))
    left, right = st.columns([1, 2])
    left.dataframe(class_counts(rows))
    right.dataframe(rows, hide_index=True)
    shown = rows.head(SHOWN)
    if len(shown):
        common.show_images(images(context.data_root, context.config.ingest.resolution, shown["dicom_id"].tolist()),
                           [f"{row.split} · {', '.join(row.findings) or 'no finding'}" for row in shown.itertuples()],
                           context.enhancement)

    st.subheader("Rejects")
    every = rejects(context.data_root)
    reason = st.selectbox("Reason", [ANY, *sorted(every["reason"].unique())], key="reason")
    st.dataframe(rejects(context.data_root, _choice(reason)), hide_index=True)

    st.subheader("Synthetic sets")
    outputs = synthetic_outputs(context.data_root)
    if outputs.empty:
        st.info("No synthetic images stored yet: the synthesize stage makes them.")
        return
    st.dataframe(outputs, hide_index=True)
    left, right = st.columns(2)
    output_id = left.selectbox("Set", outputs["output_id"].tolist(), key="export_output")
    export_format = right.selectbox("Format", list(FORMATS), key="export_format")
    default = layout.export_dir(context.data_root, output_id, export_format)
    dest = st.text_input("Export to", str(default))  # no key: another set or format resets it to its default
    if st.button("Export", key="export"):
        with st.spinner("writing ..."):
            st.success(f"Wrote {export_set(context.data_root, output_id, export_format, Path(dest))}")
