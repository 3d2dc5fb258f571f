"""Super experts (Su et al. 2025): which experts' max |down_proj output| makes them special.

Candidates are the routed and shared experts of the first ``round(layer_fraction * num_layers)``
layers (a dense model's MLPs, expert 0 of kind ``dense``, when the model has no MoE layer; the dense
layers of a mixed model are not candidates, as in the reference script). An expert that saw no token
has no maximum and is not a candidate.

Two rules, both recorded in ``profile.json`` with the numbers behind every verdict:

``paper``
    The reference script's selection (``_identify_super_experts`` in ZunhaiSu/Super-Experts-Profilling):
    max > ``np.percentile(maxima, quantile)`` and max > ``max(maxima) // (1 / ratio)`` (a floor division:
    ``np.max(v) // 10`` there). With 24-256 candidates the 99.5th percentile interpolates just below the
    largest maximum, so this rule names the largest expert of every model, random ones included.
``default``
    The paper's conditions, and what makes the finding real:

    * *stands out*: the candidate is in the group of largest maxima that sits above a gap, i.e. its
      maximum is at least ``median_factor`` x the median candidate maximum and at least ``next_factor`` x
      the largest maximum below it outside that group (the "next" expert);
    * *feeds a massive activation* (Sun et al.): the residual stream after its layer, in the channel of its
      maximum, reaches at least ``residual_factor`` x that layer's median |residual|. The entry is looked
      up among the layer's kept top entries (``ProfileOptions.top_massive``) and its position is reported
      next to the expert's; the positions are not required to agree, because an expert's largest output
      need not sit where the residual peaks (``zoo:tiny-moe-se`` over the 380 built-in prompts: the planted
      expert peaks at position 1, its massive activation sits at position 0). Sun et al.'s absolute floor
      (100) is not applied because it depends on the model's scale.

    The defaults (10, 3, 30) sit between what random models show and what the planted and real super
    experts show; the README's profiling section lists the measured numbers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

RULES = ("default", "paper")
# What every expert entry of profile.json gets: the number against each condition and the verdicts (None for
# an expert that is not a candidate). Text is made from them on display (:func:`explain`), never stored: a
# formatted number would differ between runs that agree to rounding.
CHECKS = ("candidate", "above_percentile", "above_ratio", "ratio_to_median", "ratio_to_next", "stands_out",
          "residual", "residual_ratio_to_median", "residual_position", "residual_in_top", "feeds_massive", "admitted")
SHOWN = 8  # candidates listed by the CLI and the app: the largest ones, and any the paper's conditions admit


@dataclass(frozen=True)
class SuperExpertRule:
    rule: str = "default"
    quantile: float = 99.5
    ratio: float = 0.1
    layer_fraction: float = 0.75
    median_factor: float = 10.0  # default rule: max >= this x the median candidate maximum ...
    next_factor: float = 3.0  # ... and >= this x the next maximum outside the standing-out group ...
    residual_factor: float = 30.0  # ... and the residual in its channel reaches this x the layer median

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"unknown rule {self.rule!r}; the rules are {', '.join(RULES)}")
        if not 0 < self.quantile <= 100 or not 0 <= self.ratio <= 1 or not 0 < self.layer_fraction <= 1:
            raise ValueError("quantile in (0, 100], ratio in [0, 1], layer_fraction in (0, 1]")
        if not all(f >= 1 for f in (self.median_factor, self.next_factor, self.residual_factor)):
            raise ValueError("median_factor, next_factor and residual_factor must be at least 1")

    def as_dict(self) -> dict:
        return asdict(self)


def candidates(experts: list[dict], num_layers: int, layer_fraction: float) -> tuple[list[dict], int]:
    """The experts the rules look at, and the number of candidate layers."""
    last = round(layer_fraction * num_layers)
    moe = any(e["kind"] != "dense" for e in experts)
    return [e for e in experts if e["layer"] < last and not math.isnan(e["max_abs"])
            and (e["kind"] != "dense" or not moe)], last


def select(experts: list[dict], num_layers: int, rule: SuperExpertRule,
           residual: list[dict] | None = None) -> tuple[list[dict], dict, dict]:
    """``experts``: dicts with ``layer``, ``expert``, ``kind``, ``max_abs``, ``channel``, ``position``.
    ``residual``: the profile's massive-activation layers (``layer``, ``median_abs``, ``top`` entries with
    ``value``, ``channel``, ``position``, ``ratio_to_median``); without it no candidate feeds a massive
    activation. Returns (super experts largest first, rule facts, {(layer, kind, expert): checks} for every
    expert, the :data:`CHECKS` fields)."""
    cands, last = candidates(experts, num_layers, rule.layer_fraction)
    checks = {_key(e): {**dict.fromkeys(CHECKS), "candidate": False} for e in experts}
    facts: dict = {"candidate_layers": last, "candidates": len(cands)}
    if not cands:
        return [], {**facts, "percentile_value": math.nan, "max": math.nan, "ratio_floor": math.nan,
                    "threshold": math.nan, "median": math.nan, "top_ratio_to_median": math.nan,
                    "top_ratio_to_next": math.nan, "standing_out": 0}, checks
    order = sorted(cands, key=lambda e: (-e["max_abs"], e["layer"], e.get("expert", 0)))
    m = np.array([e["max_abs"] for e in order], dtype=np.float64)
    # The paper's two conditions, exactly as the reference computes them. An inf maximum (an fp16 overflow) is the
    # largest value there is: the percentile takes it as the largest finite one, and the floor (0.1 x inf) as that
    # too, so the inf clears both and no finite maximum clears the floor (inf in the arithmetic gave NaN, which
    # every comparison failed: the planted expert that overflowed was dropped)
    finite = m[np.isfinite(m)]
    cap = float(finite.max()) if finite.size else 0.0
    q = float(np.percentile(np.where(np.isposinf(m), cap, m), rule.quantile))
    top = float(m[0])
    floor = (float(top // (1.0 / rule.ratio)) if math.isfinite(top) else cap) if rule.ratio > 0 else 0.0
    med = float(np.median(m))
    # The standing-out group: the k largest, for the largest k whose k-th maximum clears both factors.
    k = 0
    for r in range(len(m) - 1, -1, -1):
        nxt = m[r + 1] if r + 1 < len(m) else 0.0
        if m[r] >= rule.median_factor * med and _ratio(m[r], nxt) >= rule.next_factor:
            k = r + 1
            break
    by_layer = {l["layer"]: l for l in residual or []}
    chosen = []
    for r, e in enumerate(order):
        nxt = m[k] if r < k < len(m) else (m[r + 1] if r + 1 < len(m) else 0.0)  # largest below, outside the group
        v = {"candidate": True, "above_percentile": bool(m[r] > q), "above_ratio": bool(m[r] > floor),
             "ratio_to_median": _ratio(m[r], med), "ratio_to_next": _ratio(m[r], nxt), "stands_out": r < k,
             **_residual(e, by_layer.get(e["layer"]), rule.residual_factor)}
        paper = v["above_percentile"] and v["above_ratio"]
        v["admitted"] = paper if rule.rule == "paper" else paper and v["stands_out"] and v["feeds_massive"]
        checks[_key(e)] = v
        if v["admitted"]:
            chosen.append(e)
    first = checks[_key(order[0])]
    facts.update({"percentile_value": q, "max": top, "ratio_floor": floor, "threshold": max(q, floor),
                  "median": med, "top_ratio_to_median": first["ratio_to_median"],
                  "top_ratio_to_next": _ratio(m[0], m[1]) if len(m) > 1 else math.inf, "standing_out": k})
    return chosen, facts, checks


def shown(p: dict) -> list[dict]:
    """The candidates worth listing, largest first: the :data:`SHOWN` largest, and any the paper's conditions
    admit. Empty for a profile.json written before the checks were recorded."""
    cands = sorted((e for e in p["experts"] if e.get("candidate")),
                   key=lambda e: (-e["max_abs"], e["layer"], e["expert"]))
    return [e for i, e in enumerate(cands) if i < SHOWN or e["admitted"] or (e["above_percentile"] and e["above_ratio"])]


def no_super_experts(p: dict) -> str:
    """What to say when a profile has no super experts: one line, then the largest candidate's verdict."""
    f = p["super_expert_rule"]
    under = " under the paper rule" if f.get("rule") == "paper" else ""
    if not f.get("candidates"):
        return f"no super experts{under} (no expert in the first {f.get('candidate_layers')} layers saw a token)"
    r = f.get("top_ratio_to_median")
    head = f"no super experts{under}" + (f" (largest expert maximum is {_times(r)} the median)" if r is not None else "")
    cands = shown(p)
    if not cands:
        return head
    c = cands[0]
    return f"{head}\n  largest candidate {label(c)} ({c['kind']}): {explain(c, f)}"


