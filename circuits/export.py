"""The Circuit object and its files: networkx node-link JSON, GraphML, DOT, and every scored edge as parquet.

A :class:`Circuit` is plain data (node attributes, edges with scores, run metadata), so it compares
with ``==`` and round-trips through ``circuit.json`` exactly. The graph is a multigraph: a sender can
reach the same node through several ports (a head feeding both the key and the value of a KV group).
Edge ``port`` is q, k, v or in (MLP / expert / router / logits input), or ``internal`` for the
always-present KV group -> head and router -> expert links. GraphML carries standard typed keys only
(string, int, double, boolean), so Gephi and Cytoscape open it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import networkx as nx
import torch

from workbench.errors import WorkbenchError
from workbench.io import atomic_path, read_text, write_text


@dataclass
class Circuit:
    nodes: dict[str, dict]  # name -> {"kind", "layer", "index"}
    edges: list[dict]  # {"source", "target", "port", "score"}, internal ones with score 0.0
    meta: dict = field(default_factory=dict)  # model, method, metric, steps, selection, metrics, facts ...

    @property
    def n_edges(self) -> int:
        """Scored edges (internal links not counted)."""
        return sum(1 for e in self.edges if e["port"] != "internal")

    @classmethod
    def from_mask(cls, graph, matrix: torch.Tensor, mask: torch.Tensor, meta: dict | None = None) -> "Circuit":
        s, r = mask.nonzero(as_tuple=True)
        edges = [{"source": graph.senders[i], "target": graph.receivers[j].node, "port": graph.receivers[j].port,
                  "score": float(matrix[i, j])} for i, j in zip(s.tolist(), r.tolist())]
        names = {e["source"] for e in edges} | {e["target"] for e in edges}
        edges += [{"source": a, "target": b, "port": "internal", "score": 0.0}
                  for a, b in graph.internal if a in names and b in names]
        nodes = {n.name: n.attrs() for n in graph.nodes if n.name in names}
        return cls(nodes, _canonical(nodes, edges), dict(meta or {}))

    # ----- networkx -------------------------------------------------------------------------------
    def to_networkx(self) -> nx.MultiDiGraph:
        g = nx.MultiDiGraph()
        g.graph.update(_scalars(self.meta))
        for name, attrs in self.nodes.items():
            g.add_node(name, **attrs)
        for e in self.edges:
            g.add_edge(e["source"], e["target"], key=e["port"], port=e["port"], score=float(e["score"]))
        return g

    def to_json_obj(self) -> dict:
        g = self.to_networkx()
        data = nx.node_link_data(g, edges="edges")
        data["graph"] = {"meta": self.meta}
        return data

    @classmethod
    def from_json_obj(cls, data: dict, source: str = "circuit JSON") -> "Circuit":
        """The circuit a :meth:`to_json_obj` wrote; anything else is a one-line error naming ``source`` and what is
        wrong in it."""
        def bad(what: str) -> WorkbenchError:
            return WorkbenchError(f"{source}: not a circuit (node-link JSON with nodes and edges): {what}")
        if not isinstance(data, dict):
            raise bad(f"the top level is a {type(data).__name__}, not an object")
        for key in ("nodes", "edges"):
            if not isinstance(data.get(key), list):
                raise bad(f"no {key!r} list")
        nodes = {}
        for i, n in enumerate(data["nodes"]):
            if not isinstance(n, dict) or not isinstance(n.get("id"), str):
                raise bad(f"node {i} has no string 'id'")
            if n["id"] in nodes:
                raise bad(f"node {i} repeats the id {n['id']!r}")
            if what := _bad_node(n):
                raise bad(f"node {i} ({n['id']}) {what}")
            nodes[n["id"]] = {k: v for k, v in n.items() if k != "id"}
        from workbench.circuits.graph import PORTS

        edges, seen = [], set()
        ports = (*PORTS, "internal")
        for i, e in enumerate(data["edges"]):
            if not isinstance(e, dict) or any(k not in e for k in ("source", "target", "port", "score")):
                raise bad(f"edge {i} lacks one of 'source', 'target', 'port', 'score'")
            if not all(isinstance(e[k], str) for k in ("source", "target", "port")):
                raise bad(f"edge {i} has a 'source', 'target' or 'port' that is not a string")
            if e["source"] not in nodes or e["target"] not in nodes:
                raise bad(f"edge {i} ({e['source']} -> {e['target']}) names a node the circuit does not have")
            if not isinstance(e["score"], (int, float)) or isinstance(e["score"], bool):
                raise bad(f"edge {i} ({e['source']} -> {e['target']}) has a non-numeric score {e['score']!r}")
            if e["port"] not in ports:
                raise bad(f"edge {i} ({e['source']} -> {e['target']}) has port {e['port']!r}; ports: "
                          + ", ".join(ports))
            key = (e["source"], e["target"], e["port"])
            if key in seen:  # (a graph keeps one of them, a comparison would count it twice)
                raise bad(f"edge {i} repeats {e['source']} -> {e['target']} (port {e['port']})")
            seen.add(key)
            edges.append({"source": e["source"], "target": e["target"], "port": e["port"], "score": e["score"]})
        graph = data.get("graph", {})
        meta = graph.get("meta", {}) if isinstance(graph, dict) else {}
        return cls(nodes, _canonical(nodes, edges), meta if isinstance(meta, dict) else {})


def _bad_node(n: dict) -> str:
    """What a node-link node lacks to be a circuit node (``Node.attrs``: kind, integer layer and index, every
    attribute a string, number or boolean, so GraphML can carry it); empty when nothing."""
    from workbench.circuits.graph import NODE_KINDS

    if n.get("kind") not in NODE_KINDS:
        return (f"has kind {n['kind']!r}" if "kind" in n else "has no 'kind'") + f"; kinds: {', '.join(NODE_KINDS)}"
    for key in ("layer", "index"):
        if key not in n:
            return f"has no {key!r}"
        if not isinstance(n[key], int) or isinstance(n[key], bool):
            return f"has {key} {n[key]!r}, not an integer"
    odd = next((k for k, v in n.items() if not isinstance(v, (str, int, float, bool))), None)
    return f"has attribute {odd!r} = {n[odd]!r}, not a string, number or boolean" if odd else ""


def _canonical(nodes: dict[str, dict], edges: list[dict]) -> list[dict]:
    """Edges by (source, target) in node order, then port: the order networkx iterates them in."""
    order = {name: i for i, name in enumerate(nodes)}
    return sorted(edges, key=lambda e: (order[e["source"]], order[e["target"]], e["port"]))


def _scalars(meta: dict, prefix: str = "") -> dict:
    """Flatten metadata to GraphML-safe scalars (nested dicts become dotted keys; lists are dropped)."""
    out = {}
    for k, v in meta.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_scalars(v, key + "."))
        elif isinstance(v, bool) or isinstance(v, (int, float, str)):
            out[key] = v
    return out


def write_json(circuit: Circuit, path: str | Path) -> Path:
    text = json.dumps(circuit.to_json_obj(), indent=1, allow_nan=True) + "\n"
    return write_text(path, text)


def read_json(path: str | Path) -> Circuit:
    path = Path(path)
    if path.is_dir():
        raise WorkbenchError(f"circuit file {path} is a folder" + (f" (give {path / 'circuit.json'})"
                                                                  if (path / "circuit.json").is_file() else ""))
    try:
        data = json.loads(read_text(path, "circuit file"))
    except json.JSONDecodeError as e:
        raise WorkbenchError(f"circuit file {path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    return Circuit.from_json_obj(data, f"circuit file {path}")


def write_graphml(circuit: Circuit, path: str | Path) -> Path:
    g = circuit.to_networkx()
    with atomic_path(path) as tmp:
        nx.write_graphml(g, tmp, named_key_ids=True)
    return Path(path)


def read_graphml(path: str | Path) -> nx.MultiDiGraph:
    return nx.read_graphml(path, force_multigraph=True)


def write_dot(circuit: Circuit, path: str | Path) -> Path:
    """Graphviz DOT, one rank per layer; edge width by |score|."""
    def q(s):
        return '"' + str(s).replace('"', r'\"') + '"'
    colors = {"input": "gray", "head": "lightblue", "kv": "lightcyan", "mlp": "lightsalmon", "router": "khaki",
              "expert": "orange", "shared": "gold", "logits": "gray"}
    top = max((abs(e["score"]) for e in circuit.edges if math.isfinite(e["score"])), default=1.0) or 1.0
    lines = ["digraph circuit {", "  rankdir=BT;", "  node [shape=box, style=filled, fontsize=10];"]
    by_layer: dict[int, list[str]] = {}
    for name, a in circuit.nodes.items():
        by_layer.setdefault(a["layer"], []).append(name)
        lines.append(f"  {q(name)} [fillcolor={colors.get(a['kind'], 'white')}];")
    for layer, names in sorted(by_layer.items()):
        lines.append("  { rank=same; " + " ".join(q(n) for n in names) + " }")
    for e in circuit.edges:
        if e["port"] == "internal":
            lines.append(f"  {q(e['source'])} -> {q(e['target'])} [style=dotted];")
        elif not math.isfinite(e["score"]):  # no width or sign to draw: dashed, its score in the label
            label = q(f"{e['port']} {e['score']}")
            lines.append(f"  {q(e['source'])} -> {q(e['target'])} [label={label}, style=dashed, color=gray];")
        else:
            w = 0.5 + 3 * abs(e["score"]) / top
            color = "blue" if e["score"] >= 0 else "red"
            lines.append(f"  {q(e['source'])} -> {q(e['target'])} [label={q(e['port'])}, penwidth={w:.2f}, color={color}];")
    lines.append("}")
    return write_text(path, "\n".join(lines) + "\n")


def write_edges_parquet(graph, matrix: torch.Tensor, mask: torch.Tensor, path: str | Path,
                        refined: torch.Tensor | None = None) -> Path:
    """Every scored edge: source, target, port, receiver, layer of each end, score, in_circuit (and
    refined_score, the score within the candidate circuit, NaN outside it, when the circuit was refined)."""
    import pandas as pd

    s, r = graph.valid().nonzero(as_tuple=True)
    layer = {n.name: n.layer for n in graph.nodes}
    df = pd.DataFrame({
        "source": [graph.senders[i] for i in s.tolist()],
        "target": [graph.receivers[j].node for j in r.tolist()],
        "port": [graph.receivers[j].port for j in r.tolist()],
        "receiver": [graph.receivers[j].name for j in r.tolist()],
        "source_layer": [layer[graph.senders[i]] for i in s.tolist()],
        "target_layer": [layer[graph.receivers[j].node] for j in r.tolist()],
        "score": matrix[s, r].numpy(),
        "in_circuit": mask[s, r].numpy(),
    })
    if refined is not None:
        df["refined_score"] = refined[s, r].numpy()
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)
    return Path(path)
