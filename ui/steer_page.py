"""Steer page: edit expert interventions in a table (and, with an SAE, ``sae_steer`` feature rows; any other
operation, on any model, as YAML: heads, Q/K dims, residual channels, MLP neurons), compare greedy
generations and next-token probabilities without and with them, and round-trip the set as a study YAML
for ``workbench ablate``."""

from __future__ import annotations

import json
import math
import re
import time

import pandas as pd
import streamlit as st
import torch
import yaml

from workbench import metrics as M
from workbench.errors import WorkbenchError
from workbench.experts.sinks import eager_attention, strongest_heads
from workbench.io import read_upload
from workbench.sae.loading import same_model
from workbench.interventions import Intervention, apply, parse, reaches, token_texts
from workbench.studies import Study
from workbench.ui.common import PickedSAE, load_model, moe_layers, new_upload, show_error, took_upload

COLUMNS = ["expert", "zero", "drop", "force", "force_weight", "scale", "bias", "positions", "token"]
TOGGLES = ("zero", "drop", "force")
NEW_TOKENS = 20
SAE_OP = "sae_steer"
# one row per feature steered: the SAE folder (blank: the sidebar's SAE), the feature, the coefficient of
# its decoder direction, and the usual position / token scope; a row without a feature or with coef 0 is off
SAE_COLUMNS = ["sae", "feature", "coef", "positions", "token", "site"]
TABLE_OPS = ("zero", "drop", "force", "scale", "bias")  # routed-expert ops: the expert table holds them
EXTRA_HELP = ("A YAML list of any other interventions, e.g.\n"
              "- {op: zero_head, layers: 3, heads: [0, 5]}\n"
              "- {op: mean_qk, layers: [0, 1, 2], top: 2, proj: qk}\n"
              "- {op: zero_channel, layers: 11, channel: 507}\n"
              "- {op: scale_neuron, layers: 4, channel: 12, factor: 0}")


def in_table(iv: Intervention) -> bool:
    """Whether the expert table (rather than the YAML box) holds ``iv``."""
    return iv.op in TABLE_OPS and iv.kind == "routed" and not iv.prompts


def extra_interventions(text: str) -> list[dict]:
    """The YAML box's interventions (validated shapes), as dicts; blank: none."""
    if not text.strip():
        return []
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise WorkbenchError(f"more interventions: not YAML ({str(exc).splitlines()[0]})") from None
    return [iv.to_dict() for iv in parse(data if data is not None else [], "more interventions")]


def _blank(n_experts: int) -> pd.DataFrame:
    return pd.DataFrame({"expert": range(n_experts), "zero": False, "drop": False, "force": False,
                         "force_weight": 0.3, "scale": 1.0, "bias": 0.0, "positions": "", "token": ""})[COLUMNS]


def _blank_cell(v) -> bool:
    return v is None or v is pd.NA or (isinstance(v, float) and v != v)


def _text(v) -> str:
    """A text cell as a string ('' for a cleared cell, which the editor returns as None or NaN)."""
    return "" if _blank_cell(v) else str(v)


def parse_positions(text: str, where: str) -> list[int] | None:
    """'0, -1' -> [0, -1]; blank -> None (every position)."""
    parts = [t for t in re.split(r"[\s,;]+", text.strip()) if t]
    if not all(re.fullmatch(r"[+-]?[0-9]+", t) for t in parts):  # (int() also reads other scripts' digits)
        raise WorkbenchError(f"{where}: positions {text.strip()!r}: write integers separated by commas, "
                             "e.g. 0, -1 (negative counts from the end)")
    return [int(t) for t in parts] or None


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


DENSE_OPS = ("zero_channel", "scale_channel", "zero_head", "scale_head", "zero_neuron", "scale_neuron")
DENSE_COLUMNS = ["on", "op", "layer", "index", "factor", "positions", "why"]


def blank_dense_rows() -> pd.DataFrame:
    return pd.DataFrame({"on": pd.Series(dtype=bool), "op": pd.Series(dtype=str), "layer": pd.Series(dtype="Int64"),
                         "index": pd.Series(dtype="Int64"), "factor": pd.Series(dtype=float),
                         "positions": pd.Series(dtype=str), "why": pd.Series(dtype=str)})


