"""Smaller MoE families whose routing is a variation of softmax top-k.

* Hunyuan-A13B (``hunyuan_v1_moe``): softmax, top-k, always renormalised (as Mixtral), plus an ungated
  shared MLP (``shared_mlp``).
* ERNIE-4.5-MoE (``ernie4_5_moe``): softmax probabilities; experts chosen by probability plus a
  correction bias (``gate.moe_statics.e_score_correction_bias``), weighted by their probability
  renormalised with the sum clamped below at ``moe_norm_min``; ungated shared experts; dense first layers.
* GPT-OSS (``gpt_oss``): top-k of the biased router logits, softmax over the chosen k.
* Qwen3.5-MoE (``qwen3_5_moe_text``) and MiniMax (``minimax``): Mixtral's routing under hybrid attention.
* Phi-3.5-MoE (``phimoe``): SparseMixer (transformers' own function, eval mode).
* Granite MoE (``granitemoe``), Granite-MoE-Shared and -Hybrid (a shared MLP beside the block).
* Jamba (``jamba``): Mamba and attention layers, MoE and dense MLPs.
"""

import functools
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
        choice = router.moe_statics(probs)  # probability + correction bias: a dropped expert's 0 + its bias could win
        index = torch.topk(choice if exclude is None else choice.masked_fill(exclude, float("-inf")), router.top_k,
                           dim=-1)[1]
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
        if exclude is None:
            return sparsemixer(logits, jitter_eps=router.router_jitter_noise, training=False, top_k=self.top_k(model))
        weights, index = sparsemixer(logits.masked_fill(exclude, float("-inf")), jitter_eps=router.router_jitter_noise,
                                     training=False, top_k=self.top_k(model))
        # fewer experts left than slots: the second choice's softmax is over nothing (NaN); such a slot weighs nothing
        return weights.masked_fill(exclude.gather(1, index) | weights.isnan(), 0.0), index


PHIMOE = register_adapter(PhimoeAdapter(name="phimoe", model_types=("phimoe",), router_name="router",
                                        norm_topk_prob_attr=None))


# Granite MoE: GPT-OSS's routing rule (top-k of the logits, softmax over the k) without a bias, under
# ``block_sparse_moe``. (Granite's residual, embedding and logit multipliers are inside the model's own
# forward.)
GRANITE_MOE = register_adapter(GptOssAdapter(name="granitemoe", model_types=("granitemoe",), router_name="router",
                                             mlp_name="block_sparse_moe", norm_topk_prob_attr=None))

@functools.cache
def _granite_classes(model_type: str) -> tuple[type, type]:
    """Contract subclasses of a Granite family's MoE block and decoder layer (built once per family)."""
    if model_type == "granitemoeshared":
        from transformers.models.granitemoeshared import modeling_granitemoeshared as mg

        moe_base, layer_base = mg.GraniteMoeSharedMoE, mg.GraniteMoeSharedDecoderLayer
    else:
        from transformers.models.granitemoehybrid import modeling_granitemoehybrid as mg

        moe_base, layer_base = mg.GraniteMoeHybridMoE, mg.GraniteMoeHybridDecoderLayer

    class ContractMoE(moe_base):
        _contract = True

        def forward(self, layer_input):
            out = super().forward(layer_input)
            # the layer's shared MLP, held as a plain attribute (not a child: state_dict unchanged)
            shared = self.__dict__.get("shared_mlp")
            return out if shared is None else out + shared(layer_input)

    if model_type == "granitemoeshared":
        class ContractLayer(layer_base):
            _contract = True
            # The layer's forward takes its no-shared-MLP path (``if self.shared_mlp is None``); the module
            # stays registered (``_modules``), and the MoE block adds its output, in the same order (moe + shared).
            shared_mlp = property(lambda self: None)
    else:
        class ContractLayer(layer_base):
            _contract = True
            # The layer's forward takes its no-experts path (``self.shared_mlp(h)``), which reaches the MoE
            # block, and the block adds the shared MLP's output: moe + shared, as the experts path computes it.
            has_experts = property(lambda self: False)
            shared_mlp = property(lambda self: self._modules["block_sparse_moe"])

    return ContractMoE, ContractLayer


@dataclass(frozen=True)
class GraniteSharedAdapter(GptOssAdapter):
    """Granite-MoE-Shared and Granite-MoE-Hybrid: Granite MoE plus an ungated shared MLP that the decoder layer
    calls beside the MoE block (``moe(h) + shared_mlp(h)``), not inside it. :meth:`prepare` moves that call into
    the block, so the block's output is routed + shared as everywhere else, keeping every parameter where it
    was: the block holds the shared MLP as a plain attribute ``shared_mlp`` (what ``shared_names`` reads), not
    as a child module. (Hybrid: Mamba-2 layers in place of attention in some layers.)"""

    def prepare(self, model):
        moe_cls, layer_cls = _granite_classes(self.model_types[0])
        for layer in self.decoder_layers(model):
            shared, moe = layer._modules.get("shared_mlp"), layer._modules.get(self.mlp_name)
            if type(layer) is not layer_cls.__bases__[0] or shared is None or moe is None:
                continue  # prepared already, not transformers' module, or no shared MLP / no experts: left as is
            moe.__class__, layer.__class__ = moe_cls, layer_cls
            moe.__dict__["shared_mlp"] = shared


GRANITE_MOE_SHARED = register_adapter(GraniteSharedAdapter(
    name="granitemoeshared", model_types=("granitemoeshared",), router_name="router", mlp_name="block_sparse_moe",
    shared_names=("shared_mlp",), down_proj_name="output_linear", norm_topk_prob_attr=None))
GRANITE_MOE_HYBRID = register_adapter(GraniteSharedAdapter(
    name="granitemoehybrid", model_types=("granitemoehybrid",), router_name="router", mlp_name="block_sparse_moe",
    shared_names=("shared_mlp",), down_proj_name="output_linear", norm_topk_prob_attr=None,
    linear_attn_names=("mamba",)))

# Jamba: Mamba layers and attention layers, MoE blocks (transformers' fused experts; softmax top-k, not
# renormalised) in some layers and dense MLPs in the others, all under ``feed_forward``; the MLP reads the
# ``pre_ff_layernorm``.
JAMBA = register_adapter(Adapter(name="jamba", model_types=("jamba",), mlp_name="feed_forward", router_name="router",
                                 post_attn_norm_name="pre_ff_layernorm", linear_attn_names=("mamba",)))
