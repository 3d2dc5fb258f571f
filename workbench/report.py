"""One self-contained HTML page per output folder: the findings in sentences, the tables, every plot.

``report(folder)`` reads what ``workbench profile``, ``ablate``, ``circuit``, ``routing`` or
``circuit-evolution`` wrote there and writes ``folder/report.html``: no server, no script, no
network request (plots are PNG data URIs, the circuit drawing inline SVG), so it opens offline in
any browser and can be mailed as one file. A folder that holds none of those outputs, or only part of
one (a killed run), is a one-line error naming what is missing.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

from workbench.errors import WorkbenchError
from workbench.io import clear_stale_temps, read_text, write_text

# kind -> (the file whose presence means the run finished, files it needs beside it)
KINDS = {
    "profile": ("profile.json", ()),
    "study": ("results.csv", ("study.resolved.yaml",)),
    "circuit": ("metrics.json", ("circuit.json",)),
    "routing": ("routing.json", ()),
    "evolution": ("evolution.json", ()),
}


def kind_of(folder: Path) -> str:
    """Which run wrote ``folder``; a one-line error when none finished there."""
    if not folder.is_dir():
        raise WorkbenchError(f"{folder} is not a folder: report takes a profile, study or circuit output folder")
    if (folder / "cfg.json").is_file() and (folder / "sae_weights.safetensors").is_file():
        raise WorkbenchError(f"{folder} holds an SAE (sae train: cfg.json, sae_weights.safetensors, metrics.json), "
                             "which report does not cover: its numbers are in metrics.json")
    for kind, (marker, needs) in KINDS.items():
        if (folder / marker).is_file():
            missing = [n for n in needs if not (folder / n).is_file()]
            if missing:
                raise WorkbenchError(f"{folder} has {marker} but not {', '.join(missing)}: an incomplete {kind} "
                                     "output (rerun it)")
            return kind
    if (folder / "circuit.json").is_file() and _embedded_metrics(folder / "circuit.json") is not None:
        return "circuit"  # a circuit.json on its own (the app's download) carries its metrics
    uncovered = {"contrast.csv": "contrast (its table is contrast.csv, its study interventions.yaml)",
                 "expert_features.csv": "sae features (its tables are expert_features.csv and feature_tokens.csv)",
                 "node_features.csv": "sae features (its tables are node_features.csv and feature_tokens.csv)",
                 "trace.json": "trace (its numbers are in trace.json)"}
    for marker, what in uncovered.items():  # finished runs of commands that write no report
        if (folder / marker).is_file():
            raise WorkbenchError(f"{folder} holds a finished {what}, which report does not cover")
    partial = {"run.json": "profile.json", "results.parquet": "results.csv", "study.resolved.yaml": "results.csv",
               "circuit.json": "metrics.json", "edges.parquet": "metrics.json", "routing.parquet": "routing.json",
               "evolution.parquet": "evolution.json"}
    for have, want in partial.items():
        if (folder / have).is_file():
            raise WorkbenchError(f"{folder} has {have} but no {want}: the run did not finish (rerun it)")
    raise WorkbenchError(f"{folder} holds no finished run: expected profile.json (profile), results.csv (ablate), "
                         "metrics.json (circuit), routing.json or evolution.json")


def _corrupt(path: Path, e: Exception) -> WorkbenchError:
    why = str(e).splitlines()[0] if str(e).strip() else type(e).__name__
    return WorkbenchError(f"{path} is corrupt or incomplete ({why}); rerun the command that wrote it")


def _read_json(path: Path):
    text = read_text(path, "file")  # a missing, unreadable or non-UTF-8 file: its own one-line error
    try:
        return json.loads(text)
    except ValueError as e:  # JSONDecodeError
        raise _corrupt(path, e) from None


def _read_csv(path: Path):
    import pandas as pd  # (imported where needed: the other reports do without it)

    try:
        return pd.read_csv(path)
    except ValueError as e:  # EmptyDataError, ParserError, UnicodeDecodeError: all ValueErrors
        raise _corrupt(path, e) from None


def report(folder: str | Path, out: str | Path | None = None) -> Path:
    """Write the folder's report page (default ``folder/report.html``) and return its path."""
    folder = Path(folder)
    kind = kind_of(folder)
    body = {"profile": _profile, "study": _study, "circuit": _circuit, "routing": _routing,
            "evolution": _evolution}[kind](folder)
    # The page depends only on the folder's files (not on where the folder is): the same run gives the same page.
    title = f"workbench {kind} report"
    page = (f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{_e(title)}</title>"
            f"<style>{CSS}</style></head>\n<body>\n<h1>{_e(title)}</h1>\n{body}\n"
            f"{_plots(folder, kind)}\n</body></html>\n")
    path = Path(out) if out else folder / "report.html"
    clear_stale_temps(path.parent, [path.name])  # what a killed earlier write left
    return write_text(path, page)


