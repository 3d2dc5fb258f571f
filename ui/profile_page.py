"""Profile page: open a saved ``profile.json`` or profile a few prompts, then plot it."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

import workbench as wb
from workbench.errors import WorkbenchError
from workbench.experts.plots import figures
from workbench.experts.profile import ProfileOptions, profile
from workbench.experts.report import check_profile, flat
from workbench.io import read_upload
from workbench.sae.loading import same_model
from workbench.ui.common import (FEATURE_PROMPTS, FEATURE_TOKENS, FEATURE_TOP, PickedSAE, feature_columns,
                                  feature_prompts, load_model, load_sae, new_upload, show_error,
                                  took_upload, warnings_on_page)
from workbench.ui.plotting import figure
from workbench.ui.steer_page import TOGGLES, add_to_table

PICK_CHART = "profile_fig_expert_maxabs"  # the max|down_proj| heatmap; a click on a cell picks that expert


def _read(data: bytes, where: str) -> dict:
    """A profile.json's bytes as a checked profile; a WorkbenchError (one line, naming ``where``) otherwise."""
    return check_profile(read_upload(data, where, is_json=True), where)


def _open_path(path: str) -> dict:
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "profile.json"
    if not p.is_file():
        raise WorkbenchError(f"profile file {p} does not exist")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise WorkbenchError(f"cannot read {p}: {e.strerror or e}") from None
    return _read(data, str(p))


def _show(p: dict) -> None:
    """Make ``p`` the profile the pages show; ``profile_serial`` tells a new profile from the last (an ``id`` can
    be the freed last one's)."""
    st.session_state["profile"] = p
    st.session_state["profile_serial"] = st.session_state.get("profile_serial", 0) + 1


def _source(lm) -> None:
    """Where the shown profile comes from: the latest of a run, an upload (when a new file arrives) and an open.

    Each action stores its profile in ``session_state["profile"]`` on the rerun it happens in; a file that sits in
    the uploader is parsed once (its content hash is remembered), so a later run or open is not overwritten by it
    on the next rerun. An invalid profile is never stored: its error shows, the last good profile stays."""
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
                with st.spinner(f"profiling {len(prompts)} prompts ..."), warnings_on_page():
                    p = profile(lm, prompts, ProfileOptions(max_tokens=int(max_tokens), sinks=sinks), progress=False)
                _show(p)
            except Exception as exc:
                show_error(exc)
        if lm is None:
            st.caption("No model is loaded: pick one in the sidebar to run a profile (a saved profile.json opens "
                       "without one).")
    with tab_open:
        path = st.text_input("Path to profile.json", key="profile_path")
        up = st.file_uploader("... or upload it", type=["json"], key="profile_upload")
        try:
            data = new_upload(up, "profile_upload")
            if data is not None:
                _show(_read(data, up.name))
                took_upload(up, "profile_upload", data)
        except Exception as exc:
            show_error(exc)
        if path.strip() and st.button("Open", key="profile_open"):
            try:
                _show(_open_path(path.strip()))
            except Exception as exc:
                show_error(exc)


def picked_expert(points) -> tuple[int, int] | None:
    """(layer, expert) of the last clicked cell of the max|down_proj| heatmap (x: expert, y: layer)."""
    for pt in reversed(points or []):
        try:
            return int(float(pt["y"])), int(float(pt["x"]))
        except (KeyError, TypeError, ValueError):
            continue
    return None


def _on_pick() -> None:
    """Chart selection callback (runs only when the selection changes): move the pickers to the cell."""
    state = st.session_state.get(PICK_CHART)
    pick = picked_expert(state["selection"]["points"]) if state else None
    if pick is not None:
        st.session_state["profile_pick_layer"], st.session_state["profile_pick_expert"] = pick


def expert_details(p: dict, layer: int, expert: int) -> dict | None:
    """What the profile knows about one routed (or dense) expert: its max |out| with channel, prompt,
    position and token, its router load, and kurtosis; None when the profile has no such expert."""
    e = next((e for e in p["experts"] if e["layer"] == layer and e["expert"] == expert and e["kind"] != "shared"), None)
    if e is None:
        return None
    out = {"kind": e["kind"], "max |out|": e["max_abs"], "channel": e["channel"], "prompt": e.get("prompt_index"),
           "position": e["position"], "token": e.get("token"), "tokens routed": e.get("tokens_routed")}
    router = next((r for r in p.get("router", []) if r["layer"] == layer), None)
    if router is not None and expert < len(router["load"]):
        out["load"] = router["load"][expert]
        out["mean routing prob"] = router["mean_prob"][expert] if "mean_prob" in router else None
    if e.get("channel_kurtosis") is not None:
        out["kurtosis of its channel maxima"] = e["channel_kurtosis"]
    by_layer = p.get("expert_max_kurtosis_by_layer") or []
    if layer < len(by_layer) and by_layer[layer] is not None and by_layer[layer] == by_layer[layer]:  # (NaN: dense)
        out["kurtosis of the layer's expert maxima"] = by_layer[layer]
    out["super expert"] = any(s["layer"] == layer and s["expert"] == expert and s["kind"] != "shared"
                              for s in p["super_experts"])
    if "candidate" in e:  # why the rule admitted or rejected it (absent from a profile.json written before #17)
        from workbench.experts.super_experts import explain

        out["super-expert check"] = explain(e, p["super_expert_rule"])
    return {k: v for k, v in out.items() if v is not None}


