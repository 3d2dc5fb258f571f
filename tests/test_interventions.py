"""Interventions are exact, scoped, validated, and leave no trace when the context exits."""

import pytest
import torch

from helpers import PROMPTS, ZOO_SPECS, assert_close
from workbench.errors import WorkbenchError
from workbench.interventions import Intervention, apply, load_file, parse
from workbench.models.specs import load


def batch(lm):
    return lm.tokenizer(PROMPTS, return_tensors="pt", padding=True)


def logits(lm, enc):
    with torch.no_grad():
        return lm.model(**enc).logits


def moe_layer(lm):
    return next(i.index for i in lm.layer_infos() if i.kind == "moe")


@pytest.mark.parametrize("spec", ZOO_SPECS)
def test_every_op_restores_the_model_exactly(spec):
    lm = load(spec)
    enc = batch(lm)
    before = logits(lm, enc)
    L = moe_layer(lm)
    ops = [dict(op="zero", layers=L, expert=1), dict(op="scale", layers=L, expert=2, factor=3.0),
           dict(op="drop", layers=L, expert=3), dict(op="bias", layers=L, expert=4, value=2.0),
           dict(op="zero_channel", layers=0, channel=5, positions=[0, -1])]
    ops += [dict(op="force", layers=L, expert=5, weight=0.5), dict(op="zero", layers=L, expert=1, positions=[0])]
    for op in ops:
        with apply(lm, [op]):
            changed = logits(lm, enc)
        assert (changed - before).abs().max() > 1e-4, op  # each op really changes the output
    assert torch.equal(logits(lm, enc), before)  # same model, buffers and shapes: bit-identical after leaving
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in lm.model.modules())


@pytest.mark.parametrize("spec", ["zoo:qwen3-moe", "zoo:mixtral", "zoo:deepseek-v3", "zoo:qwen3-moe-modulelist"])
def test_zero_equals_removing_the_expert_weights(spec):
    lm = load(spec)
    enc = batch(lm)
    L = moe_layer(lm)
    with apply(lm, [dict(op="zero", layers=L, expert=2)]):
        ours = logits(lm, enc)
    experts = lm.adapter.experts(lm.adapter.decoder_layers(lm.model)[L])
    w = experts[2].down_proj.weight if isinstance(experts, torch.nn.ModuleList) else experts.down_proj[2]
    saved = w.detach().clone()
    with torch.no_grad():
        w.zero_()
    try:
        ref = logits(lm, enc)
    finally:
        with torch.no_grad():
            w.copy_(saved)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


MODULELIST_OPS = [
    [dict(op="force", layers=1, expert=5, weight=0.5)],
    [dict(op="force", layers=[0, 2], expert=3, weight=0.3, positions=[0, -1])],
    [dict(op="zero", layers=1, expert=2, positions=[0, 1])],
    [dict(op="scale", layers=0, expert=4, factor=3.0, token="a")],
    [dict(op="zero", layers=0, expert=2, prompts=[1])],
    [dict(op="drop", layers=1, expert=0), dict(op="force", layers=1, expert=7, weight=0.4, positions=[-1]),
     dict(op="zero", layers=1, expert=1)],
]


@pytest.mark.parametrize("ops", MODULELIST_OPS, ids=lambda ops: "+".join(o["op"] for o in ops))
def test_modulelist_experts_take_force_and_scoped_ops_like_the_fused_layout(ops):
    """zoo:qwen3-moe-modulelist holds zoo:qwen3-moe's weights in the older layout: same interventions, same logits."""
    fused, mlist = load("zoo:qwen3-moe"), load("zoo:qwen3-moe-modulelist")
    enc = batch(fused)
    base = logits(mlist, enc)
    out = {}
    for name, lm in (("fused", fused), ("modulelist", mlist)):
        with apply(lm, ops) as applied:
            applied.set_prompts(range(len(PROMPTS)))
            out[name] = logits(lm, enc)
    assert (out["modulelist"] - base).abs().max() > 1e-3  # the intervention does something
    torch.testing.assert_close(out["modulelist"], out["fused"], rtol=1e-5, atol=2e-5)
    assert torch.equal(logits(mlist, enc), base)


