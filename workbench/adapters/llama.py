"""Dense Llama-style decoders (Llama, SmolLM2, Mistral, Qwen2/3 dense): the MLP is one expert."""

from workbench.adapters.base import Adapter, register_adapter

LLAMA = register_adapter(Adapter(name="llama", model_types=("llama", "mistral", "qwen2", "qwen3")))
