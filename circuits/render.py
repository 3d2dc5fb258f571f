"""Draw a circuit as a static SVG or PNG with matplotlib (no graphviz binary needed).

Layered layout: the input embedding at the bottom, the logits at the top, and for every layer that
has a node in the circuit one attention row (KV groups next to their query heads) under one MLP row
(dense MLP, or router, routed experts and shared expert). Edge width grows with |score|, colour
gives the sign (blue: positive, red: negative; strongest drawn last), internal links (KV group ->
head, router -> expert) are dotted grey. Node colours tell kinds apart; experts are orange/gold,
heads blue, MLPs salmon.

    from workbench.circuits.render import circuit_svg, write_png
    svg_text = circuit_svg(circuit, max_edges=200)      # for a download button
    write_png(circuit, "runs/circuit/circuit.png")

Every node and scored edge is one SVG group with an id (``node-<name>``, ``edge-<k>``, k the rank by
|score|), so the drawing can be checked or styled after the fact.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

from workbench.circuits.export import Circuit
from workbench.io import atomic_path

KIND_COLOURS = {"input": "#bdbdbd", "logits": "#bdbdbd", "head": "#9ecae1", "kv": "#deebf7", "mlp": "#fc9272",
                "router": "#f0e442", "expert": "#fd8d3c", "shared": "#e6ab02"}
KIND_LABELS = {"input": "input / logits", "head": "attention head", "kv": "KV group", "mlp": "MLP",
               "router": "router", "expert": "routed expert", "shared": "shared expert"}
POSITIVE, NEGATIVE, INTERNAL = "#2166ac", "#d6604d", "#969696"
_MLP_KINDS = ("mlp", "router", "expert", "shared")


def finite_edges(circuit: Circuit) -> Circuit:
    """The circuit without its scored edges whose score is NaN or infinite (they have no size or rank to draw)."""
    edges = [e for e in circuit.edges if e["port"] == "internal" or math.isfinite(float(e["score"]))]
    return circuit if len(edges) == len(circuit.edges) else Circuit(circuit.nodes, edges, circuit.meta)


def _shown(circuit: Circuit, max_edges: int | None) -> tuple[list[dict], list[dict], list[str]]:
    """(scored edges, strongest first, capped at max_edges; internal edges among their nodes; node names). Edges
    whose score is NaN or infinite have no width or rank: they are not drawn."""
    scored = sorted((e for e in finite_edges(circuit).edges if e["port"] != "internal"),
                    key=lambda e: -abs(float(e["score"])))
    if max_edges is not None:
        if max_edges < 0:
            raise ValueError(f"max_edges must be >= 0, got {max_edges}")
        scored = scored[:max_edges]
    names = {e["source"] for e in scored} | {e["target"] for e in scored}
    if max_edges is None:  # everything, isolated nodes included
        names |= set(circuit.nodes)
    internal = [e for e in circuit.edges if e["port"] == "internal" and e["source"] in names and e["target"] in names]
    return scored, internal, [n for n in circuit.nodes if n in names]


def _row(a: dict) -> tuple[int, int]:
    """Sort key of a node's row: (layer, 0 attention / 1 MLP); input is layer -1, logits the last."""
    return int(a["layer"]), 1 if a["kind"] in _MLP_KINDS else 0


def _group_size(circuit: Circuit) -> int:
    """Query heads per KV group, from the graph summary (1 where unknown)."""
    graph = circuit.meta.get("graph")
    kinds = graph.get("node_kinds") if isinstance(graph, dict) else None
    kinds = kinds if isinstance(kinds, dict) else {}  # (a hand-made file may hold anything there)
    heads, kvs = kinds.get("head", 0), kinds.get("kv", 0)
    heads, kvs = (v if isinstance(v, int) and not isinstance(v, bool) else 0 for v in (heads, kvs))
    return heads // kvs if heads and kvs and heads % kvs == 0 else 1


