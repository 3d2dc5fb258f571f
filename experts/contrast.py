"""Experts for a behaviour (MoTE's fTRI idea): which experts the router picks more on positive prompts.

For every prompt and MoE layer we record each expert's routing frequency (share of the prompt's
tokens whose top-k includes it) and mean routing probability. Experts are ranked by the difference
of mean frequency, positive minus negative, with Welch's t-test over prompts as the significance
figure (``p_value``, and ``q_value``: adjusted for the number of experts tested). The top of the list is a ready
intervention set.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Sequence

import pandas as pd
import torch

from workbench.errors import WorkbenchError
from workbench.interventions import Intervention
from workbench.tracing.reducers import Payload, broken_rows, routing_distribution
from workbench.tracing.runner import tokenize, trace
from workbench.tracing.sites import Component, all_sites


class PerPromptRouting:
    """Sink for one router site: per-prompt expert counts and summed routing probabilities."""

    def __init__(self, token_prompt: torch.Tensor, num_prompts: int, num_experts: int, scoring: str = "softmax"):
        if scoring not in ("softmax", "sigmoid"):
            raise ValueError(f"router scoring must be 'softmax' or 'sigmoid', not {scoring!r}")
        self.token_prompt = token_prompt
        self.scoring = scoring  # the family's own (DeepSeek-V3, GLM-4.5: sigmoid), as the profile's mean_prob reads it
        self.counts = torch.zeros(num_prompts, num_experts, dtype=torch.float64)
        self.prob = torch.zeros(num_prompts, num_experts, dtype=torch.float64)
        self.tokens = torch.zeros(num_prompts, dtype=torch.float64)
        self.nonfinite = 0  # tokens whose router logits were not finite (an overflow upstream): left out

    def update(self, p: Payload) -> None:
        values, topk, tokens = p.values.detach().cpu().double(), p.topk.cpu().to(torch.int64), p.tokens.cpu()
        bad = broken_rows(values)  # (-inf is a masked expert)
        if bad is not None:  # their probabilities are NaN and their top-k arbitrary
            self.nonfinite += int(bad.sum())
            values, topk, tokens = values[~bad], topk[~bad], tokens[~bad]
        prompt = self.token_prompt[tokens]
        onehot = torch.zeros(values.shape, dtype=torch.float64)
        onehot.scatter_(1, topk, 1.0)
        self.counts.index_add_(0, prompt, onehot)
        self.prob.index_add_(0, prompt, routing_distribution(values, self.scoring))
        self.tokens.index_add_(0, prompt, torch.ones(len(prompt), dtype=torch.float64))


def routing_by_prompt(lm, prompts: Sequence[str], batch_size: int = 8, progress: bool = True) -> dict:
    """{layer: (frequency [P, E], probability [P, E])} for every MoE layer."""
    ids = tokenize(lm, prompts)
    token_prompt = torch.repeat_interleave(torch.arange(len(ids)), torch.tensor([len(x) for x in ids]))
    sites = all_sites(lm.adapter, lm.model, [Component.ROUTER])
    infos = lm.layer_infos()
    sinks = {s: [PerPromptRouting(token_prompt, len(ids), infos[s.layer].num_experts, lm.adapter.router_scoring)]
             for s in sites}
    trace(lm, prompts, sites, reducers=(), batch_size=batch_size, progress=progress, sinks=sinks)
    lost = {s.layer: r.nonfinite for s, (r,) in sinks.items() if r.nonfinite}
    if lost:
        warnings.warn(f"{max(lost.values())} token(s) had non-finite router logits (an overflow upstream, e.g. in "
                      f"float16) in layer(s) {', '.join(map(str, lost))}: left out of the frequencies and "
                      "probabilities", stacklevel=2)
    out = {}
    for s, (r,) in sinks.items():
        n = r.tokens.clamp(min=1)[:, None]
        out[s.layer] = (r.counts / n, r.prob / n)
    return out


def _welch(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Welch's t and two-sided p, in float64; a group whose values are all equal has variance exactly 0, a group
    of one value has no variance estimate (NaN, NaN).

    Written out rather than ``scipy.stats.ttest_ind``, which warns ("catastrophic cancellation") whenever a
    group is constant, and experts routed on every token of every prompt are common at large top-k.
    """
    from scipy import stats

    a, b = a.double(), b.double()
    if a.numel() < 2 or b.numel() < 2:  # no variance to estimate from one prompt: no test
        return math.nan, math.nan
    va = 0.0 if a.max() == a.min() else float(a.var()) / a.numel()
    vb = 0.0 if b.max() == b.min() else float(b.var()) / b.numel()
    diff = float(a.mean() - b.mean())
    if va + vb == 0.0:
        return (math.copysign(math.inf, diff) if diff else 0.0), (0.0 if diff else 1.0)
    t = diff / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (a.numel() - 1) + vb ** 2 / (b.numel() - 1))
    return t, float(2 * stats.t.sf(abs(t), df))


