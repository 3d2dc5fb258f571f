"""One streaming pass that profiles a model: super experts, router statistics (with utilization, local
routing consistency and vocabulary specialization), massive activations, attention sinks. Nothing of size
tokens x hidden is kept; every statistic is a mergeable reducer.
"""

from __future__ import annotations

import json
import math
import platform
import time
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import torch

from workbench.args import Number
from workbench.data import check_prompts
from workbench.experts import massive
from workbench.errors import WorkbenchError
from workbench.experts.router import ChangeRate, LocalConsistency, Predictions, VocabSpecialization
from workbench.experts.qk import QKMeter
from workbench.experts.routing import check_domains
from workbench.experts.sinks import SinkMeter, eager_attention
from workbench.experts.super_experts import SuperExpertRule, kurtosis, kurtosis_rows, select
from workbench.distributed import Shard
from workbench.models.specs import LoadedModel
from workbench.tracing.reducers import AbsMax, ExpertAbsMax, RouterStats
from workbench.tracing.runner import check_number, tokenize, trace
from workbench.tracing.sites import Component, Site, all_sites
from workbench.tracing.state import Checkpoint


@dataclass(frozen=True)
class ProfileOptions:
    rule: SuperExpertRule = field(default_factory=SuperExpertRule)
    batch_size: int = 8
    max_tokens: int | None = None
    top_massive: int = 8  # residual entries kept per layer
    massive_ratio: float = 1000.0  # "massive" when |x| >= this x the layer's median |x| ...
    massive_min: float = 100.0  # ... and at least this large (Sun et al.)
    sinks: bool = True
    # Massive values in queries, keys and values (experts/qk.py): a few % of the pass on SmolLM2 and the tiny zoo
    # (bench/profile_overhead.py --variants profile,profile-qk; README).
    qk: bool = True
    # Domain specialization (experts/routing.py): {name: prompts}, each run once more through the routers.
    domains: dict = field(default_factory=dict)
    # Vocabulary specialization by the model's predicted token too (runs the LM head once per token).
    vocab_predicted: bool = False
    # Prompts of similar length share a batch (less padding; workbench.tracing.runner.batch_members).
    by_length: bool = True

    def __post_init__(self):
        """Every option checked where it is set, each a one-line error naming it (as the CLI's flags are)."""
        if not isinstance(self.rule, SuperExpertRule):
            raise WorkbenchError(f"rule must be a SuperExpertRule, not {type(self.rule).__name__}")
        check_number("batch_size", self.batch_size)
        if self.max_tokens is not None:
            check_number("max_tokens", self.max_tokens)
        check_number("top_massive", self.top_massive)
        for name in ("massive_ratio", "massive_min"):
            check_number(name, getattr(self, name), Number(float, 0))
        for name in ("sinks", "qk", "vocab_predicted", "by_length"):
            if not isinstance(getattr(self, name), bool):
                raise WorkbenchError(f"{name} must be True or False, got {getattr(self, name)!r}")
        object.__setattr__(self, "domains", check_domains(self.domains))


# How the pass's statistics are counted, named in its checkpoints' fingerprint: changed when a reducer's counts change
# meaning, so that a checkpoint written before is started over, not resumed with counts of two kinds. 2026-12-07:
# local consistency's SCH stack follows the paper's code (experts/router.py: LocalConsistency).
COUNTING = "2026-12-07"