def dense_rows_from_profile(p: dict, heads: int = 3) -> pd.DataFrame:
    """Rows for a dense model's table from its profile, all off: each massive-activation channel, zeroed at
    the output of the first layer where it is the layer's top entry, and the ``heads`` strongest sink heads."""
    rows, seen = [], set()
    for layer in p.get("massive_activations", {}).get("layers", []):
        if not layer.get("massive") or not layer.get("top"):
            continue
        t = layer["top"][0]
        if t["channel"] in seen:
            continue
        seen.add(t["channel"])
        rows.append({"on": False, "op": "zero_channel", "layer": layer["layer"], "index": t["channel"], "factor": 0.0,
                     "positions": "", "why": f"massive activation {t['value']:.3g} ({t['ratio_to_median']:.0f}x the "
                                              f"median) at position {t['position']}, from layer {layer['layer']}"})
    for v, l, h in strongest_heads(p.get("attention_sinks", {}).get("share_pos0") or [], heads):
        rows.append({"on": False, "op": "zero_head", "layer": l, "index": h, "factor": 0.0, "positions": "",
                     "why": f"sink head: {v:.2f} of its attention on position 0"})
    df = pd.DataFrame(rows, columns=DENSE_COLUMNS) if rows else blank_dense_rows()
    return df.astype({"layer": "Int64", "index": "Int64"})


def interventions_from_dense_rows(rows: pd.DataFrame) -> list[dict]:
    """The ticked rows of the dense table as intervention dicts (a half-filled ticked row is an error)."""
    out = []
    for i, r in rows.reset_index(drop=True).iterrows():
        if not bool(r.get("on")) or pd.isna(r.get("on")):
            continue
        where = f"dense table row {i + 1}"
        if r.get("op") not in DENSE_OPS or _blank_cell(r.get("layer")) or _blank_cell(r.get("index")):
            raise WorkbenchError(f"{where}: pick an op ({', '.join(DENSE_OPS)}), a layer and an index")
        d = {"op": r["op"], "layers": [int(r["layer"])]}
        if r["op"].endswith("_head"):
            d["heads"] = [int(r["index"])]
        else:
            d["channel"] = int(r["index"])
        if r["op"].startswith("scale_"):
            d["factor"] = 0.0 if _blank_cell(r.get("factor")) else float(r["factor"])
        pos = parse_positions(_text(r.get("positions")), where)
        if pos is not None:
            d["positions"] = pos
        out.append(d)
    return out


def blank_sae_rows() -> pd.DataFrame:
    return pd.DataFrame({"sae": pd.Series(dtype=object), "feature": pd.Series(dtype="Int64"),
                         "coef": pd.Series(dtype=float), "positions": pd.Series(dtype=object),
                         "token": pd.Series(dtype=object), "site": pd.Series(dtype=object)})[SAE_COLUMNS]


def interventions_from_sae_rows(rows: pd.DataFrame, default_sae: str | None) -> list[dict]:
    """Feature-steering rows -> ``sae_steer`` intervention dicts (rows without a feature or with coef 0 are off)."""
    out = []
    for i, r in enumerate(rows.itertuples(index=False)):
        if _blank_cell(r.feature) or _blank_cell(r.coef) or float(r.coef) == 0.0:
            continue
        sae = _text(r.sae).strip() or default_sae
        if not sae:
            raise WorkbenchError(f"feature row {i + 1}: no SAE: type its folder in the row or load one in the sidebar")
        if not float(r.feature).is_integer():
            raise WorkbenchError(f"feature row {i + 1}: feature {r.feature}: a feature index is a whole number")
        d = {"op": SAE_OP, "sae": sae, "feature": int(r.feature), "coef": float(r.coef)}
        if _text(r.site).strip():
            d["site"] = _text(r.site).strip()
        positions = parse_positions(_text(r.positions), f"feature row {i + 1}")
        if positions is not None:
            d["positions"] = positions
        if _text(r.token):
            d["token"] = _text(r.token)
        out.append(d)
    return out


