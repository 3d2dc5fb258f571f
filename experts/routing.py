"""Routing across training checkpoints: router saturation, change rate and expert utilization.

Definitions (per MoE layer; a token's top-k set is the experts its router chose, in score order):

* **saturation** of checkpoint t: mean over tokens of ``|TopK_t ∩ TopK_final| / k``, the final
  checkpoint being the last one given (OLMoE, Muennighoff et al. 2024, "router saturation", sec. 5.1
  and Fig. 7; FLAME-MoE's ``router_saturation_step2.py`` computes the same overlap). ``saturation_top1``:
  the share of tokens whose top-1 expert is the final checkpoint's top-1.
* **change rate** between consecutive checkpoints t-1 and t: ``1 - mean |TopK_{t-1} ∩ TopK_t| / k``
  ("router change rate", "On DeepSeekMoE: Statistical Benefits of Shared Experts and Normalized
  Sigmoid Gating"); null for the first checkpoint.
* **utilization**: Jain's fairness index of the per-expert load ``p`` (top-k slots per expert),
  ``(sum p)^2 / (E * sum p^2)``: 1 when every expert gets the same load, 1/E when one gets all.

How it runs: checkpoints are loaded one after another (never two in memory); each runs the same
prompts in the same batches, and its router choices go to disk as int16 ``[tokens, k]`` per layer,
written at the tokens' global indices (``os.pwrite``), so memory does not grow with the token count.
The comparison then streams the files in fixed chunks. Checkpoints must share the tokenizer (same
token ids), the MoE layers and each layer's expert count and k; anything else is a one-line error.
"""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from workbench.errors import WorkbenchError
from workbench.experts.router import score_order
from workbench.models.specs import check_series, step_of
from workbench.tracing.reducers import ExpertCounts, Payload, jain

CHUNK = 1 << 16  # tokens per comparison chunk


def overlap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per row, ``|A ∩ B|`` of two ``[n, k]`` integer sets (each row's entries distinct)."""
    return (a[:, :, None] == b[:, None, :]).any(-1).sum(-1)


class ChoiceRecorder:
    """A router-site sink that writes each token's score-ordered top-k to ``path`` (int16, [tokens, k])."""

    def __init__(self, path: Path, k: int):
        self.path, self.k = Path(path), k
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)

    def update(self, p: Payload) -> None:
        rows = score_order(p).cpu()
        if rows.shape[1] != self.k:
            raise WorkbenchError(f"router chose {rows.shape[1]} experts per token, expected {self.k}")
        tokens = p.tokens.cpu()
        if not tokens.numel():
            return
        data = rows.to(torch.int16).numpy()
        t = tokens.to(torch.int64).numpy()
        # one write per run of consecutive tokens: a batch's prompts, or the whole payload when they follow on
        cuts = [0, *(np.flatnonzero(t[1:] != t[:-1] + 1) + 1).tolist(), len(t)]
        for a, b in zip(cuts, cuts[1:]):
            os.pwrite(self.fd, data[a:b].tobytes(), int(t[a]) * self.k * 2)

    def close(self) -> None:
        os.close(self.fd)


def record(lm, prompts: Sequence[str], folder: Path, *, batch_size: int = 8, max_tokens: int | None = None,
           progress: bool = False) -> dict:
    """Run ``prompts`` through ``lm`` and write every MoE layer's router choices under ``folder``.

    Returns what the comparison needs: the token ids, the MoE layers with their expert count and k,
    and each layer's expert load.
    """
    from workbench.tracing.runner import trace
    from workbench.tracing.sites import Component, all_sites

    sites = all_sites(lm.adapter, lm.model, [Component.ROUTER])
    if not sites:
        raise WorkbenchError(f"{lm.spec} has no MoE router: routing compares the router choices of MoE checkpoints")
    infos = lm.layer_infos()
    layers = {s.layer: (infos[s.layer].num_experts, infos[s.layer].top_k) for s in sites}
    folder.mkdir(parents=True, exist_ok=True)
    recorders = {s: ChoiceRecorder(folder / f"layer{s.layer}.i16", layers[s.layer][1]) for s in sites}
    counts = {s: ExpertCounts(num_experts=layers[s.layer][0]) for s in sites}
    try:
        res = trace(lm, prompts, sites, reducers=(), batch_size=batch_size, max_tokens=max_tokens,
                    progress=progress, sinks={s: [counts[s], recorders[s]] for s in sites})
    finally:
        for r in recorders.values():
            r.close()
    return {"token_ids": res.token_ids, "layers": layers, "context": lm.context_length,
            "architecture": type(lm.model).__name__,
            "load": {s.layer: counts[s].counts.to(torch.float64) for s in sites},
            "nonfinite": max((int(c.nonfinite) for c in counts.values()), default=0)}


