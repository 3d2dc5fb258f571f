"""Import every built-in adapter module so each registers itself."""

from workbench.adapters import dbrx, deepseek, gpt2, llama, mixtral, olmoe, others, qwen_moe  # noqa: F401
