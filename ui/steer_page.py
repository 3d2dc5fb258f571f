"""Steer page: edit expert interventions in a table, compare greedy generations and next-token
probabilities without and with them, and round-trip the set as a study YAML for ``workbench ablate``."""

from __future__ import annotations

import json
import re
import time

import pandas as pd
import streamlit as st
import torch
import yaml

from workbench import metrics as M
from workbench.errors import WorkbenchError
from workbench.experts.sinks import eager_attention
from workbench.interventions import apply, parse
from workbench.studies import Study
from workbench.ui.common import load_model, moe_layers, show_error

COLUMNS = ["expert", "zero", "drop", "force", "force_weight", "scale", "bias", "positions", "token"]
TOGGLES = ("zero", "drop", "force")
NEW_TOKENS = 20


def _blank(n_experts: int) -> pd.DataFrame:
    return pd.DataFrame({"expert": range(n_experts), "zero": False, "drop": False, "force": False,
                         "force_weight": 0.3, "scale": 1.0, "bias": 0.0, "positions": "", "token": ""})[COLUMNS]


def _text(v) -> str:
    """A text cell as a string ('' for a cleared cell, which the editor returns as None or NaN)."""
    return "" if v is None or (isinstance(v, float) and v != v) else str(v)


def parse_positions(text: str, where: str) -> list[int] | None:
    """'0, -1' -> [0, -1]; blank -> None (every position)."""
    parts = [t for t in re.split(r"[\s,;]+", text.strip()) if t]
    try:
        return [int(t) for t in parts] or None
    except ValueError:
        raise WorkbenchError(f"{where}: positions {text.strip()!r}: write integers separated by commas, "
                             "e.g. 0, -1 (negative counts from the end)") from None


def _row_scope(r, layer: int) -> dict:
    scope = {}
    positions = parse_positions(_text(r.positions), f"layer {layer} expert {int(r.expert)}")
    if positions is not None:
        scope["positions"] = positions
    if _text(r.token):
        scope["token"] = _text(r.token)
    return scope


def interventions_from_tables(tables: dict[int, pd.DataFrame]) -> list[dict]:
    """Table rows -> intervention dicts (one per active op), in layer then expert order; a row's
    positions / token restrict every op of that row."""
    out = []
    for layer in sorted(tables):
        for r in tables[layer].itertuples(index=False):
            e = int(r.expert)
            ops = []
            if r.zero:
                ops.append({"op": "zero"})
            if r.drop:
                ops.append({"op": "drop"})
            if r.force:
                ops.append({"op": "force", "weight": float(r.force_weight)})
            if float(r.scale) != 1.0:
                ops.append({"op": "scale", "factor": float(r.scale)})
            if float(r.bias) != 0.0:
                ops.append({"op": "bias", "value": float(r.bias)})
            scope = _row_scope(r, layer) if ops else {}
            for op in ops:
                out.append({"op": op.pop("op"), "layers": [layer], "expert": e, **op, **scope})
    return out


def describe(d: dict) -> str:
    """'drop L0.E3 @0,-1 'Paris'' for the caption."""
    s = f"{d['op']} L{d['layers'][0]}.E{d['expert']}"
    if d.get("positions"):
        s += " @" + ",".join(str(p) for p in d["positions"])
    if d.get("token"):
        s += f" {d['token']!r}"
    return s


