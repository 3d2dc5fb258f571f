"""Capture is read-only (bit-identical forward) and reports what the model really computes."""

import pytest
import torch

from helpers import PROMPTS, ZOO_SPECS, assert_argmax_tie_aware, assert_clear_routing, assert_close
from workbench.models.specs import load
from workbench.tracing.capture import Capture
from workbench.tracing.reducers import NO_TOKEN, AbsMax, Payload
from workbench.tracing.runner import trace
from workbench.tracing.sites import Component, Site, all_sites

ALL = [c.value for c in Component]


class Keep:
    """A sink that keeps every payload (tests only)."""

    def __init__(self):
        self.parts: list[Payload] = []

    def update(self, p):
        self.parts.append(p)

    def rows(self):
        return torch.cat([p.values for p in self.parts]), torch.cat([p.tokens for p in self.parts])


def _batch(lm, prompts):
    enc = lm.tokenizer(prompts, return_tensors="pt", padding=True)
    grid = torch.where(enc.attention_mask.bool(), torch.arange(enc.input_ids.numel()).view_as(enc.input_ids), -1)
    return enc, grid


@pytest.fixture(scope="module", params=ZOO_SPECS)
def zoo_lm(request):
    return load(request.param)


def test_zoo_is_deterministic():
    a, b = load("zoo:qwen3-moe").model, load("zoo:qwen3-moe").model
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka


def test_modulelist_layout_matches_fused():
    ids = torch.randint(0, 49152, (2, 11), generator=torch.Generator().manual_seed(0))
    fused, listed = load("zoo:qwen3-moe").model, load("zoo:qwen3-moe-modulelist").model
    assert isinstance(listed.model.layers[0].mlp.experts, torch.nn.ModuleList)
    torch.testing.assert_close(listed(ids).logits, fused(ids).logits, rtol=1e-5, atol=1e-6)


def test_modulelist_router_site_counts_each_token_once_with_experts_captured():
    """The ModuleList capture re-runs the router to learn the routing; the router site must not see that call."""
    from workbench.tracing.reducers import ExpertCounts

    counts = {}
    for name in ("zoo:qwen3-moe", "zoo:qwen3-moe-modulelist"):
        lm = load(name)
        enc, grid = _batch(lm, PROMPTS)
        sites = all_sites(lm.adapter, lm.model, ["router", "expert"], [0])  # layer 0: the same inputs in both layouts
        sinks = {s: [ExpertCounts(num_experts=8)] if s.component is Component.ROUTER else [AbsMax()] for s in sites}
        with Capture(lm.model, lm.adapter, sinks) as cap:
            cap.begin_batch(grid)
            lm.model(**enc)
        router = sinks[Site(0, Component.ROUTER)][0]
        assert int(router.tokens) == int(enc["attention_mask"].sum()), name
        counts[name] = router.counts
    assert torch.equal(counts["zoo:qwen3-moe"], counts["zoo:qwen3-moe-modulelist"])


def test_hooked_forward_is_bit_identical(zoo_lm):
    enc, grid = _batch(zoo_lm, PROMPTS)
    plain = zoo_lm.model(**enc).logits
    sites = all_sites(zoo_lm.adapter, zoo_lm.model, ALL)
    sinks = {s: [AbsMax()] for s in sites}
    with Capture(zoo_lm.model, zoo_lm.adapter, sinks) as cap:
        cap.begin_batch(grid)
        hooked = zoo_lm.model(**enc).logits
    assert torch.equal(plain, hooked)
    assert all(sinks[s][0].rows > 0 for s in sites if s.component is not Component.EXPERT)
    after = zoo_lm.model(**enc).logits  # hooks are gone
    assert torch.equal(plain, after)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in zoo_lm.model.modules())


