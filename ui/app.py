"""The workbench Streamlit app: ``streamlit run ui/app.py -- --model SPEC`` (or ``workbench ui``).

The sidebar picks a model (built-in spec, local folder or hub id), optionally an SAE folder (SAELens'
format) and a page; each page lives in its own module and only calls the workbench Python API.
"""

from __future__ import annotations

import argparse
import sys

import streamlit as st
import torch

from workbench.models.specs import list_builtin
from workbench.ui import circuits_page, profile_page, steer_page
from workbench.ui.common import drop_if_rewritten, load_model, pick_sae, show_error, warnings_on_page

DEFAULT_MODEL = "zoo:tiny-moe-se"  # trained: readable continuations, one planted super expert to find
CUSTOM = "(local path or hub id)"
PAGES = {"Profile": profile_page.render, "Steer": steer_page.render, "Circuits": circuits_page.render}
NEEDS_MODEL = {"Steer"}  # Profile and Circuits open a saved profile.json / circuit.json without a model


def _argv() -> argparse.Namespace:
    """The app's own arguments, after ``--`` on the streamlit command line (``workbench ui`` passes them)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--model", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--sae", default=None)
    args, _ = p.parse_known_args(sys.argv[1:])
    return args


def _pick_model():
    builtin = list_builtin()
    start = _argv().model or DEFAULT_MODEL
    options = builtin + [CUSTOM]
    st.sidebar.title("workbench")
    choice = st.sidebar.selectbox("Model", options, index=options.index(start) if start in builtin else len(builtin),
                                  key="model_choice")
    if choice == CUSTOM:
        spec = st.sidebar.text_input("Folder or hub id", value="" if start in builtin else start, key="model_path")
    else:
        spec = choice
    if not spec.strip():
        st.sidebar.info("Type a model folder or hub id.")
        return None
    try:
        with st.spinner(f"loading {spec} ..."):
            drop_if_rewritten(spec.strip())
            lm = load_model(spec.strip())
    except Exception as exc:  # the app keeps running on any load failure
        show_error(exc)
        return None
    s = lm.summary()
    st.sidebar.caption(f"{s['architecture']}, {s['params'] / 1e6:.1f}M params, {s['layers']} layers, "
                       f"experts: {s['experts'] or 'dense'}, top-k {s['top_k']}; "
                       f"{torch.get_num_threads()} torch threads")
    return lm


def main() -> None:
    st.set_page_config(page_title="workbench", layout="wide")
    threads = _argv().threads
    if threads and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    lm = _pick_model()
    page = st.sidebar.radio("Page", list(PAGES), key="page")
    sae = pick_sae(lm, _argv().sae or "")
    if lm is None and page in NEEDS_MODEL:
        st.header(page)
        st.info(f"The {page} page needs a model: pick one in the sidebar (none is loaded).")
        return
    try:
        with warnings_on_page():  # what a page does not show where it arises, at the page's end
            PAGES[page](lm, sae)
    except Exception as exc:
        show_error(exc)


main()
