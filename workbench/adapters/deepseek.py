"""DeepSeek-V3: sigmoid group-limited routing, shared experts, the first k layers dense."""

from workbench.adapters.base import Adapter, register_adapter

DEEPSEEK_V3 = register_adapter(
    Adapter(name="deepseek_v3", model_types=("deepseek_v3",), shared_names=("shared_experts",))
)