def sae_rows_from_interventions(ivs) -> pd.DataFrame:
    """The inverse, for an uploaded study's ``sae_steer`` interventions."""
    rows = []
    for iv in ivs:
        if iv.prompts:
            raise WorkbenchError(f"intervention {iv.to_dict()}: the feature rows hold no prompt scopes")
        own = Intervention.from_dict({"op": SAE_OP, "sae": iv.sae, "feature": iv.feature, "coef": iv.coef}).site
        rows.append({"sae": iv.sae, "feature": iv.feature, "coef": iv.coef,
                     "positions": ", ".join(str(p) for p in iv.positions or ()), "token": iv.token or "",
                     "site": "" if iv.site == own else iv.site})  # blank: the SAE's own site
    if not rows:
        return blank_sae_rows()
    return pd.DataFrame(rows, columns=SAE_COLUMNS).astype({"feature": "Int64", "coef": float})


def describe(d: dict) -> str:
    """'drop L0.E3 @0,-1 'Paris'' (or 'sae_steer f7 x-4 L1.resid_post', 'zero_head L0-3.H0,1') for the caption."""
    layers = d.get("layers") or []
    where = f"L{layers[0]}" if len(layers) == 1 else f"L{layers[0]}-{layers[-1]}" if len(layers) > 1 else ""
    if d["op"] == SAE_OP:
        s = f"{SAE_OP} f{d['feature']} x{d['coef']:g}" + (f" {d['site']}" if d.get("site") else "")
    elif "expert" in d:  # a shared expert is S<n> (it read as routed expert <n>)
        s = f"{d['op']} {where}.{'S' if d.get('kind') == 'shared' else 'E'}{d['expert']}"
    elif "heads" in d and d["op"] != "mean_qk":
        s = f"{d['op']} {where}.H{','.join(map(str, d['heads']))}"
    elif "channel" in d:
        s = f"{d['op']} {where}.C{d['channel']}"
    else:
        pick = next((f"{k} {d[k]}" for k in ("top", "bottom", "random", "matched") if k in d), f"dims {d.get('dims')}")
        s = f"{d['op']} {where} {d.get('proj', 'qk')} {pick}"
    if d.get("positions"):
        s += " @" + ",".join(str(p) for p in d["positions"])
    if d.get("token"):
        s += f" {d['token']!r}"
    if d.get("prompts") is not None:
        s += " prompts " + ",".join(str(p) for p in d["prompts"])
    return s


def tables_from_interventions(ivs, n_experts: dict[int, int]) -> dict[int, pd.DataFrame]:
    """The inverse, for an uploaded study: routed expert ops, one position/token scope per expert row."""
    tables = {layer: _blank(n) for layer, n in n_experts.items()}
    scopes: dict[tuple[int, int], tuple] = {}
    ops: set[tuple[int, int, str]] = set()
    for iv in ivs:
        if iv.kind != "routed" or iv.prompts:
            raise WorkbenchError(f"intervention {iv.to_dict()}: the table holds routed-expert ops without "
                                 "prompt scopes only")
        scope = (tuple(iv.positions or ()), iv.token or "")
        for layer in iv.layers:
            if scopes.setdefault((layer, iv.expert), scope) != scope:
                raise WorkbenchError(f"intervention {iv.to_dict()}: layer {layer} expert {iv.expert} already has "
                                     "another position/token scope (the table holds one per expert)")
            if (layer, iv.expert, iv.op) in ops:  # the table has one cell per op: a second would be lost
                raise WorkbenchError(f"intervention {iv.to_dict()}: layer {layer} expert {iv.expert} already has a "
                                     f"{iv.op!r} op (the table holds one of each per expert; combine them into one)")
            ops.add((layer, iv.expert, iv.op))
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


