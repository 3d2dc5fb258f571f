"""``workbench check MODEL``: does the workbench understand this checkpoint? One line per check.

The battery, on a few prompts (the same one the family coverage test runs on every family):

* **adapter**: declared for the family, or read from the module tree (:mod:`workbench.adapters.infer`),
  and what it found (layers, MoE layers, experts, norms);
* **hooks fire**: every capture site of every layer sees every real token (routed experts: top-k
  rows per token);
* **hooks are read-only**: logits with every capture hook installed equal the plain forward's, bit
  for bit (the same kernels on the same buffers), and again after the hooks are removed;
* **dense MLP output** (dense layers): the output projection's output is the MLP's output, bit for bit;
* **routing** (fused MoE layers): the adapter's routing rule applied to the router's logits chooses
  the router's own experts (tie-aware: a different pick must be tied in probability with the one it
  replaces);
* **block rebuilt** (MoE layers): routed expert outputs x routing weights + shared experts (x their
  gate) sum to the block's output (relative error <= 1e-4 in float32; in bf16 / fp16 all tolerances that
  were failing there are 4 units of the dtype's resolution, and the circuit graph, which runs in float32, is skipped);
* **zero is exact**: zeroing a dense neuron (``zero_neuron``) or a routed expert (``zero``) gives the
  logits of the same model with that neuron's / expert's output weights set to zero (tolerance 1e-4
  of the logits' scale: the two compute the same sums through different kernels);
* **planted super expert found**: one output row (channel 7) of the most-routed expert of the first MoE
  layer (a dense model: layer 0's MLP) scaled x5000 (or more, to 1000x the largest expert maximum of
  the model: layers' output scales differ; 10x more, twice at most, while it does not yet write a
  massive activation: residual scalings such as MiniMax's differ), the profile of 24 built-in prompts names exactly
  that expert and channel as a super expert (the profile's default rule), and the unplanted model is
  restored bit for bit;
* **study runs**: a two-condition ablation study (baseline and the zero above; perplexity and KL on 4
  built-in texts) gives finite perplexities, KL exactly 0 for the baseline and >= 0 for the
  ablation, to float32 rounding (>= -1e-6: a zero that barely moves the model gives ~1e-8 of either sign;
  a random model's near-uniform outputs barely move: the values are printed, not judged);
* **attention probabilities**: with eager attention every layer's attention returns probabilities
  whose rows sum to 1 (what the attention-sink statistics read); with learned sinks (GPT-OSS) to at most 1;
* **circuit graph**: builds (each block read as pre-norm, sandwich, post-norm or parallel by
  ``circuits.blocks``), the instrumented forward equals the model's own (1e-4) in plain and gradient
  mode, so do the logits the metrics read (Granite's scaling, Gemma's soft-capping), each stage's residual is its senders' outputs plus a token-independent term, and patching
  every edge gives the clean run and patching none the corrupted one (1e-4); or the reason circuits
  do not apply (no softmax attention, an attention layout they cannot read);
* **cost**: forward time per token and peak RSS (reported, not checked).
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass

import torch

from workbench.errors import WorkbenchError

PROMPTS = ["The capital of France is", "Once upon a time there was a small", "def add(a, b):\n    return",
           "Water boils at 100 degrees"]


@dataclass
class Check:
    name: str
    ok: bool | None  # None: does not apply to this model (the detail says why)
    detail: str

    def line(self) -> str:
        mark = {True: "ok  ", False: "FAIL", None: "skip"}[self.ok]
        return f"{mark} {self.name}: {self.detail}"


def _tolerance(lm, fp32: float) -> float:
    """A check's tolerance in the model's dtype: ``fp32`` in float32; in bf16 / fp16, where every product and sum
    is rounded to the dtype, at least 4 units of its resolution (bf16 rows of attention probabilities sum to 1
    within ~3e-3, a bf16 MoE block is rebuilt to ~5e-3: float32's 1e-3 and 1e-4 failed every model)."""
    dt = lm.dtype
    return fp32 if dt in (torch.float32, torch.float64) else max(fp32, 4 * torch.finfo(dt).eps)


def _batch(lm, prompts):
    tok = lm.tokenizer
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    enc = tok(prompts, return_tensors="pt", padding=True)
    enc = {k: v.to(lm.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
    grid = torch.where(enc["attention_mask"].bool(), torch.arange(enc["input_ids"].numel(), device=lm.device)
                       .view_as(enc["input_ids"]), -1)
    return enc, grid


class _Keep:
    def __init__(self):
        self.parts = []

    def update(self, p):
        self.parts.append(p)

    def rows(self):
        return (torch.cat([p.values for p in self.parts]), torch.cat([p.tokens for p in self.parts]),
                torch.cat([p.topk for p in self.parts]) if self.parts and self.parts[0].topk is not None else None)


def run_checks(lm, prompts: list[str] | None = None) -> list[Check]:
    """The battery on ``lm`` (a :class:`~workbench.models.specs.LoadedModel`); never raises for a failed check."""
    prompts = prompts or PROMPTS
    out: list[Check] = []
    for fn in (_adapter, _inputs, _hooks, _dense_mlp, _routing_and_rebuild, _zero_exact, _planted, _study,
               _attention_probs, _circuits, _cost):
        try:
            out += fn(lm, prompts)
        except Exception as e:  # a check that crashes is a failed check, named
            msg = str(e).splitlines()[0] if str(e) else ""
            out.append(Check(fn.__name__.strip("_").replace("_", " "), False, f"{type(e).__name__}: {msg}"[:300]))
    return out


def _adapter(lm, prompts):
    ad, infos = lm.adapter, lm.layer_infos()
    moe = [i for i in infos if i.kind == "moe"]
    how = "read from the module tree and verified" if ad.name.endswith("(inferred)") else "declared"
    norms = "pre-norm" if ad.input_norm_name and ad.post_attn_norm_name else "not plain pre-norm (sandwich, post-norm or parallel)"
    what = f"{len(infos)} layers at {ad.layers_path}, attention {ad.attn_name!r}, MLP {ad.mlp_name!r}, {norms}"
    linear = [i for i, layer in enumerate(ad.decoder_layers(lm.model)) if not ad.has_attention(layer)]
    if linear:
        what += f"; hybrid: {len(linear)} {ad.mixer_kind(ad.decoder_layers(lm.model)[linear[0]])} layers"
    if moe:
        m = moe[0]
        what += (f"; {len(moe)} MoE layers ({m.layout}), {m.num_experts} experts, top-{m.top_k}, "
                 f"{m.num_shared} shared")
    return [Check("adapter", True, f"{ad.name} ({how}): {what}")]


def _inputs(lm, prompts):
    """What every later check needs, named when it is missing (else they fail with an IndexError or NaN of their own):
    the tokenizer's ids within the embedding, and finite weights."""
    out = []
    emb = lm.adapter.embedding(lm.model)
    rows = int(getattr(emb, "num_embeddings", 0) or emb.weight.shape[0])
    top = int(_batch(lm, prompts)[0]["input_ids"].max())
    out.append(Check("tokenizer", top < rows, f"the check prompts' token ids reach {top}, the embedding has {rows} "
                                              "rows" + ("" if top < rows else ": this tokenizer is not the model's")))
    bad = [(n, int((~torch.isfinite(p)).sum())) for n, p in lm.model.named_parameters()
           if p.is_floating_point() and not bool(torch.isfinite(p).all())]
    out.append(Check("weights", not bad, "all finite" if not bad else
                     f"{sum(c for _, c in bad)} NaN or inf value(s) in {len(bad)} tensor(s), first {bad[0][0]}: every "
                     "check that runs the model reads them"))
    return out


def _hooks(lm, prompts):
    from workbench.tracing.capture import Capture
    from workbench.tracing.reducers import AbsMax
    from workbench.tracing.sites import Component, all_sites

    enc, grid = _batch(lm, prompts)
    model, ad = lm.model, lm.adapter
    with torch.no_grad():
        plain = model(**enc).logits
        sites = all_sites(ad, model, list(Component))
        sinks = {s: [AbsMax()] for s in sites}
        with Capture(model, ad, sinks) as cap:
            cap.begin_batch(grid)
            hooked = model(**enc).logits
        after = model(**enc).logits
    n = int(enc["attention_mask"].sum())
    infos = lm.layer_infos()
    bad = []
    for s in sites:
        if s.component is Component.EXPERTS or (s.component is Component.EXPERT and infos[s.layer].kind == "moe"):
            continue
        rows = int(sinks[s][0].rows)
        if rows != n:
            bad.append(f"{s} saw {rows} rows")
    for i in (i for i in infos if i.kind == "moe"):
        rows = sum(int(sinks[s][0].rows) for s in sites if s.layer == i.index and s.component is Component.EXPERT)
        grouped = sum(int(sinks[s][0].rows) for s in sites if s.layer == i.index and s.component is Component.EXPERTS)
        if rows != n * i.top_k or grouped != n * i.top_k:
            bad.append(f"layer {i.index}'s routed experts saw {rows} rows ({grouped} grouped), expected {n} x top-{i.top_k}")
    fire = Check("hooks fire", not bad, f"{len(sites)} sites, {n} tokens" + (f": {bad[0]}" if bad else ", every site saw every token"))
    same = torch.equal(plain, hooked) and torch.equal(plain, after)
    diff = float((plain - hooked).abs().max())
    return [fire, Check("hooks are read-only", same, "logits with hooks and after removing them equal the plain forward's"
                        if same else f"logits differ by up to {diff:.3g} with hooks installed")]


def _dense_mlp(lm, prompts):
    dense = [i.index for i in lm.layer_infos() if i.kind == "dense"]
    if not dense:
        return [Check("dense MLP output", None, "no dense layers")]
    enc, _ = _batch(lm, prompts)
    ad, layers = lm.adapter, lm.adapter.decoder_layers(lm.model)
    seen, handles = {}, []
    for i in dense:
        handles.append(ad.mlp(layers[i]).register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(("mlp", i), o)))
        handles.append(ad.dense_down_proj(layers[i]).register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(("down", i), o)))
    try:
        with torch.no_grad():
            lm.model(**enc)
    finally:
        for h in handles:
            h.remove()
    bad = [i for i in dense if not torch.equal(seen[("mlp", i)][0] if isinstance(seen[("mlp", i)], tuple) else seen[("mlp", i)],
                                               seen[("down", i)])]
    return [Check("dense MLP output", not bad, f"{ad.down_proj_name} output is the MLP output in all {len(dense)} dense layers"
                  if not bad else f"layer {bad[0]}: {ad.down_proj_name} output is not the MLP output")]


def _routing_and_rebuild(lm, prompts):
    from workbench.tracing.capture import Capture
    from workbench.tracing.sites import Component, Site, all_sites

    infos = [i for i in lm.layer_infos() if i.kind == "moe"]
    if not infos:
        return [Check("routing", None, "dense model"), Check("block rebuilt", None, "dense model")]
    enc, grid = _batch(lm, prompts)
    model, ad = lm.model, lm.adapter
    layers = [i.index for i in infos]
    keep = {s: [_Keep()] for s in all_sites(ad, model, ["expert", "shared_expert", "router", "mlp_out"], layers)}
    ins: dict[int, torch.Tensor] = {}
    handles = [ad.mlp(ad.decoder_layers(model)[i]).register_forward_pre_hook(
        lambda m, a, k, i=i: ins.__setitem__(i, (a[0] if a else k["hidden_states"]).detach()), with_kwargs=True)
        for i in layers]
    try:
        with torch.no_grad(), Capture(model, ad, keep) as cap:
            cap.begin_batch(grid)
            model(**enc)
    finally:
        for h in handles:
            h.remove()
    valid = grid.reshape(-1) >= 0
    route_bad, worst, checked = [], 0.0, 0
    for info in infos:
        i = info.index
        layer = ad.decoder_layers(model)[i]
        logits, tokens, index = keep[Site(i, Component.ROUTER)][0].rows()
        mlp_in = ins[i].reshape(-1, ins[i].shape[-1])[valid]
        with torch.no_grad():
            if info.layout == "fused":
                _, weights, own = ad.router(layer)(mlp_in)
                _, mine = ad.select_experts(model, logits.float(), ad.router(layer))
                probs = torch.softmax(logits.float(), -1) if ad.router_scoring == "softmax" else torch.sigmoid(logits.float())
                for r in range(own.shape[0]):
                    a, b = set(own[r].tolist()), set(mine[r].tolist())
                    if a != b:
                        lo = min(float(probs[r, e]) for e in a)
                        if len(a) != len(b) or any(abs(float(probs[r, e]) - lo) > 1e-6 for e in b - a):
                            route_bad.append(f"layer {i} token {r}: router chose {sorted(a)}, the adapter's rule {sorted(b)}")
                            break
                checked += 1
            else:
                weights, own = ad.select_experts(model, ad.router(layer)(mlp_in))
            mlp_out, _, _ = keep[Site(i, Component.MLP_OUT)][0].rows()
            rebuilt = torch.zeros_like(mlp_out)
            pos = {int(t): r for r, t in enumerate(tokens)}
            for e in range(info.num_experts):
                k = keep[Site(i, Component.EXPERT, e)][0]
                if not k.parts:
                    continue
                vals, toks, _ = k.rows()
                rows = torch.tensor([pos[int(t)] for t in toks], dtype=torch.long)
                slot = (own[rows] == e).float().argmax(-1)
                rebuilt.index_add_(0, rows, vals * weights[rows, slot][:, None].to(vals.dtype))
            mlp = ad.mlp(layer)
            for s in range(info.num_shared):
                vals, _, _ = keep[Site(i, Component.SHARED_EXPERT, s)][0].rows()
                gate_mod = getattr(mlp, ad.shared_gate_name, None) if ad.shared_gate_name else None
                rebuilt += vals * (torch.sigmoid(gate_mod(mlp_in)) if gate_mod is not None else 1.0)
            err = float((rebuilt - mlp_out).abs().max() / mlp_out.abs().max().clamp(min=1e-12))
            worst = max(worst, err)
    route = (Check("routing", not route_bad, route_bad[0] if route_bad else
                   f"the adapter's rule picks the router's own experts in {checked} fused MoE layers (tie-aware)")
             if checked else Check("routing", None, "ModuleList experts: the adapter's rule is the routing; nothing to compare"))
    tol = _tolerance(lm, 1e-4)
    return [route, Check("block rebuilt", worst <= tol, f"experts x weights + shared = block output in {len(infos)} "
                         f"MoE layers, max relative error {worst:.1e}"
                         + (f" (<= {tol:.1e} in {lm.dtype_name})" if tol > 1e-4 else ""))]


def _zero_exact(lm, prompts):
    from workbench.interventions import apply

    enc, _ = _batch(lm, prompts)
    infos = lm.layer_infos()
    moe = next((i for i in infos if i.kind == "moe"), None)
    ad, model = lm.adapter, lm.model
    layer = ad.decoder_layers(model)[(moe or infos[0]).index]
    with torch.no_grad():
        plain = model(**enc).logits
        if moe is not None:
            ivs = [{"op": "zero", "layers": [moe.index], "expert": 0}]
            experts = ad.experts(layer)
            if moe.layout == "fused":
                weights = [(experts.down_proj, (0,))]
                if getattr(experts, "down_proj_bias", None) is not None:
                    weights.append((experts.down_proj_bias, (0,)))
            else:
                down = ad.shared_down_proj(experts[0])
                weights = [(down.weight, (slice(None),))] + ([(down.bias, (slice(None),))] if down.bias is not None else [])
            what = f"routed expert 0 of layer {moe.index}"
        else:
            down = ad.dense_down_proj(layer)
            hidden = int(lm.config.hidden_size)
            col = (slice(None), 0) if down.weight.shape[0] == hidden else (0,)
            ivs = [{"op": "zero_neuron", "layers": [infos[0].index], "channel": 0}]
            weights = [(down.weight, col)]
            what = f"neuron 0 of layer {infos[0].index}'s MLP"
        with apply(lm, ivs):
            ablated = model(**enc).logits
        saved = [(w, idx, w[idx].clone()) for w, idx in weights]
        try:
            for w, idx, _ in saved:
                w[idx] = 0
            reference = model(**enc).logits
        finally:
            for w, idx, old in saved:
                w[idx] = old
        restored = model(**enc).logits
    scale = float(plain.abs().max())
    err = float((ablated - reference).abs().max()) / max(scale, 1e-12)
    moved = float((ablated - plain).abs().max()) / max(scale, 1e-12)
    ok = err <= 1e-4 and torch.equal(plain, restored)
    return [Check("zero is exact", ok, f"zeroing {what} = its output weights set to zero (relative difference {err:.1e}; "
                  f"the ablation moved the logits by {moved:.1e}); leaving restores the model"
                  + ("" if torch.equal(plain, restored) else " -- NOT restored"))]


def output_row(lm, layer: int, expert: int, channel: int) -> torch.Tensor:
    """The weight view whose scaling multiplies ``channel`` of a routed expert's (or a dense layer's MLP's)
    output: one row of its down_proj (a column where the weights are stored [in, out]). Planting a super
    expert scales it."""
    from workbench.tracing.capture import _transposed

    ad, info = lm.adapter, lm.layer_infos()[layer]
    block = ad.decoder_layers(lm.model)[layer]
    if info.kind == "dense":
        w = ad.dense_down_proj(block).weight
        return w[channel] if w.shape[0] == int(lm.config.hidden_size) else w[:, channel]
    experts = ad.experts(block)
    if info.layout == "modulelist":
        return ad.shared_down_proj(experts[expert]).weight[channel]
    return experts.down_proj[expert][:, channel] if _transposed(experts) else experts.down_proj[expert][channel]


def _short(kind: str, expert: int) -> str:
    return {"routed": f"E{expert}", "shared": f"shared{expert}"}.get(kind, "MLP")


def _planted(lm, prompts, factor: float = 5000.0, channel: int = 7):
    """Plant a super expert (x5000, or more: 1000x the model's largest expert maximum; 10x more, twice at
    most, while it stands out but its residual stays below the massive-activation bar) and profile."""
    from workbench.data import default_prompts
    from workbench.experts.profile import ProfileOptions, profile

    corpus = default_prompts()[:24]
    infos = lm.layer_infos()
    moe = [i.index for i in infos if i.kind == "moe"]
    early = [i for i in moe if i < round(0.75 * len(infos))]
    layer = (early or moe or [0])[0]
    opts = ProfileOptions(sinks=False)
    with torch.no_grad():
        before = profile(lm, corpus, opts, progress=False)
        n = sum(e["kind"] != "shared" for e in before["experts"])
        if n < 3:  # the median of two maxima is their mean: a planted one is never 10x it
            return [Check("planted super expert found", None, f"{n} experts (MLPs) in all: the default rule's median "
                          "expert maximum needs 3 or more to stand out from")]
        kind = "routed" if infos[layer].kind == "moe" else "dense"
        candidates = [e for e in before["experts"] if e["layer"] == layer and e["kind"] == kind]
        chosen = max(candidates, key=lambda e: e.get("tokens_routed") or 0)
        expert = chosen["expert"]
        # Large against every expert of the model, not only against its own layer (layers' scales differ).
        top = max((e["max_abs"] for e in before["experts"] if e["max_abs"] == e["max_abs"]), default=1.0)
        factor = max(factor, 1000.0 * top / max(chosen["max_abs"], 1e-12))
        row = output_row(lm, layer, expert, channel)
        saved = row.clone()
        want = (layer, kind, expert, channel)
        prenorm = bool(lm.adapter.input_norm_name and lm.adapter.post_attn_norm_name)
        for attempt in range(3):  # a super expert writes a massive activation: plant 10x harder until it does
            try:
                row.mul_(factor)
                after = profile(lm, corpus, opts, progress=False)
            finally:
                row.copy_(saved)
            found = [(e["layer"], e["kind"], e["expert"], e["channel"]) for e in after["super_experts"]]
            ok = want in found
            mine = next(e for e in after["experts"] if (e["layer"], e["kind"], e["expert"]) == want[:3])
            if ok or not prenorm or not mine.get("stands_out") or mine.get("feeds_massive") or attempt == 2:
                break
            factor *= 10.0
    why = "" if ok else (f"; the planted one: {mine.get('ratio_to_median', 0):.3g}x the median expert maximum, "
                         f"{mine.get('ratio_to_next', 0):.3g}x the next, residual "
                         f"{mine.get('residual_ratio_to_median') or 0:.3g}x its layer median in channel {mine.get('channel')}")
    where = f"L{layer}.{_short(kind, expert)} channel {channel}"
    if not ok and mine.get("stands_out") and not prenorm:
        from workbench.experts.super_experts import SuperExpertRule, select

        paper, _, _ = select(after["experts"], len(infos), SuperExpertRule(rule="paper"),
                             after["massive_activations"]["layers"])
        named = want[:3] in [(e["layer"], e["kind"], e["expert"]) for e in paper]
        return [Check("planted super expert found", None, f"{where} x{factor:.3g} stands out "
                      f"({mine['ratio_to_median']:.3g}x the median expert maximum) but its output is normed before "
                      f"the residual (sandwich or post-norm blocks): it writes only {mine.get('residual_ratio_to_median') or 0:.3g}x "
                      "the layer median there, not the massive activation the default rule requires (--rule paper "
                      + ("names it)" if named else "does not name it either)"))]
    return [Check("planted super expert found", ok, f"{where} x{factor:.3g}: the profile names "
                  + (", ".join(f"L{l}.{_short(k, x)} ch {c}" for l, k, x, c in found) or "none")
                  + f" (before planting: {_count(len(before['super_experts']), 'super expert')}){why}")]


def _count(n: int, what: str) -> str:
    return f"{n} {what}" + ("" if n == 1 else "s")


# How far below 0 float32 rounding takes the KL of a condition that barely changes the model (seen: -4.6e-8).
KL_ROUNDING = 1e-6


def _study(lm, prompts):
    import math

    from workbench.studies import Study

    infos = lm.layer_infos()
    moe = next((i for i in infos if i.kind == "moe"), None)
    iv = ({"op": "zero", "layers": [moe.index], "expert": 0} if moe is not None
          else {"op": "zero_neuron", "layers": [infos[0].index], "channel": 0})
    study = Study({"name": "check", "metrics": ["perplexity", "kl"], "num_texts": 4, "seeds": [0],
                   "conditions": [{"name": "zero", "interventions": [iv]}]}, source="check")
    df = study.run(lm, None, progress=False)
    get = {(r.condition, r.metric): r.mean for r in df.itertuples()}
    ppl = [get[("baseline", "perplexity")], get[("zero", "perplexity")]]
    kl0, kl1 = get[("baseline", "kl")], get[("zero", "kl")]
    # KL >= 0 up to float32 rounding: a zero with almost no effect gives KLs of ~1e-8 of either sign
    ok = all(math.isfinite(v) and v > 0 for v in ppl) and kl0 == 0 and math.isfinite(kl1) and kl1 >= -KL_ROUNDING
    return [Check("study runs", ok, f"baseline and {iv['op']} on 4 texts: perplexity {ppl[0]:.4g} -> {ppl[1]:.4g}, "
                  f"KL {kl0:.3g} -> {kl1:.3g}")]


def _attention_probs(lm, prompts):
    from workbench.experts.sinks import eager_attention

    enc, _ = _batch(lm, prompts)
    ad, model = lm.adapter, lm.model
    seen, handles = {}, []
    linear = [i for i, layer in enumerate(ad.decoder_layers(model)) if not ad.has_attention(layer)]
    for i, layer in enumerate(ad.decoder_layers(model)):
        if i in linear:
            continue
        handles.append(ad.attention(layer).register_forward_hook(
            lambda m, a, o, i=i: seen.__setitem__(i, o[1] if isinstance(o, tuple) and len(o) > 1 else None)))
    try:
        with torch.no_grad(), eager_attention(model):
            model(**enc)
    finally:
        for h in handles:
            h.remove()
    missing = [i for i, w in seen.items() if w is None]
    if missing:
        return [Check("attention probabilities", False, f"layer {missing[0]}'s attention returns no probabilities under "
                      "eager attention (attention-sink statistics need them)")]
    mask = enc["attention_mask"].bool()
    sums = torch.cat([w.float().sum(-1)[mask[:, None, :].expand(-1, w.shape[1], -1)] for w in seen.values()])
    note = (f"; {len(linear)} {ad.mixer_kind(ad.decoder_layers(model)[linear[0]])} layers have none (sink statistics "
            "skip them)" if linear else "")
    if any(getattr(ad.attention(layer), "sinks", None) is not None for layer in ad.decoder_layers(model)
           if ad.has_attention(layer)):
        # Learned attention sinks (GPT-OSS) take part of every row's mass: the returned rows sum to at most 1.
        ok = float(sums.max()) <= 1 + _tolerance(lm, 1e-3) and float(sums.min()) >= 0
        return [Check("attention probabilities", ok, f"{len(seen)} layers return [batch, heads, query, key] "
                      f"probabilities under eager attention; rows sum to {float(sums.min()):.2f}-{float(sums.max()):.2f} "
                      "(the rest goes to the learned sink)" + note)]
    worst, tol = float((sums - 1).abs().max()), _tolerance(lm, 1e-3)
    return [Check("attention probabilities", worst <= tol, f"{len(seen)} layers return [batch, heads, query, key] "
                  f"probabilities under eager attention; rows sum to 1 within {worst:.1e}"
                  + (f" (<= {tol:.1e} in {lm.dtype_name})" if tol > 1e-3 else "") + note)]


def _circuits(lm, prompts):
    from workbench.circuits.attribution import last_logits
    from workbench.circuits.graph import build_graph
    from workbench.circuits.runner import GraphRunner, Patch

    ad = lm.adapter
    if lm.dtype != torch.float32:  # (their gradients and patching need it: find_circuit refuses other dtypes)
        return [Check("circuit graph", None, f"circuits run in float32 and `workbench circuit` loads the model so; "
                      f"this check ran in {lm.dtype_name} (check without --dtype for the circuit graph)")]
    try:
        g = build_graph(lm.model, ad)
    except WorkbenchError as e:  # a layout circuits do not model (the error says which)
        return [Check("circuit graph", None, f"no circuit graph: {e}")]
    ids = torch.randint(10, min(2000, int(lm.config.vocab_size)), (2, 6), generator=torch.Generator().manual_seed(0))
    ids = ids.to(lm.device)
    corr_ids = ids.flip(0)
    body = ad.body(lm.model)
    S, P, d, dev = g.n_senders, len(g.stages), g.d_model, lm.device

    def rel(a, b):
        return float((a.detach() - b).abs().max() / b.abs().max().clamp(min=1e-12))

    with torch.no_grad():
        ref = body(input_ids=ids, use_cache=False)[0]
        corr_ref = body(input_ids=corr_ids, use_cache=False)[0]
        model_logits = lm.model(input_ids=ids, use_cache=False).logits[:, -1].float()
        logits_err = rel(last_logits(lm, ref, torch.full((2,), 5, device=dev)), model_logits)
    acts, resid = torch.zeros(S, 2, 6, d, device=dev), torch.zeros(P, 2, 6, d, device=dev)
    corr_acts, corr_resid = torch.zeros_like(acts), torch.zeros_like(resid)
    try:
        with GraphRunner(lm.model, ad, g) as runner:
            got = runner.forward(ids, acts=acts, resid=resid)
            grad = runner.forward(ids, mode="grad", grads=torch.zeros(g.n_receivers, 2, 6, d, device=dev))
            runner.forward(corr_ids, acts=corr_acts, resid=corr_resid)
            valid = g.valid().to(dev)
            full = runner.forward(ids, mode="patch", acts=torch.zeros_like(acts),
                                  patch=Patch(valid, corr_acts, corr_resid))
            empty = runner.forward(ids, mode="patch", acts=torch.zeros_like(acts),
                                   patch=Patch(torch.zeros_like(valid), corr_acts, corr_resid))
    except WorkbenchError as e:
        return [Check("circuit graph", None, f"no circuit graph: {e}")]
    err = max(rel(got, ref), rel(grad, ref))
    patched = max(rel(full, ref), rel(empty, corr_ref))
    # Attribution rests on this: every receiver's residual is the sum of the outputs of the senders before it,
    # up to a term no input changes (GPT-2's position embeddings: the same in clean and corrupted runs).
    sums = 0.0
    for st in g.stages:
        rest = resid[st.index] - acts[:st.n_up].sum(0)  # [2, T, d]: the two rows hold different tokens
        scale = resid[st.index].abs().max().clamp(min=1e-12)
        sums = max(sums, min(float(rest.abs().max() / scale), float((rest[0] - rest[1]).abs().max() / scale)))
    kinds = sorted({p.block.kind for p in g.layers})
    return [Check("circuit graph", err <= 1e-4 and sums <= 1e-4 and patched <= 1e-4 and logits_err <= 1e-4,
                  f"{g.n_edges} edges over {'/'.join(kinds)} blocks; the instrumented forward and the logits equal the "
                  f"model's own (relative error {max(err, logits_err):.1e}), each stage's residual is its senders' outputs plus a token-independent "
                  f"term ({sums:.1e}), and patching all edges / none gives the clean / corrupted run ({patched:.1e})")]


def _cost(lm, prompts):
    enc, _ = _batch(lm, prompts * 4)
    n = int(enc["attention_mask"].sum())
    with torch.no_grad():
        lm.model(**enc)
        t0 = time.perf_counter()
        lm.model(**enc)
        dt = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform != "darwin" else 1024 ** 2)
    params = sum(p.numel() for p in lm.model.parameters())
    return [Check("cost", True, f"forward {1000 * dt / n:.2f} ms/token ({n} tokens, {torch.get_num_threads()} threads), "
                  f"peak RSS {rss:.0f} MB, {params / 1e6:.1f}M parameters")]


def report(name: str, results: list[Check]) -> int:
    """Print one line per check and a summary; the exit status (1 when any check failed)."""
    for c in results:
        print(c.line(), flush=True)
    failed = [c.name for c in results if c.ok is False]
    skipped = sum(c.ok is None for c in results)
    print(f"{name}: " + (f"{len(failed)} check(s) failed: {', '.join(failed)}" if failed else
                         f"all {sum(c.ok is True for c in results)} checks passed"
                         + (f", {skipped} not applicable" if skipped else "")))
    return 1 if failed else 0