def test_expert_outputs_rebuild_the_moe_block(zoo_lm):
    """Routed expert outputs x routing weights (+ shared) must sum to the captured MoE block output."""
    enc, grid = _batch(zoo_lm, PROMPTS)
    ad, model = zoo_lm.adapter, zoo_lm.model
    layer_idx = next(i.index for i in zoo_lm.layer_infos() if i.kind == "moe")
    info = zoo_lm.layer_infos()[layer_idx]
    layer = ad.decoder_layers(model)[layer_idx]
    keep = {s: [Keep()] for s in all_sites(ad, model, ["expert", "shared_expert", "router", "mlp_out", "resid_pre"],
                                           [layer_idx])}
    with Capture(model, ad, keep) as cap:
        cap.begin_batch(grid)
        model(**enc)
    mlp_out, tokens = keep[Site(layer_idx, Component.MLP_OUT)][0].rows()
    logits, _ = keep[Site(layer_idx, Component.ROUTER)][0].rows()
    # Reference weights: recompute the router on the MLP input (post-attention norm of the block input).
    resid, _ = keep[Site(layer_idx, Component.RESID_PRE)][0].rows()
    rebuilt = torch.zeros_like(mlp_out)
    pos = {int(t): i for i, t in enumerate(tokens)}
    mlp_in = _mlp_input(zoo_lm, layer, layer_idx, enc)
    with torch.no_grad():
        router = ad.router(layer)
        if info.layout == "fused":
            _, weights, index = router(mlp_in)
        else:
            weights, index = ad.select_experts(model, router(mlp_in))
    valid = grid.reshape(-1) >= 0
    weights, index = weights[valid], index[valid]
    for e in range(info.num_experts):
        vals, toks = keep[Site(layer_idx, Component.EXPERT, e)][0].rows()
        for v, t in zip(vals, toks):
            r = pos[int(t)]
            slot = (index[r] == e).nonzero().item()
            rebuilt[r] += v * weights[r, slot]
    for s in range(info.num_shared):
        vals, toks = keep[Site(layer_idx, Component.SHARED_EXPERT, s)][0].rows()
        mlp = ad.mlp(layer)
        gate = torch.sigmoid(mlp.shared_expert_gate(mlp_in[valid])) if ad.shared_gate_name else 1.0
        rebuilt += vals * gate
    torch.testing.assert_close(rebuilt, mlp_out, rtol=1e-5, atol=1e-6)


def test_grouped_experts_site_equals_the_per_expert_sites(zoo_lm):
    """One ``experts`` payload per layer holds every routed expert's rows, sorted by expert then token."""
    enc, grid = _batch(zoo_lm, PROMPTS)
    ad, model = zoo_lm.adapter, zoo_lm.model
    grouped = all_sites(ad, model, ["experts"])
    assert grouped and all(zoo_lm.layer_infos()[s.layer].kind == "moe" for s in grouped)
    single = {s: [Keep()] for s in all_sites(ad, model, ["expert"], sorted({g.layer for g in grouped}))}
    for sinks in ({g: [Keep()] for g in grouped}, single):
        with Capture(model, ad, sinks) as cap:
            cap.begin_batch(grid)
            model(**enc)
        if sinks is not single:
            kept = sinks
    for g in grouped:
        (p,) = kept[g][0].parts
        assert p.experts is not None and bool((p.experts[1:] >= p.experts[:-1]).all())
        for e in range(zoo_lm.layer_infos()[g.layer].num_experts):
            vals, toks = single[Site(g.layer, Component.EXPERT, e)][0].rows()
            sel = p.experts == e
            assert torch.equal(p.tokens[sel], toks), (g, e)
            torch.testing.assert_close(p.values[sel], vals, rtol=1e-5, atol=1e-6)


def _mlp_input(lm, layer, idx, enc):
    """The MoE block's input, read with a plain hook (independent of workbench's capture)."""
    got = {}
    h = lm.adapter.mlp(layer).register_forward_pre_hook(lambda m, a: got.setdefault("x", a[0].detach()))
    try:
        lm.model(**enc)
    finally:
        h.remove()
    x = got["x"]
    return x.reshape(-1, x.shape[-1])


def _kept_one_by_one(lm, prompts, sites) -> dict:
    """Every payload of ``sites``, one unpadded prompt at a time, with global token indices."""
    keep, offset = {s: [Keep()] for s in sites}, 0
    with Capture(lm.model, lm.adapter, keep) as cap:
        for p in prompts:
            enc = lm.tokenizer([p], return_tensors="pt")
            n = enc.input_ids.shape[1]
            cap.begin_batch(torch.arange(offset, offset + n).view(1, n))
            lm.model(**enc)
            offset += n
    return {s: k[0] for s, k in keep.items()}


