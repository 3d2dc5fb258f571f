"""Circuit memory (issue 24): receiver gradients contracted as backward produces them, the lean mode
(one buffer of sender differences, checkpointed layers), reduced-precision storage and the memory plan.

Scores of every path are compared with a hand-written reference of the buffered algorithm the
attribution used before (every receiver's gradient kept ``[R, B, T, d]``, then one matrix product per
stage), on the families whose layouts the runner treats differently."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from test_circuit_models import FACTS as MODEL_FACTS
from workbench.circuits import memory
from workbench.circuits.attribution import attribute, ig_alphas, last_logits, mean_grid, metric_values, sender_means
from workbench.circuits.evaluate import evaluate, select_fill, select_random
from workbench.circuits.facts import Fact, batches, fill_runner_up, pad_id, prepare
from workbench.circuits.graph import build_graph
from workbench.circuits.runner import GraphRunner
from workbench.errors import WorkbenchError
from workbench.models.specs import load

# test_circuit_models' facts, and one with no partner and no entity: the mean baseline
FACTS = [*MODEL_FACTS, Fact("the sky on a clear day is", " blue")]

pytestmark = pytest.mark.usefixtures("one_thread")


def reference_edges_ig(lm, prepared, graph, steps: int, batch_size: int, metric: str = "logprob") -> torch.Tensor:
    """The buffered eap-ig-edges: clean and corrupted senders and residuals, this step's senders and every
    receiver's gradient kept, mean-baseline residuals from a cumulative sum, one product per stage."""
    S, R, P, d = graph.n_senders, graph.n_receivers, len(graph.stages), graph.d_model
    scores = torch.zeros(S, R)
    bs = batches(prepared, batch_size, pad_id(lm.tokenizer))
    with GraphRunner(lm.model, lm.adapter, graph) as runner:
        means = sender_means(runner, bs, S, d) if any(p.corrupted_ids is None for p in prepared) else None
        for b in bs:
            B, T = b.ids.shape
            with torch.no_grad():
                logits = last_logits(lm, runner.forward(b.ids), b.last)
            fill_runner_up(prepared, b.index, logits)
            b.corrupted_answer = torch.tensor([prepared[j].corrupted_answer_id for j in b.index])
            clean_acts, clean_resid = torch.zeros(S, B, T, d), torch.zeros(P, B, T, d)
            runner.forward(b.ids, acts=clean_acts, resid=clean_resid)
            corr_acts, corr_resid = torch.zeros(S, B, T, d), torch.zeros(P, B, T, d)
            if not bool(b.mean.all()):
                runner.forward(b.corrupted_ids, acts=corr_acts, resid=corr_resid)
            m = b.mean
            if bool(m.any()):
                grid = mean_grid(means, T)  # [S, 1, T, d]: the first position's mean, then the others'
                corr_acts[:, m] = grid
                cum = torch.cumsum(grid - clean_acts[:, m], dim=0)
                for st in graph.stages:
                    corr_resid[st.index, m] = clean_resid[st.index, m] + cum[st.n_up - 1]
            acts, grads = torch.zeros(S, B, T, d), torch.zeros(R, B, T, d)
            for t in ig_alphas(steps):
                grads.zero_()
                hidden = runner.forward(b.ids, mode="grad", grads=grads, acts=acts, mix=(t, corr_resid))
                metric_values(metric, last_logits(lm, hidden, b.last), b).sum().backward()
                delta, g = (corr_acts - acts).view(S, -1), grads.view(R, -1)
                for st in graph.stages:
                    scores[:st.n_up, st.start:st.stop] += delta[:st.n_up] @ g[st.start:st.stop].T / steps
    return scores / len(prepared)


def _model(which: str):
    if which.startswith("zoo:"):
        return load(which)
    from workbench.adapters.base import adapter_for
    from workbench.models.families import tiny_model
    from workbench.models.specs import LoadedModel

    model = tiny_model(which)
    return LoadedModel(model, load("zoo:qwen3-moe").tokenizer, adapter_for(model), which)


def _close(a: torch.Tensor, b: torch.Tensor, rel: float) -> None:
    """Equal up to ``rel`` of the largest score (float32 sums in another order)."""
    scale = float(a.abs().max())
    assert scale > 0
    err = float((a - b).abs().max())
    assert err <= rel * scale, f"max difference {err:.3g} against the largest score {scale:.3g}"


