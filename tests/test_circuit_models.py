"""Circuits on more layouts: the older ModuleList MoE layout gives the same graph and scores as the fused one;
GPT-2's fused attention and DeepSeek-V3's latent attention score edges as brute-force patching does."""

from __future__ import annotations

import pytest
import torch

from helpers import eap_is_the_derivative_of_edge_patching, spearman
from workbench.circuits.attribution import attribute
from workbench.circuits.evaluate import evaluate, prune, select_top
from workbench.circuits.facts import Fact, prepare
from workbench.circuits.graph import build_graph
from workbench.circuits.runner import GraphRunner
from workbench.models.specs import load

FACTS = [
    Fact("The capital of France is", " Paris", relation="capital_of", subject="France"),
    Fact("The capital of Germany is", " Berlin", relation="capital_of", subject="Germany"),
    Fact("The capital of Japan is", " Tokyo", relation="capital_of", subject="Japan"),
    Fact("The chemical symbol for gold is", " Au", relation="chemical_symbol", subject="gold"),
    Fact("The chemical symbol for iron is", " Fe", relation="chemical_symbol", subject="iron"),
]


@pytest.fixture(scope="module")
def deepseek_v3():
    return load("zoo:deepseek-v3")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one torch thread (tests/conftest.py)


def _check_runner(lm):
    """Plain and grad forwards through the instrumented model equal the model's own; the residual at
    every stage is the sum of the senders upstream of it (no biases in these families)."""
    g = build_graph(lm.model, lm.adapter)
    ids = torch.randint(100, 2000, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = lm.model.model(input_ids=ids).last_hidden_state
    S, P, d = g.n_senders, len(g.stages), g.d_model
    acts, resid = torch.zeros(S, 2, 6, d), torch.zeros(P, 2, 6, d)
    with GraphRunner(lm.model, lm.adapter, g) as runner:
        out = runner.forward(ids, acts=acts, resid=resid)
        out_grad = runner.forward(ids, mode="grad", grads=torch.zeros(g.n_receivers, 2, 6, d))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_grad.detach(), ref, rtol=1e-5, atol=1e-5)
    for st in g.stages:
        torch.testing.assert_close(resid[st.index], acts[:st.n_up].sum(0), rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        assert torch.equal(lm.model.model(input_ids=ids).last_hidden_state, ref)  # instrumentation removed
    return g


def test_modulelist_moe_matches_fused():
    fused, listed = load("zoo:qwen3-moe"), load("zoo:qwen3-moe-modulelist")
    g_fused, g_list = _check_runner(fused), _check_runner(listed)
    assert g_list.summary() == g_fused.summary() and g_list.senders == g_fused.senders
    assert [p.layout for p in g_list.layers] == ["modulelist"] * 4
    prepared = prepare(listed.tokenizer, FACTS)
    a = attribute(fused, prepared, method="eap-ig", steps=2, graph=g_fused).matrix
    b = attribute(listed, prepared, method="eap-ig", steps=2, graph=g_list).matrix
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6 * float(a.abs().max()))
    experts = [i for i, n in enumerate(g_list.senders) if g_list.node(n).kind == "expert"]
    assert b[experts].abs().sum() > 0
    within = prune(g_list, select_top(g_list, b, 80))  # edge IG inside a circuit reads every sender live
    a = attribute(fused, prepared, method="eap-ig-edges", steps=2, graph=g_fused, within=within).matrix
    b = attribute(listed, prepared, method="eap-ig-edges", steps=2, graph=g_list, within=within).matrix
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6 * float(a.abs().max()))
    assert b[within].abs().sum() > 0
    valid = g_list.valid()
    ev = evaluate(listed, prepared, g_list, {"full": valid, "empty": torch.zeros_like(valid)})
    assert ev["circuits"]["full"]["faithfulness"] == pytest.approx(1.0, abs=1e-4)
    assert ev["circuits"]["empty"]["faithfulness"] == pytest.approx(0.0, abs=1e-4)


def _edge_effects(lm, prepared, g, edges):
    """Brute force: metric(every edge but e) - metric(full) for each (sender, receiver) in ``edges``."""
    valid = g.valid()
    masks = {}
    for k, (i, j) in enumerate(edges):
        m = valid.clone()
        m[i, j] = False
        masks[k] = m
    ev = evaluate(lm, prepared, g, masks, batch_size=8)
    return torch.tensor([ev["circuits"][k]["metric"] - ev["metric_full"] for k in range(len(edges))])