def _layout(circuit: Circuit, names: list[str], internal: list[dict]) -> tuple[dict, list[tuple[int, int]], int]:
    """(node -> (x, y), rows, columns): one row per (layer, attention/MLP) present, one column per head /
    KV group / expert present in any layer (dense MLPs right of the heads), input and logits centred."""
    rows: dict[tuple[int, int], list[str]] = {}
    for n in names:
        rows.setdefault(_row(circuit.nodes[n]), []).append(n)
    parent = {e["target"]: e["source"] for e in internal}
    group = _group_size(circuit)

    def key(n: str):
        a = circuit.nodes[n]
        kind, idx = a["kind"], int(a["index"])
        if kind == "kv":
            return (0, idx, 0, idx)
        if kind == "head":  # next to its KV group
            kv = parent.get(n)
            g = int(circuit.nodes[kv]["index"]) if kv in circuit.nodes else idx // group
            return (0, g, 1, idx)
        if kind in ("input", "logits"):
            return (2, 0, 0, 0)
        order = {"router": 0, "mlp": 0, "expert": 1, "shared": 2}[kind]
        return (1, order, 0, idx)

    # fixed columns: a head, KV group or expert sits in the same column in every layer
    keys = {n: key(n) for n in names}
    attn = sorted({k for n, k in keys.items() if k[0] == 0})
    mlp = sorted({k for n, k in keys.items() if k[0] == 1})
    if len(mlp) <= 1:  # dense MLPs (or a single expert): one column right of the heads
        width = len(attn) + len(mlp)
        col = {k: float(i) for i, k in enumerate(attn + mlp)}
    else:
        width = max(len(attn), len(mlp))
        col = {k: i + (width - len(attn)) / 2 for i, k in enumerate(attn)}
        col.update({k: i + (width - len(mlp)) / 2 for i, k in enumerate(mlp)})
    centre = (max(width, 1) - 1) / 2
    pos = {}
    order = sorted(rows)
    for y, r in enumerate(order):
        for n in rows[r]:
            x = col[keys[n]] if keys[n] in col else centre  # input and logits in the middle
            pos[n] = (x - centre, float(y))
    return pos, order, max(width, 1)


def _label(name: str, a: dict) -> str:
    """Short node text: the layer is on the y axis, so ``h2``, ``kv1``, ``MLP``, ``e5``, ``router``, ``shared``."""
    kind, idx = a["kind"], int(a["index"])
    return {"input": "input", "logits": "logits", "head": f"h{idx}", "kv": f"kv{idx}", "mlp": "MLP",
            "router": "router", "expert": f"e{idx}", "shared": "shared" if idx <= 0 else f"shared{idx}"}.get(kind, name)


def _row_label(r: tuple[int, int], n_layers: int | None) -> str:
    layer, part = r
    if layer < 0:
        return "embedding"
    if n_layers is not None and layer >= n_layers:
        return "unembedding"
    return f"L{layer} {'MLP' if part else 'attn'}"


def _figure(circuit: Circuit, max_edges: int | None):
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import FancyArrowPatch, Patch

    scored, internal, names = _shown(circuit, max_edges)
    pos, rows, width_nodes = _layout(circuit, names, internal)
    n_layers = next((int(a["layer"]) for a in circuit.nodes.values() if a["kind"] == "logits"), None)
    w = min(40.0, max(8.0, 0.62 * width_nodes + 3.0))
    h = min(60.0, max(4.0, 0.42 * len(rows) + 1.8))
    fig = Figure(figsize=(w, h), dpi=100)
    bottom, top_margin = 0.25, 0.95  # inches: below the embedding row, above the logits row (title, legend)
    left, right = 0.95, 0.2  # inches: row labels, spare
    ax = fig.add_axes((left / w, bottom / h, 1 - (left + right) / w, 1 - (bottom + top_margin) / h))
    top = max((abs(float(e["score"])) for e in scored), default=1.0) or 1.0
    half = max(width_nodes - 1, 1) / 2

    def arrow(e: dict, **kw) -> FancyArrowPatch:
        (x0, y0), (x1, y1) = pos[e["source"]], pos[e["target"]]
        span = abs(y1 - y0)
        # long edges bow sideways so they do not run through the rows they skip; a KV group's k and v
        # edges from one sender bow differently so both stay visible
        if span == 0:  # internal link within a row (KV group -> head): arc over the nodes between
            rad = -0.25 if x1 > x0 else 0.25
        else:  # edges point up; a positive rad bows right: bow towards the middle, less for long edges
            rad = 0.0 if span <= 1 else (-0.2 if x0 + x1 > 0 else 0.2) / math.sqrt(span)
            rad += {"k": 0.05, "v": -0.05}.get(e["port"], 0.0)
        return FancyArrowPatch((x0, y0), (x1, y1), connectionstyle=f"arc3,rad={rad:.3f}", arrowstyle="-|>",
                               mutation_scale=6, shrinkA=7, shrinkB=7, **kw)

    for e in internal:
        p = arrow(e, color=INTERNAL, linestyle=":", linewidth=0.8, zorder=1)
        ax.add_patch(p)
    for k, e in reversed(list(enumerate(scored))):  # strongest drawn last, on top
        s = float(e["score"])
        p = arrow(e, color=POSITIVE if s >= 0 else NEGATIVE, linewidth=0.4 + 4.6 * abs(s) / top,
                  alpha=0.2 + 0.7 * abs(s) / top, zorder=2)
        p.set_gid(f"edge-{k}")
        ax.add_patch(p)
    for n in names:
        a = circuit.nodes[n]
        x, y = pos[n]
        t = ax.text(x, y, _label(n, a), ha="center", va="center", fontsize=7, zorder=3,
                    bbox=dict(boxstyle="round,pad=0.25", facecolor=KIND_COLOURS.get(a["kind"], "white"),
                              edgecolor="#525252", linewidth=0.6))
        t.set_gid(f"node-{n}")
    ax.set_xlim(-half - 1.0, half + 1.0)
    ax.set_ylim(-0.6, max(len(rows) - 1, 0) + 0.6)
    ax.set_yticks(range(len(rows)), [_row_label(r, n_layers) for r in rows], fontsize=7)
    ax.set_xticks([])
    for side in ("top", "right", "bottom"):
        ax.spines[side].set_visible(False)
    for y, r in enumerate(rows):
        if r[1] == 0 and 0 <= r[0]:
            ax.axhline(y - 0.5, color="#f0f0f0", linewidth=0.6, zorder=0)
    kinds = [k for k in KIND_COLOURS if k != "logits" and any(circuit.nodes[n]["kind"] == k for n in names)]
    handles = [Patch(facecolor=KIND_COLOURS[k], edgecolor="#525252", label=KIND_LABELS[k]) for k in kinds]
    handles += [Line2D([], [], color=POSITIVE, linewidth=2, label="positive score"),
                Line2D([], [], color=NEGATIVE, linewidth=2, label="negative score")]
    if internal:
        handles.append(Line2D([], [], color=INTERNAL, linestyle=":", label="internal link"))
    fig.legend(handles=handles, loc="upper center", ncol=min(len(handles), 6), fontsize=7, frameon=False,
               bbox_to_anchor=(0.5, 1 - 0.55 / h))
    fig.suptitle(_title(circuit, len(scored)), fontsize=9, y=1 - 0.12 / h, va="top")
    return fig


