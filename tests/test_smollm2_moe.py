"""``smollm2-moe``: SmolLM2-135M split into a Qwen2-MoE whose experts carry its pretrained neurons."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import TOLERANCES
from workbench.errors import WorkbenchError
from workbench.models import moefy

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))


@pytest.fixture(scope="module")
def parts():
    return moefy.read_parts()


@pytest.fixture(scope="module")
def smollm2():
    """A fresh SmolLM2 of this module's own: nothing another module did to the session's model reaches the
    exactness checks here."""
    from workbench.models.specs import load

    return load("smollm2-135m")


def test_every_layer_partition_is_disjoint_and_covers_the_mlp(parts):
    tensors, meta = parts
    E, S = meta["experts"], meta["shared"]
    perm, router = tensors["perm"], tensors["router"]
    assert perm.shape == (30, 1536) and router.shape == (30, E, 576)
    assert (1536 - S) % E == 0
    for layer in range(30):
        shared, experts = moefy.expert_neurons(perm[layer].long(), E, S)
        assert torch.equal(torch.sort(perm[layer].long()).values, torch.arange(1536)), layer
        assert len(shared) == S and all(len(e) == (1536 - S) // E for e in experts)
    assert torch.isfinite(router).all()


def _uniform(parts):
    tensors, meta = parts
    return {"perm": tensors["perm"], "router": torch.zeros_like(tensors["router"])}, meta


def test_every_expert_on_with_equal_gates_is_smollm2s_mlp(smollm2, parts):
    """top_k = experts and a zero router (every gate 1/E, times E): each block computes the dense MLP.

    The block sums 17 partial matmuls (16 experts + shared) where the dense MLP runs one, so the result
    differs by float rounding: fp32 tolerance relative to the layer's largest output (the massive
    activation of layer 11 is ~3e4).
    """
    E = parts[1]["experts"]
    moe = moefy.assemble(smollm2.model, E, _uniform(parts))
    ids = smollm2.tokenizer("The capital of France is Paris. def f(x): return x + 1", return_tensors="pt").input_ids
    inputs = {}
    hooks = [layer.mlp.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0]))
             for i, layer in enumerate(smollm2.model.model.layers)]
    try:
        with torch.no_grad():
            dense_logits = smollm2.model(ids).logits
            moe_logits = moe(ids).logits
            tol = TOLERANCES[torch.float32]
            for i, layer in enumerate(smollm2.model.model.layers):
                want, got = layer.mlp(inputs[i]), moe.model.layers[i].mlp(inputs[i])
                scale = float(want.abs().max())
                assert (got - want).abs().max() <= 10 * tol["rtol"] * scale + tol["atol"], i
    finally:
        for h in hooks:
            h.remove()
    torch.testing.assert_close(moe_logits, dense_logits, rtol=1e-3, atol=1e-3)
    top2 = dense_logits[0, -1].topk(2).values  # a top-2 gap far above the 1e-3 above: the argmax cannot flip
    assert float(top2[0] - top2[1]) > 1e-2 and torch.equal(moe_logits[0, -1].argmax(), dense_logits[0, -1].argmax())


def test_attention_and_embeddings_are_smollm2s_own(smollm2, parts):
    moe = moefy.assemble(smollm2.model, 8, parts)
    dense = smollm2.model.state_dict()
    for k, v in moe.state_dict().items():
        if ".mlp." not in k:
            assert torch.equal(v, dense[k]), k
    layer = moe.model.layers[11].mlp
    assert torch.equal(layer.shared_expert_gate.weight, torch.zeros(1, 576))  # sigmoid(0) * 2 = 1


def test_assembly_is_deterministic(smollm2, parts):
    a = moefy.assemble(smollm2.model, 4, parts).state_dict()
    b = moefy.assemble(smollm2.model, 4, parts).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _random_lora(parts, rank=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"gate_a": (1536, rank), "gate_b": (rank, 576), "up_a": (1536, rank), "up_b": (rank, 576),
              "down_a": (576, rank), "down_b": (rank, 1536)}
    return {f"lora.{k}": torch.randn(30, *sh, generator=g) * 0.02 for k, sh in shapes.items()}


@pytest.mark.parametrize("layer", [3, 11, 27])
def test_distillation_trains_what_the_assembled_moe_computes(smollm2, parts, layer):
    """The build's training forward (exact Qwen2-MoE routing, low-rank corrections) and the assembled
    checkpoint's block give the same output on real hidden states. Tokens whose k-th and (k+1)-th router
    probabilities nearly tie may route differently by rounding and are left out."""
    from moefy_smollm2 import _moe_mlp

    tensors, meta = parts
    lora = _random_lora(parts)
    k = 8
    moe = moefy.assemble(smollm2.model, k, ({**tensors, **lora}, meta))
    captured = {}
    h = smollm2.model.model.layers[layer].mlp.register_forward_pre_hook(lambda m, a: captured.setdefault("x", a[0]))
    ids = smollm2.tokenizer("The capital of France is Paris. def f(x): return x + 1", return_tensors="pt").input_ids
    try:
        with torch.no_grad():
            smollm2.model(ids)
    finally:
        h.remove()
    x = captured["x"][0]
    router = tensors["router"][layer].float()
    probs = torch.softmax(x @ router.T, -1).sort(-1, descending=True).values
    clear = (probs[:, k - 1] - probs[:, k]) > 1e-5 * probs[:, 0]
    assert clear.sum() >= len(x) // 2
    train = _moe_mlp(smollm2.model.model.layers[layer].mlp, tensors["perm"][layer].long(), router,
                     {n: v[layer] for n, v in ((n[5:], v) for n, v in lora.items())}, meta["experts"], meta["shared"],
                     {"moe": True, "k": k})
    with torch.no_grad():
        want, got = train(x)[clear], moe.model.layers[layer].mlp(x[None])[0][clear]
    scale = float(want.abs().max())
    assert (got - want).abs().max() <= 1e-4 * scale
    assert not torch.allclose(got, smollm2.model.model.layers[layer].mlp(x)[clear], rtol=1e-3, atol=1e-3)  # corrected


def test_distillation_is_deterministic_for_a_seed(zoo_tokenizer):
    """Two short distillations of a tiny Llama with the same seed give equal corrections, move them off
    zero, and leave the model's own MLPs in place."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from moefy_smollm2 import distill

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(zoo_tokenizer), hidden_size=32, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    perms = [torch.randperm(96, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    routers = [torch.randn(8, 32, generator=torch.Generator().manual_seed(10 + i)) for i in range(2)]
    texts = ["The capital of France is Paris and the capital of Spain is Madrid. " * 3, "def f(x):\n    return x + 1\n" * 4]
    runs = [distill(model, zoo_tokenizer, texts, perms, routers, 8, 16, steps=3, rank=2, batch=2, seq=16, top_ks=(2, 4),
                    log=lambda m: None)
            for _ in range(2)]
    assert runs[0].keys() == runs[1].keys() and len(runs[0]) == 6
    for name in runs[0]:
        assert torch.equal(runs[0][name], runs[1][name]), name
    assert float(runs[0]["lora.down_a"].abs().max()) > 0 and runs[0]["lora.gate_a"].shape == (2, 96, 2)
    assert all("forward" not in layer.mlp.__dict__ for layer in model.model.layers)


def test_the_build_is_deterministic_for_a_seed():
    """The script's per-layer fit (clustering, router, temperature) on the same activations, twice."""
    from moefy_smollm2 import fit_layer

    torch.manual_seed(0)
    mlp = nn.Module()
    mlp.gate_proj, mlp.up_proj, mlp.down_proj = nn.Linear(32, 96, bias=False), nn.Linear(32, 96, bias=False), nn.Linear(96, 32, bias=False)
    x = torch.randn(500, 32)
    first = fit_layer(x, mlp, experts=8, shared_n=16, top_k=2, seed=0)
    second = fit_layer(x, mlp, experts=8, shared_n=16, top_k=2, seed=0)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1]) and first[2:] == second[2:]
    assert torch.equal(torch.sort(first[0]).values, torch.arange(96))  # a partition of the neurons
    other = fit_layer(x, mlp, experts=8, shared_n=16, top_k=2, seed=1)
    assert not torch.equal(first[0], other[0])