def tables_from_interventions(ivs, n_experts: dict[int, int]) -> dict[int, pd.DataFrame]:
    """The inverse, for an uploaded study: routed expert ops, one position/token scope per expert row."""
    tables = {layer: _blank(n) for layer, n in n_experts.items()}
    scopes: dict[tuple[int, int], tuple] = {}
    for iv in ivs:
        if iv.kind != "routed" or iv.prompts:
            raise WorkbenchError(f"intervention {iv.to_dict()}: the table holds routed-expert ops without "
                                 "prompt scopes only")
        scope = (tuple(iv.positions or ()), iv.token or "")
        for layer in iv.layers:
            if scopes.setdefault((layer, iv.expert), scope) != scope:
                raise WorkbenchError(f"intervention {iv.to_dict()}: layer {layer} expert {iv.expert} already has "
                                     "another position/token scope (the table holds one per expert)")
            t = tables[layer]
            t.loc[iv.expert, "positions"] = ", ".join(str(p) for p in scope[0])
            t.loc[iv.expert, "token"] = scope[1]
            if iv.op in ("zero", "drop", "force"):
                t.loc[iv.expert, iv.op] = True
                if iv.op == "force":
                    t.loc[iv.expert, "force_weight"] = iv.weight
            elif iv.op == "scale":
                t.loc[iv.expert, "scale"] = iv.factor
            elif iv.op == "bias":
                t.loc[iv.expert, "bias"] = iv.value
    return tables


def study_yaml(ivs: list[dict], name: str = "ui") -> str:
    spec = {"name": name, "conditions": [{"name": "ui", "interventions": ivs}]}
    Study(spec, "ui study")  # validates the shape, as `workbench ablate` will
    return yaml.safe_dump(spec, sort_keys=False)


@st.cache_data(show_spinner=False, max_entries=64)
def generate(spec: str, prompt: str, ivs_json: str) -> tuple[str, list[float], float, int]:
    """Greedy continuation of ``prompt`` under the interventions (up to NEW_TOKENS, stopping at the end
    of text), the next-token probabilities, seconds, and the number of new tokens."""
    lm = load_model(spec)
    ivs = json.loads(ivs_json)
    enc = lm.tokenizer(prompt, return_tensors="pt").to(lm.device)
    start = time.perf_counter()
    with torch.no_grad(), apply(lm, ivs):
        out = lm.model.generate(**enc, max_new_tokens=NEW_TOKENS, do_sample=False, output_scores=True,
                                return_dict_in_generate=True, pad_token_id=lm.tokenizer.eos_token_id)
    seconds = time.perf_counter() - start
    new = out.sequences[0, enc["input_ids"].shape[1]:]
    probs = torch.softmax(out.scores[0][0].float(), dim=-1)
    return lm.tokenizer.decode(new), probs.tolist(), seconds, int(new.numel())


@st.cache_data(show_spinner=False, max_entries=64)
def prompt_metrics(spec: str, prompt: str, ivs_json: str) -> dict[str, float]:
    """Attention share on position 0, largest |residual| and KL from baseline on the prompt (``text_metrics``)."""
    lm = load_model(spec)
    with eager_attention(lm.model):
        _, base_lp = M.text_metrics(lm, [prompt], {"kl"})
        with apply(lm, json.loads(ivs_json)) as applied:
            values, _ = M.text_metrics(lm, [prompt], {"sink", "massive", "kl"}, base_lp, applied=applied)
    return {k: v[0] for k, v in values.items()}


def _profile_columns(lm, layer: int, n: int) -> pd.DataFrame | None:
    """load and max|out| per expert of ``layer`` from the profile on the Profile page, when it is this model's."""
    p = st.session_state.get("profile")
    if not p or p.get("meta", {}).get("spec") != lm.spec:
        return None
    cols = pd.DataFrame({"load": float("nan"), "max_abs": float("nan")}, index=range(n))
    for r in p.get("router", []):
        if r["layer"] == layer:
            cols["load"] = r["load"][:n]
    for e in p["experts"]:
        if e["layer"] == layer and e["kind"] == "routed" and e["expert"] < n:
            cols.loc[e["expert"], "max_abs"] = e["max_abs"]
    return cols