def profile(lm: LoadedModel, prompts: Sequence[str], options: ProfileOptions = ProfileOptions(),
            progress: bool = True, *, checkpoint: Checkpoint | None = None, shard: Shard | None = None) -> dict:
    """Run ``prompts`` once and return the profile as plain data (what ``profile.json`` holds).

    ``p["run"]`` describes the execution (wall time, ranks, resumption); :func:`workbench.experts.report.write`
    puts it in ``run.json``, so ``profile.json`` depends only on the model, prompts and options.
    ``checkpoint`` makes the pass resumable; ``shard`` runs one rank of a data-parallel pass (the
    result is complete on rank 0 only).
    """
    if not isinstance(options, ProfileOptions):
        raise WorkbenchError(f"options must be a ProfileOptions, not {type(options).__name__}"
                             + (": ProfileOptions(**options)" if isinstance(options, dict) else ""))
    prompts = check_prompts(prompts)  # a generator is read once, here (the trace and its count read the list)
    infos = lm.layer_infos()
    n_layers = len(infos)
    # Routed experts of a MoE layer are reduced together (one grouped site per layer); a dense layer's
    # MLP is its expert 0; shared experts have their own sites.
    grouped_sites = all_sites(lm.adapter, lm.model, [Component.EXPERTS])
    moe_layers = {s.layer for s in grouped_sites}
    dense_sites = [Site(i, Component.EXPERT, 0) for i in range(n_layers) if i not in moe_layers]
    shared_sites = all_sites(lm.adapter, lm.model, [Component.SHARED_EXPERT])
    router_sites = all_sites(lm.adapter, lm.model, [Component.ROUTER])
    resid_sites = all_sites(lm.adapter, lm.model, [Component.RESID_POST])
    change = ChangeRate([s.layer for s in router_sites])
    ids = tokenize(lm, prompts, options.max_tokens)  # once, for the trace and the reducers that read sequences
    if router_sites:  # the prompts' boundaries and token ids, for the reducers that read sequences and the vocabulary
        lengths = torch.tensor([len(x) for x in ids])
        starts = torch.cumsum(lengths, 0) - lengths  # each prompt's first global token
        token_ids = torch.tensor([t for x in ids for t in x], dtype=torch.int64)
    extra = {s: [AbsMax()] for s in [*dense_sites, *shared_sites]}
    # The profile reports each expert's peak: its token only, not every (expert, channel) maximum's (far less work)
    extra.update({s: [ExpertAbsMax(num_experts=infos[s.layer].num_experts, channel_tokens=False)]
                  for s in grouped_sites})
    scoring = lm.adapter.router_scoring
    extra.update({s: [RouterStats(num_experts=infos[s.layer].num_experts, scoring=scoring), change.sink(s.layer),
                      LocalConsistency(num_experts=infos[s.layer].num_experts, top_k=infos[s.layer].top_k,
                                       starts=starts),
                      VocabSpecialization(num_experts=infos[s.layer].num_experts, token_ids=token_ids, starts=starts)]
                  for s in router_sites})
    meters = []
    if options.vocab_predicted and not router_sites:
        warnings.warn(f"{lm.spec} has no MoE router: --vocab-predicted (vocabulary specialization of experts) has "
                      "nothing to measure", stacklevel=2)
    if options.vocab_predicted and router_sites:
        if lm.meta.get("streamer") is not None:
            raise WorkbenchError("--vocab-predicted needs the whole model in one forward; it does not combine with "
                                 "--offload layers")
        predictions = Predictions(lm)
        for s in router_sites:
            predictions.watch(extra[s][3])
        meters.append(predictions)
    resid_red = {s: massive.make_reducers(options.top_massive) for s in resid_sites}
    extra.update({s: list(resid_red[s].values()) for s in resid_sites})
    sink_meter = qk_meter = None
    if options.sinks:
        sink_meter = SinkMeter(n_layers, int(lm.config.num_attention_heads))
        meters.append(sink_meter)
    if options.qk:
        qk_meter = QKMeter(n_layers)
        meters.append(qk_meter)
    if checkpoint is not None:
        checkpoint.tag = json.dumps({"options": repr(options), "dtype": str(lm.dtype), "expert_tokens": "peak",
                                     "counting": COUNTING})
    start = time.perf_counter()
    ctx = eager_attention(lm.model) if options.sinks else _null()
    with ctx:
        res = trace(lm, prompts, [*grouped_sites, *dense_sites, *shared_sites, *router_sites, *resid_sites], reducers=(),
                    batch_size=options.batch_size, max_tokens=options.max_tokens, progress=progress,
                    sinks=extra, meters=meters, stateful={"change_rate": change}, checkpoint=checkpoint, shard=shard,
                    tokenized=ids, by_length=options.by_length)
    seconds = time.perf_counter() - start
    decode = lambda t: lm.tokenizer.decode([t]) if t is not None else None  # noqa: E731

    def where(token: int) -> dict:
        loc = res.locate(token)
        return {"prompt_index": loc["prompt_index"], "position": loc["position"], "token": decode(loc["token_id"])}

    # ----- experts -------------------------------------------------------------------------------
    _kurtosis = lambda absmax: kurtosis(absmax) if absmax is not None else math.nan  # noqa: E731
    # (layer, expert, kind, result, kurtosis of the channel maxima), in layer order
    reduced: list[tuple[int, int, str, dict, float]] = []
    for i in range(n_layers):
        if i in moe_layers:
            g: ExpertAbsMax = extra[Site(i, Component.EXPERTS)][0]
            kurt = [math.nan] * infos[i].num_experts if g.absmax is None else kurtosis_rows(g.absmax)
            reduced += [(i, e, "routed", r, kurt[e]) for e, r in enumerate(g.results())]
        else:
            a = extra[Site(i, Component.EXPERT, 0)][0]
            reduced.append((i, 0, "dense", a.result(), _kurtosis(a.absmax)))
        reduced += [(i, s.expert, "shared", extra[s][0].result(), _kurtosis(extra[s][0].absmax))
                    for s in shared_sites if s.layer == i]
    experts = []
    for layer, e, kind, r, kurt in reduced:
        experts.append({"layer": layer, "expert": e, "kind": kind, "max_abs": r["max_abs"],
                        "channel": r["channel"], "tokens_routed": r["rows"], "channel_kurtosis": kurt,
                        "nan_count": r["nan_count"], "inf_count": r["inf_count"], **where(r["token"])})
    layer_kurt = {}
    for i in range(n_layers):
        vals = torch.tensor([e["max_abs"] for e in experts if e["layer"] == i and e["kind"] != "shared"])
        layer_kurt[i] = kurtosis(vals)
    out: dict = {"experts": experts, "expert_max_kurtosis_by_layer": [layer_kurt[i] for i in range(n_layers)]}
    # ----- router --------------------------------------------------------------------------------
    if router_sites:
        rates = change.result()
        out["router"] = [{"layer": s.layer, **extra[s][0].result(), "top1_change_rate": rates.get(s.layer, math.nan),
                          **extra[s][2].result(), **extra[s][3].result()} for s in router_sites]
    # ----- massive activations -------------------------------------------------------------------
    layers = []
    for s in resid_sites:
        top = resid_red[s]["topk"]
        med = resid_red[s]["histogram"].median()
        entries = []
        for v, t, c in zip(top.values.tolist(), top.tokens.tolist(), top.channels.tolist()):
            entries.append({"value": v, "channel": c, "ratio_to_median": v / med if med else math.inf, **where(t)})
        layers.append({"layer": s.layer, "median_abs": med, "top": entries,
                       "massive": bool(entries and entries[0]["value"] >= options.massive_min
                                       and entries[0]["ratio_to_median"] >= options.massive_ratio)})
    # ----- super experts: the rule reads the expert maxima and the residual entries at their spots ----------
    chosen, facts, checks = select(experts, n_layers, options.rule, layers)
    for e in experts:  # every expert carries the number against each condition (chosen ones are these dicts)
        e.update(checks[(e["layer"], e["kind"], e["expert"])])
    out.update({"super_experts": chosen, "super_expert_rule": {**options.rule.as_dict(), **facts}})
    out["non_finite"] = _non_finite(experts, [resid_red[s]["histogram"] for s in resid_sites], resid_sites)
    out["massive_activations"] = {"criterion": {"ratio_to_median": options.massive_ratio, "min_abs": options.massive_min},
                                  "layers": layers}
    if options.domains and router_sites:
        from workbench.experts.routing import domain_specialization

        out["domain_specialization"] = domain_specialization(lm, options.domains, batch_size=options.batch_size,
                                                             max_tokens=options.max_tokens)
    if sink_meter is not None:
        out["attention_sinks"] = sink_meter.result()
    if qk_meter is not None:
        out["qk_values"] = qk_meter.result(lm.model)
    out["meta"] = {
        "spec": lm.spec, "architecture": type(lm.model).__name__, "num_layers": n_layers,
        "num_prompts": len(res.prompts), "num_tokens": res.num_tokens, "batch_size": options.batch_size,
        "max_tokens": options.max_tokens, "batch_order": res.meta["batch_order"],
        "seconds": round(seconds, 3), "layout": lm.summary()["layout"],
        "versions": _versions(), "attention": "eager (for attention probabilities)" if options.sinks else "model default",
        "dtype": lm.dtype_name,
    }
    out["run"] = {"seconds": round(seconds, 3), "device": str(lm.device), "world_size": shard.world if shard else 1,
                  "batches": res.meta.get("batches"), "resumed_at_batch": res.meta.get("resumed_at_batch"),
                  "positions": res.meta.get("positions"),
                  **({"ranks": res.meta["ranks"]} if "ranks" in res.meta else {}),
                  **lm.meta.get("run", {})}
    return out


def _non_finite(experts: list[dict], hists: list, resid_sites: list[Site]) -> dict:
    """NaN / inf counts over expert outputs and the residual stream, and where they first appear."""
    bad_experts = [e for e in experts if e["nan_count"] or e["inf_count"]]
    bad_resid = [s.layer for s, h in zip(resid_sites, hists) if int(h.nan_count) or int(h.inf_count)]
    layers = [e["layer"] for e in bad_experts] + bad_resid
    return {"expert_nan": sum(e["nan_count"] for e in experts), "expert_inf": sum(e["inf_count"] for e in experts),
            "experts_affected": len(bad_experts),
            "residual_nan": sum(int(h.nan_count) for h in hists), "residual_inf": sum(int(h.inf_count) for h in hists),
            "first_layer": min(layers) if layers else None}


def _versions() -> dict:
    import transformers

    import workbench

    return {"workbench": workbench.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
