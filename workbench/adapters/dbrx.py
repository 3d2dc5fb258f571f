"""DBRX: softmax top-k routing renormalised by a p-norm, experts stored one row block per expert, and
attention (fused ``Wqkv``, clipped) nested with its two norms in ``norm_attn_norm``.

DBRX computes what the fused contract describes (``workbench.adapters.base``) but splits it otherwise:
its router returns only logits (the block routes), and its experts keep ``w1``/``v1``/``w2`` as
``[E * I, H]`` matrices. :meth:`DbrxAdapter.prepare` swaps the three modules' classes for subclasses that
keep every parameter (``state_dict`` and ``save_pretrained`` are unchanged) and compute the same numbers
through the contract's calls: the router returns ``(logits, weights, indices)`` with DBRX's own
routing, the block hands them to the experts, and the experts expose ``gate_up_proj [E, 2I, H]`` (a
copy of ``w1`` and ``v1``) and ``down_proj [E, H, I]`` (a view of ``w2``, so writing it writes the model).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from workbench.adapters.base import Adapter, register_adapter


def dbrx_route(logits: torch.Tensor, top_k: int, p: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """DBRX's routing (``DbrxFFN.route_tokens_to_experts``): softmax in the logits' dtype, top-k, the k
    weights divided by their p-norm (``moe_normalize_expert_weights``; none: kept as they are)."""
    probs = torch.softmax(logits, dim=1, dtype=logits.dtype)
    weights, index = torch.topk(probs, top_k, dim=-1)
    if p is not None:
        weights = weights / torch.norm(weights, p=p, dim=-1, keepdim=True)
    return weights, index


@functools.cache
def _classes():
    """The contract subclasses of transformers' DBRX modules (built once, on first use)."""
    from transformers.models.dbrx import modeling_dbrx as md

    class ContractRouter(md.DbrxRouter):
        _contract = True

        def forward(self, hidden_states):
            logits = super().forward(hidden_states)
            weights, index = dbrx_route(logits, self.top_k, self.moe_normalize_expert_weights)
            return logits, weights, index

    class ContractFFN(md.DbrxFFN):
        _contract = True

        def forward(self, hidden_states):
            flat = hidden_states.reshape(-1, hidden_states.shape[-1])  # the experts get [tokens, H], as elsewhere
            _, weights, index = self.router(flat)
            return self.experts(flat, index, weights).view(hidden_states.shape)

    class ContractExperts(md.DbrxExperts):
        _contract = True

        is_transposed = False
        has_bias = False

        def _blocks(self, w: torch.Tensor) -> torch.Tensor:
            return w.view(self.num_experts, self.ffn_hidden_size, self.hidden_size)

        @property
        def gate_up_proj(self) -> torch.Tensor:
            return torch.cat([self._blocks(self.mlp.w1), self._blocks(self.mlp.v1)], dim=1)

        @property
        def down_proj(self) -> torch.Tensor:
            return self._blocks(self.mlp.w2).transpose(1, 2)

        @property
        def act_fn(self):
            return self.mlp.activation_fn

    return ContractRouter, ContractFFN, ContractExperts


@dataclass(frozen=True)
class DbrxAdapter(Adapter):
    def top_k(self, model: nn.Module) -> int:
        return int(model.config.ffn_config.moe_top_k)

    def select_experts(self, model, logits, router=None, exclude=None):
        if exclude is not None:
            logits = logits.masked_fill(exclude, float("-inf"))
        return dbrx_route(logits, self.top_k(model), model.config.ffn_config.moe_normalize_expert_weights)

    def prepare(self, model: nn.Module) -> None:
        router_cls, ffn_cls, experts_cls = _classes()
        for layer in self.decoder_layers(model):
            ffn = self.mlp(layer)
            if type(ffn) is not ffn_cls.__bases__[0]:
                continue  # prepared already, or not transformers' module (remote code): left as it is
            ffn.router.top_k = ffn.top_k
            ffn.router.moe_normalize_expert_weights = ffn.moe_normalize_expert_weights
            ffn.router.__class__, ffn.experts.__class__, ffn.__class__ = router_cls, experts_cls, ffn_cls


DBRX = register_adapter(DbrxAdapter(
    name="dbrx", model_types=("dbrx",), layers_path="transformer.blocks", embed_path="transformer.wte",
    final_norm_path="transformer.norm_f", attn_name="norm_attn_norm.attn", mlp_name="ffn",
    input_norm_name="norm_attn_norm.norm_1", post_attn_norm_name="norm_attn_norm.norm_2", router_name="router",
    norm_topk_prob_attr=None))