def test_scale_equals_scaling_the_expert_weights():
    lm = load("zoo:olmoe")
    enc = batch(lm)
    with apply(lm, [dict(op="scale", layers=[0, 2], expert=6, factor=2.5)]):
        ours = logits(lm, enc)
    saved = {}
    for L in (0, 2):
        d = lm.adapter.experts(lm.adapter.decoder_layers(lm.model)[L]).down_proj
        saved[L] = d[6].detach().clone()
        with torch.no_grad():
            d[6] *= 2.5
    try:
        ref = logits(lm, enc)
    finally:
        with torch.no_grad():
            for L, v in saved.items():
                lm.adapter.experts(lm.adapter.decoder_layers(lm.model)[L]).down_proj[6].copy_(v)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spec,renorm", [("zoo:qwen3-moe", True), ("zoo:olmoe", False), ("zoo:mixtral", True)])
def test_drop_equals_rerouting_by_hand(spec, renorm):
    lm = load(spec)
    enc = batch(lm)
    L, e, k = moe_layer(lm), 3, lm.summary()["top_k"]
    layer = lm.adapter.decoder_layers(lm.model)[L]
    seen = {}

    def by_hand(mod, args, out):
        lg = out[0].masked_fill(torch.arange(out[0].shape[1]) == e, float("-inf"))
        p = torch.softmax(lg.float(), -1)
        w, i = torch.topk(p, k, -1)
        if renorm:
            w = w / w.sum(-1, keepdim=True)
        seen["index"] = i
        return (out[0], w, i)

    h = lm.adapter.router(layer).register_forward_hook(by_hand)
    try:
        ref = logits(lm, enc)
    finally:
        h.remove()
    got = {}
    with apply(lm, [dict(op="drop", layers=L, expert=e)]):
        h = lm.adapter.router(layer).register_forward_hook(lambda m, a, o: got.update(index=o[2]))
        try:
            ours = logits(lm, enc)
        finally:
            h.remove()
    assert not (got["index"] == e).any() and torch.equal(got["index"], seen["index"])
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


def test_force_puts_the_expert_in_every_tokens_top_k():
    lm = load("zoo:qwen2-moe")
    enc = batch(lm)
    layer = lm.adapter.decoder_layers(lm.model)[1]
    got = {}
    h = lm.adapter.experts(layer).register_forward_pre_hook(
        lambda m, a: got.update(index=a[1].clone(), weights=a[2].clone()))
    try:
        with apply(lm, [dict(op="force", layers=1, expert=7, weight=0.25)]):
            logits(lm, enc)
    finally:
        h.remove()
    hit = got["index"] == 7
    assert hit.sum(-1).eq(1).all()
    assert torch.allclose(got["weights"][hit], torch.tensor(0.25))


@pytest.mark.parametrize("first,second", [((0, 0.4), (1, 0.6)), ((1, 0.6), (0, 0.4))])
def test_two_forces_keep_both_experts_in_either_order(first, second):
    """The second force took the lowest-weighted slot, which could be the one the first had just set: with
    [e0 0.4, e1 0.6], e0 stayed in 2 of 16 tokens on zoo:qwen3-moe (16 with the list reversed). More forces than
    the layer's top-k are refused."""
    lm = load("zoo:qwen3-moe")
    layer = lm.adapter.decoder_layers(lm.model)[1]
    got = {}
    h = lm.adapter.experts(layer).register_forward_pre_hook(lambda m, a: got.update(index=a[1].clone(),
                                                                                     weights=a[2].clone()))
    try:
        with apply(lm, [dict(op="force", layers=1, expert=e, weight=w) for e, w in (first, second)]):
            logits(lm, batch(lm))
    finally:
        h.remove()
    for e, w in (first, second):
        hit = got["index"] == e
        assert hit.sum(-1).eq(1).all() and torch.allclose(got["weights"][hit], torch.tensor(w)), e
    k = lm.layer_infos()[1].top_k
    with pytest.raises(WorkbenchError, match=rf"force puts {k + 1} experts \(0, 1, 2\) in layer 1, which routes each "
                                             rf"token to {k}: they cannot all be chosen"):
        apply(lm, [dict(op="force", layers=1, expert=e, weight=0.3) for e in range(k + 1)])


