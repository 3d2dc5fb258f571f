"""Write a profile to disk: profile.json, one parquet table per section, PNG and HTML plots, run.json.

Every file is written to a temporary name and renamed, so no file is ever half-written; if writing
fails part-way (disk full, ...), the files this call already wrote are removed again, so a failed
write leaves no partial output set. ``profile.json`` is written last: its presence means the run
finished. It depends only on the model, prompts and options (byte-identical across runs, resumed
runs and rank counts); wall time and how the run was executed go to ``run.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from workbench.errors import WorkbenchError
from workbench.io import atomic_path, round_floats, write_json


# What the app's Profile page and the reports (:func:`write`, ``workbench report``) read from every profile;
# router, sinks, Q/K values and domain specialization are optional sections (what experts.profile.profile writes
# depends on the model and options).
SECTIONS = {"experts": list, "meta": dict, "super_experts": list, "super_expert_rule": dict,
            "massive_activations": dict}
ENTRY_KEYS = {"experts": ("layer", "expert", "kind", "max_abs", "channel", "position"),
              "super_experts": ("layer", "expert", "kind"),
              "massive_activations.layers": ("layer", "median_abs", "top")}


def _entries(items, name: str) -> str | None:
    """What is wrong with a list whose entries must each be an object with ``ENTRY_KEYS[name]``, or None."""
    if not isinstance(items, list):
        return f"no '{name}' list"
    for i, e in enumerate(items):
        if not isinstance(e, dict):
            return f"{name}[{i}] is not an object"
        missing = [k for k in ENTRY_KEYS[name] if k not in e]
        if missing:
            return f"{name}[{i}] has no {', '.join(missing)}"
    return None


def _problem(p) -> str | None:
    """The first thing the page or the report builder would miss in ``p``, or None."""
    if not isinstance(p, dict):
        return f"a JSON {type(p).__name__}, not an object"
    missing = [k for k in SECTIONS if k not in p]
    if missing:
        return f"missing {', '.join(missing)}"
    for k, t in SECTIONS.items():
        if not isinstance(p[k], t):
            return f"'{k}' is not a JSON {'object' if t is dict else 'list'}"
    for name in ENTRY_KEYS:
        top, _, sub = name.partition(".")
        bad = _entries(p[top].get(sub) if sub else p[top], name)
        if bad:
            return bad
    n = p["meta"].get("num_layers")
    if not isinstance(n, int):
        return "meta has no num_layers" if n is None else "meta.num_layers is not an integer"
    if not any(e["kind"] != "shared" for e in p["experts"]):
        return "'experts' holds no routed or dense expert"
    for i, e in enumerate(p["experts"]):
        if not (isinstance(e["layer"], int) and 0 <= e["layer"] < n and isinstance(e["expert"], int)
                and e["expert"] >= 0):
            return f"experts[{i}] is layer {e['layer']!r}, expert {e['expert']!r}; meta.num_layers is {n}"
    return None


def check_profile(p, where: str) -> dict:
    """``p`` if it holds everything the app and the reports read, else a WorkbenchError naming what is missing."""
    problem = _problem(p)
    if problem is not None:
        raise WorkbenchError(f"{where}: not a profile.json ({problem})")
    return p


def tables(p: dict) -> dict[str, pd.DataFrame]:
    """The profile's sections as flat tables."""
    super_keys = {(e["layer"], e["expert"], e["kind"]) for e in p["super_experts"]}
    experts = pd.DataFrame(p["experts"])
    experts["is_super"] = [(r.layer, r.expert, r.kind) in super_keys for r in experts.itertuples()]
    out = {"experts": experts}
    if "router" in p:
        rows = []
        for layer in p["router"]:
            for e, (load, prob) in enumerate(zip(layer["load"], layer["mean_prob"])):
                rows.append({"layer": layer["layer"], "expert": e, "load": load, "mean_prob": prob,
                             "count": layer["counts"][e]})
        out["router_load"] = pd.DataFrame(rows)
        out["router_layers"] = pd.DataFrame([flat({k: v for k, v in layer.items()
                                                    if k not in ("load", "mean_prob", "counts", "coactivation")})
                                             for layer in p["router"]])
    out["massive_activations"] = pd.DataFrame(
        [{"layer": l["layer"], "rank": i, "median_abs": l["median_abs"], **t}
         for l in p["massive_activations"]["layers"] for i, t in enumerate(l["top"])])
    if "attention_sinks" in p:
        s = p["attention_sinks"]
        out["attention_sinks"] = pd.DataFrame(
            [{"layer": l, "head": h, "share_pos0": v, "share_top": s["share_top"][l][h],
              "top_is_pos0": s["top_is_pos0"][l][h]}
             for l, heads in enumerate(s["share_pos0"]) for h, v in enumerate(heads)])
    if "qk_values" in p:
        out["qk_values"] = qk_table(p["qk_values"])
    if "domain_specialization" in p:
        out["domain_specialization"] = pd.DataFrame(
            [{"layer": l["layer"], "domain": d, "expert": e, "share": v, "ratio": l["ratio"][d][e]}
             for l in p["domain_specialization"]["layers"] for d in l["share"] for e, v in enumerate(l["share"][d])])
    return out


