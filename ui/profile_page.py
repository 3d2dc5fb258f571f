"""Profile page: open a saved ``profile.json`` or profile a few prompts, then plot it."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import streamlit as st

import workbench as wb
from workbench.errors import WorkbenchError
from workbench.experts.plots import figures
from workbench.experts.profile import ProfileOptions, profile
from workbench.ui.common import show_error
from workbench.ui.plotting import figure


def _read(text: str, where: str) -> dict:
    try:
        p = json.loads(text)
    except json.JSONDecodeError as e:
        raise WorkbenchError(f"{where}: not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(p, dict) or "experts" not in p or "meta" not in p:
        raise WorkbenchError(f"{where}: not a profile.json (no 'experts' / 'meta')")
    return p


def _source(lm) -> None:
    tab_run, tab_open = st.tabs(["Run on prompts", "Open profile.json"])
    with tab_run:
        default = "\n".join(wb.default_prompts()[:8])
        text = st.text_area("Prompts, one per line", value=default, height=160, key="profile_prompts")
        c1, c2 = st.columns(2)
        max_tokens = c1.number_input("max tokens per prompt", min_value=1, value=64, key="profile_max_tokens")
        sinks = c2.checkbox("attention sinks", value=True, key="profile_sinks")
        if st.button("Run profile", key="profile_run", disabled=lm is None):
            prompts = [l for l in text.splitlines() if l.strip()]
            try:
                with st.spinner(f"profiling {len(prompts)} prompts ..."):
                    st.session_state["profile"] = profile(
                        lm, prompts, ProfileOptions(max_tokens=int(max_tokens), sinks=sinks), progress=False)
            except Exception as exc:
                show_error(exc)
    with tab_open:
        path = st.text_input("Path to profile.json", key="profile_path")
        up = st.file_uploader("... or upload it", type=["json"], key="profile_upload")
        try:
            if up is not None:
                st.session_state["profile"] = _read(up.getvalue().decode("utf-8"), up.name)
            elif path.strip() and st.button("Open", key="profile_open"):
                p = Path(path.strip()).expanduser()
                if p.is_dir():
                    p = p / "profile.json"
                if not p.is_file():
                    raise WorkbenchError(f"profile file {p} does not exist")
                st.session_state["profile"] = _read(p.read_text(encoding="utf-8"), str(p))
        except Exception as exc:
            show_error(exc)


def render(lm) -> None:
    st.header("Profile: super experts, router, massive activations, attention sinks")
    _source(lm)
    p = st.session_state.get("profile")
    if p is None:
        st.info("Run a profile or open a profile.json.")
        return
    m = p["meta"]
    st.caption(f"{m.get('spec')}: {m.get('num_prompts')} prompts, {m.get('num_tokens')} tokens, "
               f"{m.get('seconds', 0):.1f} s")
    st.subheader("Super experts")
    st.dataframe(pd.DataFrame(p["super_experts"]), key="profile_super")
    figs = figures(p)
    cols = st.columns(2)
    for i, (name, f) in enumerate(figs.items()):
        cols[i % 2].plotly_chart(figure(f), key=f"profile_fig_{name}")
    if "router" in p:
        st.subheader("Router statistics per MoE layer")
        rows = [{k: v for k, v in r.items() if not isinstance(v, list)} for r in p["router"]]
        st.dataframe(pd.DataFrame(rows), key="profile_router")
    kurt = p.get("expert_max_kurtosis_by_layer")
    if kurt:
        st.caption(f"kurtosis of experts' maxima by layer: {kurt}")