CANDIDATE_COLUMNS = {"max_abs": "max |out|", "above_percentile": "> percentile", "above_ratio": "> floor(ratio x max)",
                     "ratio_to_median": "x median", "ratio_to_next": "x next", "stands_out": "stands out",
                     "residual_ratio_to_median": "residual x median", "feeds_massive": "feeds massive",
                     "admitted": "super expert"}


def candidates_table(p: dict) -> pd.DataFrame | None:
    """The largest super-expert candidates with the number against each condition and the verdict (None for a
    profile.json written before the checks were recorded)."""
    from workbench.experts.super_experts import explain, label, shown

    rows = shown(p)
    if not rows:
        return None
    df = pd.DataFrame([{"candidate": label(c), **{v: c[k] for k, v in CANDIDATE_COLUMNS.items()},
                        "why": explain(c, p["super_expert_rule"])} for c in rows])
    for col in ("> percentile", "> floor(ratio x max)", "stands out", "feeds massive", "super expert"):
        df[col] = df[col].map(lambda b: "yes" if b else "no")
    return df


def _fmt(k: str, v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    return repr(v) if k == "token" else str(v)  # the token's quotes show its spaces


@st.cache_data(show_spinner=False, max_entries=8)
def sae_expert_features(spec: str, sae_path: str, sae_version: int):
    """``workbench.sae.expert_features`` for every expert writing into the SAE's site, on the app's small prompt
    set: (table, top-token table, meta). One pass for all experts, so picking another cell costs nothing."""
    from workbench.sae import expert_features

    report = expert_features(load_model(spec), load_sae(sae_path, sae_version), feature_prompts(), top=FEATURE_TOP,
                             top_tokens=5, max_tokens=FEATURE_TOKENS)
    return report.table, report.tokens, report.meta


def _sae_panel(lm, sae: PickedSAE, layer: int, expert: int) -> None:
    """The picked expert's top SAE features (feature, score, top activating tokens)."""
    from workbench.sae.features import expert_writers
    from workbench.tracing.sites import Site

    st.markdown(f"**Top SAE features** at {sae.site} (mean activation the expert's output raises, "
                f"first {FEATURE_PROMPTS} built-in prompts, {FEATURE_TOKENS} tokens each)")
    writer = expert_writers(lm, [(layer, expert)])[0]
    if not writer.feeds(Site.from_key(sae.site)):
        st.info(f"{writer.name} does not write into the SAE's site {sae.site} directly (an expert reaches "
                "resid_post of its layer and later residual sites, and mlp_out of its layer)")
        return
    with st.spinner("SAE features of every expert ..."):
        table, tokens, meta = sae_expert_features(lm.spec, sae.path, sae.version)
    mine = table[table.writer == writer.name]
    if mine.empty:
        why = ("no token of the prompts was routed to it" if writer.name in meta.get("writers_without_tokens", [])
               else "its output raises no feature")
        st.info(f"{writer.name}: no SAE features ({why})")
        return
    shown, ctx = feature_columns(mine, tokens)
    st.dataframe(shown, hide_index=True, key="profile_pick_sae")
    with st.expander("top activating tokens in context"):
        st.dataframe(ctx, hide_index=True, key="profile_pick_sae_tokens")


def _expert_panel(lm, p: dict, sae: PickedSAE | None = None) -> None:
    """The picked expert's details, its top SAE features when an SAE is loaded, and a button that ticks an op
    for it in the Steer page's table."""
    cells = sorted({(e["layer"], e["expert"]) for e in p["experts"] if e["kind"] != "shared"})
    layers = sorted({l for l, _ in cells})
    if st.session_state.get("profile_pick_layer") not in layers:  # a newly opened profile
        st.session_state["profile_pick_layer"] = layers[0]
    st.markdown("**Selected expert** (click a cell of the heatmap, or pick)")
    c1, c2 = st.columns(2)
    layer = c1.selectbox("layer", layers, key="profile_pick_layer")
    experts = [e for l, e in cells if l == layer]
    if st.session_state.get("profile_pick_expert") not in experts:
        st.session_state["profile_pick_expert"] = experts[0]
    expert = c2.selectbox("expert", experts, key="profile_pick_expert")
    d = expert_details(p, layer, expert)
    if d is None:
        st.info(f"the profile has no expert {expert} in layer {layer}")
        return
    st.markdown(f"#### Layer {layer}, expert {expert}")
    st.dataframe(pd.DataFrame({"": list(d), "value": [_fmt(k, v) for k, v in d.items()]}), hide_index=True,
                 key="profile_pick_details", height=35 * (len(d) + 1) + 3)
    same = lm is not None and same_model(str(p["meta"].get("spec")), lm.spec)
    moe = same and d["kind"] == "routed"
    c1, c2 = st.columns([1, 2])
    op = c1.selectbox("op", TOGGLES, key="profile_pick_op", label_visibility="collapsed")
    if c2.button("Add to the Steer table", key="profile_pick_add", disabled=not moe):
        try:
            add_to_table(lm, layer, expert, op)
            st.success(f"{op} L{layer}.E{expert} is ticked in the Steer page's table")
        except Exception as exc:
            show_error(exc)
    if not same:
        st.caption(f"the profile is of {p['meta'].get('spec')}, the loaded model is "
                   f"{lm.spec if lm is not None else 'none'}: load it to steer this expert")
    elif not moe:
        st.caption("only routed experts of MoE layers go into the Steer table")
    if sae is not None and same:
        try:
            _sae_panel(lm, sae, layer, expert)
        except Exception as exc:
            show_error(exc)
    elif sae is not None:
        st.caption("SAE features need the profile's model loaded")


def render(lm, sae: PickedSAE | None = None) -> None:
    st.header("Profile: super experts, router, massive activations, attention sinks")
    _source(lm)
    p = st.session_state.get("profile")
    if p is None:
        st.info("Run a profile or open a profile.json.")
        return
    m = p["meta"]
    took = f", {m['seconds']:.1f} s" if "seconds" in m else ""  # a saved profile.json keeps timings in run.json
    st.caption(f"{m.get('spec')}: {m.get('num_prompts')} prompts, {m.get('num_tokens')} tokens{took}")
    st.subheader("Super experts")
    rule = p.get("super_expert_rule", {})
    if p["super_experts"]:
        st.dataframe(pd.DataFrame(p["super_experts"]), key="profile_super")
    else:
        from workbench.experts.super_experts import no_super_experts

        st.info(no_super_experts(p).splitlines()[0])
    table = candidates_table(p)
    if table is not None:
        st.caption(f"rule: {rule.get('rule', 'paper')}. The largest candidates and the number against each "
                   "condition: the paper's (above the percentile and the floored ratio of the largest) and, "
                   "for the default rule, standing out (x the median and x the next expert) and feeding a "
                   "massive activation (residual in its channel x the layer median).")
        st.dataframe(table, hide_index=True, key="profile_super_candidates")
    figs = figures(p)
    left, right = st.columns(2)
    left.plotly_chart(figure(figs.pop("expert_maxabs"), selectable=True), key=PICK_CHART, on_select=_on_pick,
                      selection_mode="points")
    with right:
        _expert_panel(lm, p, sae)
    cols = st.columns(2)
    for i, (name, f) in enumerate(figs.items()):
        cols[i % 2].plotly_chart(figure(f), key=f"profile_fig_{name}")
    if "router" in p:
        st.subheader("Router statistics per MoE layer")
        rows = [flat({k: v for k, v in r.items() if not isinstance(v, list)}) for r in p["router"]]
        st.dataframe(pd.DataFrame(rows), key="profile_router")
    kurt = p.get("expert_max_kurtosis_by_layer")
    # a dense layer's one MLP has no spread of expert maxima (NaN): it is left out, not shown as "nan"
    shown = [(i, k) for i, k in enumerate(kurt or []) if k is not None and k == k]
    if shown:
        by_layer = ", ".join(f"L{i} {_fmt('', k)}" for i, k in shown)
        st.caption(f"kurtosis of experts' maxima by MoE layer: {by_layer}")
    _report_button(p)


def _report_button(p: dict) -> None:
    """The same one-page report `workbench profile` writes (workbench.report), built on demand, to download."""
    if st.button("Build the report page (HTML)", key="profile_report"):
        import tempfile

        from workbench.experts.report import write
        from workbench.report import report

        with tempfile.TemporaryDirectory() as d:
            write(p, d)
            st.session_state["profile_report_html"] = (st.session_state.get("profile_serial"),
                                                       report(d).read_bytes())
    built = st.session_state.get("profile_report_html")
    if built is not None and built[0] == st.session_state.get("profile_serial"):
        st.download_button("Download report.html", built[1], file_name="report.html", mime="text/html",
                           key="profile_report_download")
        st.caption("one self-contained page: findings, tables and plots; opens offline (same as `workbench report`)")