@pytest.mark.parametrize("spec,k", [("smollm2-moe", moefy.DEFAULT_TOP_K), ("smollm2-moe:top2", 2), ("smollm2-moe:top16", 16)])
def test_spec_picks_the_top_k(spec, k):
    assert moefy.parse_spec(spec) == k


@pytest.mark.parametrize("spec", ["smollm2-moe:top0", "smollm2-moe:top17", "smollm2-moe:8", "smollm2-moe:"])
def test_bad_top_k_is_one_line(spec):
    with pytest.raises(WorkbenchError, match="smollm2-moe:topK with K from 1 to 16"):
        moefy.parse_spec(spec)


def test_models_lists_it():
    from workbench.models.catalog import catalog
    from workbench.models.specs import list_builtin

    row = next(r for r in catalog() if r["spec"] == "smollm2-moe")
    assert row["architecture"] == "Qwen2MoeForCausalLM" and row["experts"] == 16 and row["top_k"] == moefy.DEFAULT_TOP_K
    assert "smollm2-moe" in list_builtin()  # what the app offers


@pytest.mark.slow
def test_cache_is_plain_transformers_atomic_and_rebuilt_when_corrupt(smollm2, parts, tmp_path, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM

    from workbench.models import gguf

    (tmp_path / "smollm2-135m-instruct").symlink_to(gguf.checkpoint_dir())  # reuse the dense conversion
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path))
    (tmp_path / ".smollm2-moe-half").mkdir()  # what a killed build leaves: never used
    path = moefy.checkpoint_dir(2)
    assert path == tmp_path / "smollm2-moe-top2"
    plain = AutoModelForCausalLM.from_pretrained(path)  # no workbench code involved
    assert type(plain).__name__ == "Qwen2MoeForCausalLM" and plain.config.num_experts_per_tok == 2
    ids = smollm2.tokenizer("The capital of Japan is", return_tensors="pt").input_ids
    with torch.no_grad():
        want = moefy.assemble(smollm2.model, 2, parts)(ids).logits
        # the saved weights are the assembled ones; the reload is memory-mapped (other GEMM paths)
        torch.testing.assert_close(plain(ids).logits, want, **TOLERANCES[torch.float32])
    assert json.loads((path / "workbench-moe.json").read_text())["top_k"] == 2
    capsys.readouterr()
    with open(path / "model.safetensors", "r+b") as f:  # corrupt: truncate
        f.truncate(1000)
    again = moefy.checkpoint_dir(2)
    err = capsys.readouterr().err
    assert "rebuilding the smollm2-moe cache" in err and "corrupt" in err
    assert AutoModelForCausalLM.from_pretrained(again).config.num_experts == 16
    shutil.rmtree(tmp_path / "smollm2-moe-top2")


