"""Steer page: edit expert interventions in a table, compare greedy generations and next-token
probabilities without and with them, and round-trip the set as a study YAML for ``workbench ablate``."""

from __future__ import annotations

import json
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

COLUMNS = ["expert", "zero", "drop", "force", "force_weight", "scale", "bias"]
NEW_TOKENS = 20


def _blank(n_experts: int) -> pd.DataFrame:
    return pd.DataFrame({"expert": range(n_experts), "zero": False, "drop": False, "force": False,
                         "force_weight": 0.3, "scale": 1.0, "bias": 0.0})[COLUMNS]


def interventions_from_tables(tables: dict[int, pd.DataFrame]) -> list[dict]:
    """Table rows -> intervention dicts (one per active op), in layer then expert order."""
    out = []
    for layer in sorted(tables):
        for r in tables[layer].itertuples(index=False):
            e = int(r.expert)
            if r.zero:
                out.append({"op": "zero", "layers": [layer], "expert": e})
            if r.drop:
                out.append({"op": "drop", "layers": [layer], "expert": e})
            if r.force:
                out.append({"op": "force", "layers": [layer], "expert": e, "weight": float(r.force_weight)})
            if float(r.scale) != 1.0:
                out.append({"op": "scale", "layers": [layer], "expert": e, "factor": float(r.scale)})
            if float(r.bias) != 0.0:
                out.append({"op": "bias", "layers": [layer], "expert": e, "value": float(r.bias)})
    return out


def tables_from_interventions(ivs, n_experts: dict[int, int]) -> dict[int, pd.DataFrame]:
    """The inverse, for an uploaded study: routed expert ops without position/token scopes."""
    tables = {layer: _blank(n) for layer, n in n_experts.items()}
    for iv in ivs:
        if iv.kind != "routed" or iv.positions or iv.token or iv.prompts:
            raise WorkbenchError(f"intervention {iv.to_dict()}: the table holds unscoped routed-expert ops only")
        for layer in iv.layers:
            t = tables[layer]
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
def generate(spec: str, prompt: str, ivs_json: str) -> tuple[str, list[float], float]:
    """Greedy continuation of ``prompt`` under the interventions, the next-token probabilities, seconds."""
    lm = load_model(spec)
    ivs = json.loads(ivs_json)
    enc = lm.tokenizer(prompt, return_tensors="pt").to(lm.device)
    start = time.perf_counter()
    with torch.no_grad(), apply(lm, ivs):
        out = lm.model.generate(**enc, max_new_tokens=NEW_TOKENS, do_sample=False, output_scores=True,
                                return_dict_in_generate=True, pad_token_id=lm.tokenizer.eos_token_id)
    seconds = time.perf_counter() - start
    text = lm.tokenizer.decode(out.sequences[0, enc["input_ids"].shape[1]:])
    probs = torch.softmax(out.scores[0][0].float(), dim=-1)
    return text, probs.tolist(), seconds


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


def _table_state(lm) -> dict[int, pd.DataFrame]:
    infos = {i.index: i.num_experts for i in lm.layer_infos() if i.kind == "moe"}
    if st.session_state.get("steer_model") != lm.spec:
        st.session_state["steer_model"] = lm.spec
        st.session_state["steer_tables"] = {layer: _blank(n) for layer, n in infos.items()}
        st.session_state["steer_version"] = st.session_state.get("steer_version", 0) + 1
    return st.session_state["steer_tables"]


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


def _next_token_table(lm, base: list[float], steered: list[float]) -> pd.DataFrame:
    b, s = torch.tensor(base), torch.tensor(steered)
    ids = torch.unique(torch.cat([b.topk(10).indices, s.topk(10).indices]))
    delta = s[ids] - b[ids]
    order = delta.abs().argsort(descending=True)[:10]
    ids = ids[order]
    return pd.DataFrame({"token": [repr(lm.tokenizer.decode([int(i)])) for i in ids],
                         "p without": b[ids].numpy(), "p with": s[ids].numpy(), "change": (s[ids] - b[ids]).numpy()})


def render(lm) -> None:
    st.header("Steer: expert interventions, live")
    layers = moe_layers(lm)
    if not layers:
        st.warning(f"{lm.spec} has no MoE layers: the expert table needs a Mixture-of-Experts model.")
        return
    _table_state(lm)
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
                       "bias": st.column_config.NumberColumn("bias", help="added to the router logit")})
    tables[layer] = edited[COLUMNS].reset_index(drop=True)
    ivs = interventions_from_tables(tables)
    try:
        for i, d in enumerate(parse(ivs)):
            d.validate(lm, f"interventions[{i}]")
    except WorkbenchError as exc:
        show_error(exc)
        return
    st.caption(f"{len(ivs)} active interventions: " + ", ".join(f"{d['op']} L{d['layers'][0]}.E{d['expert']}"
                                                                 for d in ivs))
    if not prompt.strip():
        st.info("Type a prompt.")
        return
    try:
        base_text, base_p, _ = generate(lm.spec, prompt, "[]")
        text, probs, seconds = generate(lm.spec, prompt, json.dumps(ivs, sort_keys=True))
    except Exception as exc:
        show_error(exc)
        return
    c1, c2 = st.columns(2)
    c1.markdown("**Without interventions**")
    c1.code(prompt + base_text, language=None, wrap_lines=True)
    c2.markdown("**With interventions**")
    c2.code(prompt + text, language=None, wrap_lines=True)
    st.session_state["steer_generations"] = (base_text, text)
    st.caption(f"{NEW_TOKENS} greedy tokens; steered generation took {seconds:.2f} s")
    try:
        before = prompt_metrics(lm.spec, prompt, "[]")
        after = prompt_metrics(lm.spec, prompt, json.dumps(ivs, sort_keys=True))
        c1, c2, c3 = st.columns(3)
        c1.metric("attention share on position 0", f"{after['sink']:.3f}", f"{after['sink'] - before['sink']:+.3f}")
        c2.metric("max |residual|", f"{after['massive']:.3g}", f"{after['massive'] - before['massive']:+.3g}")
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
