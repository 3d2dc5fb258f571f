"""Plotly figures from the plain data the API returns (profile figure dicts, circuits)."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go


def figure(f: dict, selectable: bool = False) -> go.Figure:
    """One ``workbench.experts.plots.figures`` entry as an interactive plotly figure (hover shows values).

    ``selectable`` (heatmaps): plotly cannot select heatmap cells, so an invisible marker sits on every
    cell; a click on a cell then selects that marker, whose x / y are the cell's column / row."""
    if f["kind"] == "heat":
        z = np.asarray(f["z"], dtype=float)
        y = f.get("ylabels") or list(range(z.shape[0]))
        hover = f"{f['x']} %{{x}}<br>{f['y']} %{{y}}<br>value %{{z:.4g}}<extra></extra>"
        fig = go.Figure(go.Heatmap(z=z, x=list(range(z.shape[1])), y=[str(v) for v in y], colorscale="Viridis",
                                   hovertemplate=hover, hoverinfo="skip" if selectable else None))
        if selectable:
            rows, cols = np.indices(z.shape)
            fig.add_trace(go.Scatter(
                x=cols.ravel(), y=[str(y[r]) for r in rows.ravel()], mode="markers", showlegend=False,
                marker=dict(symbol="square", size=24, opacity=0), customdata=z.ravel(), name="cells",
                selected=dict(marker=dict(opacity=0.6, color="white")), unselected=dict(marker=dict(opacity=0)),
                hovertemplate=f"{f['x']} %{{x}}<br>{f['y']} %{{y}}<br>value %{{customdata:.4g}}<br>"
                              "click to select<extra></extra>"))
            fig.update_layout(clickmode="event+select", hoverdistance=100, dragmode=False)
        marks = f.get("marks") or []
        if marks:
            fig.add_trace(go.Scatter(x=[e for _, e in marks], y=[str(l) for l, _ in marks], mode="markers",
                                     marker=dict(symbol="x", color="red", size=12), name="super expert",
                                     unselected=dict(marker=dict(opacity=1)),
                                     hovertemplate="super expert: layer %{y}, expert %{x}<extra></extra>"))
        # fixed ranges: the markers must not pad the axes, so cell (r, c) stays where the heatmap draws it
        fig.update_layout(showlegend=False)  # the title says what the red x marks
        fig.update_yaxes(type="category", title=f["y"], range=[-0.5, z.shape[0] - 0.5])
        fig.update_xaxes(title=f["x"], range=[-0.5, z.shape[1] - 0.5])
    elif f["kind"] == "lines":
        fig = go.Figure([go.Scatter(x=f["x"], y=ys, name=label, mode="lines+markers") for label, ys in f["ys"].items()])
        fig.update_xaxes(title="layer")
    else:
        fig = go.Figure(go.Bar(x=f["x"], y=f["y"], name="largest |residual|"))
        if "y2" in f:
            fig.add_trace(go.Scatter(x=f["x"], y=f["y2"], mode="lines+markers", name="median |residual|"))
        fig.update_yaxes(type="log")
        fig.update_xaxes(title="layer")
    fig.update_layout(title=f["title"], height=420, margin=dict(l=40, r=20, t=50, b=40))
    return fig


KIND_COLOURS = {"input": "#444444", "logits": "#444444", "head": "#1f77b4", "kv": "#17becf", "mlp": "#2ca02c",
                "router": "#9467bd", "expert": "#d62728", "shared": "#ff7f0e"}


def circuit_figure(circuit, n_edges: int, selectable: bool = False) -> go.Figure:
    """Layered drawing: input at the bottom, logits at the top, one row per layer (attention below MLP),
    edge width by |score| (top ``n_edges`` scored edges), expert nodes coloured by kind.

    ``selectable``: a click on a node marker selects it; the marker's customdata is the node's name."""
    scored = sorted((e for e in circuit.edges if e["port"] != "internal"), key=lambda e: -abs(e["score"]))
    shown = scored[:n_edges]
    names = {e["source"] for e in shown} | {e["target"] for e in shown}
    rows: dict[float, list[str]] = {}
    for name, a in circuit.nodes.items():
        if name not in names:
            continue
        y = float(a["layer"]) + (0.5 if a["kind"] in ("mlp", "router", "expert", "shared") else 0.0)
        rows.setdefault(y, []).append(name)
    pos = {}
    for y, row in rows.items():
        row.sort(key=lambda n: (circuit.nodes[n]["kind"], circuit.nodes[n]["index"]))
        for i, n in enumerate(row):
            pos[n] = ((i + 1) / (len(row) + 1), y)
    fig = go.Figure()
    top = max((abs(e["score"]) for e in shown), default=1.0) or 1.0
    for e in shown:
        (x0, y0), (x1, y1) = pos[e["source"]], pos[e["target"]]
        fig.add_trace(go.Scatter(x=[x0, x1], y=[y0, y1], mode="lines", showlegend=False, hoverinfo="text",
                                 text=f"{e['source']} -> {e['target']} ({e['port']}): {e['score']:.4g}",
                                 line=dict(width=0.5 + 6 * abs(e["score"]) / top,
                                           color="rgba(31,119,180,0.55)" if e["score"] >= 0 else "rgba(214,39,40,0.55)")))
    by_kind: dict[str, list[str]] = {}
    for n in pos:
        by_kind.setdefault(circuit.nodes[n]["kind"], []).append(n)
    for kind, ns in by_kind.items():
        fig.add_trace(go.Scatter(x=[pos[n][0] for n in ns], y=[pos[n][1] for n in ns], mode="markers+text",
                                 text=ns, textposition="top center", name=kind, hoverinfo="text", customdata=ns,
                                 marker=dict(size=14 if kind in ("expert", "shared", "router") else 10,
                                             color=KIND_COLOURS.get(kind, "#7f7f7f"), line=dict(width=1, color="white")),
                                 selected=dict(marker=dict(size=22)), unselected=dict(marker=dict(opacity=1))))
    fig.update_layout(height=700, xaxis=dict(visible=False), yaxis=dict(title="layer (input bottom, logits top)"),
                      title=f"{len(shown)} of {len(scored)} scored edges (blue: positive, red: negative)",
                      margin=dict(l=40, r=20, t=50, b=20))
    if selectable:
        fig.update_layout(clickmode="event+select")
    return fig
