"""Qwen2-MoE (routed experts plus one sigmoid-gated shared expert) and Qwen3-MoE (routed only)."""

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
