"""Family coverage: every dense decoder family of transformers we list, and every declared MoE family,
passes `workbench check`'s battery on a tiny seeded model saved with save_pretrained and loaded as a
user's checkpoint; undeclared MoE families are refused with one line naming what was found."""

from __future__ import annotations

from dataclasses import replace

import pytest

from workbench.adapters.base import Adapter, adapter_for, register_adapter
from workbench.check import report, run_checks
from workbench.adapters.infer import ROUTING_RULES
from workbench.errors import WorkbenchError
from workbench.models.families import DENSE, MOE_DECLARED, MOE_INFERRED, MOE_UNDECLARED, MOE_ZOO, save_tiny
from workbench.models.specs import load

# Plain pre-norm blocks; every other dense family is sandwich, post-norm or parallel (circuits.blocks reads
# each, and circuits apply to all of them).
PRENORM = {"llama", "mistral", "qwen2", "qwen3", "gpt2", "gemma", "olmo", "stablelm", "smollm3", "helium",
           "ministral", "seed_oss", "apertus", "arcee", "hunyuan_v1_dense", "glm"}
BLOCK_KINDS = {"gemma2": "sandwich", "gemma3_text": "sandwich", "glm4": "sandwich", "olmo2": "post-norm",
               "olmo3": "post-norm", "exaone4": "post-norm", "phi": "parallel", "cohere": "parallel",
               "cohere2": "parallel", "gpt_neox": "parallel", "falcon": "parallel"}
# What transformers itself cannot do for a family, so a check fails honestly (none left: Falcon refuses the
# dynamic attention switch but reads the config at forward time, which the sink pass now sets).
KNOWN_FAILURES: dict[str, set[str]] = {}


def _by_name(results):
    return {c.name: c for c in results}


@pytest.mark.parametrize("model_type", DENSE)
def test_dense_family_passes_the_check(model_type, tmp_path, zoo_tokenizer):
    lm = load(str(save_tiny(model_type, tmp_path, zoo_tokenizer)))
    res = _by_name(run_checks(lm))
    failed = {n for n, c in res.items() if c.ok is False}
    assert failed == KNOWN_FAILURES.get(model_type, set()), [res[n].line() for n in failed]
    for name in ("adapter", "hooks fire", "hooks are read-only", "dense MLP output", "zero is exact"):
        assert res[name].ok is True, res[name].line()
    assert res["routing"].ok is None and res["block rebuilt"].ok is None
    assert res["circuit graph"].ok is True, res["circuit graph"].line()
    assert f"over {BLOCK_KINDS.get(model_type, 'pre-norm')} blocks" in res["circuit graph"].detail
    if model_type in PRENORM | {"granite"}:  # elsewhere a post-MLP norm may keep the planted row from the residual (skip, said why)
        assert res["planted super expert found"].ok is True, res["planted super expert found"].line()
    declared = model_type in ("llama", "mistral", "qwen2", "qwen3", "gpt2")
    assert ("(inferred)" in lm.adapter.name) != declared


@pytest.mark.parametrize("model_type,dtype", [("zoo:qwen3-moe", "bfloat16"), ("deepseek_v2", "bfloat16"),
                                              ("gpt_oss", "float16"), ("gemma2", "bfloat16")])
def test_the_check_passes_in_half_precision(model_type, dtype, tmp_path, zoo_tokenizer):
    """`workbench check --dtype bf16|fp16` failed every model: float32's tolerances (attention rows within 1e-3:
    2.9e-3 in bf16; a MoE block rebuilt within 1e-4: 5.1e-3 on deepseek_v2 in bf16). They now scale with the
    dtype's resolution where they were failing; the circuit graph, which runs in float32, is said not to apply."""
    spec = model_type if model_type.startswith("zoo:") else str(save_tiny(model_type, tmp_path, zoo_tokenizer))
    res = _by_name(run_checks(load(spec, dtype=dtype)))
    assert not [c.line() for c in res.values() if c.ok is False]
    assert res["attention probabilities"].ok is True
    if model_type != "gpt_oss":  # (whose rows sum to less than 1: its learned sinks take the rest)
        assert f"in {dtype})" in res["attention probabilities"].detail
    assert res["circuit graph"].ok is None and "circuits run in float32" in res["circuit graph"].detail
    assert res["zero is exact"].ok is True and res["hooks are read-only"].ok is True
    if res["block rebuilt"].ok is not None:
        assert res["block rebuilt"].ok is True and f"in {dtype})" in res["block rebuilt"].detail