def _read(path: Path, k: int, start: int, n: int) -> torch.Tensor:
    a = np.fromfile(path, dtype=np.int16, count=n * k, offset=start * k * 2)
    return torch.from_numpy(a.astype(np.int64)).view(-1, k)


def compare(folders: Sequence[Path], layers: dict[int, tuple[int, int]], n_tokens: int) -> dict[int, dict]:
    """Saturation (vs the last folder), top-1 saturation and change rate (vs the previous folder) per layer."""
    out = {}
    last = len(folders) - 1
    for layer, (_, k) in sorted(layers.items()):
        sat = [0.0] * len(folders)
        sat1 = [0.0] * len(folders)
        kept = [0.0] * len(folders)  # overlap with the previous checkpoint
        for start in range(0, n_tokens, CHUNK):
            n = min(CHUNK, n_tokens - start)
            final = _read(folders[last] / f"layer{layer}.i16", k, start, n)
            prev = None
            for i, f in enumerate(folders):
                cur = final if i == last else _read(f / f"layer{layer}.i16", k, start, n)
                sat[i] += float(overlap(cur, final).sum()) / k
                sat1[i] += float((cur[:, 0] == final[:, 0]).sum())
                if prev is not None:
                    kept[i] += float(overlap(cur, prev).sum()) / k
                prev = cur
        n = max(n_tokens, 1)
        out[layer] = {"saturation": [s / n for s in sat], "saturation_top1": [s / n for s in sat1],
                      "change_rate": [None] + [1.0 - s / n for s in kept[1:]]}
    return out


def routing(specs: Sequence[str], prompts: Sequence[str], *, load: Callable[[str], object], batch_size: int = 8,
            max_tokens: int | None = None, progress: bool = False, workdir: str | Path | None = None) -> dict:
    """Router saturation, change rate and utilization over checkpoints ``specs`` (training order, last = final).

    ``load(spec)`` returns a LoadedModel; each checkpoint is loaded, recorded and freed before the next.
    Returns ``{"checkpoints": [...], "num_tokens": N, "layers": [{"layer", "saturation", "saturation_top1",
    "change_rate", "utilization", "num_experts", "top_k"}, ...]}``.
    """
    from workbench.data import check_prompts

    if isinstance(specs, str):
        raise WorkbenchError("specs must be a list of checkpoint specs, not one string: wrap them in a list")
    specs = list(specs)
    prompts = check_prompts(prompts)  # read once: every checkpoint runs the same prompts
    check_series(specs, "routing")
    if workdir is not None and not Path(workdir).is_dir():  # (tempfile's NotADirectoryError / FileNotFoundError)
        raise WorkbenchError(f"workdir {workdir} is not a folder" + (" (it is a file)" if Path(workdir).exists() else
                                                                     " (it does not exist)"))
    tmp = Path(tempfile.mkdtemp(prefix="workbench-routing-", dir=workdir))
    try:
        first = None
        folders, loads = [], []
        for i, spec in enumerate(specs):
            lm = load(spec)
            try:
                rec = record(lm, prompts, tmp / f"ckpt{i}", batch_size=batch_size, max_tokens=max_tokens,
                             progress=progress)
            finally:
                del lm
                gc.collect()
            if first is None:
                first = rec
            else:
                _check_compatible(specs[0], first, spec, rec)
            folders.append(tmp / f"ckpt{i}")
            loads.append(rec["load"])
            if rec["nonfinite"]:  # their choices are recorded as the model made them, from NaN scores: arbitrary
                warnings.warn(f"{spec}: {rec['nonfinite']} token(s) had non-finite router logits (an overflow "
                              "upstream, e.g. in float16); their expert choices are arbitrary and are counted",
                              stacklevel=2)
        layers = first["layers"]
        metrics = compare(folders, layers, int(first["token_ids"].numel()))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = []
    for layer, (e, k) in sorted(layers.items()):
        rows.append({"layer": layer, "num_experts": e, "top_k": k, **metrics[layer],
                     "utilization": [jain(ld[layer]) for ld in loads]})
    return {"checkpoints": list(specs), "num_tokens": int(first["token_ids"].numel()), "num_prompts": len(prompts),
            "final": specs[-1], "layers": rows}