def study_yaml(ivs: list[dict], name: str = "ui", split: bool = False) -> str:
    """The intervention set as a study; ``split`` puts expert ops and feature steering in two conditions
    ("ui experts", "ui features") so `workbench ablate` compares them side by side."""
    experts = [d for d in ivs if d["op"] != SAE_OP]
    features = [d for d in ivs if d["op"] == SAE_OP]
    if split and experts and features:
        conditions = [{"name": "ui experts", "interventions": experts},
                      {"name": "ui features", "interventions": features}]
    else:
        conditions = [{"name": "ui", "interventions": ivs}]
    spec = {"name": name, "conditions": conditions}
    Study(spec, "ui study")  # validates the shape, as `workbench ablate` will
    return yaml.safe_dump(spec, sort_keys=False)


def study_interventions(study: Study, where: str) -> tuple[list, bool]:
    """The interventions the page holds from a study: its one explicit condition, or the two this page writes
    with ``split`` (one of expert ops only, one of feature steering only); and whether it was split."""
    conds = study.explicit
    if len(conds) == 1:
        return list(conds[0].interventions), False
    kinds = [{iv.op == SAE_OP for iv in c.interventions} for c in conds]
    if len(conds) == 2 and kinds in ([{False}, {True}], [{True}, {False}]):
        return list(conds[0].interventions) + list(conds[1].interventions), True
    raise WorkbenchError(f"{where}: the page holds one explicit condition (or one of expert ops and one of "
                         f"feature steering), the file has {len(conds)}")


