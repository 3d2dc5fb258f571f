"""Massive values in Q, K and V (experts/qk.py): the meter against a brute-force computation, merging,
the forward left as it was, a planted massive key dimension found where it was put, and the profile's
``qk_values`` section."""

from __future__ import annotations

import pytest
import torch

from workbench.adapters.base import adapter_for
from workbench.experts.qk import QKMeter

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(model_type="llama"):
    from workbench.models.families import tiny_model
    return tiny_model(model_type)


def _measure(model, batches):
    meter = QKMeter(len(adapter_for(model).decoder_layers(model)))
    meter.install(model, adapter_for(model))
    try:
        with torch.no_grad():
            for ids, grid in batches:
                meter.begin_batch(grid)
                model(input_ids=ids)
    finally:
        meter.remove()
    return meter


def _batch(seed, pad_last=False):
    ids = torch.randint(100, 2000, (2, 7), generator=torch.Generator().manual_seed(seed))
    grid = ids.clone()
    if pad_last:
        grid[1, -2:] = -1  # the meter leaves these positions out
    return ids, grid


def _brute(model, ids, grid, layer):
    """Q, K (after RoPE) and V of ``layer`` recomputed from the projections, summed over the grid's tokens."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    attn = model.model.layers[layer].self_attn
    seen = {}
    hooks = [getattr(attn, n).register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, o.detach()))
             for n in ("q_proj", "k_proj", "v_proj")]
    with torch.no_grad():
        model(input_ids=ids)
        pos = torch.arange(ids.shape[1])[None]
        cos, sin = model.model.rotary_emb(seen["q_proj"], pos)
    for h in hooks:
        h.remove()
    hd = attn.head_dim
    q, k, v = (seen[n].view(*ids.shape, -1, hd).transpose(1, 2) for n in ("q_proj", "k_proj", "v_proj"))
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    valid = (grid >= 0).double()[:, None, :, None]
    no0 = valid.clone()
    no0[:, :, 0] = 0
    return {p: ((x.double() ** 2 * valid).sum((0, 2)), (x.double() ** 2 * no0).sum((0, 2)))
            for p, x in zip("qkv", (q, k, v))}


@pytest.mark.parametrize("hold", [True, False], ids=["held", "at-once"])
def test_meter_equals_brute_force_and_merges(hold, monkeypatch):
    """Small calls are held and reduced together; large ones (SMALL_PAYLOAD 0 here) at once: both equal brute force."""
    if not hold:
        monkeypatch.setattr("workbench.experts.qk.SMALL_PAYLOAD", 0)
    model = _tiny()
    b1, b2 = _batch(0, pad_last=True), _batch(1)
    meter = _measure(model, [b1, b2])
    for layer in (0, 3):
        ref1, ref2 = _brute(model, *b1, layer), _brute(model, *b2, layer)
        for p in "qkv":
            torch.testing.assert_close(meter.sums[f"{layer}.{p}.all"], ref1[p][0] + ref2[p][0], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(meter.sums[f"{layer}.{p}.no0"], ref1[p][1] + ref2[p][1], rtol=1e-5, atol=1e-6)
    assert meter.tokens[0].tolist() == [14 + 12, 14 + 12 - 4]
    first, second = _measure(model, [b1]), _measure(model, [b2])
    want = {key: first.sums[key] + second.sums[key] for key in first.sums}
    halves = first.merge(second)
    assert halves.sums.keys() == meter.sums.keys() and torch.equal(halves.tokens, meter.tokens)
    for key, v in meter.sums.items():
        assert torch.equal(halves.sums[key], want[key])  # merging adds the float64 totals, nothing else
        # one product per call and batch either way (held or not): the same float32 sums, added in float64
        torch.testing.assert_close(halves.sums[key], v, rtol=1e-12, atol=0)
    restored = QKMeter(4).load_state_dict(meter.state_dict())
    assert restored.sums.keys() == meter.sums.keys() and torch.equal(restored.tokens, meter.tokens)
    assert all(torch.equal(restored.sums[key], v) for key, v in meter.sums.items())


@pytest.mark.parametrize("before", ["sdpa", "eager"])
def test_forward_is_unchanged_and_the_implementation_restored(before):
    """The recording implementation calls the one the model was using: the same kernels on the same buffers,
    so the logits are bit-equal."""
    model = _tiny()
    model.set_attn_implementation(before)
    ids = _batch(0)[0]
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    meter = QKMeter(4)
    meter.install(model, adapter_for(model))
    try:
        meter.begin_batch(ids)
        with torch.no_grad():
            got = model(input_ids=ids).logits
    finally:
        meter.remove()
    assert torch.equal(got, ref)
    assert model.config._attn_implementation == before


def test_planted_massive_key_dimension_is_found():
    """Key rows of one rotary pair (dims 5 and 13 of a 16-dim head) of KV head 1 in layer 2 scaled x30: the
    largest key ratio of the model is that layer, head and pair, with the pair's wavelength."""
    model = _tiny()
    k = model.model.layers[2].self_attn.k_proj
    hd = model.model.layers[2].self_attn.head_dim
    with torch.no_grad():
        for d in (5, 5 + hd // 2):
            k.weight[1 * hd + d] *= 30
    meter = _measure(model, [_batch(0), _batch(1)])
    res = meter.result(model)
    keys = [e for e in res["entries"] if e["proj"] == "k"]
    best = max(keys, key=lambda e: e["ratio"])
    assert (best["layer"], best["head"], best["pair"]) == (2, 1, 5) and best["dim"] in (5, 13)
    assert best["ratio"] > 5 * max(e["ratio"] for e in keys if (e["layer"], e["head"]) != (2, 1))
    inv = model.model.rotary_emb.inv_freq
    assert best["wavelength"] == pytest.approx(2 * torch.pi / float(inv[5]))
    assert res["rotary_dims"] == hd and {r["layer"] for r in res["by_layer"]} == {0, 1, 2, 3}
    for e in res["entries"]:
        assert {"layer", "proj", "head", "dim", "ratio"} <= e.keys() and e["proj"] in ("q", "k", "v")


def test_no_rope_and_unmeasured_families_say_so():
    gpt2 = _measure(_tiny("gpt2"), [_batch(0)]).result(_tiny("gpt2"))
    assert gpt2["rotary_dims"] == 0 and gpt2["entries"] and all(e["pair"] is None for e in gpt2["entries"])
    falcon = _tiny("falcon")  # its attention does not go through transformers' attention interface
    res = _measure(falcon, [_batch(0)]).result(falcon)
    assert res["entries"] == [] and res["unmeasured_layers"] == [0, 1, 2, 3]


def test_profile_has_a_qk_values_section(tmp_path):
    import pandas as pd

    from workbench.experts.profile import ProfileOptions, profile
    from workbench.experts.report import write
    from workbench.models.specs import load

    lm = load("zoo:qwen3-moe")
    before = lm.model.config._attn_implementation
    p = profile(lm, ["The capital of France is Paris.", "Once upon a time there was a dog."], progress=False)
    q = p["qk_values"]
    assert len(q["by_layer"]) == 4 and q["entries"] and q["tokens"][0] > 0
    assert "qk_values" not in profile(lm, ["The capital of France is"], ProfileOptions(qk=False), progress=False)
    assert lm.model.config._attn_implementation == before
    files = {f.name for f in write(p, tmp_path)}
    assert {"qk_values.parquet", "qk_concentration.png", "qk_norms_k.png", "qk_norms_v.html"} <= files
    df = pd.read_parquet(tmp_path / "qk_values.parquet")
    cfg = lm.model.config
    hd = cfg.head_dim
    assert len(df) == 4 * (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * hd
    top = max((e for e in q["entries"] if e["proj"] == "k"), key=lambda e: e["ratio"])
    row = df[(df.layer == top["layer"]) & (df.proj == "k") & (df["head"] == top["head"]) & (df.dim == top["dim"])]
    assert float(row.ratio.iloc[0]) == pytest.approx(top["ratio"], rel=1e-6) and int(row.pair.iloc[0]) == top["pair"]


# ----- head and Q/K interventions ----------------------------------------------------------------------

def _lm(model_type="llama"):
    from workbench.models.specs import LoadedModel

    model = _tiny(model_type)
    return LoadedModel(model, None, adapter_for(model), model_type)


def _logits(lm, ids, ivs=(), mask=None):
    from workbench.interventions import apply

    with torch.no_grad(), apply(lm, list(ivs)):
        return lm.model(input_ids=ids, attention_mask=mask).logits


def test_zero_and_scale_head_equal_the_output_projection_columns_changed():
    lm = _lm()
    ids = _batch(0)[0]
    ref = _logits(lm, ids)
    o = lm.model.model.layers[1].self_attn.o_proj
    hd = lm.model.model.layers[1].self_attn.head_dim
    keep = o.weight.detach().clone()
    with torch.no_grad():
        o.weight[:, 2 * hd:3 * hd] *= 0.5
        want = lm.model(input_ids=ids).logits
        o.weight.copy_(keep)
    got = _logits(lm, ids, [{"op": "scale_head", "layers": 1, "head": 2, "factor": 0.5}])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    zero = _logits(lm, ids, [{"op": "zero_head", "layers": [1], "heads": [2], "positions": [-1]}])
    assert torch.equal(zero[:, :-1], ref[:, :-1]) and not torch.equal(zero[:, -1], ref[:, -1])
    assert torch.equal(_logits(lm, ids), ref)  # restored on exit


def _reference_mean_qk(q, k, dims, heads, proj, keep_first, group):
    """Loops: the chosen (head, dim) entries at every token become their mean over the tokens."""
    q, k = q.clone(), k.clone()
    T = q.shape[2]
    for name, x in (("q", q), ("k", k)):
        if name not in proj:
            continue
        hs = range(x.shape[1]) if heads is None else sorted({h if name == "q" else h // group for h in heads})
        for b in range(x.shape[0]):
            toks = list(range(1 if keep_first else 0, T))
            for h in hs:
                for dd in dims:
                    x[b, h, toks, dd] = x[b, h, toks, dd].mean()
    return q, k


@pytest.mark.parametrize("proj,heads,keep_first", [("qk", None, False), ("k", [3], True), ("q", [0, 2], False)])
def test_mean_qk_equals_a_hand_written_reference(proj, heads, keep_first):
    from workbench.tracing.attention_tap import AttentionTap

    lm = _lm()
    ids = _batch(0)[0]
    attn = lm.model.model.layers[2].self_attn
    dims = (1, 9)
    group = lm.model.config.num_attention_heads // lm.model.config.num_key_value_heads

    def by_hand(module, q, k, v):
        return (*_reference_mean_qk(q, k, dims, heads, proj, keep_first, group), v)
    with AttentionTap(lm.model, {attn: by_hand}), torch.no_grad():
        want = lm.model(input_ids=ids).logits
    iv = {"op": "mean_qk", "layers": 2, "dims": list(dims), "proj": proj, "keep_first": keep_first}
    if heads is not None:
        iv["heads"] = heads
    got = _logits(lm, ids, [iv])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, _logits(lm, ids))


def test_mean_qk_top_picks_the_largest_dims_and_the_cache_keeps_them():
    """``top: 2`` on a key pair planted x30 changes the model exactly as naming those dims; in generation the
    prompt's changed keys are what the cache holds."""
    lm = _lm()
    attn = lm.model.model.layers[2].self_attn
    hd = attn.head_dim
    with torch.no_grad():
        for d in (5, 5 + hd // 2):
            attn.k_proj.weight[hd:2 * hd][d] *= 30  # KV head 1
    ids = _batch(0)[0]
    top = _logits(lm, ids, [{"op": "mean_qk", "layers": 2, "top": 2, "proj": "k", "heads": [2, 3]}])
    named = _logits(lm, ids, [{"op": "mean_qk", "layers": 2, "dims": [5, 5 + hd // 2], "proj": "k", "heads": [2, 3]}])
    torch.testing.assert_close(top, named, rtol=1e-5, atol=1e-6)
    from workbench.interventions import apply

    with torch.no_grad(), apply(lm, [{"op": "mean_qk", "layers": 2, "dims": [5], "proj": "k"}]):
        out = lm.model(input_ids=ids, use_cache=True)
        keys = out.past_key_values.layers[2].keys
    assert torch.allclose(keys[:, :, :, 5], keys[:, :, :1, 5].expand_as(keys[:, :, :, 5]))


def test_bad_head_and_qk_interventions_get_one_line_errors():
    from workbench.errors import WorkbenchError
    from workbench.interventions import apply

    lm = _lm()
    cases = [({"op": "zero_head", "layers": 0, "head": 9}, "head 9 out of range"),
             ({"op": "zero_head", "layers": 0}, "needs field 'heads'"),
             ({"op": "mean_qk", "layers": 0, "dims": [16], "proj": "k"}, "dim 16 out of range"),
             ({"op": "mean_qk", "layers": 0, "top": 2, "dims": [1]}, "exactly one of"),
             ({"op": "mean_qk", "layers": 0, "top": 2, "proj": "o"}, "'proj' must be"),
             ({"op": "mean_qk", "layers": 0, "random": 14}, "random.*3 of them the top ones")]
    for iv, msg in cases:
        with pytest.raises(WorkbenchError, match=msg):
            apply(lm, [iv])
    with pytest.raises(WorkbenchError, match="no rotary attention"):
        apply(_lm("gpt2"), [{"op": "mean_qk", "layers": 0, "top": 1}])
    with pytest.raises(WorkbenchError, match="does not use"):
        apply(_lm("falcon"), [{"op": "mean_qk", "layers": 0, "top": 1}])


def test_mean_qk_random_dims_avoid_each_heads_top_three_and_follow_the_seed():
    from workbench.interventions import Intervention, mean_qk

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 6, 16, generator=g), torch.randn(2, 2, 6, 16, generator=g)
    k[:, :, :, [3, 7, 11]] *= 50  # each head's 3 largest
    valid = torch.ones(2, 6, dtype=torch.bool)
    picked = []
    for seed in (0, 0, 1):
        kk = k.clone()
        mean_qk(q.clone(), kk, Intervention("mean_qk", (0,), random=2, seed=seed, proj="k"), valid, valid)
        changed = (kk != k).any(2)  # [B, KV, d]
        assert int(changed.sum(-1).max()) <= 2 and not changed[..., [3, 7, 11]].any()
        picked.append(changed)
    assert torch.equal(picked[0], picked[1]) and not torch.equal(picked[0], picked[2])
    v = torch.randn(2, 2, 6, 16, generator=g)
    vv = v.clone()
    mean_qk(q.clone(), k.clone(), Intervention("mean_qk", (0,), dims=(4,), proj="v"), valid, valid, vv)
    assert torch.allclose(vv[..., 4], v[..., 4].mean(2, keepdim=True).expand_as(v[..., 4]))
    assert torch.equal(vv[..., :4], v[..., :4])


def test_trace_q_k_v_components_feed_the_reducers():
    """`trace --components q,k` sites: one row per real token, heads side by side; their sums of squares per
    column are the QKMeter's per (head, dim), and padding never reaches a reducer."""
    from transformers import AutoTokenizer

    from workbench.models.gguf import tokenizer_dir
    from workbench.models.specs import LoadedModel
    from workbench.tracing.runner import trace
    from workbench.tracing.sites import Site

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir()))
    model = _tiny()
    lm = LoadedModel(model, tok, adapter_for(model), "tiny")
    prompts = ["The capital of France is Paris.", "Once upon a time", "def add(a, b): return a + b"]
    sites = [Site(1, "q"), Site(1, "k"), Site(2, "v")]
    res = trace(lm, prompts, sites, ["moments"], batch_size=2, progress=False)
    meter = QKMeter(4)
    meter.install(model, adapter_for(model))
    try:
        with torch.no_grad():
            for p in prompts:
                ids = tok(p, return_tensors="pt").input_ids
                meter.begin_batch(ids)
                model(input_ids=ids)
    finally:
        meter.remove()
    n = sum(len(tok(p).input_ids) for p in prompts)
    for site, proj in zip(sites, ("q", "k", "v")):
        r = res.reducers[site]["moments"]
        assert r.result()["count"] == n and r.count.numel() == meter.sums[f"{site.layer}.{proj}.all"].numel()
        sumsq = r.m2 + r.count * r.mean ** 2  # per column (head-major: head * head_dim + dim)
        torch.testing.assert_close(sumsq, meter.sums[f"{site.layer}.{proj}.all"].flatten(), rtol=1e-4, atol=1e-6)


def test_latent_attention_pairs_are_its_last_dims():
    """DeepSeek-V3's latent attention: queries and keys are (no-rope dims, rope dims); only the latter have
    rotary pairs (halves after its rotation), with their wavelengths."""
    from workbench.models.specs import load

    lm = load("zoo:deepseek-v3")
    meter = _measure(lm.model, [_batch(0)])
    res = meter.result(lm.model)
    attn = lm.model.model.layers[0].self_attn
    nope, rope = attn.qk_nope_head_dim, attn.qk_rope_head_dim
    want = [None] * nope + [j % (rope // 2) for j in range(rope)]  # V3's rotated dims come out as halves
    assert res["pair_of_dim"] == want
    inv = next(m.inv_freq for m in lm.model.modules() if hasattr(m, "inv_freq"))
    for e in res["entries"]:
        if e["proj"] != "v" and e["dim"] >= nope:
            assert e["wavelength"] == pytest.approx(2 * torch.pi / float(inv[e["pair"]]))
        else:
            assert e["pair"] is None


def test_meter_keeps_projections_of_other_head_dims_apart():
    """Latent attention can hand V a head dim other than Q's and K's: then the meter keeps one total per
    projection; each equals the masked sum of squares, and merging and a state round trip keep them apart."""
    g = torch.Generator().manual_seed(0)

    def run(batches):
        meter = QKMeter(2)
        for q, k, v, grid in batches:
            meter.begin_batch(grid)
            meter.update(1, q, k, v)
        return meter

    batches = []
    for _ in range(2):
        q, k, v = torch.randn(2, 4, 5, 24, generator=g), torch.randn(2, 1, 5, 24, generator=g), torch.randn(2, 1, 5, 16, generator=g)
        grid = torch.arange(10).view(2, 5)
        grid[1, :2] = -1  # left padding: the second prompt's first real token is at position 2
        batches.append((q, k, v, grid))
    both = run(batches)
    for proj, i in zip("qkv", range(3)):
        want_all = sum((b[i][0] ** 2).sum(1) + (b[i][1, :, 2:] ** 2).sum(1) for b in batches).double()
        want_no0 = sum((b[i][0, :, 1:] ** 2).sum(1) + (b[i][1, :, 3:] ** 2).sum(1) for b in batches).double()
        torch.testing.assert_close(both.sums[f"1.{proj}.all"], want_all, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(both.sums[f"1.{proj}.no0"], want_no0, rtol=1e-5, atol=1e-6)
    assert both.tokens[1].tolist() == [16, 12] and both.tokens[0].tolist() == [0, 0]
    merged = run(batches[:1]).merge(run(batches[1:]))
    restored = QKMeter(2).load_state_dict(merged.state_dict())
    for key, v in both.sums.items():
        torch.testing.assert_close(merged.sums[key], v, rtol=1e-12, atol=0)
        torch.testing.assert_close(restored.sums[key], v, rtol=1e-12, atol=0)
    assert torch.equal(restored.tokens, both.tokens)
    assert restored.result()["entries"] == merged.result()["entries"]
    with pytest.raises(ValueError, match="incomplete"):
        QKMeter(2).load_state_dict({k: v for k, v in merged.state_dict().items() if not k.endswith(".v.no0")})


@pytest.mark.parametrize("spec", ["tiny-llama", "zoo:deepseek-v3", "deepseek_v2", "glm", "cohere", "helium",
                                  "ernie4_5_moe", "phi", "stablelm", "gemma3_text"])
def test_rotary_pairs_are_the_models_own(spec):
    """In layer 0 a repeated token has the same query before RoPE at every position, so the joint norm of a
    true rotary pair is the same at every position while its single dims are not: the pairs the meter
    names (rotate_half halves for Llama, interleaved rope dims for DeepSeek-V3, interleaved pairs for GLM, Cohere,
    Helium and ERNIE, which were given rotate_half's halves, 8 of 8 pairs wrong on Cohere) are the model's."""
    from workbench.models.specs import load
    from workbench.tracing.attention_tap import AttentionTap

    model = _tiny() if spec == "tiny-llama" else load(spec).model if spec.startswith("zoo:") else _tiny(spec)
    meter = _measure(model, [_batch(0)])
    pairs = meter.result(model)["pair_of_dim"]
    seen = {}
    attn = adapter_for(model).attention(adapter_for(model).decoder_layers(model)[0])
    def keep(module, q, k, v):
        seen.setdefault("q", q[0, 0].detach().clone())
    with AttentionTap(model, {attn: keep}), torch.no_grad():
        model(input_ids=torch.full((1, 6), 500))
    q = seen["q"]  # [T, d] of head 0
    groups: dict[int, list[int]] = {}
    for d, p in enumerate(pairs):
        if p is not None:
            groups.setdefault(p, []).append(d)
    assert groups and all(len(g) == 2 for g in groups.values())
    for dims in groups.values():
        joint = q[:, dims].norm(dim=-1)
        torch.testing.assert_close(joint, joint[:1].expand_as(joint), rtol=1e-4, atol=1e-6)
    moving = max(float((q[:, d] - q[0, d]).abs().max()) for g in groups.values() for d in g)
    assert moving > 1e-3  # RoPE did rotate them


def test_nope_layers_and_per_layer_frequencies_are_read_from_the_rotation():
    """SmolLM3's and Cohere2's NoPE layers were given rotary pairs and wavelengths; Gemma3's sliding and full layers
    rotate with other frequencies (other buffers), which the first inv_freq buffer could not say (its profile had no
    rotation at all). Each layer's own: not rotated, or its wavelengths; and `mean_qk matched` refuses a NoPE layer."""
    import math

    from workbench.models.families import tiny_config
    from transformers import AutoModelForCausalLM

    for model_type, nope in (("smollm3", [3]), ("cohere2", [3])):
        model = _tiny(model_type)
        meter = _measure(model, [_batch(0)])
        r = meter.result(model)
        assert r["not_rotated_layers"] == nope, model_type
        # a checkpoint holds them (a resumed pass may not run a layer's first calls again): the same result
        assert QKMeter(meter.num_layers).load_state_dict(meter.state_dict()).result(model) == r
        assert all(e["pair"] is None and e["wavelength"] is None for e in r["entries"] if e["layer"] in nope)
        assert any(e["pair"] is not None for e in r["entries"] if e["layer"] not in nope)
    c = tiny_config("gemma3_text")
    c.layer_types = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(c).eval()
    r = _measure(model, [_batch(0)]).result(model)
    longest = {}
    for e in r["entries"]:
        if e["pair"] is not None:
            theta = c.rope_parameters[c.layer_types[e["layer"]]]["rope_theta"]
            assert e["wavelength"] == pytest.approx(2 * math.pi * theta ** (2 * e["pair"] / 16), rel=1e-5)
            longest[e["layer"]] = max(longest.get(e["layer"], 0), e["pair"])
    assert len(longest) == 4 and r["rotary_dims"] == 16


def test_mean_qk_matched_follows_the_layers_rotation():
    """`matched` walked rotate_half's dims (p, p + rot / 2) from the highest frequency on every family: on the
    interleaved ones it mixed dims of other pairs; on a NoPE layer it picked "rotary" dims that are not rotated."""
    import workbench.interventions as I
    from workbench.errors import WorkbenchError
    from workbench.interventions import Applied, Intervention
    from workbench.models.specs import LoadedModel

    for model_type in ("cohere2",):
        model = _tiny(model_type)
        lm = LoadedModel(model, None, adapter_for(model), model_type)
        seen = {}
        real = I.mean_qk

        def spy(q, k, iv, valid, replace, v=None, order=None):
            seen[iv.layers] = None if order is None else order.tolist()
            return real(q, k, iv, valid, replace, v, order=order)

        I.mean_qk = spy
        try:
            with Applied(lm, [Intervention.from_dict({"op": "mean_qk", "layers": [0], "matched": 1})]), torch.no_grad():
                model(input_ids=_batch(0)[0])
            with pytest.raises(WorkbenchError, match="layer 3 is not rotated \\(a NoPE layer\\)"), \
                    Applied(lm, [Intervention.from_dict({"op": "mean_qk", "layers": [3], "matched": 1})]), \
                    torch.no_grad():
                model(input_ids=_batch(0)[0])
        finally:
            I.mean_qk = real
        assert seen[(0,)] == list(range(16))  # interleaved pairs (0, 1), (2, 3) ... from the highest frequency


def test_qkv_sites_only_where_the_attention_interface_is_used(tmp_path, zoo_tokenizer):
    """all_sites leaves out layers whose Q/K/V cannot be read (hybrid linear attention, Falcon's own
    attention); `trace --components q` on a model with none says why in one line, with a non-zero exit."""
    import subprocess
    import sys

    from workbench.models.families import save_tiny
    from workbench.tracing.sites import all_sites

    nxt = _tiny("qwen3_next")
    ad = adapter_for(nxt)
    layers = [i for i, layer in enumerate(ad.decoder_layers(nxt)) if ad.has_attention(layer)]
    assert [s.layer for s in all_sites(ad, nxt, ["q"])] == layers and len(layers) < 4
    falcon = _tiny("falcon")
    assert all_sites(adapter_for(falcon), falcon, ["k", "v"]) == []
    folder = save_tiny("falcon", tmp_path / "falcon", zoo_tokenizer)
    r = subprocess.run([sys.executable, "-m", "workbench", "trace", str(folder), "--components", "q", "--text", "x",
                        "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert r.returncode != 0 and r.stderr.strip().splitlines()[-1].startswith("error: no q sites: FalconAttention")
    assert not (tmp_path / "out").exists()


def test_mean_qk_matched_takes_high_frequency_dims_until_the_top_ns_size():
    """``matched: N``: per prompt and head, rotary dims from the highest frequency down (pair p = dims p and
    p + rot/2), the top N by norm skipped, until their mean-ablation changes as much as the top N's would."""
    from workbench.interventions import Intervention, mean_qk

    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 4, 7, 16, generator=g), torch.randn(2, 2, 7, 16, generator=g)
    k[:, :, :, [6, 14]] = k[:, :, :, [6, 14]] * 2.5 + 10  # pair 6: the top 2 by norm in every head (an offset)
    k[1, 1, :, 0] *= 4  # prompt 1, KV head 1: pair 0's first dim varies more than the top 2 together
    valid = torch.ones(2, 7, dtype=torch.bool)
    order = torch.tensor([d for p in range(8) for d in (p, p + 8)])
    kk = k.clone()
    mean_qk(q.clone(), kk, Intervention("mean_qk", (0,), matched=2, proj="k"), valid, valid, order=order)
    changed = (kk != k).any(2)  # [B, KV, d]
    size = (k - k.mean(2, keepdim=True)).square().sum(2)  # [B, KV, d]
    for b in range(2):
        for h in range(2):
            target, taken, want = float(size[b, h, [6, 14]].sum()), 0.0, []
            for d in order.tolist():  # the rule by hand
                if d in (6, 14):
                    continue
                if taken < target:
                    want.append(d)
                    taken += float(size[b, h, d])
            assert sorted(torch.nonzero(changed[b, h]).flatten().tolist()) == sorted(want)
            assert (taken >= target or len(want) == 14) and not changed[b, h, [6, 14]].any()
    assert changed[1, 1].sum() == 1 and changed[1, 1, 0]  # one dim was enough there
    assert changed[0, 0].sum() > 2  # small high-frequency dims: more of them than the top 2


def test_mean_qk_matched_on_a_model():
    from workbench.errors import WorkbenchError
    from workbench.interventions import apply

    lm = _lm()
    ids = _batch(0)[0]
    base = _logits(lm, ids)
    got = _logits(lm, ids, [{"op": "mean_qk", "layers": [1, 2], "matched": 2}])
    assert not torch.allclose(got, base) and torch.equal(_logits(lm, ids), base)
    with pytest.raises(WorkbenchError, match="values are not rotated"):
        apply(lm, [{"op": "mean_qk", "layers": 0, "matched": 2, "proj": "v"}])
    with pytest.raises(WorkbenchError, match="exactly one of"):
        apply(lm, [{"op": "mean_qk", "layers": 0, "matched": 2, "top": 2}])


@pytest.mark.parametrize("shape", [(1, 1), (1, 3), (2, 3)], ids=["one-token", "one-prompt", "two-prompts"])
def test_meter_never_writes_the_models_tensors(shape, monkeypatch):
    """Calls reduced at once (SMALL_PAYLOAD 0), projections of other head dims (one per projection): where a
    strided view (a slice of a wider buffer, one head) is not contiguous yet reshapes without a copy, the
    meter squares a copy, never the tensors the attention goes on to use."""
    monkeypatch.setattr("workbench.experts.qk.SMALL_PAYLOAD", 0)
    B, T = shape
    g = torch.Generator().manual_seed(1)
    meter = QKMeter(1)
    meter.begin_batch(torch.arange(B * T).view(B, T))
    # token-major buffers handed over as [B, heads, T, d] views, as the projections produce them
    q, k = (torch.randn(B, T, 1, 8, generator=g).transpose(1, 2) for _ in range(2))
    v = torch.randn(B, T, 1, 6, generator=g)[..., :4].transpose(1, 2)  # a slice: rows of 6, 4 used
    before = [x.clone() for x in (q, k, v)]
    meter.update(0, q, k, v)
    assert all(torch.equal(x, y) for x, y in zip((q, k, v), before))
    for proj, x in zip("qkv", before):
        torch.testing.assert_close(meter.sums[f"0.{proj}.all"], (x.double() ** 2).sum((0, 2)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("padding", ["right", "left", "a whole row"])
@pytest.mark.parametrize("k_layout", ["token-major", "head-major"])
@pytest.mark.parametrize("layers", [(0, 1, 2), (0, 2)], ids=["consecutive", "gap"])
@pytest.mark.parametrize("shape", [(1, 1), (3, 3)], ids=["one-token", "three-prompts"])
def test_held_calls_equal_brute_force_whatever_their_layout(shape, layers, k_layout, padding):
    """Held calls (the tensors themselves, reduced a batch at a time): head-major Q (DeepSeek concatenates its
    queries), K token-major or head-major (then most of the batch is head-major), a strided slice for V; layers
    in order (one add into the shared totals) or not; padding on either side, or a prompt of padding only (it has
    no first token). The model's tensors are never written, and the sums equal brute force over the real tokens,
    with and without each prompt's first."""
    B, T = shape
    g = torch.Generator().manual_seed(2)
    meter = QKMeter(3)
    grid = torch.arange(B * T).view(B, T)
    if B > 1:
        grid[1, {"right": [-1], "left": [0, 1], "a whole row": [0, 1, 2]}[padding]] = -1
    meter.begin_batch(grid)
    calls = {}
    for layer in layers:
        q = torch.randn(B, 2, T, 4, generator=g)  # head-major, contiguous
        k = torch.randn(B, T, 1, 4, generator=g).transpose(1, 2) if k_layout == "token-major" \
            else torch.randn(B, 1, T, 4, generator=g)
        v = torch.randn(B, T, 1, 7, generator=g)[..., 2:6].transpose(1, 2)
        calls[layer] = (q, k, v, [x.clone() for x in (q, k, v)])
        meter.update(layer, q, k, v)
    valid = (grid >= 0).double()
    no0 = valid.clone()
    for b in range(B):
        if valid[b].any():
            no0[b, int(valid[b].argmax())] = 0
    for layer, (q, k, v, before) in calls.items():
        for proj, x, y in zip("qkv", (q, k, v), before):
            assert torch.equal(x, y)
            for which, mask in (("all", valid), ("no0", no0)):
                torch.testing.assert_close(meter.sums[f"{layer}.{proj}.{which}"],
                                           (y.double() ** 2 * mask[:, None, :, None]).sum((0, 2)), rtol=1e-5, atol=1e-6)
    real = int((grid >= 0).sum())
    assert meter.tokens[layers[0]].tolist() == [real, real - int((grid >= 0).any(-1).sum())]


def test_ratio_without_the_first_token_is_nan_when_no_such_token_was_seen():
    """Prompts of one token each leave nothing but first tokens: ratio_no_pos0 read 0.0 (0 over a clamped median),
    as if measured; it is NaN (the sink section already said "not measured")."""
    import math

    model = _tiny()
    ids = torch.randint(100, 2000, (3, 1), generator=torch.Generator().manual_seed(0))
    r = _measure(model, [(ids, ids.clone())]).result(model)
    assert r["entries"] and all(math.isnan(e["ratio_no_pos0"]) and e["ratio"] > 0 for e in r["entries"])
    # no position 1 to read the frequencies at: the model's inv_freq (not also its original_inv_freq twin)
    assert all(e["wavelength"] > 0 for e in r["entries"] if e["pair"] is not None)
    r = _measure(model, [_batch(0)]).result(model)
    assert all(e["ratio_no_pos0"] > 0 for e in r["entries"])


def test_rope_recorders_nest_and_leave_the_models_function_as_it_was():
    """Two recorders on one modeling module (a profile under a `mean_qk matched` intervention), removed in either
    order, leave transformers' own apply_rotary_pos_emb in place, and each reads the layout."""
    import sys

    from workbench.experts.rope import RopeRecorder

    model = _tiny("cohere")
    attn = {i: adapter_for(model).attention(b) for i, b in enumerate(adapter_for(model).decoder_layers(model))}
    mod = sys.modules[type(attn[0]).__module__]
    own = mod.apply_rotary_pos_emb
    for first_out in (True, False):
        a, b = RopeRecorder(model, attn).install(), RopeRecorder(model, attn).install()
        from workbench.tracing.attention_tap import AttentionTap

        def tap(i):
            def fn(module, q, k, v):
                a.attention_ran(i, q.shape[-1])
                b.attention_ran(i, q.shape[-1])
            return fn
        with AttentionTap(model, {m: tap(i) for i, m in attn.items()}), torch.no_grad():
            model(input_ids=_batch(0)[0])
        assert a.layouts[0].pair[:4] == b.layouts[0].pair[:4] == [0, 0, 1, 1]
        for r in ((a, b) if first_out else (b, a)):
            r.remove()
        if not first_out:  # removed in the order they were put on: the model's own function is back
            assert mod.apply_rotary_pos_emb is own
        else:  # out of order: the inner wrapper stays in the chain, passing calls through
            left = mod.apply_rotary_pos_emb
            assert left.__wrapped_by_workbench__ is own and not a._active and not b._active
            q = torch.randn(1, 2, 3, 16)
            cos, sin = torch.randn(1, 3, 16), torch.randn(1, 3, 16)
            assert all(torch.equal(x, y) for x, y in zip(left(q, q, cos, sin), own(q, q, cos, sin)))
            mod.apply_rotary_pos_emb = own


def test_wavelengths_are_the_buffers_in_half_precision_too():
    """A bf16 model's cos/sin are rounded to bf16, so the frequencies read from them missed the float32 buffer's by
    more than the 1e-3 they had to match within: wavelengths 0.33 % off (SmolLM2's 24,656 tokens read 24,584)."""
    from workbench.models.specs import load

    got = {}
    for dtype in ("float32", "bfloat16", "float16"):
        lm = load("zoo:qwen3-moe", dtype=dtype)
        got[dtype] = _measure(lm.model, [_batch(0)]).layouts()[0].freq
    assert got["bfloat16"] == got["float32"] == got["float16"]


def test_a_token_that_is_not_finite_adds_nothing_to_the_norms():
    """An fp16 overflow made a few prompts NaN from some layer on: that layer's Q/K/V norms were NaN for every head
    (by_layer NaN too). A NaN or inf token now adds nothing; the norms equal those of the finite tokens alone."""
    from workbench.tracing.attention_tap import AttentionTap

    model = _tiny()
    attn = adapter_for(model).attention(adapter_for(model).decoder_layers(model)[1])
    ids, grid = _batch(0)
    clean = _measure(model, [(ids, grid)])

    seen = {}

    def poison(module, q, k, v):  # the second prompt's third token overflowed
        q, k, v = q.clone(), k.clone(), v.clone()
        for x in (q, k, v):
            x[1, :, 2] = float("nan")
        v[0, 0, 3, 0] = float("inf")
        seen.update(q=q, k=k, v=v)
        return q, k, v

    with AttentionTap(model, {attn: poison}):
        hit = _measure(model, [(ids, grid)])
    for key, v in hit.sums.items():
        assert torch.isfinite(v).all(), key
    for proj in ("q", "k", "v"):  # layer 1: the sums of squares of the finite entries, by hand
        x = seen[proj].double().square().nan_to_num(nan=0.0, posinf=0.0)  # [B, H, T, d]
        want = (x * (grid >= 0)[:, None, :, None]).sum(dim=(0, 2))
        torch.testing.assert_close(hit.sums[f"1.{proj}.all"], want, rtol=1e-5, atol=1e-6)
    for key in (k for k in clean.sums if k.startswith("0.")):  # layer 0, before the poison: as without it
        torch.testing.assert_close(hit.sums[key], clean.sums[key])


def test_the_cli_line_places_each_projections_largest_dim(run, tmp_path):
    """The summary named the key's place only; the query's largest ratio is often another head's (SmolLM2: q at L3.H5,
    k at L19.H0), so "q 21.1, k 15.1 (L19.H0 dim 23 ...)" read as both there."""
    import json

    code, out, err = run("profile", "zoo:qwen3-moe", "--text", "The capital of France is Paris.", "--text",
                         "Water boils at one hundred degrees.", "--quiet", "--no-plots", "--out", tmp_path / "o")
    assert code == 0, err
    line = next(l for l in out.splitlines() if l.startswith("massive values in attention"))
    entries = json.loads((tmp_path / "o" / "profile.json").read_text())["qk_values"]["entries"]
    for proj in "qkv":
        e = max((x for x in entries if x["proj"] == proj), key=lambda x: x["ratio"])
        assert f"{proj} {e['ratio']:.1f} (L{e['layer']}.H{e['head']} dim {e['dim']}" in line, line
