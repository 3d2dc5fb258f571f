"""Write a profile to disk: profile.json, one parquet table per section, PNG and HTML plots.

Every file is written to a temporary name and renamed, so a failed run leaves no half-written output.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from workbench.io import atomic_path, write_json


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
        out["router_layers"] = pd.DataFrame([{k: v for k, v in layer.items()
                                              if k not in ("load", "mean_prob", "counts", "coactivation")}
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
    return out


def write(p: dict, out_dir: str | Path, plots: bool = True) -> list[Path]:
    out = Path(out_dir)
    written = []
    for name, df in tables(p).items():
        with atomic_path(out / f"{name}.parquet") as tmp:
            df.to_parquet(tmp, index=False)
        written.append(out / f"{name}.parquet")
    if plots:
        from workbench.experts import plots as P

        written += P.write_all(p, out)
    written.append(write_json(out / "profile.json", p))  # last: its presence means the run finished
    return written
