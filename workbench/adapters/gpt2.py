"""GPT-2: dense, Conv1D projections, pre-LN blocks under ``transformer.h``."""

from workbench.adapters.base import Adapter, register_adapter

GPT2 = register_adapter(
    Adapter(
        name="gpt2",
        model_types=("gpt2",),
        layers_path="transformer.h",
        embed_path="transformer.wte",
        final_norm_path="transformer.ln_f",
        attn_name="attn",
        input_norm_name="ln_1",
        post_attn_norm_name="ln_2",
        down_proj_name="c_proj",
    )
)