def contrast(lm, positive: Sequence[str], negative: Sequence[str], batch_size: int = 8,
             progress: bool = True) -> pd.DataFrame:
    """One row per (layer, expert), sorted by frequency difference (positive - negative), largest first."""
    from workbench.data import check_prompts

    if not any(i.kind == "moe" for i in lm.layer_infos()):
        raise WorkbenchError(f"{lm.spec} is a dense model: contrast ranks routed experts and needs an MoE model")
    # once each: a generator was read by the tokenizer, then found empty by the trace ("no prompts given")
    positive, negative = check_prompts(positive, "positive"), check_prompts(negative, "negative")
    return rank(routing_by_prompt(lm, positive, batch_size, progress),
                routing_by_prompt(lm, negative, batch_size, progress))


def rank(pos: dict, neg: dict) -> pd.DataFrame:
    """Rank experts from two ``routing_by_prompt`` results."""
    rows = []
    for layer in pos:
        (fp, pp), (fn, pn) = pos[layer], neg[layer]
        for e in range(fp.shape[1]):
            t, p = _welch(fp[:, e], fn[:, e])
            rows.append({"layer": layer, "expert": e, "freq_pos": float(fp[:, e].mean()),
                         "freq_neg": float(fn[:, e].mean()), "freq_diff": float(fp[:, e].mean() - fn[:, e].mean()),
                         "prob_pos": float(pp[:, e].mean()), "prob_neg": float(pn[:, e].mean()),
                         "prob_diff": float(pp[:, e].mean() - pn[:, e].mean()), "t": t, "p_value": p})
    df = pd.DataFrame(rows)
    df["q_value"] = q_values(df.p_value.to_numpy())
    df = df.sort_values(["freq_diff", "layer", "expert"], ascending=[False, True, True])
    df["rank"] = range(1, len(df) + 1)
    return df.reset_index(drop=True)


def q_values(p):
    """Benjamini-Hochberg adjusted p-values over every test made (each routed expert of every layer is one): an
    expert with q <= 0.05 is a discovery at a false discovery rate of 5 %. Many experts are tested, so a p-value
    of 0.01 alone is expected of one expert in a hundred that routes alike on both sides. NaN p (no test) stays
    NaN and is not counted."""
    import numpy as np
    from scipy.stats import false_discovery_control

    p = np.asarray(p, dtype=float)
    q = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        q[ok] = false_discovery_control(p[ok], method="bh")
    return q


def top_interventions(df: pd.DataFrame, k: int, op: str = "drop") -> list[Intervention]:
    """The top ``k`` rows of the ranking ``df`` (every routed expert) as ``op`` interventions. ``drop`` leaves each
    layer one expert to route to (dropping all is refused): a layer's last expert in the top k is left out, said."""
    from workbench.tracing.runner import check_number

    k = check_number("k", k)  # (-1 gave every row but the last: pandas' head(-1))
    rows = df.head(k)
    if k > len(df):
        warnings.warn(f"--top {k}: the model has {len(df)} routed experts; the set takes all of them", stacklevel=2)
    if op == "drop":
        left = df.groupby("layer").size().to_dict()
        keep, skipped = [], []
        for r in rows.itertuples():
            if left[r.layer] == 1:
                skipped.append(f"L{r.layer} E{r.expert}")
                continue
            left[r.layer] -= 1
            keep.append(r)
        if skipped:
            warnings.warn(f"drop leaves a layer one expert to route to: {', '.join(skipped)} left out of the set "
                          "(--op zero silences every expert)", stacklevel=2)
        rows = pd.DataFrame(keep)
    return [Intervention(op, (int(r.layer),), expert=int(r.expert)) for r in rows.itertuples()]


def write(df: pd.DataFrame, out: Path, k: int, op: str, made_from: str = "") -> list[Path]:
    """The outputs; ``made_from`` (model, dtype, prompts) heads interventions.yaml as a comment."""
    import yaml

    from workbench.io import atomic_path, write_text

    out = Path(out)
    with atomic_path(out / "contrast.parquet") as tmp:
        df.to_parquet(tmp, index=False)
    with atomic_path(out / "contrast.csv") as tmp:
        df.to_csv(tmp, index=False)
    ivs = top_interventions(df, k, op)
    study = {"name": "contrast-top-experts", "conditions": [
        {"name": f"{op} top {len(ivs)} contrast experts", "interventions": [iv.to_dict() for iv in ivs]}]}
    write_text(out / "interventions.yaml", (f"# {made_from}\n" if made_from else "")
               + yaml.safe_dump(study, sort_keys=False))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = df.head(20)
    fig, ax = plt.subplots(figsize=(7, 5), dpi=100)
    ax.barh([f"L{r.layer} E{r.expert}" for r in top.itertuples()], top.freq_diff, color="tab:green")
    ax.invert_yaxis()
    ax.set_xlabel("routing frequency, positive - negative")
    ax.set_title("experts routed more on the positive prompts")
    fig.tight_layout()
    with atomic_path(out / "contrast.png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return [out / n for n in ("contrast.parquet", "contrast.csv", "interventions.yaml", "contrast.png")]