def _check_compatible(spec0: str, a: dict, spec: str, b: dict) -> None:
    if a.get("architecture") != b.get("architecture"):  # two models that happen to share layers, experts and tokenizer
        warnings.warn(f"{spec} is a {b.get('architecture')}, {spec0} a {a.get('architecture')}: the routers compared "
                      "are of two models, not checkpoints of one", stacklevel=3)
    if set(a["layers"]) != set(b["layers"]):
        raise WorkbenchError(f"{spec} has MoE layers {sorted(b['layers'])}, {spec0} has {sorted(a['layers'])}: "
                             "checkpoints of one series must have the same layers")
    for layer, (e, k) in a["layers"].items():
        if b["layers"][layer] != (e, k):
            e2, k2 = b["layers"][layer]
            raise WorkbenchError(f"layer {layer}: {spec} routes top-{k2} of {e2} experts, {spec0} top-{k} of {e}: "
                                 "checkpoints of one series must have the same experts")
    if torch.equal(a["token_ids"], b["token_ids"]):
        return
    if a.get("context") != b.get("context"):
        raise WorkbenchError(f"{spec} has a context of {b.get('context')} tokens, {spec0} of {a.get('context')}, and "
                             "prompts longer than the shorter one are cut to it: checkpoints of one series must have "
                             "the same context (or give --max-tokens within both)")
    raise WorkbenchError(f"{spec} tokenizes the prompts differently from {spec0}: checkpoints of one series must "
                         "share the tokenizer")


def table(result: dict):
    """One row per (layer, checkpoint): the long table behind ``routing.parquet``."""
    import pandas as pd

    rows = []
    for layer in result["layers"]:
        for i, spec in enumerate(result["checkpoints"]):
            rows.append({"layer": layer["layer"], "checkpoint": i, "spec": spec, "step": step_of(spec),
                         "saturation": layer["saturation"][i], "saturation_top1": layer["saturation_top1"][i],
                         "change_rate": layer["change_rate"][i], "utilization": layer["utilization"][i]})
    return pd.DataFrame(rows)


