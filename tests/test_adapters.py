"""Every registered dense family loads from a local folder and traces bit-identically."""

import pytest
import torch

from helpers import PROMPTS
from workbench.adapters.base import adapter_for, supported_model_types
from workbench.errors import WorkbenchError
from workbench.models.specs import load
from workbench.tracing.capture import Capture
from workbench.tracing.reducers import AbsMax
from workbench.tracing.runner import trace
from workbench.tracing.sites import Component, Site, all_sites


def tiny_config(model_type):
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=49152, num_hidden_layers=2, num_attention_heads=4, bos_token_id=1, eos_token_id=2)
    if model_type == "gpt2":
        return GPT2Config(vocab_size=49152, n_embd=64, n_layer=2, n_head=4, n_positions=128)
    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[model_type]
    return cls(**common, hidden_size=64, intermediate_size=96, num_key_value_heads=2, max_position_embeddings=128)


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "mistral", "qwen2", "qwen3"])
def test_dense_family_round_trip(model_type, tmp_path, zoo_tokenizer):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type)).eval()
    model.save_pretrained(tmp_path)
    zoo_tokenizer.save_pretrained(tmp_path)
    lm = load(str(tmp_path))
    assert lm.summary()["layout"] == "dense"
    enc = lm.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    grid = torch.where(enc.attention_mask.bool(), torch.arange(enc.input_ids.numel()).view_as(enc.input_ids), -1)
    plain = lm.model(**enc).logits
    sites = all_sites(lm.adapter, lm.model, [c for c in Component])
    assert Site(1, Component.EXPERT, 0) in sites and not any(s.component is Component.ROUTER for s in sites)
    sinks = {s: [AbsMax()] for s in sites}
    with Capture(lm.model, lm.adapter, sinks) as cap:
        cap.begin_batch(grid)
        hooked = lm.model(**enc).logits
    assert torch.equal(plain, hooked)
    n_tokens = int(enc.attention_mask.sum())
    assert all(int(sinks[s][0].rows) == n_tokens for s in sites)
    # The MLP's down_proj output is the MLP output for these families.
    mlp, expert = sinks[Site(0, Component.MLP_OUT)][0], sinks[Site(0, Component.EXPERT, 0)][0]
    assert torch.equal(mlp.absmax, expert.absmax)
    # trace() runs the decoder stack without the LM head: the same statistics as the full forward above.
    assert lm.adapter.body(lm.model) is not lm.model
    res = trace(lm, PROMPTS, sites, ("absmax",), batch_size=len(PROMPTS), progress=False)
    for s in sites:
        assert torch.equal(res[s]["absmax"].absmax, sinks[s][0].absmax), s


def test_registry_lists_families_and_rejects_unknown():
    types = supported_model_types()
    for t in ["llama", "gpt2", "qwen2_moe", "qwen3_moe", "olmoe", "mixtral", "deepseek_v3"]:
        assert t in types
    with pytest.raises(WorkbenchError, match="unsupported architecture 'bert'.*llama"):
        adapter_for("bert")


def test_site_keys_round_trip_and_reject_garbage():
    for s in [Site(3, Component.EXPERT, 5), Site(0, Component.RESID_POST), Site(2, Component.SHARED_EXPERT, 0)]:
        assert Site.from_key(s.key) == s
    for bad in ["L3.expert", "L3.resid_post.E1", "3.expert.E1", "L1.nonsense"]:
        with pytest.raises(WorkbenchError):
            Site.from_key(bad)