@pytest.mark.parametrize("name", MOE_ZOO)
def test_declared_moe_family_passes_the_check(name):
    lm = load(f"zoo:{name}")
    res = _by_name(run_checks(lm))
    assert not [c.line() for c in res.values() if c.ok is False]
    assert res["block rebuilt"].ok is True and res["circuit graph"].ok is True
    assert res["planted super expert found"].ok is True
    assert res["routing"].ok is (None if name.endswith("modulelist") else True)


@pytest.mark.parametrize("model_type", MOE_DECLARED)
def test_declared_moe_family_from_its_config_class_passes_the_check(model_type, tmp_path, zoo_tokenizer):
    lm = load(str(save_tiny(model_type, tmp_path, zoo_tokenizer)))
    res = _by_name(run_checks(lm))
    assert not [c.line() for c in res.values() if c.ok is False]
    for name in ("routing", "block rebuilt", "zero is exact", "planted super expert found", "study runs"):
        assert res[name].ok is True, res[name].line()
    if model_type in ("qwen3_next", "qwen3_5_moe_text", "minimax", "granitemoehybrid", "jamba"):  # hybrid: linear-attention layers have no
        assert "layers have none" in res["attention probabilities"].detail  # probabilities and no circuit heads
        assert res["circuit graph"].ok is None and "softmax attention in every layer" in res["circuit graph"].detail
    else:
        assert res["circuit graph"].ok is True, res["circuit graph"].line()
    assert "(inferred)" not in lm.adapter.name


@pytest.mark.parametrize("model_type", MOE_INFERRED)
def test_inferred_moe_family_passes_the_check(model_type, tmp_path, zoo_tokenizer):
    """No declared adapter: the MoE structure and routing rule are read from the model and verified."""
    lm = load(str(save_tiny(model_type, tmp_path, zoo_tokenizer)))
    assert lm.adapter.name == f"{model_type} (inferred)" and lm.adapter.routing in ROUTING_RULES
    res = _by_name(run_checks(lm))
    assert not [c.line() for c in res.values() if c.ok is False]
    for name in ("routing", "block rebuilt", "zero is exact", "planted super expert found", "study runs"):
        assert res[name].ok is True, res[name].line()


def test_moe_routing_inference_refuses_what_no_rule_reproduces(tmp_path, zoo_tokenizer):
    """A router whose choice no known rule reproduces (here: the model's own router with its weights
    renormalised away from what it returns) is refused in one line, naming the rules tried."""
    import torch

    from workbench.adapters.infer import infer_adapter
    from workbench.models.families import tiny_model

    model = tiny_model("flex_olmo")  # softmax top-k, not renormalised
    router = model.model.layers[0].mlp.gate
    plain = router.forward

    def squared(hidden):
        logits, weights, index = plain(hidden)
        return logits, weights ** 2, index  # no rule gives these weights
    router.forward = squared
    with pytest.raises(WorkbenchError, match="no known routing rule") as e:
        infer_adapter(model)
    assert "\n" not in str(e.value)
    router.forward = plain
    assert infer_adapter(model).routing == "softmax-topk"
    with torch.no_grad():  # the inferred rule re-routes with an expert excluded, as drop does
        logits = torch.randn(5, router.weight.shape[0])
        exclude = torch.zeros_like(logits, dtype=torch.bool)
        exclude[:, 0] = True
        _, index = infer_adapter(model).select_experts(model, logits, router, exclude)
    assert not (index == 0).any()


@pytest.mark.parametrize("model_type", MOE_UNDECLARED)
def test_undeclared_moe_family_is_refused_in_one_line(model_type, tmp_path, zoo_tokenizer):
    d = save_tiny(model_type, tmp_path, zoo_tokenizer)
    with pytest.raises(WorkbenchError, match=f"unsupported architecture '{model_type}'") as e:
        load(str(d))
    msg = str(e.value)
    assert "\n" not in msg and ("mixture of experts" in msg or "no attention module" in msg), msg


def test_a_wrong_adapter_fails_the_check_and_exits_non_zero(capsys):
    lm = load("zoo:qwen3-moe")
    lm.adapter = replace(lm.adapter, top_k_attr="no_such_field")  # routes top-1 where the model routes top-2
    results = run_checks(lm)
    res = _by_name(results)
    assert res["routing"].ok is False and "router chose" in res["routing"].detail
    assert report("zoo:qwen3-moe", results) == 1
    assert "check(s) failed" in capsys.readouterr().out
    lm = load("zoo:qwen2-moe")
    lm.adapter = replace(lm.adapter, shared_names=())  # forgets the shared expert: the block no longer adds up
    res = _by_name(run_checks(lm))
    assert res["block rebuilt"].ok is False and res["routing"].ok is True