@pytest.fixture(scope="module")
def tiny_gpt2(zoo_tokenizer):
    """A random 3-layer GPT-2 (fused Conv1D c_attn, LayerNorm with biases, learned positions)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from workbench.adapters.base import adapter_for
    from workbench.models.specs import LoadedModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(zoo_tokenizer), n_embd=64, n_head=4, n_layer=3, n_positions=128,
                     bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg).eval()
    return LoadedModel(model, zoo_tokenizer, adapter_for(model), "tiny-gpt2")


@pytest.mark.parametrize("which", ["tiny_gpt2", "deepseek_v3"])
def test_attention_layouts_score_like_brute_force(which, request):
    """GPT-2 (fused c_attn: every head its own KV group) and DeepSeek-V3 (latent attention: one KV group,
    the shared latent, per layer; sigmoid group-limited routing; a dense first layer; a shared expert):
    the instrumented forward is the model's own, the full circuit is the clean run and the empty one
    the corrupted run, and the scores rank edges as patching each one alone does."""
    lm = request.getfixturevalue(which)
    g = build_graph(lm.model, lm.adapter)
    kind = {"tiny_gpt2": "c_attn", "deepseek_v3": "mla"}[which]
    assert [p.attn_kind for p in g.layers] == [kind] * len(g.layers)
    n_kv = sum(1 for n in g.nodes if n.kind == "kv")
    assert n_kv == (len(g.layers) if kind == "mla" else sum(p.n_heads for p in g.layers))
    _scores_like_brute_force(lm, g, which)


FAMILY_BLOCKS = [("gemma2", "sandwich", "qkv"), ("olmo2", "post-norm", "qkv"), ("gpt_neox", "parallel", "fused"),
                 ("phi", "parallel", "qkv"), ("granite", "pre-norm", "qkv"), ("falcon", "parallel", "fused"),
                 ("phi3", "pre-norm", "fused")]


@pytest.mark.parametrize("model_type,block,attn", FAMILY_BLOCKS)
def test_block_kinds_score_as_the_derivative_of_patching(model_type, block, attn, zoo_tokenizer):
    """Sandwich norms (Gemma 2: each sublayer's output normed before the add), post-norm (OLMo 2: no
    norm on the way in), parallel blocks (GPT-NeoX: a norm each; Phi: one shared norm; Falcon: fused
    multi-query attention) and residual multipliers (Granite) are read from the model: the instrumented
    forward is the model's own, full and empty circuits are the clean and corrupted runs, and every
    edge's EAP score is the derivative of patching that edge alone (finite differences)."""
    from workbench.adapters.base import adapter_for
    from workbench.models.families import tiny_model
    from workbench.models.specs import LoadedModel

    if model_type == "granite":  # multipliers away from 1 that keep a random model's edge effects above float32 rounding
        from transformers import AutoModelForCausalLM

        from workbench.models.families import tiny_config
        cfg = tiny_config("granite")
        cfg.residual_multiplier, cfg.embedding_multiplier, cfg.logits_scaling = 0.7, 3.0, 0.5
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg).eval()
    else:
        model = tiny_model(model_type)
    lm = LoadedModel(model, zoo_tokenizer, adapter_for(model), model_type)
    g = build_graph(lm.model, lm.adapter)
    assert {p.block.kind for p in g.layers} == {block} and {p.attn_kind for p in g.layers} == {attn}
    if block == "parallel":  # a layer's MLP reads the layer's input: its own heads are not upstream
        p = g.layers[1]
        assert g.stages[p.mlp_stage].n_up == p.head_sender0
    if model_type == "granite":
        assert g.embed_scale == pytest.approx(3.0) and g.layers[0].block.attn_scale == pytest.approx(0.7)
    _runs_like_the_model(lm, g)
    eap_is_the_derivative_of_edge_patching(lm, g, FACTS[:4])


def test_granite_embedding_multiplier_scores_as_the_same_multiplier_in_the_weights(zoo_tokenizer):
    """EAP-IG interpolated between the corrupted embedding as the first layer reads it (x Granite's
    embedding_multiplier) and the clean one as the embedding module gives it (not yet multiplied), so the
    corrupted end was multiplied twice: scores 0.92 (relative) off those of the same model with the multiplier
    moved into the embedding weights. Every method now scores the two alike."""
    from transformers import AutoModelForCausalLM

    from workbench.adapters.base import adapter_for
    from workbench.models.families import tiny_config
    from workbench.models.specs import LoadedModel

    def make(in_weights: bool):
        cfg = tiny_config("granite")
        cfg.embedding_multiplier = 12.0
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg).eval()
        if in_weights:
            with torch.no_grad():
                model.get_input_embeddings().weight.mul_(12.0)
            model.config.embedding_multiplier = 1.0
            for mod in model.modules():
                if hasattr(mod, "embedding_multiplier"):
                    mod.embedding_multiplier = 1.0
        return LoadedModel(model, zoo_tokenizer, adapter_for(model), "granite")
    a, b = make(False), make(True)
    ga, gb = build_graph(a.model, a.adapter), build_graph(b.model, b.adapter)
    assert ga.embed_scale == pytest.approx(12.0) and gb.embed_scale == 1.0
    prepared, valid = prepare(zoo_tokenizer, FACTS[:3]), ga.valid()
    for method in ("eap", "eap-ig", "eap-ig-edges"):
        sa = attribute(a, prepared, method=method, steps=5, graph=ga).matrix[valid]
        sb = attribute(b, prepared, method=method, steps=5, graph=gb).matrix[valid]
        # the same function computed in another order (a product moved into the weights): float32 rounding
        assert float((sa - sb).abs().max() / sb.abs().max()) < 1e-3, method