def test_one_expert_both_dropped_and_forced_is_refused():
    """A drop and a force of one expert were accepted without a word (the force won); where both apply, it is
    refused. Other scopes and other experts are not."""
    lm = load("zoo:qwen3-moe")
    for ops in ([dict(op="drop", layers=1, expert=3), dict(op="force", layers=[0, 1], expert=3)],
                [dict(op="drop", layers=1, expert=3), dict(op="force", layers=1, expert=3, positions=[0])],
                [dict(op="force", layers=1, expert=3), dict(op="drop", layers=1, expert=3, token="Paris")]):
        with pytest.raises(WorkbenchError, match="interventions: expert 3 of layer 1 is both dropped and forced"):
            with apply(lm, ops):
                pass
    for ops in ([dict(op="drop", layers=1, expert=3), dict(op="force", layers=1, expert=4)],
                [dict(op="drop", layers=0, expert=3), dict(op="force", layers=1, expert=3)],
                [dict(op="drop", layers=1, expert=3, positions=[1]),
                 dict(op="force", layers=1, expert=3, positions=[0])]):
        with apply(lm, ops):
            logits(lm, batch(lm))



def test_drops_beyond_the_top_k_give_the_empty_slots_no_weight():
    """DeepSeek-V3's routing gathered a slot's weight from the unmasked scores: with 6 of 8 experts dropped (top-2 of
    one of 2 groups) every token went to a dropped expert at ~0.5. PhiMoE's SparseMixer gave NaN weights (and NaN
    logits) once fewer experts than slots were left. Such slots now weigh nothing, and the drop is said."""
    from types import SimpleNamespace

    lm = load("zoo:deepseek-v3")
    layer = lm.adapter.decoder_layers(lm.model)[1]
    got = {}
    h = lm.adapter.experts(layer).register_forward_pre_hook(lambda m, a: got.update(index=a[1].clone(),
                                                                                     weights=a[2].clone()))
    dropped = [1, 2, 3, 4, 5, 6]
    try:
        with apply(lm, [dict(op="drop", layers=1, expert=e) for e in dropped]):
            out = logits(lm, batch(lm))
    finally:
        h.remove()
    assert torch.isfinite(out).all()
    assert (got["weights"][torch.isin(got["index"], torch.tensor(dropped))] == 0).all()
    assert (got["weights"].sum(-1) > 0).all()  # each token keeps a kept expert
    with pytest.warns(UserWarning, match=r"drop leaves layer 1 1 routed expert\(s\), fewer than the 2 each token is "
                                         r"routed to: the other slot\(s\) weigh nothing"):
        apply(lm, [dict(op="drop", layers=1, expert=e) for e in range(7)])

    from workbench.adapters.base import adapter_for

    phimoe = adapter_for("phimoe")
    model = SimpleNamespace(config=SimpleNamespace(num_experts_per_tok=2))
    logits_ = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    exclude = torch.zeros(16, 4, dtype=torch.bool)
    exclude[:, :3] = True
    w, idx = phimoe.select_experts(model, logits_, SimpleNamespace(router_jitter_noise=0.01), exclude)
    assert torch.isfinite(w).all() and (idx[:, 0] == 3).all() and (w[:, 1] == 0).all()
    w0, idx0 = phimoe.select_experts(model, logits_, SimpleNamespace(router_jitter_noise=0.01))  # unchanged without
    from transformers.models.phimoe.modeling_phimoe import sparsemixer

    ref = sparsemixer(logits_, jitter_eps=0.01, training=False, top_k=2)
    assert torch.equal(w0, ref[0]) and torch.equal(idx0, ref[1])