def test_the_check_names_a_tokenizer_past_the_embedding_and_non_finite_weights(tmp_path):
    """A tokenizer whose ids pass the embedding's rows failed 7 checks with "IndexError: index out of range in self",
    and one NaN weight six with NaN figures, neither naming the cause; a config.json without model_type, or holding a
    list, said "unsupported architecture None"."""
    import torch

    lm = load("zoo:qwen3-moe")
    with torch.no_grad():
        lm.adapter.decoder_layers(lm.model)[1].self_attn.o_proj.weight[0, 0] = float("nan")
    res = _by_name(run_checks(lm))
    assert res["weights"].ok is False and res["weights"].detail.startswith(
        "1 NaN or inf value(s) in 1 tensor(s), first model.layers.1.self_attn.o_proj.weight")
    assert res["tokenizer"].ok is True
    lm = load("zoo:qwen3-moe")
    lm.model.resize_token_embeddings(40)
    res = _by_name(run_checks(lm))
    assert res["tokenizer"].ok is False and "the embedding has 40 rows: this tokenizer is not the model's" in \
        res["tokenizer"].detail and res["weights"].ok is True
    for body, msg in (("[1, 2]", "holds a JSON list, not a model config"),
                      ('{"hidden_size": 8}', "names no model_type, so no architecture can be chosen for it")):
        (tmp_path / "config.json").write_text(body)
        with pytest.raises(WorkbenchError, match=msg):
            load(str(tmp_path))


def test_a_user_adapter_registered_from_user_code_is_used(tmp_path, zoo_tokenizer):
    """The README's 'Your own architecture' path: a declared adapter wins over the inferred one."""
    d = save_tiny("olmo2", tmp_path, zoo_tokenizer)
    assert adapter_for(load(str(d)).model).name == "olmo2 (inferred)"
    mine = Adapter(name="my-olmo2", model_types=("olmo2",), input_norm_name="", post_attn_norm_name="")
    register_adapter(mine)
    try:
        lm = load(str(d))
        assert lm.adapter is mine
        assert not [c.line() for c in run_checks(lm) if c.ok is False]
    finally:
        del Adapter.registry["olmo2"]


