"""DeepSeek-V3: sigmoid group-limited routing, shared experts, the first k layers dense."""

from dataclasses import dataclass

import torch

from workbench.adapters.base import Adapter, register_adapter


@dataclass(frozen=True)
class DeepseekAdapter(Adapter):
    def select_experts(self, model, logits, router=None, exclude=None):
        """DeepSeek-V3's router: sigmoid scores + correction bias, best groups, top-k, renormalise, scale."""
        if router is None:
            raise ValueError("DeepSeek routing needs the router module (its bias and group settings)")
        logits = logits.to(torch.float32)
        scores = logits.sigmoid()
        choice = scores + router.e_score_correction_bias
        if exclude is not None:
            choice = choice.masked_fill(exclude, float("-inf"))
        n, e = choice.shape
        groups = choice.view(n, router.num_group, e // router.num_group)
        group_scores = groups.topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=router.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(n, router.num_group, e // router.num_group).reshape(n, e)
        choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
        index = torch.topk(choice, k=router.top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, index)
        if router.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * router.routed_scaling_factor, index


DEEPSEEK_V3 = register_adapter(
    DeepseekAdapter(name="deepseek_v3", model_types=("deepseek_v3",), shared_names=("shared_experts",),
                    router_scoring="sigmoid")
)