@pytest.mark.parametrize("family", ["ernie4_5_moe", "glm4_moe", "dots1", "exaone_moe", "zoo:deepseek-v3"])
def test_drop_under_a_correction_bias_reroutes(family, tmp_path, zoo_tokenizer):
    """ERNIE-4.5 picks experts by probability + correction bias: a dropped expert's probability was 0, but its bias
    alone still won slots (at weight 0), so tokens kept k - 1 experts instead of being re-routed. The tiny models'
    biases are 0, which hid it; real checkpoints have them. The reference is the unchanged model with that expert's
    bias at -1e4 (the chosen weights are renormalised, so what the softmax or sigmoid gave it does not matter)."""
    from workbench.models.families import save_tiny

    lm = load(family) if family.startswith("zoo:") else load(str(save_tiny(family, tmp_path / family, zoo_tokenizer)))
    layer = 1
    mlp = lm.adapter.decoder_layers(lm.model)[layer]
    (name, bias), = [(n, b) for n, b in [*mlp.named_parameters(), *mlp.named_buffers()]
                     if n.endswith("e_score_correction_bias")]
    with torch.no_grad():
        bias.copy_(torch.randn(bias.shape, generator=torch.Generator().manual_seed(0)) * 0.3)
    expert = int(bias.flatten().argmax())
    enc = batch(lm)
    seen = []
    hook = lm.adapter.experts(mlp).register_forward_pre_hook(lambda m, a: seen.append(a[1].clone()))
    try:
        with apply(lm, [dict(op="drop", layers=layer, expert=expert)]):
            dropped = logits(lm, enc)
    finally:
        hook.remove()
    assert seen and not (seen[0] == expert).any(), f"{name}: tokens still routed to dropped expert {expert}"
    with torch.no_grad():
        bias.view(-1)[expert] = -1e4
    assert_close(dropped, logits(lm, enc))


def test_drop_on_deepseek_never_picks_the_expert():
    lm = load("zoo:deepseek-v3")
    enc = batch(lm)
    layer = lm.adapter.decoder_layers(lm.model)[1]
    got = {}
    with apply(lm, [dict(op="drop", layers=1, expert=0), dict(op="drop", layers=1, expert=1)]):
        h = lm.adapter.experts(layer).register_forward_pre_hook(lambda m, a: got.update(index=a[1]))
        try:
            logits(lm, enc)
        finally:
            h.remove()
    assert not ((got["index"] == 0) | (got["index"] == 1)).any()