def test_cli_check_prints_one_line_per_check(tmp_path, zoo_tokenizer):
    import os
    import subprocess
    import sys

    d = save_tiny("gemma2", tmp_path / "m", zoo_tokenizer)
    r = subprocess.run([sys.executable, "-m", "workbench", "check", str(d)], capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith("ok   adapter: gemma2 (inferred)")
    assert "all 11 checks passed, 3 not applicable" in lines[-1]
    assert any(l.startswith("skip planted super expert found") and "normed before the residual" in l for l in lines)


def test_circuits_run_on_a_post_norm_block(tmp_path, zoo_tokenizer):
    """OLMo 2 (no norm on the way into attention or MLP, one on each output): a circuit is found end to end."""
    from workbench.circuits.discover import CircuitOptions, find_circuit
    from workbench.circuits.facts import builtin_facts

    lm = load(str(save_tiny("olmo2", tmp_path, zoo_tokenizer)))
    circuit, scores, mask = find_circuit(lm, builtin_facts()[:4], CircuitOptions(steps=1, top_edges=20))
    metrics = circuit.meta["metrics"]
    assert 0 < metrics["n_edges"] <= 20 and metrics["n_edges_total"] == scores.graph.n_edges
    assert scores.matrix.abs().sum() > 0 and metrics["faithfulness"] == metrics["faithfulness"]  # finite


def test_inferred_prenorm_holds_in_bfloat16(tmp_path, zoo_tokenizer):
    """The pre-norm verification compares a residual sum: in bfloat16 it rounds, and must still be recognised."""
    import torch

    d = str(save_tiny("gemma", tmp_path, zoo_tokenizer))
    lm = load(d, dtype=torch.bfloat16)
    assert lm.adapter.name == "gemma (inferred)" and lm.adapter.input_norm_name == "input_layernorm"


@pytest.mark.parametrize("model_type", ["dbrx", "granitemoeshared", "granitemoehybrid"])
def test_prepared_modules_compute_what_transformers_computes(model_type, tmp_path):
    """Adapters that bring a family to the contract by swapping module classes (DBRX: router, block and
    experts; Granite-MoE-Shared and -Hybrid: the layer's shared-MLP call moved into the block) keep the parameters
    (state_dict equal, also after a circuit run; save_pretrained loads in plain transformers) and the logits.
    The same kernels run in both, but on differently shaped inputs in places (DBRX's block hands the experts
    flattened rows), so logits are compared to float32 rounding, not bits."""
    import torch
    from transformers import AutoModelForCausalLM

    from workbench.circuits.graph import build_graph
    from workbench.circuits.runner import GraphRunner
    from workbench.models.families import tiny_model

    plain, model = tiny_model(model_type), tiny_model(model_type)
    ad = adapter_for(model)
    assert ad.name == model_type and type(ad.mlp(ad.decoder_layers(model)[0])).__name__.startswith("Contract")
    adapter_for(model)  # a second call changes nothing
    a = plain.state_dict()

    def same_parameters(m):
        b = m.state_dict()
        return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)

    assert same_parameters(model)
    ids = torch.tensor([[3, 17, 4051, 99, 12, 7, 2048, 5]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, plain(ids).logits, rtol=1e-5, atol=1e-6)
    if model_type != "granitemoehybrid":  # (circuits refuse Mamba layers)
        g = build_graph(model, ad)
        with GraphRunner(model, ad, g) as runner:  # stand-ins swapped in and out
            acts, resid = torch.zeros(g.n_senders, 1, 8, g.d_model), torch.zeros(len(g.stages), 1, 8, g.d_model)
            runner.forward(ids, acts=acts, resid=resid)
        assert acts.abs().sum() > 0
        assert same_parameters(model)
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not type(ad.mlp(ad.decoder_layers(again)[0])).__name__.startswith("Contract")  # plain transformers
    assert same_parameters(again)


def test_dbrx_contract_router_and_expert_weights():
    """DBRX's contract router returns (logits, weights, indices) with its p-norm routing, and down_proj is a
    view of w2: writing an expert's output row writes the model's own weight."""
    import torch

    from workbench.models.families import tiny_model

    model = tiny_model("dbrx")
    adapter_for(model)
    ffn = model.transformer.blocks[0].ffn
    with torch.no_grad():
        logits, weights, index = ffn.router(torch.randn(6, 64))
    assert logits.shape == (6, 4) and index.shape == (6, 2)
    torch.testing.assert_close(weights.sum(-1), torch.ones(6))  # 1-normalised, as the config says
    experts, (E, I, H) = ffn.experts, (4, 32, 64)
    with torch.no_grad():
        experts.down_proj[1, 3].zero_()
    assert not experts.mlp.w2.view(E, I, H)[1, :, 3].any() and experts.mlp.w2.view(E, I, H)[0, :, 3].any()


def test_a_study_sink_share_is_over_softmax_layers_only(tmp_path, zoo_tokenizer):
    """MiniMax's lightning layers hand out a [B, H, T, T] "attentions" tensor that is no probability (rows sum to
    ~0.03): averaged in, the study's sink metric was half the share eager attention gives over its softmax layers
    (0.122 against 0.240 on the sweep's texts); `profile` had it right."""
    import torch

    from workbench.experts.sinks import eager_attention
    from workbench.metrics import text_metrics

    lm = load(str(save_tiny("minimax", tmp_path, zoo_tokenizer)))
    texts = ["Once upon a time there was a cat", "Water boils at one hundred degrees"]
    softmax = [i for i, layer in enumerate(lm.adapter.decoder_layers(lm.model)) if lm.adapter.has_attention(layer)]
    assert 0 < len(softmax) < len(lm.adapter.decoder_layers(lm.model))
    with eager_attention(lm.model):  # as a study runs it
        got, _ = text_metrics(lm, texts, {"sink"}, batch_size=1)
        for text, share in zip(texts, got["sink"]):
            ids = lm.tokenizer(text, return_tensors="pt").input_ids
            with torch.no_grad():
                att = lm.model(ids, output_attentions=True).attentions
            assert len(att) == len(lm.adapter.decoder_layers(lm.model))
            want = torch.stack([att[i][0, :, 1:, 0].double().mean() for i in softmax]).mean()
            assert share == pytest.approx(float(want), rel=1e-5)