def _title(circuit: Circuit, shown: int) -> str:
    m = circuit.meta
    parts = [str(m["model"])] if m.get("model") else []
    if m.get("method"):
        steps = m.get("steps")
        parts.append(f"{m['method']}({steps})" if m["method"] != "eap" and steps else str(m["method"]))
    total = circuit.n_edges
    edges = f"{shown} of {total} circuit edges" if shown < total else f"{total} edges"
    if m.get("n_edges_total"):
        edges += f" (graph: {m['n_edges_total']:,})"
    parts.append(edges)
    metrics = m.get("metrics") or {}
    f = metrics.get("faithfulness")
    if isinstance(f, (int, float)) and not math.isnan(f):
        parts.append(f"faithfulness {f:.3f}")
    hit = metrics.get("hit_at_10_circuit")
    if isinstance(hit, (int, float)):
        parts.append(f"Hit@10 {hit:.3f}")
    return ", ".join(parts)


_RC = {"svg.fonttype": "none", "svg.hashsalt": "workbench-circuit"}  # text stays text; ids are reproducible


def _check_max_edges(max_edges) -> None:
    from workbench.args import Number
    from workbench.tracing.runner import check_number

    if max_edges is not None:  # an integer (2.5 or "5" failed inside the layout); its range: _shown
        check_number("max_edges", max_edges, Number(int))


def circuit_svg(circuit: Circuit, max_edges: int | None = None) -> str:
    """The circuit as SVG text (``max_edges``: draw only the strongest scored edges and their nodes)."""
    import matplotlib

    _check_max_edges(max_edges)
    buf = io.StringIO()
    with matplotlib.rc_context(_RC):
        _figure(circuit, max_edges).savefig(buf, format="svg", metadata={"Date": None})
    return buf.getvalue()


def write_svg(circuit: Circuit, path: str | Path, max_edges: int | None = None) -> Path:
    text = circuit_svg(circuit, max_edges)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_png(circuit: Circuit, path: str | Path, max_edges: int | None = None, dpi: int = 130) -> Path:
    import matplotlib

    from workbench.tracing.runner import check_number

    _check_max_edges(max_edges)
    check_number("dpi", dpi)  # (0 failed inside matplotlib)
    with matplotlib.rc_context(_RC), atomic_path(path) as tmp:
        _figure(circuit, max_edges).savefig(tmp, format="png", dpi=dpi)
    return Path(path)


def write_curve(curve: list[dict], path: str | Path, dpi: int = 110) -> Path:
    """Faithfulness and Hit@10 against the circuit's edge count (log x), from ``metrics.json``'s curve."""
    import matplotlib
    from matplotlib.figure import Figure

    with matplotlib.rc_context(_RC), atomic_path(path) as tmp:
        fig = Figure(figsize=(6, 3.6))
        ax = fig.add_subplot()
        x = [c["n_edges"] for c in curve]
        ax.plot(x, [c["faithfulness"] for c in curve], "o-", label="faithfulness")
        ax.plot(x, [c["hit_at_10"] for c in curve], "s--", label="Hit@10 (circuit)")
        ax.axhline(curve[0]["hit_at_10_full"], color="gray", lw=0.8, ls=":", label="Hit@10 (full model)")
        ax.set_xscale("log")
        ax.set_xlabel("edges in the circuit")
        ax.set_ylim(min(0.0, min(c["faithfulness"] for c in curve)) - 0.05, 1.05)
        ax.legend(loc="lower right", fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(tmp, format="png", dpi=dpi)
    return Path(path)
