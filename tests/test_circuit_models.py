"""Circuits on more layouts: the older ModuleList MoE layout gives the same graph and scores as the fused one;
GPT-2's fused attention and DeepSeek-V3's latent attention score edges as brute-force patching does."""

from __future__ import annotations

import pytest
import torch

from helpers import spearman
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