def label(e: dict) -> str:
    """``L1.E5``, ``L0.S0`` (shared), ``L11.MLP`` (dense)."""
    tag = {"routed": "E", "shared": "S"}.get(e["kind"])
    return f"L{e['layer']}.{tag}{e['expert']}" if tag else f"L{e['layer']}.MLP"


def _times(x: float) -> str:
    return f"{x:.2g}x" if x < 10 else f"{x:.0f}x"


def _ratio(a: float, b: float) -> float:
    if b > 0:
        return float(a / b)
    return math.inf if a > 0 else math.nan


def _residual(e: dict, layer: dict | None, factor: float) -> dict:
    """The largest residual entry after the expert's layer in the expert's channel, from the layer's kept top
    entries (its position is reported next to the expert's); when the channel has none, the smallest kept
    entry bounds it from above."""
    if layer is None or not layer["top"]:
        return {"residual": None, "residual_ratio_to_median": None, "residual_position": None,
                "residual_in_top": False, "feeds_massive": False}
    same = [t for t in layer["top"] if t["channel"] == e["channel"]]
    t = max(same, key=lambda t: (t["value"], t["position"] == e["position"])) if same else layer["top"][-1]
    return {"residual": t["value"], "residual_ratio_to_median": t["ratio_to_median"],
            "residual_position": t["position"] if same else None, "residual_in_top": bool(same),
            "feeds_massive": bool(same) and t["ratio_to_median"] >= factor}


