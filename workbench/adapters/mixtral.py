"""Mixtral: routed experts, softmax top-2, always renormalised."""

from dataclasses import dataclass

import torch

from workbench.adapters.base import Adapter, register_adapter


@dataclass(frozen=True)
class MixtralAdapter(Adapter):
    def select_experts(self, model, logits, router=None, exclude=None):
        if exclude is not None:
            logits = logits.masked_fill(exclude, float("-inf"))
        probs = torch.softmax(logits, dim=-1, dtype=torch.float)
        weights, index = torch.topk(probs, self.top_k(model), dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, index  # Mixtral keeps the float32 weights


MIXTRAL = register_adapter(MixtralAdapter(name="mixtral", model_types=("mixtral",), norm_topk_prob_attr=None))
