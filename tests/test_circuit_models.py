"""Circuits on more layouts: the older ModuleList MoE layout gives the same graph and scores as the fused one."""

from __future__ import annotations

import pytest
import torch

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


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