def explain(e: dict, rule: dict) -> str:
    """One line: the verdict, then each condition with its number and threshold. ``e``: an expert entry of
    profile.json with the checks; ``rule``: its ``super_expert_rule``."""
    yes = lambda ok: "yes" if ok else "no"  # noqa: E731
    if not e.get("candidate"):
        return "not a candidate (outside the candidate layers, a dense layer of a MoE model, or no token routed)"
    need = f"(needs >= {rule['residual_factor']:g}x): {yes(e['feeds_massive'])}"
    if e["residual"] is None:
        res = f"residual after layer {e['layer']} not measured: no"
    elif e["residual_in_top"]:
        where = ("at the expert's position" if e["residual_position"] == e["position"]
                 else f"at pos {e['residual_position']}; the expert's maximum is at pos {e['position']}")
        res = (f"residual in ch {e['channel']} peaks at {e['residual']:.4g} = {e['residual_ratio_to_median']:.3g}x "
               f"the layer median ({where}) {need}")
    else:
        res = (f"residual in ch {e['channel']} <= {e['residual']:.4g} = {e['residual_ratio_to_median']:.3g}x the "
               f"layer median (not among the layer's kept top entries) {need}")
    paper = [f"max {e['max_abs']:.4g} > p{rule['quantile']:g} {rule['percentile_value']:.4g}: "
             f"{yes(e['above_percentile'])}",
             f"> floor({rule['ratio']:g} x largest) {rule['ratio_floor']:.4g}: {yes(e['above_ratio'])}"]
    extra = [f"{e['ratio_to_median']:.3g}x the median (needs >= {rule['median_factor']:g}x), "
             f"{e['ratio_to_next']:.3g}x the next (needs >= {rule['next_factor']:g}x): {yes(e['stands_out'])}", res]
    head = "admitted" if e["admitted"] else "rejected"
    if rule.get("rule") == "paper":
        return f"{head} (paper rule): " + "; ".join(paper) + "; not applied: " + "; ".join(extra)
    return f"{head}: " + "; ".join(paper + extra)


def _key(e: dict) -> tuple:
    return e["layer"], e["kind"], e["expert"]


def kurtosis_rows(x: torch.Tensor) -> list[float]:
    """:func:`kurtosis` of each row of ``x [R, C]`` at once, over each row's finite values. NaN is ``math.nan``
    itself: equal profiles compare equal (NaN is only equal to itself)."""
    x = x.to(torch.float64)
    finite = torch.isfinite(x)
    n = finite.sum(-1)
    x = torch.where(finite, x, 0.0)
    d = torch.where(finite, x - x.sum(-1, keepdim=True) / n.clamp(min=1)[..., None], 0.0)
    d2 = d * d
    var = d2.sum(-1) / n.clamp(min=1)
    k = (d2 * d2).sum(-1) / n.clamp(min=1) / (var * var)
    return [v if v == v else math.nan for v in torch.where((n >= 2) & (var > 0), k, math.nan).tolist()]


def kurtosis(x: torch.Tensor) -> float:
    """Pearson kurtosis (normal = 3) of a 1-D tensor; NaN for fewer than 2 finite values or zero spread."""
    return kurtosis_rows(x.reshape(1, -1))[0]