# dense pre-norm, sandwich norms (senders rewritten by an output norm), a parallel block with fused
# attention, fused experts with a gated shared expert, the ModuleList layout, latent attention
FAMILIES = ["llama", "gemma2", "gpt_neox", "zoo:qwen2-moe", "zoo:qwen3-moe-modulelist", "zoo:deepseek-v3"]


@pytest.mark.parametrize("which", FAMILIES)
def test_streamed_and_lean_scores_equal_the_buffered_reference(which):
    """Contracting each stage's receiver gradients as backward produces them, and the lean mode (one
    sender buffer the corrupted forward is rerun into and each step subtracts from; checkpointed
    layers), score every edge as the buffered algorithm does; with mean-baseline facts too."""
    lm = _model(which)
    g = build_graph(lm.model, lm.adapter)
    ref = reference_edges_ig(lm, prepare(lm.tokenizer, FACTS), g, steps=3, batch_size=4)
    assert any(p.baseline == "mean" for p in prepare(lm.tokenizer, FACTS))
    for lean in (False, True):
        got = attribute(lm, prepare(lm.tokenizer, FACTS), steps=3, batch_size=4, metric="logprob", graph=g, lean=lean)
        _close(got.matrix, ref, 1e-4)


@pytest.mark.parametrize("which", ["gemma2", "zoo:qwen2-moe", "zoo:deepseek-v3"])
def test_lean_evaluation_and_input_methods_equal_fast(which):
    """Evaluation by path patching in the lean mode (the corrupted forward rerun before every circuit, the
    patched pass subtracting its senders) gives the fast mode's metrics; eap and eap-ig under
    checkpointed layers give the same scores."""
    lm = _model(which)
    g = build_graph(lm.model, lm.adapter)
    prepared = prepare(lm.tokenizer, FACTS)
    for method in ("eap", "eap-ig"):
        fast = attribute(lm, prepare(lm.tokenizer, FACTS), method=method, steps=2, batch_size=4, graph=g)
        lean = attribute(lm, prepare(lm.tokenizer, FACTS), method=method, steps=2, batch_size=4, graph=g, lean=True)
        _close(lean.matrix, fast.matrix, 1e-5)
    circuits = {"c": select_fill(g, fast.matrix, g.n_edges // 20), "r": select_random(g, g.n_edges // 20, 0)}
    ev_fast = evaluate(lm, prepared, g, circuits, batch_size=4)
    ev_lean = evaluate(lm, prepared, g, circuits, batch_size=4, lean=True)
    for k in ("metric_full", "metric_corrupted"):
        assert ev_lean[k] == pytest.approx(ev_fast[k], rel=1e-5, abs=1e-6)
    for name in circuits:
        assert ev_lean["circuits"][name]["metric"] == pytest.approx(ev_fast["circuits"][name]["metric"], rel=1e-4, abs=1e-5)
        assert ev_lean["circuits"][name]["hit_at_10"] == ev_fast["circuits"][name]["hit_at_10"]


def test_reduced_precision_storage_scores_close_to_float32():
    """bfloat16 / float16 storage of the senders' outputs and differences: scores within the storage's
    rounding (2^-8 relative for bfloat16, accumulated over senders) of float32, and the top edges kept."""
    lm = load("zoo:qwen2-moe")
    g = build_graph(lm.model, lm.adapter)
    ref = attribute(lm, prepare(lm.tokenizer, FACTS), steps=2, batch_size=4, graph=g).matrix
    n = g.n_edges // 50
    top = set(torch.topk(ref.abs().flatten(), n).indices.tolist())
    for store, rel in ((torch.bfloat16, 3e-2), (torch.float16, 4e-3)):
        got = attribute(lm, prepare(lm.tokenizer, FACTS), steps=2, batch_size=4, graph=g, store=store, lean=True).matrix
        _close(got, ref, rel)
        kept = set(torch.topk(got.abs().flatten(), n).indices.tolist())
        assert len(top & kept) >= 0.8 * n
    with pytest.raises(WorkbenchError, match="storage dtype"):
        attribute(lm, prepare(lm.tokenizer, FACTS[:2]), graph=g, store=torch.int8)


def test_memory_plan_fits_the_budget_or_stops_first():
    """The plan takes fast mode at the largest batch that fits, lean mode where fast does not, and stops
    with a one-line error before any work where even one fact at a time cannot fit."""
    lm = load("zoo:qwen2-moe")
    g = build_graph(lm.model, lm.adapter)
    prepared = prepare(lm.tokenizer, FACTS)
    roomy = memory.plan(lm, g, prepared, 16, max_memory=1000.0)
    assert (roomy.batch_size, roomy.lean) == (len(FACTS), False)
    floor = memory.floor_per_token(g, torch.float32)
    assert floor == g.n_senders * g.d_model * 4
    fast_per, lean_per = (memory.per_token_bytes(g, torch.float32, lean, 1e5, len(g.layers)) for lean in (False, True))
    assert lean_per < fast_per and memory.per_token_bytes(g, torch.bfloat16, True, 1e5, len(g.layers)) < lean_per
    # a budget between lean and fast at full batch: lean mode at full batch, or fast at a smaller batch
    tokens = memory.batch_tokens([len(p.ids) for p in prepared], len(FACTS))
    budget = (roomy.base + tokens * (roomy.per_token + lean_per) // 2) / memory.GB
    tight = memory.plan(lm, g, prepared, 16, max_memory=budget)
    assert tight.estimate <= budget * memory.GB
    assert tight.lean or tight.batch_size < len(FACTS)
    forced = memory.plan(lm, g, prepared, 16, max_memory=1000.0, lean=True)
    assert forced.lean and forced.per_token < roomy.per_token
    with pytest.raises(WorkbenchError, match=r"even 1 at a time in lean mode .* the budget is"):
        memory.plan(lm, g, prepared, 16, max_memory=roomy.base / memory.GB * 0.5)
    with pytest.raises(WorkbenchError, match="--max-memory"):
        memory.plan(lm, g, prepared, 16, max_memory=-1.0)
    assert memory.batch_tokens([3, 5, 9, 4], 2) == 18 and memory.batch_tokens([3, 5, 9, 4], 1) == 9


def test_cli_refuses_a_budget_it_cannot_meet(tmp_path):
    """``workbench circuit --max-memory`` too small: a one-line error naming the need and the budget, a
    non-zero exit, no circuit files; a budget it can meet prints the plan."""
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "workbench", "circuit", "zoo:qwen2-moe", "--max-memory", "0.05",
                        "--out", str(out)], capture_output=True, text=True)
    assert r.returncode != 0
    err = [line for line in r.stderr.splitlines() if line.strip() and "Loading" not in line]
    assert len(err) == 1 and "even 1 at a time" in err[0] and "budget is 0.05 GB" in err[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert not out.exists() or not any(out.iterdir())
    r = subprocess.run([sys.executable, "-m", "workbench", "circuit", "zoo:qwen2-moe", "--max-memory", "64", "--lean",
                        "--store-dtype", "bfloat16", "--no-curve", "--random-seeds", "1", "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "memory: ~" in r.stdout and "lean mode, bfloat16 storage" in r.stdout


def test_lean_backward_keeps_no_layers_receiver_copies(monkeypatch):
    """A checkpointed layer recomputed in backward stashes its receivers' copies again; they are the layer's own
    and go when the layer returns, so backward does not pile them up layer after layer (on SmolLM2 with 1,288
    tokens they held 0.7x the floor by the first layer's gradients)."""
    import workbench.circuits.attribution as A

    lm = _model("llama")
    runners, sizes = [], []
    enter, contract = GraphRunner.__enter__, A.contract
    monkeypatch.setattr(GraphRunner, "__enter__", lambda self: (runners.append(self), enter(self))[1])

    def counting(scores, delta, g, st, alpha):
        sizes.append(len(runners[-1]._stash))
        return contract(scores, delta, g, st, alpha)
    monkeypatch.setattr(A, "contract", counting)
    attribute(lm, prepare(lm.tokenizer, FACTS[:2]), steps=1, batch_size=2, lean=True)
    assert len(lm.adapter.decoder_layers(lm.model)) >= 3 and len(sizes) >= 6
    assert max(sizes) == 0, sizes
