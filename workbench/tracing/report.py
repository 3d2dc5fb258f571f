"""Turn a :class:`TraceResult` into plain JSON-able data (what ``workbench trace`` writes)."""

from __future__ import annotations

from workbench.tracing.runner import TraceResult


def trace_summary(result: TraceResult, tokenizer, top: int = 20) -> dict:
    """Per-site reducer results, and the ``top`` sites by absmax with where it happened."""
    sites = {}
    peaks = []
    for site, reds in sorted(result.reducers.items()):
        entry = {kind: r.result() for kind, r in reds.items()}
        if "absmax" in entry:
            a = entry["absmax"]
            loc = result.locate(a["token"])
            text = tokenizer.decode([loc["token_id"]]) if loc["token_id"] is not None else None
            a.update(prompt_index=loc["prompt_index"], position=loc["position"], token_text=text)
            if a["max_abs"] == a["max_abs"]:  # not NaN
                peaks.append({"site": site.key, **a})
        sites[site.key] = entry
    peaks.sort(key=lambda p: (-p["max_abs"], p["site"]))
    return {"meta": result.meta, "top_absmax": peaks[:top], "sites": sites}
