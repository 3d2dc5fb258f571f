"""Circuits page: open a ``circuit.json`` (``workbench circuit``) and draw it, with its metrics; with an SAE
loaded, a selected node's top SAE features (``workbench.sae.node_features``), carried into the downloads."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pandas as pd
import streamlit as st

from workbench.circuits.export import Circuit, read_json, write_dot, write_graphml
from workbench.circuits.render import circuit_svg, finite_edges
from workbench.errors import WorkbenchError
from workbench.io import read_upload
from workbench.sae.loading import same_model
from workbench.ui.common import (FEATURE_PROMPTS, FEATURE_TOKENS, FEATURE_TOP, PickedSAE, feature_columns,
                                  feature_prompts, load_model, load_sae, new_upload, show_error,
                                  took_upload)
from workbench.ui.plotting import circuit_figure

GRAPH = "circuit_graph"
WRITER_KINDS = ("head", "mlp", "expert")  # the nodes workbench.sae.node_features reads


def _open() -> None:
    """Load a new upload, or the typed path when it changes (so a discovered circuit is not overwritten).

    A bad file is never stored: its error shows (an upload's on each rerun, until it is replaced) and the last
    good circuit stays."""
    path = st.text_input("Path to circuit.json (or its folder)", key="circuit_path")
    up = st.file_uploader("... or upload it", type=["json"], key="circuit_upload")
    data = new_upload(up, "circuit_upload")
    source = "upload" if up is not None else ("path", path.strip()) if path.strip() else None
    if (source is None or source == st.session_state.get("circuit_source")) and data is None:
        return
    st.session_state["circuit_source"] = source
    try:
        if up is not None:
            st.session_state["circuit"] = Circuit.from_json_obj(read_upload(data, up.name, is_json=True), up.name)
            took_upload(up, "circuit_upload", data)
        else:
            p = Path(path.strip()).expanduser()
            st.session_state["circuit"] = read_json(p / "circuit.json" if p.is_dir() else p)
    except Exception as exc:
        show_error(exc)


def _discover(lm) -> None:
    """Run ``find_circuit`` on the loaded model, on one typed fact or the first built-in facts."""
    from workbench.circuits import builtin_facts, find_circuit
    from workbench.circuits.discover import CircuitOptions
    from workbench.circuits.facts import Fact

    c1, c2 = st.columns(2)
    prompt = c1.text_input("Fact prompt (blank: built-in facts)", key="circuit_fact_prompt")
    answer = c2.text_input("Answer (e.g. ' Paris')", key="circuit_fact_answer")
    c3, c4, c5 = st.columns(3)
    n_facts = c3.number_input("built-in facts", 1, 105, 8, key="circuit_n_facts")
    method = c4.selectbox("method", ["eap-ig-edges", "eap-ig", "eap"], key="circuit_method")
    top = c5.number_input("top edges", 1, 100000, 200, key="circuit_top")
    if st.button("Find circuit", key="circuit_run", disabled=lm is None):
        try:
            if prompt.strip():
                if not answer.strip():
                    raise WorkbenchError("a typed fact needs its answer")
                facts = [Fact(prompt=prompt, answer=answer)]
            elif answer.strip():
                raise WorkbenchError("an answer needs its fact prompt: type the prompt, or clear the answer to run "
                                     "the built-in facts")
            else:
                facts = builtin_facts()[: int(n_facts)]
            with st.spinner(f"scoring edges on {len(facts)} facts ..."):
                circuit, _, _ = find_circuit(lm, facts, CircuitOptions(method=method, top_edges=int(top)))
            st.session_state["circuit"] = circuit
        except Exception as exc:
            show_error(exc)


def svg_download(circuit: Circuit, n_edges: int):
    """The SVG button's data: a callable, so the drawing is made when the button is clicked, not on
    every rerun (``circuits.render.circuit_svg`` of the ``n_edges`` strongest edges, as shown)."""
    return lambda: circuit_svg(circuit, max_edges=n_edges)


def _downloads(circuit: Circuit, n_edges: int, shown: Circuit) -> None:
    """JSON / GraphML / DOT of ``circuit`` (as saved, SAE attributes added), the SVG of the edges ``shown``."""
    c1, c2, c3, c4 = st.columns(4)
    c1.download_button("circuit.json", json.dumps(circuit.to_json_obj(), indent=1), file_name="circuit.json",
                       key="circuit_download", on_click="ignore")
    with tempfile.TemporaryDirectory() as tmp:
        graphml = write_graphml(circuit, Path(tmp) / "circuit.graphml").read_bytes()
        dot = write_dot(circuit, Path(tmp) / "circuit.dot").read_bytes()
    c2.download_button("circuit.graphml", graphml, file_name="circuit.graphml", key="circuit_download_graphml",
                       on_click="ignore")
    c3.download_button("circuit.dot", dot, file_name="circuit.dot", key="circuit_download_dot", on_click="ignore")
    c4.download_button(f"circuit.svg ({n_edges} edges)", svg_download(shown, n_edges), file_name="circuit.svg",
                       mime="image/svg+xml", key="circuit_download_svg", on_click="ignore")


@st.cache_data(show_spinner=False, max_entries=8)
def sae_node_features(spec: str, sae_path: str, sae_version: int, nodes_json: str):
    """``workbench.sae.node_features`` for every head / MLP / expert node (``nodes_json``: their attributes) on
    the app's small prompt set: (node attributes, feature table, top-token table)."""
    from workbench.sae import node_features

    nodes = json.loads(nodes_json)
    attrs, report = node_features(load_model(spec), load_sae(sae_path, sae_version), Circuit(nodes, [], {}),
                                  feature_prompts(), top=FEATURE_TOP, top_tokens=5, max_tokens=FEATURE_TOKENS)
    return attrs, report.table, report.tokens


def picked_node(points, names) -> str | None:
    """The node of the last clicked marker of the circuit graph (node markers carry their name as customdata)."""
    for pt in reversed(points or []):
        name = pt.get("customdata") if isinstance(pt, dict) else None
        if isinstance(name, list):
            name = name[0] if name else None
        if name in names:
            return name
    return None


def _on_pick() -> None:
    state = st.session_state.get(GRAPH)
    circuit = st.session_state.get("circuit")
    name = picked_node(state["selection"]["points"], circuit.nodes) if state and circuit else None
    if name is not None:
        st.session_state["circuit_node"] = name


def _node_panel(lm, circuit: Circuit, sae: PickedSAE | None) -> Circuit:
    """The selected node's attributes and, with an SAE, its top SAE features; returns the circuit to download
    (annotated with every node's SAE features when an SAE is loaded)."""
    names = list(circuit.nodes)
    if st.session_state.get("circuit_node") not in names:  # a newly opened circuit: its first head/MLP/expert
        st.session_state["circuit_node"] = next((n for n in names if circuit.nodes[n].get("kind") in WRITER_KINDS),
                                                names[0])
    node = st.selectbox("Node (or click one in the graph)", names, key="circuit_node")
    attrs = circuit.nodes[node]
    st.caption(f"{node}: " + ", ".join(f"{k} {v}" for k, v in attrs.items() if not k.startswith("sae_")))
    if sae is None:
        st.caption("load an SAE folder in the sidebar to see each node's top SAE features")
        return circuit
    model = circuit.meta.get("model")
    if lm is None or (model and not same_model(model, lm.spec)):  # (a folder written two ways is one model)
        st.info(f"SAE features need the circuit's model ({model or 'unknown'}) loaded")
        return circuit
    writers = {n: a for n, a in circuit.nodes.items() if a.get("kind") in WRITER_KINDS}
    try:
        with st.spinner("SAE features of every head / MLP / expert node ..."):
            features, table, tokens = sae_node_features(lm.spec, sae.path, sae.version,
                                                        json.dumps(writers, sort_keys=True))
    except WorkbenchError as exc:  # no node of the circuit writes into the SAE's site
        st.info(f"no SAE features: {exc}")
        return circuit
    st.markdown(f"**Top SAE features of {node}** at {sae.site} (mean activation its output raises, first "
                f"{FEATURE_PROMPTS} built-in prompts, {FEATURE_TOKENS} tokens each)")
    mine = table[table.writer == node]
    if mine.empty:
        st.info(f"{node}: no SAE features (only heads, MLPs and experts writing into {sae.site} directly have them)")
    else:
        shown, ctx = feature_columns(mine, tokens)
        st.dataframe(shown, hide_index=True, key="circuit_node_sae")
        with st.expander("top activating tokens in context"):
            st.dataframe(ctx, hide_index=True, key="circuit_node_sae_tokens")
    st.caption(f"{len(features)} nodes carry their SAE features (sae_features, sae_scores, sae_top_feature, "
               "sae_top_tokens, sae_site) as node attributes in the JSON / GraphML / DOT downloads")
    from workbench.sae import annotate_circuit

    return annotate_circuit(circuit, features)


def why_empty(meta: dict) -> str:
    """Why a circuit that ``find_circuit`` wrote has no edges: pruning keeps only edges on input -> logits paths."""
    sel = meta.get("selection")
    if not isinstance(sel, dict):
        return ""
    if sel.get("rule") == "threshold":
        budget = f"through edges with |score| >= {sel.get('threshold')}"
    elif isinstance(sel.get("top_edges"), int):
        budget = f"within the top {sel['top_edges']} edges ({sel.get('rule')} selection)"
    else:
        return ""
    return (f": a circuit keeps only edges on a path from the input to the logits (pruning drops the rest), and no "
            f"such path was found {budget}; raise top edges")


def _metrics(meta: dict) -> None:
    from workbench.circuits.evaluate import gap_caveat

    metrics = meta.get("metrics") or {}
    if not isinstance(metrics, dict):  # not what `workbench circuit` writes: shown as it is
        metrics = {"metrics": metrics}
    if caveat := gap_caveat(metrics.get("gap_z")):  # (a faithfulness of 0.998 on one fact read as a finding)
        st.warning("The faithfulness figures are noise here: " + caveat)
    flat = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))}
    if flat:
        cols = st.columns(min(len(flat), 4))
        for i, (k, v) in enumerate(flat.items()):
            cols[i % len(cols)].metric(k, f"{v:.3f}" if isinstance(v, float) else str(v))
    nested = {k: v for k, v in metrics.items() if k not in flat}
    if nested:
        st.json(nested, expanded=False)
    rest = {k: v for k, v in meta.items() if k not in ("metrics", "facts")}
    st.caption(", ".join(f"{k}: {v}" for k, v in rest.items() if isinstance(v, (int, float, str))))