def flat(d: dict, prefix: str = "") -> dict:
    """Nested dicts as one level: {"srp": {"4": {"f1": x}}} -> {"srp_4_f1": x}."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}_"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def qk_table(q: dict) -> pd.DataFrame:
    """Every (layer, proj, head, dim) norm of ``qk_values``, its ratio to the head's median, and the rotary pair."""
    import numpy as np

    pairs, rows = q["pair_of_dim"], []
    for proj, layers in q["norms"].items():
        for layer, heads in enumerate(layers):
            for head, dims in enumerate(heads or []):
                med = float(np.median(dims)) or float("nan")
                for dim, norm in enumerate(dims):
                    pair = pairs[dim] if proj != "v" and dim < len(pairs) else None
                    rows.append({"layer": layer, "proj": proj, "head": head, "dim": dim, "norm": norm,
                                 "ratio": norm / med, "pair": pair})
    return pd.DataFrame(rows, columns=["layer", "proj", "head", "dim", "norm", "ratio", "pair"])


OUTPUTS = ("profile.json", "run.json", "*.parquet", "*.png", "*.html")  # what write() may produce
TIMING = ("seconds",)  # meta fields that differ between identical runs: they go to run.json


def split(p: dict) -> tuple[dict, dict]:
    """``(deterministic profile, run facts)``: the second holds wall time and execution details."""
    det = {k: v for k, v in p.items() if k != "run"}
    det["meta"] = {k: v for k, v in p["meta"].items() if k not in TIMING}
    run = {**{k: p["meta"][k] for k in TIMING if k in p["meta"]}, **p.get("run", {})}
    return det, run


def write(p: dict, out_dir: str | Path, plots: bool = True) -> list[Path]:
    out = Path(out_dir)
    det, run = split(p)
    det = round_floats(det)  # tables and plots show exactly the numbers of profile.json
    existed = out.exists()
    before = _snapshot(out)
    stale = _listed_outputs(out)  # what the last profile written here produced
    written: list[Path] = []
    try:
        for name, df in tables(det).items():
            with atomic_path(out / f"{name}.parquet") as tmp:
                df.to_parquet(tmp, index=False)
            written.append(out / f"{name}.parquet")
        if plots:
            from workbench.experts import plots as P

            written += P.write_all(det, out)
        # run.json lists the outputs, so a later profile into this folder removes those it does not write again
        run = {**run, "outputs": sorted([f.name for f in written] + ["run.json", "profile.json"])}
        written.append(write_json(out / "run.json", run))
        written.append(write_json(out / "profile.json", det))  # last: its presence means the run finished
    except BaseException:
        for f, ino in _snapshot(out).items():  # no partial output set: remove every file this call wrote
            if before.get(f) != ino:
                f.unlink(missing_ok=True)
        if not existed and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
    for name in stale - {f.name for f in written}:  # the previous run's plots and tables that this one has not
        (out / name).unlink(missing_ok=True)        # (a report would show them as this run's)
    return written


def _listed_outputs(out: Path) -> set[str]:
    """File names the profile last written to ``out`` listed in its run.json (none when there is none)."""
    try:
        names = json.loads((out / "run.json").read_text()).get("outputs", [])
    except (OSError, ValueError, AttributeError):
        return set()
    # plain names of this folder only: a hand-edited list cannot reach elsewhere
    return {n for n in names if isinstance(n, str) and n == Path(n).name and n not in ("", ".", "..")}


def _snapshot(out: Path) -> dict[Path, int]:
    """Output files and their inodes (an atomic rename gives a replaced file a new inode)."""
    return {f: f.stat().st_ino for pat in OUTPUTS for f in out.glob(pat) if f.is_file()} if out.is_dir() else {}
