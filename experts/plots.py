"""The plots a researcher would otherwise make by hand, as PNG (matplotlib) and interactive HTML (plotly)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from workbench.io import atomic_path


def _grid(p: dict, key: str = "max_abs") -> np.ndarray:
    experts = [e for e in p["experts"] if e["kind"] != "shared"]
    n_layers = p["meta"]["num_layers"]
    width = max(e["expert"] for e in experts) + 1
    g = np.full((n_layers, width), np.nan)
    for e in experts:
        g[e["layer"], e["expert"]] = e[key]
    return g


def figures(p: dict) -> dict[str, dict]:
    """name -> {z, x, y, title, marks} for each heatmap/bar chart."""
    figs = {}
    g = _grid(p)
    marks = [(e["layer"], e["expert"]) for e in p["super_experts"] if e["kind"] != "shared"]
    figs["expert_maxabs"] = dict(kind="heat", z=np.log10(np.where(g > 0, g, np.nan)), x="expert", y="layer",
                                 title="log10 max |down_proj output| per expert (x: super expert)", marks=marks)
    if "router" in p:
        load = np.array([r["load"] for r in p["router"]])
        figs["router_load"] = dict(kind="heat", z=load, x="expert", y="MoE layer #", title="router load per expert",
                                   marks=[], ylabels=[r["layer"] for r in p["router"]])
        co = np.array(p["router"][0]["coactivation"], dtype=float)
        figs["coactivation_first_moe_layer"] = dict(kind="heat", z=co, x="expert", y="expert", marks=[],
                                                    title=f"co-activation, layer {p['router'][0]['layer']}")
    if "router" in p and "srp" in p["router"][0]:
        r = p["router"]
        segs = list(r[0]["srp"])
        ys = {f"SRP m={m}": [l["srp"][m]["f1"] for l in r] for m in segs}
        ys.update({f"SCH m={m}, cache 2k": [l["sch"][m]["cache_2k"] for l in r] for m in segs})
        figs["local_consistency"] = dict(kind="lines", x=[l["layer"] for l in r], ys=ys,
                                         title="local routing consistency by layer (SRP: best F1; SCH: hit rate)")
    if "router" in p and "vocab_specialization" in p["router"][0]:
        r = p["router"]
        figs["vocab_specialization"] = dict(
            kind="lines", x=[l["layer"] for l in r],
            ys={f"by {k} token": [l["vocab_specialization"][k]["specialization"] for l in r]
                for k in r[0]["vocab_specialization"]},
            title=f"vocabulary specialization: share of a token id's most frequent top-1 expert (1/E = "
                  f"{r[0]['vocab_specialization']['input']['uniform']:.3g}: none)")
    if "domain_specialization" in p:
        ds = p["domain_specialization"]
        for d in ds["domains"]:
            figs[f"domain_{d}"] = dict(kind="heat", z=np.log2(np.array([l["ratio"][d] for l in ds["layers"]]) + 1e-9),
                                       x="expert", y="MoE layer #", marks=[], ylabels=[l["layer"] for l in ds["layers"]],
                                       title=f"domain {d}: log2(share of its tokens routed to the expert / uniform k/E)")
    layers = p["massive_activations"]["layers"]
    figs["massive_activations"] = dict(kind="bar", x=[l["layer"] for l in layers],
                                       y=[l["top"][0]["value"] if l["top"] else 0 for l in layers],
                                       y2=[l["median_abs"] for l in layers],
                                       title="largest |residual| per layer (bars) and median |residual| (line)")
    if "attention_sinks" in p:
        figs["attention_sinks"] = dict(kind="heat", z=np.array(p["attention_sinks"]["share_pos0"]), x="head",
                                       y="layer", title="share of attention on position 0", marks=[])
    if "qk_values" in p and p["qk_values"]["by_layer"]:
        q = p["qk_values"]
        rows = q["by_layer"]
        figs["qk_concentration"] = dict(kind="lines", x=[r["layer"] for r in rows],
                                        ys={proj: [r[proj] for r in rows] for proj in ("q", "k", "v")},
                                        title="largest dim norm / head median, by layer (Q, K after RoPE)")
        for proj in ("q", "k", "v"):
            heads = [(l, h, np.asarray(d)) for l, hs in enumerate(q["norms"][proj]) for h, d in enumerate(hs or [])]
            z = np.stack([d / max(float(np.median(d)), 1e-30) for _, _, d in heads])
            figs[f"qk_norms_{proj}"] = dict(kind="heat", z=z, x="dim", y="layer x head", marks=[],
                                            title=f"{proj.upper()}: norm of each head dim / head median "
                                                  f"(rows: layer-major, {len(q['norms'][proj][0] or [])} heads per layer)")
    return figs


def _png(name: str, f: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5), dpi=110)
    if f["kind"] == "heat":
        im = ax.imshow(f["z"], aspect="auto", origin="lower", cmap="viridis", interpolation="nearest")
        fig.colorbar(im, ax=ax)
        for (layer, expert) in f.get("marks", []):
            ax.scatter([expert], [layer], marker="x", color="red", s=60)
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(f["x"])
        ax.set_ylabel(f["y"])
    elif f["kind"] == "lines":
        for label, ys in f["ys"].items():
            ax.plot(f["x"], ys, marker="o", label=label)
        ax.legend()
        ax.set_xlabel("layer")
    else:
        ax.bar(f["x"], f["y"], color="tab:blue")
        ax.plot(f["x"], f["y2"], color="tab:orange", marker="o")
        ax.set_yscale("log")
        ax.set_xlabel("layer")
    ax.set_title(f["title"], fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _html(name: str, f: dict, path: Path) -> None:
    import plotly.graph_objects as go

    if f["kind"] == "heat":
        z = np.where(np.isfinite(f["z"]), f["z"], None) if np.issubdtype(np.asarray(f["z"]).dtype, np.floating) else f["z"]
        fig = go.Figure(go.Heatmap(z=z.tolist() if hasattr(z, "tolist") else z, colorscale="Viridis",
                                   hovertemplate=f"{f['y']} %{{y}}<br>{f['x']} %{{x}}<br>value %{{z}}<extra></extra>"))
        if f.get("marks"):
            fig.add_trace(go.Scatter(x=[m[1] for m in f["marks"]], y=[m[0] for m in f["marks"]], mode="markers",
                                     marker=dict(symbol="x", color="red", size=12), name="super expert"))
        fig.update_layout(xaxis_title=f["x"], yaxis_title=f["y"])
    elif f["kind"] == "lines":
        fig = go.Figure([go.Scatter(x=f["x"], y=ys, name=label, mode="lines+markers") for label, ys in f["ys"].items()])
        fig.update_layout(xaxis_title="layer")
    else:
        fig = go.Figure([go.Bar(x=f["x"], y=f["y"], name="max |residual|"),
                         go.Scatter(x=f["x"], y=f["y2"], name="median |residual|")])
        fig.update_yaxes(type="log")
    fig.update_layout(title=f["title"])
    with atomic_path(path) as tmp:
        fig.write_html(tmp, include_plotlyjs="directory", full_html=True, div_id=name)  # a fixed id: same bytes every run


def write_all(p: dict, out: Path) -> list[Path]:
    written = []
    for name, f in figures(p).items():
        _png(name, f, out / f"{name}.png")
        _html(name, f, out / f"{name}.html")
        written += [out / f"{name}.png", out / f"{name}.html"]
    if (out / "plotly.min.js").is_file() and written:  # the HTML plots' script, written beside them
        written.append(out / "plotly.min.js")
    return written