def table_state(lm) -> dict[int, pd.DataFrame]:
    """The intervention table of ``lm`` (one DataFrame per MoE layer), kept in the session."""
    infos = {i.index: i.num_experts for i in lm.layer_infos() if i.kind == "moe"}
    if st.session_state.get("steer_model") != lm.spec:
        st.session_state["steer_model"] = lm.spec
        st.session_state["steer_tables"] = {layer: _blank(n) for layer, n in infos.items()}
        st.session_state["steer_version"] = st.session_state.get("steer_version", 0) + 1
    return st.session_state["steer_tables"]


def add_to_table(lm, layer: int, expert: int, op: str) -> None:
    """Tick ``op`` (zero / drop / force) for one expert in the Steer page's table (the Profile page's button)."""
    if op not in TOGGLES:
        raise WorkbenchError(f"op {op!r}: the table toggles {', '.join(TOGGLES)}")
    tables = table_state(lm)
    if layer not in tables:
        raise WorkbenchError(f"layer {layer} of {lm.spec} is not a MoE layer")
    if not 0 <= expert < len(tables[layer]):
        raise WorkbenchError(f"expert {expert} out of range (layer {layer} has {len(tables[layer])})")
    tables[layer].loc[expert, op] = True
    st.session_state["steer_version"] += 1  # a fresh editor shows the new table
    st.session_state["steer_layer"] = layer  # and the Steer page opens on that layer


def _upload(lm) -> None:
    up = st.file_uploader("Study YAML (one condition) into the table", type=["yaml", "yml", "json"], key="steer_upload")
    if up is None or st.session_state.get("steer_loaded") == (up.name, up.size):
        return
    try:
        spec = yaml.safe_load(up.getvalue().decode("utf-8"))
        study = Study(spec, up.name)
        if len(study.explicit) != 1:
            raise WorkbenchError(f"{up.name}: the table holds one explicit condition, the file has {len(study.explicit)}")
        ivs = study.explicit[0].interventions
        for i, iv in enumerate(ivs):
            iv.validate(lm, f"{up.name}: interventions[{i}]")
        infos = {i.index: i.num_experts for i in lm.layer_infos() if i.kind == "moe"}
        st.session_state["steer_tables"] = tables_from_interventions(ivs, infos)
        st.session_state["steer_version"] += 1
        st.session_state["steer_loaded"] = (up.name, up.size)
        st.success(f"loaded {len(ivs)} interventions from {up.name}")
    except Exception as exc:
        show_error(exc)


def _delta(d: float, fmt: str) -> str | None:
    """A metric's change as shown, or None (no arrow) when it rounds to zero."""
    text = format(d, fmt)
    return text if float(text) != 0 else None


def _next_token_table(lm, base: list[float], steered: list[float]) -> pd.DataFrame:
    b, s = torch.tensor(base), torch.tensor(steered)
    ids = torch.unique(torch.cat([b.topk(10).indices, s.topk(10).indices]))
    ids = ids[b[ids].argsort(descending=True)]  # ties (no change at all) in the baseline's order
    delta = s[ids] - b[ids]
    order = delta.abs().argsort(descending=True, stable=True)[:10]
    ids = ids[order]
    return pd.DataFrame({"token": [repr(lm.tokenizer.decode([int(i)])) for i in ids],
                         "p without": b[ids].numpy(), "p with": s[ids].numpy(), "change": (s[ids] - b[ids]).numpy()})