def plot(result: dict, path: Path) -> None:
    """Saturation, top-1 saturation, change rate and utilization against the checkpoint, one line per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = table(result)
    steps = df["step"].notna().all()
    x = "step" if steps else "checkpoint"
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    for ax, col, title in zip(axes, ["saturation", "saturation_top1", "change_rate", "utilization"],
                              ["router saturation (top-k vs final)", "saturation, top-1", "change rate vs previous",
                               "utilization (Jain's index)"]):
        for layer, g in df.groupby("layer"):
            ax.plot(g[x], g[col].astype(float), marker="o", ms=3, label=f"L{layer}")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("training step" if steps else "checkpoint (training order)")
        if steps and df["step"].max() > 20 * max(1, df["step"][df["step"] > 0].min()):
            ax.set_xscale("symlog", linthresh=max(1, int(df["step"][df["step"] > 0].min())))
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(result: dict, out_dir: str | Path, plots: bool = True) -> list[Path]:
    """routing.parquet, routing.png and routing.json (written last: its presence means the run finished)."""
    from workbench.io import write_result_set

    return write_result_set(out_dir, "routing", result, table(result),
                            (lambda path: plot(result, path)) if plots else None)


def domain_specialization(lm, domains: dict[str, Sequence[str]], *, batch_size: int = 8,
                          max_tokens: int | None = None) -> dict:
    """Domain specialization (OLMoE, Muennighoff et al. 2024, sec. 5.2): for each domain D (a prompt set) and
    expert e of each MoE layer, the share of D's tokens whose top-k contains e, next to the uniform k/E.

    Returns ``{"domains": [names], "layers": [{"layer", "uniform", "share": {D: [E]}, "ratio": {D: [E]},
    "max_ratio": {D: float}}]}`` (ratio = share / uniform; 1 everywhere when routing ignores the domain).
    """
    from workbench.tracing.runner import trace
    from workbench.tracing.sites import Component, all_sites

    domains = check_domains(domains)
    if not domains:
        raise WorkbenchError("no domains given: domain specialization compares at least one prompt set")
    sites = all_sites(lm.adapter, lm.model, [Component.ROUTER])
    if not sites:
        raise WorkbenchError(f"{lm.spec} has no MoE router: domain specialization needs a MoE model")
    infos = lm.layer_infos()
    shares: dict[str, dict[int, list[float]]] = {}
    for name, prompts in domains.items():
        counts = {s: ExpertCounts(num_experts=infos[s.layer].num_experts) for s in sites}
        trace(lm, prompts, sites, reducers=(), batch_size=batch_size, max_tokens=max_tokens, progress=False,
              sinks={s: [counts[s]] for s in sites})
        shares[name] = {s.layer: (counts[s].counts.to(torch.float64) / max(int(counts[s].tokens), 1)).tolist()
                        for s in sites}
    layers = []
    for s in sites:
        e, k = infos[s.layer].num_experts, infos[s.layer].top_k
        uniform = k / e
        share = {d: shares[d][s.layer] for d in domains}
        ratio = {d: [v / uniform for v in share[d]] for d in domains}
        layers.append({"layer": s.layer, "uniform": uniform, "share": share, "ratio": ratio,
                       "max_ratio": {d: max(ratio[d]) for d in domains}})
    return {"domains": list(domains), "layers": layers}


def check_domains(domains) -> dict[str, list[str]]:
    """``{name: prompts}`` with every name a non-empty string and every prompt set a list of prompts
    (:func:`~workbench.data.check_prompts`: a generator is read here, once); anything else is a one-line error."""
    from workbench.data import check_prompts

    if not isinstance(domains, dict):
        raise WorkbenchError(f"domains must be a dict {{name: list of prompts}}, not {type(domains).__name__}")
    for name in domains:
        if not isinstance(name, str) or not name.strip():
            raise WorkbenchError(f"domains: every name must be a non-empty string, got {name!r}")
    return {name: check_prompts(prompts, f"domain {name!r}") for name, prompts in domains.items()}


def parse_domains(items: Sequence[str] | None) -> dict[str, list[str]]:
    """``NAME=FILE`` arguments -> {name: prompts}; a malformed item or unreadable file is a one-line error."""
    from workbench.data import read_prompts

    out: dict[str, list[str]] = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise WorkbenchError(f"--domains takes NAME=FILE (a prompts file per domain), got {item!r}")
        if name.strip() in out:
            raise WorkbenchError(f"--domains names {name.strip()!r} twice")
        if any(c in name for c in "/\\") or name.strip().startswith(".") or not name.strip().isprintable():
            raise WorkbenchError(f"--domains name {name.strip()!r} names a plot file (domain_NAME.png): use no path "
                                 "separators, no leading dot")
        out[name.strip()] = read_prompts(path.strip())
    return out