@st.cache_data(show_spinner=False, max_entries=64)
def generate(spec: str, prompt: str, ivs_json: str,
             new_tokens: int = NEW_TOKENS) -> tuple[str, list[float], float, int]:
    """Greedy continuation of ``prompt`` under the interventions (up to ``new_tokens``, stopping at the end
    of text), the next-token probabilities, seconds, and the number of new tokens. The prompt is prompt 0
    of ``prompts`` scopes, as in :func:`prompt_metrics` (``workbench.metrics`` numbers its texts)."""
    lm = load_model(spec)
    ivs = json.loads(ivs_json)
    enc = lm.tokenizer(prompt, return_tensors="pt").to(lm.device)
    start = time.perf_counter()
    with torch.no_grad(), apply(lm, ivs) as applied:
        applied.set_prompts([0])
        out = lm.model.generate(**enc, max_new_tokens=new_tokens, do_sample=False, output_scores=True,
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
    if not p or not same_model(str(p.get("meta", {}).get("spec")), lm.spec):
        return None
    cols = pd.DataFrame({"load": float("nan"), "max_abs": float("nan")}, index=range(n))
    for r in p.get("router", []):
        if r["layer"] == layer:
            cols["load"] = r["load"][:n]
    for e in p["experts"]:
        if e["layer"] == layer and e["kind"] == "routed" and e["expert"] < n:
            cols.loc[e["expert"], "max_abs"] = e["max_abs"]
    return cols


def _holds_any() -> bool:
    """Whether the Steer page's tables or YAML box hold any intervention (ticked, changed or written)."""
    ss = st.session_state
    for t in (ss.get("steer_tables") or {}).values():
        if t[list(TOGGLES)].to_numpy().any() or (t["scale"] != 1.0).any() or (t["bias"] != 0.0).any():
            return True
    dense = ss.get("steer_dense_rows")
    extra = ss.get("steer_extra") or ss.get("steer_extra_kept") or ""
    return bool(str(extra).strip()) or not ss.get("steer_sae_rows", blank_sae_rows()).empty \
        or (dense is not None and bool(dense["on"].fillna(False).astype(bool).any()))


def table_state(lm) -> dict[int, pd.DataFrame]:
    """The intervention table of ``lm`` (one DataFrame per MoE layer), kept in the session (with the
    feature-steering rows, ``steer_sae_rows``)."""
    infos = {i.index: i.num_experts for i in lm.layer_infos() if i.kind == "moe"}
    before = st.session_state.get("steer_model")
    if before != lm.spec:
        if before is not None and _holds_any():  # said on the Steer page (render), once
            st.session_state["steer_reset_note"] = (f"The tables and the YAML box held interventions for {before}; "
                                                    f"they start empty for {lm.spec}.")
        st.session_state["steer_model"] = lm.spec
        st.session_state["steer_tables"] = {layer: _blank(n) for layer, n in infos.items()}
        st.session_state["steer_sae_rows"] = blank_sae_rows()
        st.session_state["steer_dense_rows"] = blank_dense_rows()
        st.session_state["steer_dense_from"] = None
        st.session_state["steer_extra"] = st.session_state["steer_extra_kept"] = ""
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


def _keep(key: str, default: str) -> None:
    """Give a text box of this page the value it had when the page was last drawn. Streamlit drops a widget's state
    on a run that does not draw it (another page's), so the prompt and the YAML box came back empty; their values
    are kept under ``KEY_kept`` as well."""
    ss = st.session_state
    if key not in ss:
        ss[key] = ss.get(f"{key}_kept", default)


def _upload(lm) -> None:
    up = st.file_uploader("Study YAML (one condition) into the table", type=["yaml", "yml", "json"], key="steer_upload")
    data = new_upload(up, "steer_upload")
    if data is None:
        return
    try:
        study = Study(read_upload(data, up.name), up.name)
        ivs, split = study_interventions(study, up.name)
        for i, iv in enumerate(ivs):
            iv.validate(lm, f"{up.name}: interventions[{i}]")
        infos = {i.index: i.num_experts for i in lm.layer_infos() if i.kind == "moe"}
        tables = tables_from_interventions([iv for iv in ivs if in_table(iv)], infos)
        st.session_state["steer_sae_rows"] = sae_rows_from_interventions([iv for iv in ivs if iv.op == SAE_OP])
        rest = [iv.to_dict() for iv in ivs if not in_table(iv) and iv.op != SAE_OP]
        st.session_state["steer_extra"] = st.session_state["steer_extra_kept"] = (
            yaml.safe_dump(rest, sort_keys=False, default_flow_style=None) if rest else "")
        st.session_state["steer_tables"] = tables
        if split:
            st.session_state["steer_split"] = True
        st.session_state["steer_version"] += 1
        took_upload(up, "steer_upload", data)
        st.success(f"loaded {len(ivs)} interventions from {up.name}")
    except Exception as exc:
        show_error(exc)


def _touches_nothing(lm, d: dict, ids: list[int], longest: int, text: str) -> str | None:
    """Why intervention ``d``'s scope touches no token of the live comparison (the prompt ``ids``, runs of up to
    ``longest`` tokens while generating, the steered ``text``), or None when it may touch some."""
    if d.get("prompts") is not None and 0 not in d["prompts"]:
        return f"prompts {d['prompts']} leave out the page's prompt (prompt 0; the study numbers its texts)"
    if d.get("positions") and not reaches(d["positions"], longest):
        return f"positions {d['positions']} are beyond the prompt ({len(ids)} tokens) and its generation"
    token = d.get("token")
    if token and token not in text and not any(token in t for t in token_texts(lm.tokenizer, ids)):
        return f"token {token!r} is in no token of the prompt and of the steered generation"
    return None


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


def _expert_editor(lm, layers: list[int], tables: dict[int, pd.DataFrame], ver: int) -> None:
    layer = st.selectbox("MoE layer", layers, key="steer_layer")
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
                                             "(negative counts from the end: while generating, from the end of "
                                             "the text so far, so -1 is each new token); blank: all"),
                       "token": st.column_config.TextColumn(
                           "token", help="restrict this row's ops to tokens whose text contains this; blank: all")})
    tables[layer] = edited[COLUMNS].reset_index(drop=True)