def announce(out: str | Path) -> None:
    """How every command that writes a folder ends: its report page, and the line that says where it is."""
    print(f"report: {report(out)}")


CSS = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
       "h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}"
       "table{border-collapse:collapse;font-size:.85em;margin:.6em 0}td,th{border:1px solid #ccc;padding:2px 6px;"
       "text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}"
       "img,svg{max-width:100%;height:auto}figure{margin:1em 0}figcaption{font-size:.8em;color:#555}"
       "li{margin:.2em 0}"
       ".plots{display:grid;grid-template-columns:repeat(auto-fill,minmax(480px,1fr));gap:1em}")


def _e(s) -> str:
    return html.escape(str(s))


def _num(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) >= 1e4 or (v and abs(v) < 1e-3) else f"{v:.{digits}f}"
    return str(v)


def _ratio(v) -> str:
    """A ratio, whole and with thousands separators from 100 on ("14,680x"; ``_num`` with no decimals wrote "1e+04x"
    for every ratio of 10,000 or more, where the CLI says 14680x)."""
    if not isinstance(v, (int, float)) or v != v:
        return "-"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.1f}"


def _table(rows: list[dict], cols: list[str] | None = None) -> str:
    if not rows:
        return "<p>(none)</p>"
    cols = cols or list(rows[0])
    head = "".join(f"<th>{_e(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{_e(_num(r.get(c)))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _sentences(items: list[str]) -> str:
    return "<ul>" + "".join(f"<li>{s}</li>" for s in items) + "</ul>"


def _plots(folder: Path, kind: str) -> str:
    figs = []
    for png in sorted(folder.glob("*.png")):
        data = base64.b64encode(png.read_bytes()).decode()
        figs.append(f"<figure><img alt=\"{_e(png.stem)}\" src=\"data:image/png;base64,{data}\">"
                    f"<figcaption>{_e(png.name)}</figcaption></figure>")
    return ("<h2>Plots</h2>\n<div class=\"plots\">" + "\n".join(figs) + "</div>") if figs else ""


# ----- profile ---------------------------------------------------------------------------------------

def _profile(folder: Path) -> str:
    from workbench.experts.sinks import strongest_heads
    from workbench.experts.super_experts import no_super_experts

    from workbench.experts.report import check_profile

    p = check_profile(_read_json(folder / "profile.json"), str(folder / "profile.json"))
    m = p.get("meta", {})
    out = [f"<p>{_e(m.get('spec'))} ({_e(m.get('architecture'))}, {m.get('num_layers')} layers): "
           f"{m.get('num_tokens')} tokens of {m.get('num_prompts')} prompts.</p>", "<h2>Findings</h2>"]
    facts = []
    se = p.get("super_experts", [])
    if se:
        for e in se[:5]:
            facts.append(f"<b>Super expert</b>: layer {e['layer']} expert {e['expert']} ({_e(e['kind'])}) writes "
                         f"{_num(e['max_abs'])} into channel {e['channel']} (prompt {e['prompt_index']}, position "
                         f"{e['position']}, token {_e(repr(e['token']))}), {_ratio(e.get('ratio_to_median'))}x the "
                         "median expert maximum.")
    else:
        facts.append(_e(no_super_experts(p)))
    massive = [l for l in p.get("massive_activations", {}).get("layers", []) if l.get("massive")]
    if massive:
        l, t = massive[0], massive[0]["top"][0]
        facts.append(f"<b>Massive activation</b> from layer {l['layer']} on ({len(massive)} layers): {_num(t['value'])} "
                     f"({_ratio(t['ratio_to_median'])}x the layer median) in channel {t['channel']} at position "
                     f"{t['position']} ({_e(repr(t['token']))}).")
    else:
        facts.append("No massive activation (no layer's top |residual| is >= 100 and >= 1000x its median).")
    sinks = p.get("attention_sinks")
    if sinks and not strongest_heads(sinks["share_pos0"], 1):
        facts.append("<b>Attention sinks</b>: not measured (no prompt has 2 tokens or more, or no layer has softmax "
                     "attention).")
    elif sinks:
        heads = strongest_heads(sinks["share_pos0"], 3)
        mean = sum(v for row in sinks["share_pos0"] for v in row if v == v) / max(
            1, sum(1 for row in sinks["share_pos0"] for v in row if v == v))
        facts.append(f"<b>Attention sinks</b>: the mean share of attention on position 0 is {mean:.2f}; the "
                     "strongest sink heads are " + ", ".join(f"L{l}.H{h} ({v:.2f})" for v, l, h in heads) + ".")
    from workbench.experts.qk import largest_dims

    dims = largest_dims(p.get("qk_values"))  # (the CLI printed it; the page listed only the qk_* plots)
    if dims:
        facts.append("<b>Massive values in attention</b>: the largest top-dim / median norm ratio is "
                     + ", ".join(f"{proj} {_e(where)}" for proj, where in dims.items()) + ".")
    router = p.get("router")
    if router:
        util = [r.get("utilization") for r in router if r.get("utilization") is not None]
        facts.append(f"<b>Router</b> ({len(router)} MoE layers): utilization (Jain) {_num(min(util))} to "
                     f"{_num(max(util))}; mean token entropy {_num(router[0]['mean_token_entropy'])} nats in layer "
                     f"{router[0]['layer']} (max {_num(router[0]['max_entropy'])}).")
    out.append(_sentences(facts))
    experts = sorted(p.get("experts", []), key=lambda e: -(e.get("max_abs") or 0))[:10]
    out.append("<h2>Largest experts</h2>")
    out.append(_table(experts, ["layer", "expert", "kind", "max_abs", "channel", "prompt_index", "position",
                                "tokens_routed"]))
    if router:
        out.append("<h2>Router per MoE layer</h2>")
        out.append(_table([{"layer": r["layer"], **{k: v for k, v in r.items() if not isinstance(v, (list, dict))}}
                           for r in router]))
    return "\n".join(out)


# ----- study --------------------------------------------------------------------------------------------

def _study(folder: Path) -> str:
    df = _read_csv(folder / "results.csv")
    lacking = [c for c in ("condition", "metric", "mean", "ci_low", "ci_high") if c not in df.columns]
    if lacking:
        raise _corrupt(folder / "results.csv", ValueError(f"no column {lacking[0]!r}"))
    num = df[df.metric != "generations"]
    out = [f"<p>{df.condition.nunique()} conditions, metrics: {_e(', '.join(dict.fromkeys(df.metric)))}.</p>",
           "<h2>Findings</h2>"]
    facts = []
    base = num[num.condition == "baseline"].set_index("metric")["mean"] if "baseline" in set(num.condition) else None
    if base is not None:
        for metric in dict.fromkeys(num.metric):
            d = num[(num.metric == metric) & (num.condition != "baseline")]
            change = (d["mean"] - base.get(metric, math.nan)).abs()
            if not change.notna().any():  # no condition, or NaN everywhere (outputs not finite): nothing to rank
                continue
            worst = d.loc[change.idxmax()]
            facts.append(f"<b>{_e(metric)}</b>: baseline {_num(float(base[metric]))}; the largest change is "
                         f"{_e(worst.condition)}: {_num(float(worst['mean']))} [{_num(float(worst.ci_low))}, "
                         f"{_num(float(worst.ci_high))}].")
    if facts:
        out.append(_sentences(facts))
    elif num.empty:
        out.append("<p>(generations only: no metric to compare with the baseline)</p>")
    else:
        out.append("<p>(no baseline condition to compare against)</p>")
    if not num.empty:
        out.append("<h2>Results (mean with 95 % interval)</h2>")
        rows = [{"condition": r.condition, "metric": r.metric, "mean": r.mean, "ci_low": r.ci_low,
                 "ci_high": r.ci_high, "n": r.n} for r in num.itertuples()]
        out.append(_table(rows))
    gens = df[df.metric == "generations"]
    if not gens.empty:
        out.append("<h2>Generations</h2><ul>" + "".join(f"<li>[{_e(c)}] {_e(t)}</li>"
                                                          for c, t in zip(gens.condition, gens.text)) + "</ul>")
    return "\n".join(out)


# ----- circuit -------------------------------------------------------------------------------------------

def _embedded_metrics(path: Path) -> dict | None:
    """The evaluation a circuit.json holds in ``graph.meta.metrics`` (None where it has none or is not JSON)."""
    try:
        m = json.loads(path.read_text()).get("graph", {}).get("meta", {}).get("metrics")
    except (OSError, ValueError, AttributeError):
        return None
    return m if isinstance(m, dict) and "faithfulness" in m else None


def _circuit(folder: Path) -> str:
    c = _read_json(folder / "circuit.json")
    m = _read_json(folder / "metrics.json") if (folder / "metrics.json").is_file() else \
        _embedded_metrics(folder / "circuit.json")
    meta = c.get("graph", {}).get("meta", {})
    differ = [k for k in ("n_edges", "n_edges_total") if k in meta and k in m and meta[k] != m[k]]
    if differ:  # a metrics.json copied beside another run's circuit.json would describe the wrong circuit
        raise WorkbenchError(f"{folder}: circuit.json and metrics.json are from different runs ({differ[0]} "
                             f"{meta[differ[0]]} against {m[differ[0]]}); rerun `workbench circuit` into this folder")
    kinds: dict[str, int] = {}
    for n in c.get("nodes", []):
        kinds[n.get("kind", "?")] = kinds.get(n.get("kind", "?"), 0) + 1
    facts = [f"<b>{m.get('n_edges')} edges</b> of {m.get('n_edges_total')} ({100 * (m.get('edge_fraction') or 0):.2f} %) "
             f"on {m.get('n_facts')} facts ({_e(meta.get('method', ''))}): faithfulness {_num(m.get('faithfulness'))} "
             f"(size-matched random circuits {_num(m.get('faithfulness_random'))}).",
             f"<b>Hit@10</b>: full model {_num(m.get('hit_at_10_full'))}, circuit {_num(m.get('hit_at_10_circuit'))}, "
             f"random circuits {_num(m.get('hit_at_10_random'))}, corrupted input {_num(m.get('hit_at_10_corrupted'))}.",
             "<b>Nodes</b>: " + ", ".join(f"{v} {_e(k)}" for k, v in sorted(kinds.items())) + "."]
    from workbench.circuits.evaluate import gap_caveat

    if caveat := gap_caveat(m.get("gap_z")):  # said by `workbench circuit` too
        facts.append("<b>The faithfulness figures are noise here</b>: " + _e(caveat))
    target = meta.get("selection", {}).get("target")
    if target:
        goal = f"faithfulness {target['faithfulness']:g}" + (
            f" with Hit@10 at least {target['hit_share']:g} x the full model's" if target.get("hit_share") else "")
        if target.get("reached_on_curve"):
            facts.append(f"The smallest circuit on the curve reaching {goal}: this one.")
        else:
            sw = meta["selection"].get("swaps", {})
            facts.append(f"No circuit on the curve up to {100 * target['max_fraction']:g} % of the edges reaches "
                         f"{goal}; this is that largest one after {len(sw.get('accepted', []))} swap round(s), which "
                         + ("reach it." if sw.get("reached") else "<b>do not reach it</b>."))
    elif "target_faithfulness" in m:
        facts.append(f"Smallest circuit on the curve reaching faithfulness {m['target_faithfulness']}: this one.")
    rel = m.get("relations", {}).get("per_relation", {})
    out = [f"<p>{_e(meta.get('model', ''))}</p>", "<h2>Findings</h2>", _sentences(facts)]
    if m.get("curve"):
        out.append("<h2>Faithfulness curve</h2>")
        out.append(_table(m["curve"]))
    if rel:
        out.append("<h2>Relations</h2>")
        out.append(_table([{"relation": k, **{x: y for x, y in v.items() if not isinstance(y, (list, dict))}}
                           for k, v in rel.items()]))
    svg = folder / "circuit.svg"
    if svg.is_file():
        text = svg.read_text(encoding="utf-8")
        text = text[text.find("<svg"):] if "<svg" in text else ""
        out.append(f"<h2>Circuit</h2><figure>{text}</figure>")
    return "\n".join(out)


def _routing(folder: Path) -> str:
    from workbench.models.specs import step_of

    r = _read_json(folder / "routing.json")
    names = [str(c) for c in r["checkpoints"]]
    steps = [step_of(c) for c in names]
    labels = [f"step {s}" if s is not None else c for c, s in zip(names, steps)]
    facts = []
    for layer in r["layers"]:
        sat, top1 = layer["saturation"], layer["saturation_top1"]
        at = next((labels[i] for i, v in enumerate(sat[:-1]) if v is not None and v >= 0.9), None)
        change = [v for v in layer.get("change_rate", []) if v is not None]
        before = len(sat) > 2  # a checkpoint between the first and the final one
        facts.append(f"<b>layer {layer['layer']}</b>: saturation {_num(sat[0])} at {_e(labels[0])}, "
                     + (f"first 0.9 or more at {_e(at)}" if at else
                        (f"{_num(sat[-2])} at {_e(labels[-2])}, " if before else "") + "below 0.9 until the final one")
                     + f"; top-1 saturation {_num(top1[0])}" + (f" -> {_num(top1[-2])}" if before else "")
                     + (f"; change rate vs the previous checkpoint {_num(change[0])}"
                        + (f" first, {_num(change[-1])} last" if len(change) > 1 else "") if change else "")
                     + f"; utilization (Jain) {_num(layer['utilization'][0])} -> {_num(layer['utilization'][-1])}.")
    tokens = r["num_tokens"]
    out = [f"<p>{len(names)} checkpoints (final: {_e(str(r['final']))}), {tokens} token{'s' if tokens != 1 else ''}; "
           "saturation: mean |top-k ∩ final top-k| / k.</p>", "<h2>Findings</h2>", _sentences(facts)]
    for key, title in (("saturation", "Router saturation against the final checkpoint"),
                       ("saturation_top1", "Top-1 saturation (share of tokens whose top-1 is the final one's)"),
                       ("change_rate", "Change rate against the previous checkpoint (1 - top-k overlap)"),
                       ("utilization", "Expert utilization (Jain's index over routed tokens)")):
        rows = [{"checkpoint": lab, **{f"layer {l['layer']}": (l.get(key) or [None] * len(names))[i]
                                       for l in r["layers"]}} for i, lab in enumerate(labels)]
        out += [f"<h2>{title}</h2>", _table(rows)]
    return "\n".join(out)


def _evolution(folder: Path) -> str:
    r = _read_json(folder / "evolution.json")
    rows = [{k: v for k, v in row.items() if k != "composition"} for row in r["rows"]]
    return (f"<p>{len(r['checkpoints'])} checkpoints, {r['n_facts']} facts.</p><h2>Circuits by checkpoint</h2>"
            + _table(rows, ["spec", "hit_at_10_full", "hit_at_10_circuit", "gap", "faithfulness",
                            "edge_jaccard_final", "node_jaccard_final"]))
