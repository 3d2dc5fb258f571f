"""Smaller MoE families whose routing is a variation of softmax top-k.

* Hunyuan-A13B (``hunyuan_v1_moe``): softmax, top-k, always renormalised (as Mixtral), plus an ungated
  shared MLP (``shared_mlp``).
* ERNIE-4.5-MoE (``ernie4_5_moe``): softmax probabilities; experts chosen by probability plus a
  correction bias (``gate.moe_statics.e_score_correction_bias``), weighted by their probability
  renormalised with the sum clamped below at ``moe_norm_min``; ungated shared experts; dense first layers.
* GPT-OSS (``gpt_oss``): top-k of the biased router logits, softmax over the chosen k.
* Qwen3.5-MoE (``qwen3_5_moe_text``) and MiniMax (``minimax``): Mixtral's routing under hybrid attention.
* Phi-3.5-MoE (``phimoe``): SparseMixer (transformers' own function, eval mode).
"""

from dataclasses import dataclass

import torch

from workbench.adapters.base import Adapter, register_adapter
from workbench.adapters.mixtral import MixtralAdapter


@dataclass(frozen=True)
class ErnieAdapter(Adapter):
    def select_experts(self, model, logits, router=None, exclude=None):
        if router is None:
            raise ValueError("ERNIE-4.5 routing needs the router module (its correction bias)")
        logits = logits.to(torch.float32)
        if exclude is not None:
            logits = logits.masked_fill(exclude, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        index = torch.topk(router.moe_statics(probs), router.top_k, dim=-1)[1]
        weights = probs.gather(-1, index)
        return weights / torch.clamp(weights.sum(dim=-1, keepdim=True), min=router.norm_min), index


HUNYUAN_MOE = register_adapter(MixtralAdapter(name="hunyuan_v1_moe", model_types=("hunyuan_v1_moe",),
                                              shared_names=("shared_mlp",), norm_topk_prob_attr=None))
ERNIE_MOE = register_adapter(ErnieAdapter(name="ernie4_5_moe", model_types=("ernie4_5_moe",),
                                          shared_names=("shared_experts",)))


@dataclass(frozen=True)
class GptOssAdapter(Adapter):
    def select_experts(self, model, logits, router=None, exclude=None):
        """GPT-OSS's router: top-k of the (biased) logits, then softmax over the k chosen logits."""
        if exclude is not None:
            logits = logits.masked_fill(exclude, float("-inf"))
        top, index = torch.topk(logits, self.top_k(model), dim=-1)
        return torch.softmax(top, dim=-1, dtype=top.dtype), index


# GPT-OSS: experts stored [E, in, out] with biases and a clamped, interleaved SwiGLU (the capture
# recomputes them with the module's own gate); attention with learned sinks.
GPT_OSS = register_adapter(GptOssAdapter(name="gpt_oss", model_types=("gpt_oss",), router_name="router",
                                         norm_topk_prob_attr=None))


# Qwen3.5-MoE (text): Qwen3-Next's hybrid layout; the router always renormalises its top-k.
QWEN3_5_MOE = register_adapter(MixtralAdapter(name="qwen3_5_moe", model_types=("qwen3_5_moe_text",),
                                              shared_names=("shared_expert",), shared_gate_name="shared_expert_gate",
                                              linear_attn_names=("linear_attn",), norm_topk_prob_attr=None))
# MiniMax: softmax top-k, always renormalised; lightning (linear) attention in most layers, softmax attention
# in the others, both under ``self_attn``.
MINIMAX = register_adapter(MixtralAdapter(name="minimax", model_types=("minimax",), norm_topk_prob_attr=None,
                                          linear_attn_classes=("LightningAttention",)))


@dataclass(frozen=True)
class PhimoeAdapter(Adapter):
    def select_experts(self, model, logits, router=None, exclude=None):
        """Phi-3.5-MoE's SparseMixer routing in eval mode: transformers' own ``sparsemixer`` (the top expert by
        logit with its masked softmax weight, then the best remaining one within the jitter threshold)."""
        from transformers.models.phimoe.modeling_phimoe import sparsemixer

        if router is None:
            raise ValueError("PhiMoE routing needs the router module (its jitter threshold)")
        if exclude is not None:
            logits = logits.masked_fill(exclude, float("-inf"))
        return sparsemixer(logits, jitter_eps=router.router_jitter_noise, training=False, top_k=self.top_k(model))


PHIMOE = register_adapter(PhimoeAdapter(name="phimoe", model_types=("phimoe",), router_name="router",
                                        norm_topk_prob_attr=None))


# Granite MoE: GPT-OSS's routing rule (top-k of the logits, softmax over the k) without a bias, under
# ``block_sparse_moe``. (Granite's residual, embedding and logit multipliers are inside the model's own
# forward. granitemoeshared keeps its shared MLP beside the MoE block, not in it: not declared.)
GRANITE_MOE = register_adapter(GptOssAdapter(name="granitemoe", model_types=("granitemoe",), router_name="router",
                                             mlp_name="block_sparse_moe", norm_topk_prob_attr=None))
