"""DeepSeek-V3 (sigmoid group-limited routing) and DeepSeek-V2 (softmax, greedy or group-limited): shared
experts, the first k layers dense; GLM-4.5 and dots.llm1 route as DeepSeek-V3."""

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
        best2 = groups.topk(2, dim=-1)[0]
        if exclude is not None:  # a group left one expert scores by it alone (-inf in the sum: unreachable)
            best2 = torch.where(best2[..., :1] > float("-inf"), best2.masked_fill(best2 == float("-inf"), 0.0), best2)
        group_scores = best2.sum(dim=-1)
        group_idx = torch.topk(group_scores, k=router.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(n, router.num_group, e // router.num_group).reshape(n, e)
        choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
        top, index = torch.topk(choice, k=router.top_k, dim=-1, sorted=False)
        weights = scores.gather(1, index)
        if exclude is not None:  # fewer experts left than slots: a slot on an excluded (-inf) expert weighs nothing
            weights = weights.masked_fill(top == float("-inf"), 0.0)
        if router.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * router.routed_scaling_factor, index


DEEPSEEK_V3 = register_adapter(
    DeepseekAdapter(name="deepseek_v3", model_types=("deepseek_v3",), shared_names=("shared_experts",),
                    router_scoring="sigmoid")
)


@dataclass(frozen=True)
class DeepseekV2Adapter(Adapter):
    def select_experts(self, model, logits, router=None, exclude=None):
        """DeepSeek-V2's router: softmax scores, top-k (greedy, or within the best ``topk_group`` groups by
        their largest score: ``group_limited_greedy``), no renormalisation, times ``routed_scaling_factor``."""
        if router is None:
            raise ValueError("DeepSeek-V2 routing needs the router module (its top-k method and group settings)")
        logits = logits.to(torch.float32)
        if exclude is not None:
            logits = logits.masked_fill(exclude, float("-inf"))
        scores = logits.softmax(dim=-1)
        n, e = scores.shape
        if router.topk_method == "group_limited_greedy":
            group_scores = scores.view(n, router.num_group, e // router.num_group).max(dim=-1).values
            group_idx = torch.topk(group_scores, k=router.topk_group, dim=-1, sorted=False)[1]
            group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
            score_mask = group_mask.unsqueeze(-1).expand(n, router.num_group, e // router.num_group).reshape(n, e)
            scores = scores.masked_fill(~score_mask.bool(), 0.0)
        weights, index = torch.topk(scores, k=router.top_k, dim=-1, sorted=False)
        return weights * router.routed_scaling_factor, index


# The Super-Experts paper's DeepSeek-V2-Lite.
DEEPSEEK_V2 = register_adapter(
    DeepseekV2Adapter(name="deepseek_v2", model_types=("deepseek_v2",), shared_names=("shared_experts",))
)


# GLM-4.5 (glm4_moe) and dots.llm1 (dots1) route exactly as DeepSeek-V3 (sigmoid + correction bias, best
# groups, top-k, optional renormalisation, scaling), with DeepSeek-style shared experts and dense first layers.
GLM4_MOE = register_adapter(
    DeepseekAdapter(name="glm4_moe", model_types=("glm4_moe", "dots1"), shared_names=("shared_experts",),
                    router_scoring="sigmoid")
)