def _dense_editor(lm, ver: int) -> pd.DataFrame:
    """A dense model's table: residual channels, heads and MLP neurons, pre-filled from this model's profile."""
    p = st.session_state.get("profile")
    serial = st.session_state.get("profile_serial")  # (not id(p): a new profile can get the freed last one's id)
    mine = p is not None and same_model(str(p.get("meta", {}).get("spec")), lm.spec)
    if mine and st.session_state.get("steer_dense_from") != serial:
        st.session_state["steer_dense_from"] = serial
        st.session_state["steer_dense_rows"] = dense_rows_from_profile(p)
        ver = st.session_state["steer_version"] = ver + 1
    st.subheader("Channels, heads and neurons")
    st.caption("Tick a row to apply it. Rows come from this model's profile (the Profile page): each massive-"
               "activation channel and the strongest sink heads; add rows for any channel, head or neuron. "
               "positions: comma-separated, negative from the end (blank: all).")
    # The editor's data is the rows as they were when it appeared, as for the SAE rows: fed its own output back, a
    # "dynamic" editor (its identity tied to its data) dropped every second edit (tick, then untick, stayed ticked).
    key = f"steer_dense_{ver}"
    if key not in st.session_state:
        st.session_state["steer_dense_base"] = st.session_state["steer_dense_rows"]
    edited = st.data_editor(
        st.session_state["steer_dense_base"], key=key, num_rows="dynamic", hide_index=True,
        column_config={"on": st.column_config.CheckboxColumn("on", default=False),
                       "op": st.column_config.SelectboxColumn("op", options=list(DENSE_OPS)),
                       "layer": st.column_config.NumberColumn("layer", min_value=0, step=1),
                       "index": st.column_config.NumberColumn("channel / head / neuron", min_value=0, step=1),
                       "factor": st.column_config.NumberColumn("factor (scale ops)"),
                       "positions": st.column_config.TextColumn("positions"),
                       "why": st.column_config.TextColumn("from the profile", disabled=True)})
    st.session_state["steer_dense_rows"] = edited
    return edited


def _sae_editor(sae: PickedSAE | None, ver: int) -> pd.DataFrame:
    """The feature-steering rows (``sae_steer``), an editor with added / deleted rows.

    The editor's data is the rows as they were when this editor appeared (Streamlit re-applies the added
    rows of its state to the data it is given); its output is kept as ``steer_sae_rows``, which a later
    editor (after an upload, a Profile-page edit or a page change) starts from."""
    rows = st.session_state["steer_sae_rows"]
    if sae is None and rows.empty:
        st.caption("load an SAE folder in the sidebar to steer SAE features here (`sae_steer`: add coef x the "
                   "feature's decoder direction at the SAE's site)")
        return rows
    key = f"steer_sae_editor_{ver}"
    if key not in st.session_state:  # a new editor: start from the latest rows
        st.session_state["steer_sae_base"] = rows
    default = f"{sae.d_sae} features at {sae.site}, {sae.path}" if sae is not None else "no SAE loaded"
    st.markdown(f"**SAE feature steering** (`sae_steer`; sidebar SAE: {default})")
    edited = st.data_editor(
        st.session_state["steer_sae_base"], key=key, num_rows="dynamic", hide_index=True,
        column_config={"sae": st.column_config.TextColumn("sae", help="SAE folder; blank: the sidebar's SAE"),
                       "feature": st.column_config.NumberColumn("feature", min_value=0, step=1, format="%d",
                                                                help="feature index (row of W_dec)"),
                       "coef": st.column_config.NumberColumn("coef", help="coefficient of the decoder direction "
                                                                          "(in the site's units); 0: off"),
                       "positions": st.column_config.TextColumn("positions", help="e.g. 0, -1; blank: all"),
                       "token": st.column_config.TextColumn("token", help="tokens whose text contains this"),
                       "site": st.column_config.TextColumn("site", help="site key; blank: the SAE's own")})
    edited = edited[SAE_COLUMNS].reset_index(drop=True)
    st.session_state["steer_sae_rows"] = edited
    return edited


