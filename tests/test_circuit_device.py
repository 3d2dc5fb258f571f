"""Circuits on an accelerator: every buffer where the model is, the same scores and evaluations as on the CPU.

Each test runs on two devices: :mod:`fake_device`'s stand-in (tensors that report another device while their
data stays on the CPU, and an error wherever one meets a CPU tensor in an op, as on CUDA), everywhere; and a
real CUDA device where there is one (``bench/gpu_check.sh`` section 6 runs them there). On the stand-in the
values come from the same CPU kernels except where PyTorch picks a kernel by device (attention takes the math
path off the CPU); on a GPU every kernel differs. Hence comparisons to float32 rounding, not bit-equality.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from fake_device import DeviceMismatch, fake_device, to_fake_device
from test_circuit_models import FACTS as MODEL_FACTS
from workbench.adapters.base import adapter_for
from workbench.circuits.attribution import attribute
from workbench.circuits.discover import CircuitOptions, find_circuit
from workbench.circuits.evaluate import evaluate, select_fill, select_random
from workbench.circuits.facts import Fact, prepare
from workbench.circuits.graph import build_graph
from workbench.models.specs import LoadedModel, load

FACTS = [*MODEL_FACTS, Fact("Ice is", " cold", relation="other")]  # no partner to swap with: the mean baseline

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(params=["stand-in", "cuda"])
def device(request):
    """``(context, move)``: inside ``context``, ``move(model)`` puts the model on the device."""
    if request.param == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("no CUDA device")
        return contextlib.nullcontext(torch.device("cuda")), lambda model: model.to("cuda")
    return fake_device(), to_fake_device


def _model(spec: str, tokenizer) -> LoadedModel:
    if spec == "tiny-llama":  # dense, grouped-query attention
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
        model = LlamaForCausalLM(cfg).eval()
        return LoadedModel(model, tokenizer, adapter_for(model), spec)
    if not spec.startswith("zoo:"):  # a tiny model of a transformers family
        from workbench.models.families import tiny_model

        model = tiny_model(spec)
        return LoadedModel(model, tokenizer, adapter_for(model), spec)
    return load(spec)


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal to float32 rounding of the largest value (attention's kernel differs by device, see above)."""
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4 * float(b.abs().max()) + 1e-9)


def test_the_stand_in_device_refuses_what_cuda_refuses():
    """The stand-in is only a test if it fails where CUDA does: a CPU tensor in an op with device tensors,
    and numpy; copies, CPU index tensors and 0-dim tensors pass, and values are the CPU's."""
    with fake_device() as dev:
        x = torch.arange(6.0, device=dev).view(2, 3)
        assert x.device == dev and (x @ x.T).device == dev
        with pytest.raises(DeviceMismatch, match="aten.add"):
            x + torch.ones(2, 3)
        with pytest.raises(DeviceMismatch):
            torch.zeros(2, 3).addmm_(torch.ones(2, 2), x)
        with pytest.raises((RuntimeError, TypeError)):
            x.numpy()
        assert x[torch.tensor([1])].tolist() == x[[1]].tolist() == [[3.0, 4.0, 5.0]]
        assert (x * torch.tensor(2.0)).cpu().tolist() == [[0.0, 2.0, 4.0], [6.0, 8.0, 10.0]]
        assert float(x.sum()) == 15.0 and x.cpu().device.type == "cpu"


@pytest.mark.parametrize("spec", ["tiny-llama", "zoo:qwen3-moe", "zoo:deepseek-v3", "zoo:qwen2-moe", "falcon"],
                         ids=["dense-gqa", "fused-experts", "latent-attention", "shared-experts",
                              "parallel-fused-qkv"])