def test_padding_never_reaches_reducers(zoo_lm):
    """Batched (padded) and one-prompt-at-a-time traces agree: padding never reaches a reducer.

    The padded batch runs the matmuls at another shape, so values agree to fp32 tolerance and each
    reported token is checked tie-aware against every routed token's value: it must hold the
    channel's maximum within tolerance (a near-tie may be broken the other way; seen on L3.E6).
    """
    sites = all_sites(zoo_lm.adapter, zoo_lm.model, ["expert", "resid_post", "router"])
    assert_clear_routing(zoo_lm, PROMPTS, what=zoo_lm.spec)  # each expert gets the same tokens in both runs
    a = trace(zoo_lm, PROMPTS, sites, ["absmax"], batch_size=4, progress=False)
    b = trace(zoo_lm, PROMPTS, sites, ["absmax"], batch_size=1, progress=False)
    n_tokens = sum(len(zoo_lm.tokenizer(p).input_ids) for p in PROMPTS)
    assert a.num_tokens == b.num_tokens == n_tokens
    kept = _kept_one_by_one(zoo_lm, PROMPTS, sites)
    for s in sites:
        ra, rb = a[s]["absmax"], b[s]["absmax"]
        assert_close(ra.absmax, rb.absmax, msg=str(s))
        vals, toks = kept[s].rows()
        full = torch.full((n_tokens, vals.shape[1]), float("-inf"))
        full[toks] = vals.abs().float()
        for r, how in ((ra, "padded"), (rb, "one by one")):
            seen = r.token != NO_TOKEN  # channels of an expert no token was routed to
            assert_argmax_tie_aware(full[:, seen], r.token[seen], msg=f"{s} {how}")


def test_router_counts_match_router_outputs():
    lm = load("zoo:qwen3-moe")
    assert_clear_routing(lm, PROMPTS, what=lm.spec)  # padded batches vs one prompt: the same top-k, not a tie apart
    sites = all_sites(lm.adapter, lm.model, ["router"])
    r = trace(lm, PROMPTS, sites, ["expert_counts"], batch_size=2, progress=False)
    # Independent count from output_router_logits=True, one prompt at a time (no padding).
    counts = torch.zeros(len(sites), 8, dtype=torch.int64)
    for p in PROMPTS:
        ids = lm.tokenizer(p, return_tensors="pt").input_ids
        out = lm.model(ids, output_router_logits=True)
        for i, logits in enumerate(out.router_logits):
            top = torch.topk(torch.softmax(logits.float(), -1), 2, dim=-1).indices
            counts[i] += torch.bincount(top.flatten(), minlength=8)
    for i, s in enumerate(sites):
        assert r[s]["expert_counts"].counts.tolist() == counts[i].tolist()


def test_planted_super_expert_is_found(zoo_lm):
    """Scale one channel of one expert's down_proj: the absmax peak names that (layer, expert, channel)."""
    ad, model = zoo_lm.adapter, zoo_lm.model
    info = next(i for i in zoo_lm.layer_infos() if i.kind == "moe")
    layer, expert, channel = info.index, 5, 17
    from workbench.check import output_row

    row = output_row(zoo_lm, layer, expert, channel)
    with torch.no_grad():
        saved = row.clone()
        row.mul_(500.0)
    try:
        sites = all_sites(ad, model, ["expert"])
        r = trace(zoo_lm, PROMPTS * 3, sites, ["absmax"], batch_size=4, progress=False)
    finally:
        with torch.no_grad():
            row.copy_(saved)
    best = max(sites, key=lambda s: r[s]["absmax"].result()["max_abs"])
    assert r[best]["absmax"].result()["rows"] > 0
    assert (best.layer, best.expert, r[best]["absmax"].result()["channel"]) == (layer, expert, channel)


def test_dense_model_mlp_is_expert_zero(smollm2):
    sites = all_sites(smollm2.adapter, smollm2.model, ["expert"])
    assert sites == [Site(i, Component.EXPERT, 0) for i in range(30)]
    assert all_sites(smollm2.adapter, smollm2.model, ["router"]) == []


