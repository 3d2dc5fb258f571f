"""The Super-Experts selection rule (Su et al.), applied to per-expert max |down_proj output|.

Candidates are the routed, shared (and, for dense models, dense-MLP) experts of the first
``round(layer_fraction * num_layers)`` layers. An expert is *super* when its max |down_proj output|
over all tokens routed to it is above the ``quantile``-th percentile of all candidates' maxima and
above ``ratio`` x the largest maximum.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class SuperExpertRule:
    quantile: float = 99.5
    ratio: float = 0.1
    layer_fraction: float = 0.75

    def __post_init__(self):
        if not 0 < self.quantile <= 100 or not 0 <= self.ratio <= 1 or not 0 < self.layer_fraction <= 1:
            raise ValueError("quantile in (0, 100], ratio in [0, 1], layer_fraction in (0, 1]")

    def as_dict(self) -> dict:
        return asdict(self)


def select(experts: list[dict], num_layers: int, rule: SuperExpertRule) -> tuple[list[dict], dict]:
    """``experts``: dicts with at least ``layer`` and ``max_abs``. Returns (super experts largest first, facts)."""
    last = round(rule.layer_fraction * num_layers)
    cands = [e for e in experts if e["layer"] < last and not math.isnan(e["max_abs"])]
    if not cands:
        return [], {"candidate_layers": last, "candidates": 0, "threshold": math.nan, "max": math.nan}
    maxima = torch.tensor([e["max_abs"] for e in cands], dtype=torch.float64)
    q = float(torch.quantile(maxima, rule.quantile / 100.0))
    top = float(maxima.max())
    threshold = max(q, rule.ratio * top)
    chosen = [e for e in cands if e["max_abs"] > q and e["max_abs"] > rule.ratio * top]
    chosen.sort(key=lambda e: (-e["max_abs"], e["layer"], e.get("expert", 0)))
    return chosen, {"candidate_layers": last, "candidates": len(cands), "percentile_value": q, "max": top,
                    "threshold": threshold}


def kurtosis(x: torch.Tensor) -> float:
    """Pearson kurtosis (normal = 3) of a 1-D tensor; NaN for fewer than 2 finite values or zero spread."""
    x = x[torch.isfinite(x)].to(torch.float64)
    if x.numel() < 2:
        return math.nan
    d = x - x.mean()
    var = (d * d).mean()
    return float((d ** 4).mean() / (var * var)) if var > 0 else math.nan
