"""Smaller MoE families whose routing is a variation of softmax top-k.

* Hunyuan-A13B (``hunyuan_v1_moe``): softmax, top-k, always renormalised (as Mixtral), plus an ungated
  shared MLP (``shared_mlp``).
* ERNIE-4.5-MoE (``ernie4_5_moe``): softmax probabilities; experts chosen by probability plus a
  correction bias (``gate.moe_statics.e_score_correction_bias``), weighted by their probability
  renormalised with the sum clamped below at ``moe_norm_min``; ungated shared experts; dense first layers.
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
