"""OLMoE: routed experts (64 in the released model), softmax top-8, no shared expert."""

from workbench.adapters.base import Adapter, register_adapter

OLMOE = register_adapter(Adapter(name="olmoe", model_types=("olmoe",)))