def _runs_like_the_model(lm, g):
    """Plain and grad forwards are the model's own, what no sender carries is the same for any input,
    and the full / empty circuits are the clean / corrupted runs."""
    base = getattr(lm.model, lm.model.base_model_prefix)
    S, P, d = g.n_senders, len(g.stages), g.d_model
    resid_minus_senders = []
    for seed in (0, 1):
        ids = torch.randint(100, 2000, (2, 6), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            ref = base(input_ids=ids).last_hidden_state
        acts, resid = torch.zeros(S, 2, 6, d), torch.zeros(P, 2, 6, d)
        with GraphRunner(lm.model, lm.adapter, g) as runner:
            out = runner.forward(ids, acts=acts, resid=resid)
            out_grad = runner.forward(ids, mode="grad", grads=torch.zeros(g.n_receivers, 2, 6, d))
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out_grad.detach(), ref, rtol=1e-5, atol=1e-5)
        resid_minus_senders.append(torch.stack([resid[st.index] - acts[:st.n_up].sum(0) for st in g.stages]))
    # what no sender carries (GPT-2: position embeddings and output-projection biases) is the same for any input
    torch.testing.assert_close(resid_minus_senders[0], resid_minus_senders[1], rtol=1e-4, atol=1e-4)
    prepared = prepare(lm.tokenizer, FACTS)
    valid = g.valid()
    ev = evaluate(lm, prepared, g, {"full": valid, "empty": torch.zeros_like(valid)})
    assert ev["circuits"]["full"]["faithfulness"] == pytest.approx(1.0, abs=1e-4)
    assert ev["circuits"]["empty"]["faithfulness"] == pytest.approx(0.0, abs=1e-4)
    return prepared, valid


def _scores_like_brute_force(lm, g, which):
    prepared, valid = _runs_like_the_model(lm, g)
    scores = attribute(lm, prepared, method="eap", graph=g).matrix
    s, r = valid.nonzero(as_tuple=True)
    order = scores[s, r].abs().argsort(descending=True)
    pick = torch.cat([order[:30], order[30:][torch.randperm(len(order) - 30, generator=torch.Generator().manual_seed(0))[:30]]])
    brute = _edge_effects(lm, prepared, g, list(zip(s[pick].tolist(), r[pick].tolist())))
    top = brute.abs().argsort(descending=True)[:20]
    for method in ("eap", "eap-ig", "eap-ig-edges"):
        est = attribute(lm, prepared, method=method, steps=5, graph=g).matrix[s[pick], r[pick]].double()
        rho = spearman(brute[top], est[top])
        print(f"{which} {method}: Spearman over the 20 largest of {len(pick)} single-edge effects {rho:.3f}")
        assert rho >= 0.9, method


@pytest.mark.parametrize("model_type,overrides,layout", [
    ("gpt_neox", {}, "interleaved"), ("phi3", {}, "blocks"), ("falcon", {}, "blocks"),
    ("falcon", {"multi_query": False}, "interleaved"),
    ("falcon", {"new_decoder_architecture": True, "num_kv_heads": 2}, "grouped")])
def test_fused_projection_rows_feed_the_heads_the_model_reads(model_type, overrides, layout):
    """A fused query/key/value projection's row order, read from the module's attributes, is the model's own:
    perturbing the rows assigned to query head h changes only head h's output (in the model's attention),
    those of KV group g's key or value only the heads of group g."""
    from transformers import AutoModelForCausalLM

    from workbench.adapters.base import adapter_for
    from workbench.circuits.attention import FUSED_NAMES, attention_spec, fused_slots, out_proj
    from workbench.models.families import tiny_config

    cfg = tiny_config(model_type)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    ad = adapter_for(model)
    attn = ad.attention(ad.decoder_layers(model)[0])
    spec = attention_spec(attn, model.config, model_type)
    assert spec.kind == "fused" and spec.layout == layout
    H, K, hd = spec.n_heads, spec.n_kv, spec.head_dim
    proj = next(getattr(attn, n) for n in FUSED_NAMES if hasattr(attn, n))
    slots = fused_slots(spec)
    seen = {}
    handle = out_proj(attn, spec).register_forward_pre_hook(lambda m, a: seen.__setitem__("z", a[0].detach().clone()))
    ids = torch.randint(100, 2000, (1, 6), generator=torch.Generator().manual_seed(0))

    def heads():
        with torch.no_grad():
            model(input_ids=ids)
        return seen["z"].view(1, 6, H, hd)

    try:
        ref = heads()
        for slot in range(H + 2 * K):
            rows = slots == slot
            keep = proj.weight.detach().clone()
            with torch.no_grad():
                proj.weight[rows] += torch.randn(int(rows.sum()), proj.weight.shape[1], generator=torch.Generator().manual_seed(slot))
            changed = set(((heads() - ref).abs().amax(dim=(0, 1, 3)) > 1e-6).nonzero().flatten().tolist())
            with torch.no_grad():
                proj.weight.copy_(keep)
            group = (slot - H) % K if slot >= H else None
            want = {slot} if slot < H else {h for h in range(H) if h // (H // K) == group}
            assert changed == want, (slot, changed, want)
    finally:
        handle.remove()
