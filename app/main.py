"""The app's entry point: `augment app --config configs/demo.yaml` runs
`streamlit run app/main.py -- --config configs/demo.yaml` on 127.0.0.1."""

import sys

import streamlit as st

from app import common, compare, explore, generate, results

PAGES = {"Generate": generate.page, "Real vs generated": compare.page, "Dataset explorer": explore.page,
         "Results": results.page}

st.set_page_config(page_title="cxr-augment", layout="wide")
context = common.sidebar(sys.argv[1:])
if context is not None:
    name = st.sidebar.radio("Page", list(PAGES), key="page")
    st.title(name)
    with common.shown_errors():
        PAGES[name](context)