def render(lm) -> None:
    st.header("Steer: expert interventions, live")
    layers = moe_layers(lm)
    if not layers:
        st.warning(f"{lm.spec} has no MoE layers: the expert table needs a Mixture-of-Experts model.")
        return
    table_state(lm)
    with st.expander("Load a study YAML"):
        _upload(lm)
    tables = st.session_state["steer_tables"]
    prompt = st.text_area("Prompt", value="The capital of France is", key="steer_prompt")
    layer = st.selectbox("MoE layer", layers, key="steer_layer")
    ver = st.session_state["steer_version"]
    shown = tables[layer]
    extra = _profile_columns(lm, layer, len(shown))
    if extra is not None:
        shown = pd.concat([shown, extra], axis=1)
        st.caption("load and max|out| come from the profile on the Profile page; click a column header to sort")
    edited = st.data_editor(
        shown, key=f"steer_editor_{layer}_{ver}", num_rows="fixed", hide_index=True,
        disabled=["expert", "load", "max_abs"],
        column_config={"zero": st.column_config.CheckboxColumn("zero", help="zero the output (router still routes)"),
                       "drop": st.column_config.CheckboxColumn("drop", help="mask the router logit, re-route"),
                       "force": st.column_config.CheckboxColumn("force", help="force into every token's top-k"),
                       "force_weight": st.column_config.NumberColumn("force weight", min_value=0.0, max_value=1.0),
                       "scale": st.column_config.NumberColumn("scale", help="output factor"),
                       "bias": st.column_config.NumberColumn("bias", help="added to the router logit"),
                       "positions": st.column_config.TextColumn(
                           "positions", help="restrict this row's ops to token positions, e.g. 0, -1 "
                                             "(negative counts from the end); blank: all"),
                       "token": st.column_config.TextColumn(
                           "token", help="restrict this row's ops to tokens whose text contains this; blank: all")})
    tables[layer] = edited[COLUMNS].reset_index(drop=True)
    try:
        ivs = interventions_from_tables(tables)
        for i, d in enumerate(parse(ivs)):
            d.validate(lm, f"interventions[{i}]")
    except WorkbenchError as exc:
        show_error(exc)
        return
    if ivs:
        st.caption(f"{len(ivs)} active intervention{'s' * (len(ivs) != 1)}: " + ", ".join(describe(d) for d in ivs))
    else:
        st.caption("no active interventions: tick zero / drop / force or change scale / bias in the table")
    if not prompt.strip():
        st.info("Type a prompt.")
        return
    try:
        base_text, base_p, _, _ = generate(lm.spec, prompt, "[]")
        text, probs, seconds, n_new = generate(lm.spec, prompt, json.dumps(ivs, sort_keys=True))
    except Exception as exc:
        show_error(exc)
        return
    c1, c2 = st.columns(2)
    c1.markdown("**Without interventions**")
    c1.code(prompt + base_text, language=None, wrap_lines=True)
    c2.markdown("**With interventions**")
    c2.code(prompt + text, language=None, wrap_lines=True)
    st.session_state["steer_generations"] = (base_text, text)
    st.caption(f"greedy, up to {NEW_TOKENS} new tokens (stops at the end of text); the steered one has {n_new}, "
               f"generated in {seconds:.2f} s")
    try:
        before = prompt_metrics(lm.spec, prompt, "[]")
        after = prompt_metrics(lm.spec, prompt, json.dumps(ivs, sort_keys=True))
        c1, c2, c3 = st.columns(3)
        c1.metric("attention share on position 0", f"{after['sink']:.3f}",
                  _delta(after["sink"] - before["sink"], "+.3f"), delta_color="off")
        c2.metric("max |residual|", f"{after['massive']:.3g}", _delta(after["massive"] - before["massive"], "+.3g"),
                  delta_color="off")
        c3.metric("KL from baseline (mean over positions)", f"{after['kl']:.3g}")
    except Exception as exc:
        show_error(exc)
    st.subheader("Next-token probability: largest changes among the top 10")
    st.dataframe(_next_token_table(lm, base_p, probs), hide_index=True, key="steer_next_token")
    st.subheader("Study")
    try:
        text_yaml = study_yaml(ivs)
    except WorkbenchError as exc:
        show_error(exc)
        return
    st.session_state["steer_study_yaml"] = text_yaml
    st.download_button("Download study YAML", text_yaml, file_name="ui_study.yaml", mime="application/x-yaml",
                       key="steer_download")
    st.caption(f"run it with: workbench ablate {lm.spec} --study ui_study.yaml --out DIR")
    with st.expander("study YAML"):
        st.code(text_yaml, language="yaml")
