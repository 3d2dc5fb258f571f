"""Qwen2-MoE (routed experts plus one sigmoid-gated shared expert), Qwen3-MoE (routed only) and the hybrid
Qwen3-Next (Qwen2-MoE blocks under linear- and softmax-attention layers)."""

from workbench.adapters.base import Adapter, register_adapter

QWEN2_MOE = register_adapter(
    Adapter(
        name="qwen2_moe",
        model_types=("qwen2_moe",),
        shared_names=("shared_expert",),
        shared_gate_name="shared_expert_gate",
    )
)
QWEN3_MOE = register_adapter(Adapter(name="qwen3_moe", model_types=("qwen3_moe",)))
# Qwen3-Next: hybrid (Gated DeltaNet linear attention in 3 of every 4 layers, gated softmax attention in
# the 4th); Qwen2-MoE's routing (softmax top-k, renormalised) and sigmoid-gated shared expert.
QWEN3_NEXT = register_adapter(
    Adapter(
        name="qwen3_next",
        model_types=("qwen3_next",),
        shared_names=("shared_expert",),
        shared_gate_name="shared_expert_gate",
        linear_attn_names=("linear_attn",),
    )
)
