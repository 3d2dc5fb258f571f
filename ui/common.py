"""Shared helpers of the Streamlit pages: the cached model loader and error display.

Only calls the workbench API; nothing here analyses a model.
"""

from __future__ import annotations

import streamlit as st

import workbench as wb
from workbench.errors import WorkbenchError


@st.cache_resource(show_spinner=False, max_entries=2)
def load_model(spec: str):
    """``workbench.load(spec)``, cached across reruns and sessions (errors are not cached)."""
    return wb.load(spec)


def show_error(exc: Exception) -> None:
    """A WorkbenchError is the user's input; anything else is a bug, shown but not raised."""
    if isinstance(exc, WorkbenchError):
        st.error(f"error: {exc}")
    else:
        st.error(f"internal error ({type(exc).__name__}: {exc})")


def moe_layers(lm) -> list[int]:
    return [i.index for i in lm.layer_infos() if i.kind == "moe"]
