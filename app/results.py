"""Results: per generator family, the per-pathology AUROC by synthetic ratio with 95% intervals, and the generator
measures beside their real references, from MLflow, with links into the MLflow UI."""

from __future__ import annotations

import streamlit as st

from app import common
from tasks.browse.results import latest_results, MLFLOW_UI


def page(context: common.Context) -> None:
    ui = st.text_input("MLflow UI", MLFLOW_UI, key="mlflow_ui")
    for result in latest_results(context.config, ui):
        st.subheader(f"{result.family}: {result.generator_id}")
        st.markdown(f"Run {result.run_name} · [open in the MLflow UI]({result.link})")
        if result.comparison.empty:
            st.info("No comparison logged yet: the retrain stage writes it.")
        else:
            for arm, rows in result.comparison.groupby("arm", sort=False):
                st.markdown(f"Arm **{arm}**: test AUROC per pathology by synthetic ratio")
                table = rows.assign(**{"AUROC [95% CI]": [
                    f"{row.auroc:.3f} [{row.ci_low:.3f}, {row.ci_high:.3f}]" for row in rows.itertuples()]})
                st.dataframe(table.pivot(index="pathology", columns="ratio", values="AUROC [95% CI]")
                             .reindex(table["pathology"].unique())  # the comparison's order: PATHOLOGIES, macro
                             .rename(columns=lambda ratio: f"{ratio:.0%} synthetic"))
        st.markdown("Generator measures beside the real reference (real vs real) and the tokenizer's ceiling")
        st.dataframe(result.generator, hide_index=True)