@pytest.mark.parametrize("spec", ZOO_SPECS)
def test_drops_that_leave_a_layer_no_expert_are_refused(spec, tmp_path):
    """Dropping every routed expert of a layer masks all its router scores (NaN outputs); one left is fine, and
    so are drops in scopes that never meet. A study is refused before its first forward."""
    from workbench.studies import Study

    lm = load(spec)
    n = lm.layer_infos()[1].num_experts
    drop = lambda e, **scope: dict(op="drop", layers=1, expert=e, **scope)  # noqa: E731
    with pytest.raises(WorkbenchError, match=f"drop removes all {n} routed experts of layer 1"):
        apply(lm, [drop(e) for e in range(n)])
    with pytest.raises(WorkbenchError, match="drop removes all"):  # an unscoped drop counts in every scope
        apply(lm, [drop(0)] + [drop(e, positions=[0]) for e in range(1, n)])
    enc = batch(lm)
    for ivs in ([drop(e) for e in range(n - 1)], [drop(e, positions=[0]) for e in range(n // 2)]
                + [drop(e, positions=[1]) for e in range(n // 2, n)]):
        with apply(lm, ivs):
            assert torch.isfinite(logits(lm, enc)).all()
    study = {"name": "s", "num_texts": 2, "metrics": ["perplexity"],
             "conditions": [{"name": "all", "interventions": [drop(e) for e in range(n)]}]}
    with pytest.raises(WorkbenchError, match="condition 'all': drop removes all"):
        Study(study, "s.yaml").run(lm, tmp_path / "o", progress=False)
    assert not (tmp_path / "o" / "conditions").exists()


def test_channel_scope_by_position_and_token():
    lm = load("zoo:qwen3-moe")
    enc = batch(lm)
    layer = lm.adapter.decoder_layers(lm.model)[1]
    out = {}
    keep = lambda m, a, o: out.__setitem__("h", (o[0] if isinstance(o, tuple) else o).clone())  # noqa: E731
    with apply(lm, [dict(op="zero_channel", layers=1, channel=9, positions=[0, -1])]):
        h = layer.register_forward_hook(keep)  # after the intervention's hook, so it sees the result
        try:
            logits(lm, enc)
        finally:
            h.remove()
    hs, mask = out["h"], enc.attention_mask.bool()
    lengths = mask.sum(-1)
    for b in range(hs.shape[0]):
        last = int(lengths[b]) - 1
        assert hs[b, 0, 9] == 0 and hs[b, last, 9] == 0
        middle = [t for t in range(1, last)]
        assert all(hs[b, t, 9] != 0 for t in middle)
    # Token scope: only tokens whose text contains "Paris".
    with apply(lm, [dict(op="zero_channel", layers=1, channel=9, token="Paris")]):
        h = layer.register_forward_hook(keep)
        try:
            logits(lm, enc)
        finally:
            h.remove()
    paris = torch.tensor([[" Paris" in lm.tokenizer.decode([int(t)]) for t in row] for row in enc.input_ids])
    assert paris.any() and (out["h"][paris][:, 9] == 0).all() and (out["h"][~paris & mask][:, 9] != 0).all()


def test_dense_neuron_zero_equals_zeroing_the_down_proj_column(smollm2):
    enc = smollm2.tokenizer(["The capital of France is"], return_tensors="pt")
    with apply(smollm2, [dict(op="zero_neuron", layers=3, channel=100)]):
        ours = logits(smollm2, enc)
    w = smollm2.model.model.layers[3].mlp.down_proj.weight
    saved = w[:, 100].clone()
    with torch.no_grad():
        w[:, 100] = 0
    try:
        ref = logits(smollm2, enc)
    finally:
        with torch.no_grad():
            w[:, 100] = saved
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_round_trip_and_validation(tmp_path):
    ivs = parse([dict(op="drop", layer=2, expert=3), dict(op="scale_channel", layers=[0, 1], channel=4, factor=0.5,
                                                           positions=[0])])
    assert parse([iv.to_dict() for iv in ivs]) == ivs
    import yaml

    f = tmp_path / "iv.yaml"
    f.write_text(yaml.safe_dump({"interventions": [iv.to_dict() for iv in ivs]}))
    assert load_file(f) == ivs
    lm = load("zoo:qwen2-moe")
    bad = [
        (dict(op="explode", layers=1, expert=0), "field 'op'"),
        (dict(op="zero", layers=1), "needs field 'expert'"),
        (dict(op="zero", layers=1, expert=0, colour="red"), "unknown field 'colour'"),
        (dict(op="zero", layers="one", expert=0), "field 'layers'"),
    ]
    for d, msg in bad:
        with pytest.raises(WorkbenchError, match=msg):
            Intervention.from_dict(d)
    with pytest.raises(WorkbenchError, match="field 'expert': routed expert 8 out of range"):
        apply(lm, [dict(op="zero", layers=1, expert=8)])
    with pytest.raises(WorkbenchError, match="layer 9 out of range"):
        apply(lm, [dict(op="drop", layers=9, expert=0)])
    broken = tmp_path / "broken.yaml"
    broken.write_text("interventions:\n  - op: zero\n    layers: [1\n")
    with pytest.raises(WorkbenchError, match="line"):
        load_file(broken)


def test_prompt_scope_touches_only_the_numbered_prompts():
    lm = load("zoo:qwen3-moe")
    enc = batch(lm)
    before = logits(lm, enc)
    with apply(lm, [dict(op="drop", layers=1, expert=3, prompts=[1, 3])]) as applied:
        assert torch.equal(logits(lm, enc), before)  # not a numbered pass: inactive
        applied.set_prompts([0, 1, 2, 3])
        after = logits(lm, enc)
    # Dropping an expert for prompts 1 and 3 changes how many rows each expert's matmul gets, so the
    # untouched prompts run at other shapes: equal to fp32 tolerance, not bit for bit.
    for i in (0, 2):
        assert_close(after[i], before[i], msg=f"prompt {i}")
    assert (after[1] - before[1]).abs().max() > 1e-4


def test_token_scope_reads_each_token_with_its_leading_space(marker_tokenizer, zoo_tokenizer):
    """A ``token`` scope matches a token's text as it reads inside a text. Decoded alone, a SentencePiece token
    (Llama-2's, Mistral's) loses its leading space, and ``token: " Paris"`` would match nothing."""
    from workbench.adapters.base import adapter_for
    from workbench.interventions import token_texts
    from workbench.models.families import tiny_model
    from workbench.models.specs import LoadedModel

    tok = marker_tokenizer
    model = tiny_model("llama")
    lm = LoadedModel(model, tok, adapter_for(model), "tiny")
    enc = tok(["The capital of France is Paris", "Paris is the capital of France"], return_tensors="pt", padding=True)
    paris = enc.input_ids == tok.convert_tokens_to_ids("\u2581Paris")
    assert paris.sum() == 2 and tok.decode([tok.convert_tokens_to_ids("\u2581Paris")]) == "Paris"  # alone: no space
    out = {}
    layer = lm.adapter.decoder_layers(model)[0]
    for scope in (" Paris", "Paris"):
        with apply(lm, [dict(op="zero_channel", layers=0, channel=3, token=scope)]):
            h = layer.register_forward_hook(lambda m, a, o: out.__setitem__("h", o[0] if isinstance(o, tuple) else o))
            try:
                logits(lm, enc)
            finally:
                h.remove()
        hit = out["h"][..., 3] == 0
        assert torch.equal(hit & enc.attention_mask.bool(), paris), scope
    # the built-in byte-level BPE: every token of the built-in prompts reads as it decodes alone
    ids = {int(t) for p in PROMPTS for t in zoo_tokenizer(p).input_ids}
    assert token_texts(zoo_tokenizer, sorted(ids)) == [zoo_tokenizer.decode([t]) for t in sorted(ids)]


NESTED = [("drop", "drop"), ("bias", "drop"), ("force", "drop"), ("drop", "bias"), ("force", "force"),
          ("zero_scoped", "drop"), ("drop", "zero_channel")]


@pytest.mark.parametrize("spec", ZOO_SPECS)
def test_nested_apply_equals_the_combined_list(spec):
    """A set applied inside another on the same model runs as the one list ``outer + inner``: bit for bit, on every
    layout (an inner re-routing once dropped the outer set's drop/bias/force); leaving the inner set restores the
    outer's effect, and drops of two sets that together empty a layer are refused."""
    lm = load(spec)
    enc = batch(lm)
    L, n = moe_layer(lm), lm.layer_infos()[moe_layer(lm)].num_experts
    make = {"drop": lambda e: dict(op="drop", layers=L, expert=e), "bias": lambda e: dict(op="bias", layers=L,
                                                                                          expert=e, value=3.0),
            "force": lambda e: dict(op="force", layers=L, expert=e, weight=0.4),
            "zero_scoped": lambda e: dict(op="zero", layers=L, expert=e, positions=[0, -1]),
            "zero_channel": lambda e: dict(op="zero_channel", layers=0, channel=e)}
    for outer, inner in NESTED:
        a, b = [make[outer](1)], [make[inner](2)]
        with apply(lm, a + b):
            combined = logits(lm, enc)
        with apply(lm, a):
            alone = logits(lm, enc)
            with apply(lm, b):
                nested = logits(lm, enc)
            assert torch.equal(logits(lm, enc), alone), (outer, inner)
        assert torch.equal(nested, combined), (outer, inner)
        assert not torch.equal(nested, alone), (outer, inner)
    with apply(lm, [make["drop"](e) for e in range(n - 1)]):
        with pytest.raises(WorkbenchError, match=f"enclosing apply's.*drop removes all {n} routed experts of layer"):
            with apply(lm, [make["drop"](n - 1)]):
                pass
        assert torch.isfinite(logits(lm, enc)).all()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in lm.model.modules())


def test_reentering_an_applied_set_is_refused():
    lm = load("zoo:qwen3-moe")
    enc = batch(lm)
    ap = apply(lm, [dict(op="drop", layers=1, expert=1)])
    with ap:
        expected = logits(lm, enc)
        with pytest.raises(WorkbenchError, match="already active"):
            with ap:
                pass
        assert torch.equal(logits(lm, enc), expected)  # the outer block keeps its intervention
    with ap:  # once left, it can be entered again
        assert torch.equal(logits(lm, enc), expected)


def test_a_layer_listed_twice_is_refused():
    for d in (dict(op="scale", layers=[1, 1], expert=1, factor=2.0),
              dict(op="scale_channel", layers=[0, 2, 0], channel=3, factor=2.0)):
        with pytest.raises(WorkbenchError, match=r"field 'layers': layer \d is listed twice"):
            Intervention.from_dict(d)
    with pytest.raises(WorkbenchError, match="layer 1 is listed twice"):
        Intervention("zero", (1, 1), expert=0)
    # heads, dims, positions and prompts too: each is applied once, so a scale of a head listed twice scaled once
    for d, what in ((dict(op="scale_head", layers=1, heads=[2, 0, 2], factor=2.0), "'heads': head 2"),
                    (dict(op="mean_qk", layers=1, dims=[3, 3]), "'dims': dim 3"),
                    (dict(op="zero", layers=1, expert=0, positions=[-1, 0, -1]), "'positions': position -1"),
                    (dict(op="zero", layers=1, expert=0, prompts=[4, 4]), "'prompts': prompt 4")):
        with pytest.raises(WorkbenchError, match=f"field {what} is listed twice"):
            Intervention.from_dict(d)


def test_field_types_are_checked_when_read():
    """A wrong type is a one-line error naming the field, when the intervention is read (not an IndexError or a
    TypeError at forward time); integers are ints as in ``layers`` (a float such as 1.0 is refused, NumPy ints
    are taken), and an empty ``token`` (which every token contains) is refused."""
    import numpy as np

    bad = [(dict(op="drop", layers=1, expert=1.0), "field 'expert' must be an integer"),
           (dict(op="zero", layers=1, expert="1"), "field 'expert' must be an integer"),
           (dict(op="zero", layers=1, expert=True), "field 'expert' must be an integer"),
           (dict(op="zero_channel", layers=1, channel=3.0), "field 'channel' must be an integer"),
           (dict(op="zero_channel", layers=1, channel="3"), "field 'channel' must be an integer"),
           (dict(op="zero_channel", layers=1, channel=3, token=5), "field 'token' must be a non-empty string"),
           (dict(op="zero_channel", layers=1, channel=3, token=""), "field 'token' must be a non-empty string"),
           (dict(op="zero", layers=1.0, expert=1), "field 'layers'"),
           (dict(op="zero", layers=1, expert=1, positions=[]), "field 'positions' is empty: leave it out"),
           (dict(op="zero", layers=1, expert=1, prompts=[]), "field 'prompts' is empty")]
    for d, msg in bad:
        with pytest.raises(WorkbenchError, match=msg):
            Intervention.from_dict(d)
    iv = Intervention.from_dict(dict(op="zero", layers=[np.int64(1)], expert=np.int64(2), positions=np.int64(0)))
    assert iv == Intervention("zero", (1,), expert=2, positions=(0,)) and type(iv.expert) is int


def test_the_constructor_checks_like_from_dict():
    bad = [(dict(op="scale", layers=(1,), expert=1), "op 'scale' needs field 'factor'"),
           (dict(op="zap", layers=(1,), expert=1), "field 'op' must be one of"),
           (dict(op="zero", layers=(1,)), "needs field 'expert'"),
           (dict(op="zero", layers=(1,), expert=1.0), "field 'expert' must be an integer")]
    for d, msg in bad:
        with pytest.raises(WorkbenchError, match=msg):
            Intervention(**d)
    iv = Intervention("scale", 1, expert=1, factor=2.0)  # one layer, as from_dict takes it
    assert iv.layers == (1,) and Intervention.from_dict(iv.to_dict()) == iv
    assert iv.to_dict() == {"op": "scale", "layers": [1], "expert": 1, "factor": 2.0}
    assert Intervention("zero", [0, 2], expert=3).to_dict() == {"op": "zero", "layers": [0, 2], "expert": 3}


def test_apply_takes_one_intervention():
    lm = load("zoo:qwen3-moe")
    enc = batch(lm)
    d = dict(op="drop", layers=1, expert=1)
    with apply(lm, [d]):
        expected = logits(lm, enc)
    for one in (d, Intervention.from_dict(d)):
        with apply(lm, one):
            assert torch.equal(logits(lm, enc), expected)
    with pytest.raises(WorkbenchError, match="expected a list of interventions, got str"):
        apply(lm, "drop")


def test_a_field_the_op_does_not_read_is_said():
    """``{op: zero, factor: 2}`` zeroes: the factor is ignored, and a warning says so (not an error: a redundant
    ``factor: 0`` on ``zero_channel`` is harmless, and older files may hold such fields)."""
    with pytest.warns(UserWarning, match="field 'factor' does not apply to op 'zero' and is ignored"):
        iv = Intervention.from_dict(dict(op="zero", layers=1, expert=1, factor=2.0))
    assert iv.factor is None
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Intervention.from_dict(dict(op="scale", layers=1, expert=1, factor=2.0, positions=[0], token="a"))
        Intervention.from_dict(dict(op="force", layers=1, expert=1, weight=0.5, kind="routed"))


def test_a_scope_that_takes_no_token_is_said():
    """A `token` no prompt contains ran without a word: its condition's metrics equal the baseline's, which the table
    does not explain. Each scoped intervention that took no token in any pass is named on leaving; one that took a
    token, an unscoped one, and a block left by an error are not."""
    import warnings

    lm = load("zoo:qwen2-moe")
    enc = batch(lm)
    with pytest.warns(UserWarning, match=r"intervention 1 \(zero_channel at layers \[1\]\): its scope \(token "
                                         r"'zqzqzq'\) took no token in this run, so it changed nothing"):
        with apply(lm, [dict(op="zero_channel", layers=0, channel=3, token="capital"),
                        dict(op="zero_channel", layers=1, channel=3, token="zqzqzq"),
                        dict(op="zero_channel", layers=1, channel=4)]):
            logits(lm, enc)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with apply(lm, [dict(op="zero_channel", layers=0, channel=3, token="capital")]):
            logits(lm, enc)
        with apply(lm, [dict(op="zero_channel", layers=1, channel=3, token="zqzqzq")]):
            pass  # no pass ran: nothing to say
        with pytest.raises(ValueError), apply(lm, [dict(op="zero_channel", layers=1, channel=3, token="zqzqzq")]):
            logits(lm, enc)
            raise ValueError("the caller's own error")


def test_a_cached_step_without_a_mask_counts_positions_after_the_cache():
    """A hand-written decoding loop (`model(ids[:, -1:], past_key_values=...)`, no attention mask) counted the new
    token as position 0: `positions: [0]` hit it (last-token logits 1.8e-2 off the full forward on granitemoeshared)."""
    lm = load("zoo:qwen3-moe")
    ids = lm.tokenizer(["The capital of France is Paris"], return_tensors="pt").input_ids
    iv = [dict(op="zero_channel", layers=1, channel=3, positions=[0])]
    with torch.no_grad(), apply(lm, iv):
        full = lm.model(ids).logits[0, -1]
        past = lm.model(ids[:, :-1], use_cache=True).past_key_values
        step = lm.model(ids[:, -1:], past_key_values=past, use_cache=True).logits[0, -1]
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-5)


def test_odd_setups_get_one_line_errors():
    """`kind: shared` on a model without shared experts said "shared expert 0 out of range (layer 0 has 0)"; a
    `prompts` scope fed a wrong number of prompt indices did nothing; head ops on Qwen3-Next's gated attention said
    only "unexpected attention shapes in layer 3"."""
    from workbench.adapters.base import adapter_for
    from workbench.interventions import Applied
    from workbench.models.families import tiny_model
    from workbench.models.specs import LoadedModel

    with pytest.raises(WorkbenchError, match=r"^intervention 0: field 'kind': layer 0 has no shared experts$"):
        apply(load("zoo:mixtral"), [dict(op="zero", layers=0, expert=0, kind="shared")])
    lm = load("zoo:qwen3-moe")
    with pytest.raises(WorkbenchError, match=r"^set_prompts gave 3 prompt indices for a batch of 4 rows$"), \
            apply(lm, [dict(op="zero_channel", layers=1, channel=3, prompts=[0])]) as applied:
        applied.set_prompts([0, 1, 2])
        logits(lm, batch(lm))
    model = tiny_model("qwen3_next")
    gated = LoadedModel(model, None, adapter_for(model), "tiny qwen3_next")
    layer = next(i for i, b in enumerate(gated.adapter.decoder_layers(model)) if gated.adapter.has_attention(b))
    with pytest.raises(WorkbenchError, match=rf"^intervention 0: op 'zero_head' reads attention heads, and layer "
                                             rf"{layer}'s attention is not of a layout it knows \(unexpected"):
        Applied(gated, [Intervention.from_dict(dict(op="zero_head", layers=layer, heads=[0]))])