@pytest.mark.slow
def test_profile_finds_smollm2s_massive_activation_as_a_super_expert(smollm2, parts):
    """The dense model's super weight (layer-11 MLP, channel 507, position 0) becomes the MoE's super expert."""
    from experts.profile import ProfileOptions, profile
    from workbench.data import default_prompts
    from workbench.models.specs import LoadedModel
    from workbench.adapters.base import adapter_for

    model = moefy.assemble(smollm2.model, moefy.DEFAULT_TOP_K, parts)
    lm = LoadedModel(model, smollm2.tokenizer, adapter_for(model), "smollm2-moe")
    p = profile(lm, default_prompts()[:40], ProfileOptions(top_massive=2), progress=False)
    found = [(e["layer"], e["kind"], e["expert"], e["channel"], e["position"]) for e in p["super_experts"]]
    assert found == [(11, "shared", 0, 507, 0)]
    e = p["super_experts"][0]
    # the shared expert's raw output is doubled (its gate is sigmoid(0) = 1/2): the residual gets SmolLM2's value
    assert 2e4 < e["residual"] < 4e4 and e["max_abs"] == pytest.approx(2 * e["residual"], rel=0.05)
    massive = [l for l in p["massive_activations"]["layers"] if l["massive"]]
    assert massive[0]["layer"] == 11 and massive[0]["top"][0]["channel"] == 507


def test_bad_size_on_the_command_line_is_one_line(tmp_path):
    import subprocess

    r = subprocess.run([sys.executable, "-m", "workbench", "profile", "smollm2-moe:top99", "--text", "hi",
                        "--out", str(tmp_path / "p")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert [l for l in r.stderr.splitlines() if l.startswith("error:")] == [
        "error: bad model spec 'smollm2-moe:top99': use smollm2-moe (top-15) or smollm2-moe:topK with K from 1 to 16, "
        "e.g. smollm2-moe:top8"]
    assert not (tmp_path / "p").exists()