def test_attribution_and_evaluation_on_a_device_equal_the_cpus(spec, device, zoo_tokenizer):
    """eap-ig-edges scores (swap and mean baselines) and the evaluation of the same circuits are the CPU's;
    before, the first batch's token ids were made on the CPU and the forward stopped there."""
    lm = _model(spec, zoo_tokenizer)
    prepared = prepare(lm.tokenizer, FACTS)
    graph = build_graph(lm.model, lm.adapter)
    ref = attribute(lm, prepared, steps=2, batch_size=4, graph=graph)
    n = max(8, graph.n_edges // 50)
    circuits = {"fill": select_fill(graph, ref.matrix, n), "random": select_random(graph, n, 0)}
    ref_ev = evaluate(lm, prepared, graph, circuits, batch_size=4)
    context, move = device
    with context:
        move(lm.model)
        got = attribute(lm, prepared, steps=2, batch_size=4, graph=graph)
        ev = evaluate(lm, prepared, graph, circuits, batch_size=4)
    assert got.matrix.device.type == "cpu"  # what callers read stays on the CPU
    _close(got.matrix, ref.matrix)
    for key in ("metric_full", "metric_corrupted"):
        assert ev[key] == pytest.approx(ref_ev[key], rel=1e-4, abs=1e-5)
    for name in circuits:
        assert ev["circuits"][name]["metric"] == pytest.approx(ref_ev["circuits"][name]["metric"], rel=1e-4, abs=1e-5)
        assert ev["circuits"][name]["hit_at_10"] == ref_ev["circuits"][name]["hit_at_10"]


@pytest.mark.parametrize("kw", [{"method": "eap"}, {"method": "eap-ig"}, {"lean": True, "store": torch.bfloat16}],
                         ids=["eap", "eap-ig", "lean-bf16"])
def test_every_method_and_memory_mode_runs_on_a_device(kw, device, zoo_tokenizer):
    lm = _model("tiny-llama", zoo_tokenizer)
    prepared = prepare(lm.tokenizer, FACTS)
    ref = attribute(lm, prepared, steps=2, batch_size=4, **kw)
    context, move = device
    with context:
        move(lm.model)
        got = attribute(lm, prepared, steps=2, batch_size=4, **kw)
    _close(got.matrix, ref.matrix)


def test_find_circuit_on_a_device_with_every_step(device, zoo_tokenizer):
    """The whole search on the device: the memory plan, the curve and its target, swap rounds, refinement and
    per-relation circuits; the same sizes and faithfulness as on the CPU."""
    lm = _model("tiny-llama", zoo_tokenizer)
    opts = CircuitOptions(steps=2, random_seeds=1, batch_size=4, curve=True, target_faithfulness=0.8, swaps=1,
                          refine=2)
    ref, _, ref_mask = find_circuit(lm, FACTS, opts)
    context, move = device
    with context as dev:
        move(lm.model)
        circuit, _, mask = find_circuit(lm, FACTS, opts)
    assert torch.device(circuit.meta["memory"]["device"]).type == dev.type
    assert int(mask.sum()) == int(ref_mask.sum())
    got, want = circuit.meta["metrics"], ref.meta["metrics"]
    assert np.isfinite(got["faithfulness"])
    assert got["faithfulness"] == pytest.approx(want["faithfulness"], abs=1e-3)
    assert set(got["relations"]["per_relation"]) == set(want["relations"]["per_relation"]) == {"capital_of",
                                                                                             "chemical_symbol"}


def test_the_memory_plan_on_a_gpu_counts_the_devices_memory(monkeypatch):
    """On CUDA the plan's base is what the process has allocated on the device and the budget what it has free
    (not the host's RSS and free memory)."""
    from workbench.circuits import memory

    calls = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty"))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d=None: 3 * memory.GB)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: (5 * memory.GB, 80 * memory.GB))
    assert memory.in_use(torch.device("cuda", 0)) == (3 * memory.GB, 5 * memory.GB) and calls == ["empty"]
    base, _ = memory.in_use(torch.device("cpu"))
    assert base == memory.rss() or abs(base - memory.rss()) < 64 * 2**20