def test_hooked_smollm2_is_bit_identical(smollm2):
    enc, grid = _batch(smollm2, PROMPTS[:2])
    plain = smollm2.model(**enc).logits
    sites = all_sites(smollm2.adapter, smollm2.model, ["expert", "resid_post", "attn_out", "mlp_out", "resid_pre"])
    with Capture(smollm2.model, smollm2.adapter, {s: [AbsMax()] for s in sites}) as cap:
        cap.begin_batch(grid)
        hooked = smollm2.model(**enc).logits
    assert torch.equal(plain, hooked)


def test_expert_recompute_follows_transposed_biased_custom_gate_layouts():
    """GPT-OSS's experts (weights [E, in, out], biases, clamped interleaved gate): both recompute paths
    equal the module's own forward on one expert with routing weight 1."""
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    from workbench.tracing.capture import fused_expert_output, fused_grouped_output

    torch.manual_seed(0)
    experts = GptOssExperts(GptOssConfig(hidden_size=32, intermediate_size=16, num_local_experts=4,
                                         num_experts_per_tok=1))
    assert experts.is_transposed and experts.has_bias
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(10, 32)
    refs = []
    with torch.no_grad():
        for e in range(4):
            ref = experts(x, torch.full((10, 1), e), torch.ones(10, 1))
            torch.testing.assert_close(fused_expert_output(experts, x, e), ref, rtol=1e-5, atol=1e-5)
            refs.append(ref[: 2 + e])
        counts = torch.tensor([2, 3, 4, 5])
        rows = torch.cat([x[: 2 + e] for e in range(4)])
        torch.testing.assert_close(fused_grouped_output(experts, rows, counts), torch.cat(refs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", ZOO_SPECS)
def test_trace_without_the_lm_head_equals_capture_on_the_full_forward(spec):
    """trace() runs the decoder stack alone (no statistic needs logits); every site's statistics equal a
    capture over the whole model's forward."""
    lm = load(spec)
    sites = all_sites(lm.adapter, lm.model, [Component.RESID_POST, Component.EXPERT, Component.SHARED_EXPERT,
                                             Component.MLP_OUT])
    res = trace(lm, PROMPTS, sites, ("absmax",), batch_size=len(PROMPTS), progress=False)
    enc = lm.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    grid = torch.where(enc.attention_mask.bool(), torch.cumsum(enc.attention_mask.flatten(), 0).view_as(enc.input_ids) - 1, -1)
    sinks = {s: [AbsMax()] for s in sites}
    with Capture(lm.model, lm.adapter, sinks) as cap, torch.no_grad():
        cap.begin_batch(grid)
        lm.model(**enc, use_cache=False)
    for s in sites:
        assert torch.equal(res[s]["absmax"].absmax, sinks[s][0].absmax), s
        assert torch.equal(res[s]["absmax"].token, sinks[s][0].token), s


@pytest.mark.parametrize("spec", ["zoo:qwen2-moe", "zoo:deepseek-v3"])
def test_fused_expert_outputs_are_read_from_the_experts_forward_not_recomputed(spec, monkeypatch):
    """grouped_mm and batched_mm hand the per-expert outputs over through ``post_expert_norm`` (no
    second expert pass); eager recomputes them. All three give the same rows, the hooked forward stays
    bit-identical to the plain one under each, and leaving the capture restores the experts module."""
    import workbench.tracing.capture as capture

    lm = load(spec)
    assert_clear_routing(lm, PROMPTS, what=spec)  # the three kernels' rounding routes every later layer alike
    enc, grid = _batch(lm, PROMPTS)
    ad, model = lm.adapter, lm.model
    moe = [i.index for i in lm.layer_infos() if i.kind == "moe"]
    sites = all_sites(ad, model, ["experts", "expert"], moe)
    recomputed = []
    monkeypatch.setattr(capture, "fused_grouped_output", lambda *a: recomputed.append(1) or _real_grouped(*a))
    got = {}
    for impl in ("grouped_mm", "batched_mm", "eager"):
        model.set_experts_implementation(impl)
        plain = model(**enc).logits
        keep = {s: [Keep()] for s in sites}
        with Capture(model, ad, keep) as cap:
            cap.begin_batch(grid)
            hooked = model(**enc).logits
        assert torch.equal(plain, hooked), impl  # same model, kernels and shapes: bit-identical
        assert bool(recomputed) == (impl == "eager"), impl
        for layer in moe:
            experts = ad.experts(ad.decoder_layers(model)[layer])
            assert not experts.has_post_expert_norm and "post_expert_norm" not in experts._modules
        got[impl] = {s: k[0] for s, k in keep.items()}
    model.set_experts_implementation("grouped_mm")
    grouped_rows = sum(got["eager"][s].rows()[1].numel() for s in sites if s.component is Component.EXPERTS)
    assert grouped_rows == len(moe) * int(enc.attention_mask.sum()) * lm.layer_infos()[moe[0]].top_k
    for s in sites:
        ref_vals, ref_toks = got["eager"][s].rows()
        ref_ids = torch.cat([p.experts for p in got["eager"][s].parts]) if s.component is Component.EXPERTS else None
        order = (ref_ids * (1 << 32) + ref_toks if ref_ids is not None else ref_toks).argsort()
        for impl in ("grouped_mm", "batched_mm"):
            vals, toks = got[impl][s].rows()
            ids = torch.cat([p.experts for p in got[impl][s].parts]) if ref_ids is not None else None
            mine = (ids * (1 << 32) + toks if ids is not None else toks).argsort()
            assert torch.equal(toks[mine], ref_toks[order]), (impl, s)
            if ids is not None:
                assert torch.equal(ids[mine], ref_ids[order]), (impl, s)
            # another expert kernel (grouped vs batched vs per-expert matmuls): fp32 tolerance
            assert_close(vals[mine], ref_vals[order], msg=f"{impl} {s}")


_real_grouped = __import__("workbench.tracing.capture", fromlist=["x"]).fused_grouped_output


@pytest.mark.parametrize("spec", ["zoo:qwen2-moe", "zoo:deepseek-v3"])
def test_coalesced_payloads_give_the_profile_of_batch_by_batch_updates(spec, monkeypatch):
    """trace() holds small payloads and hands several batches at once to the reducers (a reducer update
    costs the same tens of ops whatever its size). The profile equals the one fed batch by batch: counts,
    maxima and their tokens exactly, float64 sums to rounding; and the reducers are called fewer times."""
    from helpers import assert_json_close
    from workbench.experts.profile import ProfileOptions, profile
    from workbench.tracing import capture
    from workbench.tracing.reducers import RouterStats

    lm = load(spec)
    calls = []
    update = RouterStats.update
    monkeypatch.setattr(RouterStats, "update", lambda self, p: (calls.append(p.tokens.numel()), update(self, p)))
    opts = ProfileOptions(batch_size=2)
    coalesced = profile(lm, PROMPTS * 3, opts, progress=False)
    n_coalesced, calls[:] = len(calls), []
    monkeypatch.setattr(capture, "SMALL_PAYLOAD", 0)  # every payload goes to its sinks as it comes
    one_by_one = profile(lm, PROMPTS * 3, opts, progress=False)
    batches = -(-len(PROMPTS * 3) // 2)
    assert len(calls) == batches * len(coalesced["router"]) and n_coalesced <= len(calls) // 2  # batch 1, then the rest
    for p in (coalesced, one_by_one):
        p.pop("run"), p["meta"].pop("seconds")
    assert_json_close(coalesced, one_by_one, rtol=1e-9, atol=1e-12)
    assert [e["max_abs"] for e in coalesced["experts"]] == [e["max_abs"] for e in one_by_one["experts"]]


@pytest.mark.parametrize("spec", ["zoo:olmoe", "zoo:qwen3-moe-modulelist"])
def test_trace_reduces_every_expert_of_a_layer_as_one_grouped_site(spec, monkeypatch):
    """With absmax alone over every routed expert of a layer, trace reduces the layer's experts together (one
    ExpertAbsMax update per batch instead of one AbsMax per expert) and splits the state per expert: the
    same state as the per-expert path (taken when another reducer is asked for too)."""
    lm = load(spec)
    sites = all_sites(lm.adapter, lm.model, [Component.EXPERT])
    calls = []
    update = AbsMax.update
    monkeypatch.setattr(AbsMax, "update", lambda self, p: (calls.append(1), update(self, p)))
    grouped = trace(lm, PROMPTS * 2, sites, ("absmax",), batch_size=3, progress=False)
    assert not calls  # no per-expert AbsMax update: the layer's experts went through one grouped reducer
    monkeypatch.setattr(AbsMax, "update", update)
    per_expert = trace(lm, PROMPTS * 2, sites, ("absmax", "moments"), batch_size=3, progress=False)
    assert set(grouped.reducers) == set(sites)
    routed = 0
    for s in sites:
        a, b = grouped[s]["absmax"], per_expert[s]["absmax"]
        assert type(a) is AbsMax and a.result() == b.result(), s
        assert torch.equal(a.absmax, b.absmax) and torch.equal(a.token, b.token), s
        routed += int(a.rows)
    infos = lm.layer_infos()
    n_tokens = grouped.num_tokens
    assert routed == sum(n_tokens * infos[l].top_k for l in {s.layer for s in sites})  # every (token, slot) once


def test_a_trace_runs_in_inference_mode_and_leaves_normal_tensors(tmp_path, zoo_tokenizer):
    """trace() runs under torch.inference_mode (every op cheaper than under no_grad), so what the pass builds
    from the model's outputs starts as inference tensors, which cannot be updated in place outside that mode.
    After the pass every reducer, sink and meter can be merged in place, and a tensor a module caches during
    its forward (Phi-3's long-RoPE frequencies, a plain attribute) is a normal tensor again."""
    from transformers import AutoModelForCausalLM

    from workbench.experts.qk import QKMeter
    from workbench.experts.sinks import SinkMeter, eager_attention
    from workbench.models.families import tiny_config
    from workbench.tracing import state
    from workbench.tracing.reducers import RouterStats

    modes = []

    class Watch:  # an extra sink: sees whether the pass runs in inference mode
        coalesce = False

        def update(self, p):
            modes.append(torch.is_inference_mode_enabled())

    lm = load("zoo:qwen2-moe")
    n_layers = len(lm.layer_infos())
    sites = all_sites(lm.adapter, lm.model, ALL)
    routers = [s for s in sites if s.component is Component.ROUTER]
    extra = {s: [RouterStats(num_experts=8)] for s in routers}
    extra[sites[0]] = [Watch()]
    meters = [SinkMeter(n_layers, int(lm.config.num_attention_heads)), QKMeter(n_layers)]
    with eager_attention(lm.model):
        res = trace(lm, PROMPTS, sites, ("absmax", "moments", "log_histogram"), batch_size=3, progress=False,
                    sinks=extra, meters=meters)
    assert modes and all(modes)
    objs = [*(r for s in sites for r in res[s].values()), *(r for s in routers for r in extra[s]), *meters]
    for o in objs:
        assert not any(v.is_inference() for v in o.state_dict().values()), type(o).__name__
        o.merge(state.fresh(o).load_state_dict(o.state_dict()))  # in place: raises on an inference tensor

    config = tiny_config("phi3")
    half = config.hidden_size // config.num_attention_heads // 2
    config.rope_parameters = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 1.0,
                              "short_factor": [1.0] * half, "long_factor": [2.0] * half,
                              "original_max_position_embeddings": 4}  # prompts longer than 4 tokens: long factors
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    zoo_tokenizer.save_pretrained(tmp_path)
    phi = load(str(tmp_path))
    rope = phi.model.model.rotary_emb
    vars(rope).pop("long_inv_freq", None)  # (loading ran a forward): the trace is the first to compute them
    trace(phi, PROMPTS, all_sites(phi.adapter, phi.model, ["resid_post"]), ("absmax",), progress=False)
    assert rope.long_inv_freq.is_inference() is False
    rope.long_inv_freq.mul_(1.0)
    assert not any(t.is_inference() for m in phi.model.modules() for t in [*m.buffers(recurse=False),
                                                                             *m.parameters(recurse=False)])