def render(lm, sae: PickedSAE | None = None) -> None:
    st.header("Steer: expert interventions, live")
    layers = moe_layers(lm)
    if not layers:
        st.info(f"{lm.spec} has no MoE layers, so there is no expert table: residual channels, heads and MLP neurons "
                "are steered in the table below (pre-filled from the model's profile), Q/K dims and anything else in "
                "the YAML box" + (", SAE features in their table." if sae else "."))
    table_state(lm)
    if note := st.session_state.pop("steer_reset_note", None):
        st.info(note)
    with st.expander("Load a study YAML"):
        _upload(lm)
    tables = st.session_state["steer_tables"]
    _keep("steer_prompt", "The capital of France is")
    prompt = st.session_state["steer_prompt_kept"] = st.text_area("Prompt", key="steer_prompt")
    ver = st.session_state["steer_version"]
    dense_rows = None
    if layers:
        _expert_editor(lm, layers, tables, ver)
    else:
        dense_rows = _dense_editor(lm, ver)
        ver = st.session_state["steer_version"]
    sae_rows = _sae_editor(sae, ver)
    _keep("steer_extra", "")
    extra = st.session_state["steer_extra_kept"] = st.text_area(
        "More interventions (YAML): attention heads, Q/K dims, residual channels, MLP neurons", key="steer_extra",
        help=EXTRA_HELP, placeholder="- {op: zero_head, layers: 3, heads: [0, 5]}")
    try:
        ivs = (interventions_from_tables(tables) + (interventions_from_dense_rows(dense_rows) if dense_rows is not None
                                                     else [])
               + interventions_from_sae_rows(sae_rows, sae.path if sae else None) + extra_interventions(extra))
        for i, d in enumerate(parse(ivs)):
            d.validate(lm, f"interventions[{i}]")
    except WorkbenchError as exc:
        show_error(exc)
        return
    if ivs:
        st.caption(f"{len(ivs)} active intervention{'s' * (len(ivs) != 1)}: " + ", ".join(describe(d) for d in ivs))
    else:
        st.caption(("no active interventions: tick zero / drop / force or change scale / bias in the table, or "
                    if layers else "no active interventions: ")
                   + "write some in the YAML box" + (", or add a feature row" if sae is not None else ""))
    if not prompt.strip():
        st.info("Type a prompt.")
        return
    ids = lm.tokenizer(prompt)["input_ids"]
    limit = lm.context_length
    if limit is not None and len(ids) >= limit:
        show_error(WorkbenchError(f"the prompt has {len(ids)} tokens; {lm.spec} reads at most {limit} (its context) "
                                  "and needs room for the new tokens"))
        return
    new_tokens = NEW_TOKENS if limit is None else min(NEW_TOKENS, limit - len(ids))
    try:
        base_text, base_p, _, _ = generate(lm.spec, prompt, "[]", new_tokens)
        text, probs, seconds, n_new = generate(lm.spec, prompt, json.dumps(ivs, sort_keys=True), new_tokens)
    except Exception as exc:
        show_error(exc)
        return
    if not all(math.isfinite(p) for p in probs):
        st.warning("With the interventions the model's outputs are not finite (NaN or inf): the steered text and "
                   "numbers below mean nothing. An intervention pushes values out of range (a huge scale, bias or "
                   "coefficient?).")
    for d in ivs:
        if why := _touches_nothing(lm, d, ids, len(ids) + new_tokens - 1, prompt + text):
            st.warning(f"{describe(d)}: {why}, so it changes nothing here")
    c1, c2 = st.columns(2)
    c1.markdown("**Without interventions**")
    c1.code(prompt + base_text, language=None, wrap_lines=True)
    c2.markdown("**With interventions**")
    c2.code(prompt + text, language=None, wrap_lines=True)
    st.session_state["steer_generations"] = (base_text, text)
    st.caption(f"greedy, up to {new_tokens} new tokens (stops at the end of text); the steered one has {n_new}, "
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
    kinds = {d["op"] == SAE_OP for d in ivs}
    st.session_state.setdefault("steer_split", True)
    split = len(kinds) == 2 and st.checkbox("expert ops and feature steering as separate conditions",
                                            key="steer_split", help="so `workbench ablate` compares them")
    try:
        text_yaml = study_yaml(ivs, split=split)
    except WorkbenchError as exc:
        show_error(exc)
        return
    st.session_state["steer_study_yaml"] = text_yaml
    st.download_button("Download study YAML", text_yaml, file_name="ui_study.yaml", mime="application/x-yaml",
                       key="steer_download")
    st.caption(f"run it with: workbench ablate {lm.spec} --study ui_study.yaml --out DIR")
    with st.expander("study YAML"):
        st.code(text_yaml, language="yaml")