def render(lm, sae: PickedSAE | None = None) -> None:
    st.header("Circuits")
    tab_open, tab_run = st.tabs(["Open circuit.json", "Run discovery"])
    with tab_open:
        _open()
    with tab_run:
        _discover(lm)
    circuit = st.session_state.get("circuit")
    if circuit is None:
        st.info("Open a circuit.json written by `workbench circuit MODEL --out DIR`.")
        return
    of = circuit.meta.get("model")
    mine = lm.spec if lm is not None else "none"  # (no model loaded: the page still shows a circuit's file)
    if isinstance(of, str) and of and (lm is None or not same_model(of, lm.spec)):  # (kept after the model changed)
        st.info(f"This circuit is of {of}; the sidebar's model is {mine}. Its graph and metrics are {of}'s; a "
                "node's SAE features need that model loaded.")
    total = circuit.n_edges
    if total == 0:
        st.warning("the circuit has no scored edges" + why_empty(circuit.meta))
        return
    shown = finite_edges(circuit)
    if shown.n_edges == 0:
        st.warning(f"none of the {total} scored edges has a finite score (NaN or infinite): nothing to draw")
        return
    if shown.n_edges < total:
        k = total - shown.n_edges
        st.warning(f"{k} of the {total} scored edges {'has' if k == 1 else 'have'} no finite score (NaN or infinite): "
                   "not drawn or listed (the JSON / GraphML / DOT downloads carry them)")
    if shown.n_edges == 1:  # a slider needs two ends
        n = 1
        st.caption("1 scored edge")
    else:
        n = st.slider("edges shown (largest |score| first)", 1, shown.n_edges, min(shown.n_edges, 100),
                      key="circuit_edges")
    st.plotly_chart(circuit_figure(shown, n, selectable=True), key=GRAPH, on_select=_on_pick,
                    selection_mode="points")
    try:
        download = _node_panel(lm, circuit, sae)
    except Exception as exc:
        show_error(exc)
        download = circuit
    st.session_state["circuit_export"] = download  # what the JSON / GraphML / DOT buttons carry
    st.subheader("Metrics (for the circuit as saved)")
    _metrics(circuit.meta)
    edges = pd.DataFrame([e for e in shown.edges if e["port"] != "internal"])
    edges = edges.reindex(edges["score"].abs().sort_values(ascending=False).index).head(n)
    st.dataframe(edges, hide_index=True, key="circuit_edges_table")
    _downloads(download, n, shown)
