"""Shared helpers of the Streamlit pages: the cached model and SAE loaders, the SAE picker, error display.

Only calls the workbench API; nothing here analyses a model.
"""

from __future__ import annotations

import contextlib
import hashlib
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import streamlit as st

import workbench as wb
from workbench.errors import WorkbenchError

# SAE features in the app are read on the first FEATURE_PROMPTS built-in prompts, FEATURE_TOKENS tokens each
# (a fraction of a second for every expert of a zoo model); the CLI (`workbench sae features`) runs them all.
FEATURE_PROMPTS = 32
FEATURE_TOKENS = 32
FEATURE_TOP = 5


@st.cache_resource(show_spinner=False, max_entries=2)
def load_model(spec: str):
    """``workbench.load(spec)``, cached across reruns and sessions (errors are not cached)."""
    return wb.load(spec)


_LOADED: dict[str, int] = {}  # local model folder -> version of its files last loaded (process-wide, as the caches)


def drop_if_rewritten(spec: str) -> None:
    """A local model folder rewritten since it was loaded (another checkpoint saved there) drops every cache: the
    model's and every result keyed by its spec (generations, metrics, profiles), which were served as current."""
    path = Path(spec).expanduser()
    if not path.is_dir():
        return
    version = _version(path)
    if _LOADED.get(spec, version) != version:
        load_model.clear()
        st.cache_data.clear()
    _LOADED[spec] = version


@st.cache_resource(show_spinner=False, max_entries=4)
def load_sae(path: str, version: int):
    """``workbench.sae.load_sae(path)``, cached per folder and file version (errors are not cached)."""
    from workbench.sae import load_sae as load

    return load(path)


@dataclass(frozen=True)
class PickedSAE:
    """The SAE chosen in the sidebar: its folder, file version (the cache key), site in the model, size."""

    path: str
    version: int
    site: str
    d_in: int
    d_sae: int
    sae: object = field(compare=False, repr=False)


def _version(path: Path) -> int:
    """Modification times of the folder's files, so a re-trained SAE (or model) in the same folder is reloaded."""
    try:
        return sum(p.stat().st_mtime_ns for p in path.iterdir() if p.is_file())
    except OSError:
        return 0


def pick_sae(lm, start: str = "") -> PickedSAE | None:
    """Sidebar text box for an SAE folder (SAELens' format); a bad folder or one that does not fit the loaded
    model is an error on the page, and the app goes on without an SAE."""
    text = st.sidebar.text_input("SAE folder (optional)", value=start, key="sae_path",
                                 help="a folder in SAELens' format (cfg.json + sae_weights.safetensors), e.g. "
                                      "from `workbench sae train`: adds SAE features to expert details and "
                                      "circuit nodes, and feature-steering rows to the Steer page")
    if not text.strip():
        return None
    path = Path(text.strip()).expanduser().resolve()
    try:
        with st.spinner(f"loading SAE {path} ..."):
            sae = load_sae(str(path), _version(path))
        if lm is None:
            st.sidebar.caption("SAE loaded; load a model to use it")
            return None
        from workbench.sae import resolve_site

        site = resolve_site(lm, sae, where=f"SAE {path}")
    except Exception as exc:  # the app keeps running without an SAE
        show_error(exc)
        return None
    picked = PickedSAE(str(path), _version(path), site.key, int(sae.cfg.d_in), int(sae.cfg.d_sae), sae)
    st.sidebar.caption(f"SAE: {picked.d_in} -> {picked.d_sae} features at {picked.site}")
    return picked


def new_upload(up, key: str) -> bytes | None:
    """The bytes of the file in uploader ``up`` (its widget ``key``) when the page has not taken them yet, else None.

    A file is new until :func:`took_upload` records it; its name and content count (an edited file of the same
    size is new), and an emptied uploader forgets it, so the same file uploaded again after clearing is new again.
    Pages record only a file they could use, so a bad one errs on each rerun until it is replaced."""
    if up is None:
        st.session_state.pop(f"{key}_taken", None)
        return None
    data = up.getvalue()
    return None if st.session_state.get(f"{key}_taken") == (up.name, hashlib.sha256(data).hexdigest()) else data


def took_upload(up, key: str, data: bytes) -> None:
    """Record that the page has used ``data``, the file in uploader ``key`` (see :func:`new_upload`)."""
    st.session_state[f"{key}_taken"] = (up.name, hashlib.sha256(data).hexdigest())


@contextlib.contextmanager
def warnings_on_page():
    """Show on the page, once each, the warnings the workbench gives while the block runs (prompts truncated, a
    circuit of another model read here, ...): they went to the console, where an app user does not look. Only the
    workbench's own (a UserWarning raised from one of its modules); libraries' warnings stay in the console."""
    caught: list = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:  # an error's warnings too: they may say why
        roots = [Path(m.__file__).parent for name in ("workbench", "workbench.experts", "workbench.circuits",
                                                      "workbench.sae", "workbench.ui", "workbench.kernels")
                 if (m := sys.modules.get(name)) is not None and getattr(m, "__file__", None)]
        shown = set()
        for w in caught:
            text = str(w.message)
            ours = issubclass(w.category, UserWarning) and any(Path(w.filename).is_relative_to(r) for r in roots)
            if ours and text not in shown:
                shown.add(text)
                st.warning(text)
            elif not ours:  # as it would have been without the block
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)


def show_error(exc: Exception) -> None:
    """A WorkbenchError is the user's input; anything else is a bug, shown but not raised."""
    if isinstance(exc, WorkbenchError):
        st.error(f"error: {exc}")
    else:
        st.error(f"internal error ({type(exc).__name__}: {exc})")


def moe_layers(lm) -> list[int]:
    return [i.index for i in lm.layer_infos() if i.kind == "moe"]


def feature_prompts() -> list[str]:
    return wb.default_prompts()[:FEATURE_PROMPTS]


def feature_columns(table, tokens):
    """The shown columns of a ``FeatureReport`` table slice, and the top tokens in context of its features."""
    shown = table[["rank", "feature", "score", "delta_pre", "frac_raised", "top_tokens"]].rename(
        columns={"delta_pre": "pre-activation change", "frac_raised": "share of tokens raised",
                 "top_tokens": "top activating tokens"})
    ctx = tokens[tokens.feature.isin(list(table.feature))][["feature", "rank", "activation", "context"]]
    return shown, ctx
