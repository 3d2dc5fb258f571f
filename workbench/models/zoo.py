"""Tiny models of real MoE architectures, built from transformers configs.

Each zoo model is seeded and deterministic (the same spec gives bit-identical weights) and uses
SmolLM2's tokenizer (vocab 49152). Random ones are for structure tests; ``zoo:tiny-moe`` is a
Qwen3-MoE trained briefly on the built-in corpus (``scripts/train_zoo.py`` reproduces it), so its
routing and generations are not noise; ``zoo:tiny-moe-se`` is tiny-moe fine-tuned to depend on one
planted super expert (``scripts/plant_super_expert.py``), the ground truth for ablation studies.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from workbench.errors import WorkbenchError

VOCAB = 49152
WEIGHTS_DIR = Path(__file__).parent / "zoo_weights"
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
               bos_token_id=1, eos_token_id=2, pad_token_id=2)


def _qwen2_moe():
    from transformers import Qwen2MoeConfig
    return Qwen2MoeConfig(**_COMMON, intermediate_size=128, moe_intermediate_size=32, num_experts=8,
                          num_experts_per_tok=2, shared_expert_intermediate_size=64, norm_topk_prob=False)


def _qwen3_moe(layers: int = 4, tie: bool = False):
    from transformers import Qwen3MoeConfig
    c = dict(_COMMON, num_hidden_layers=layers)
    return Qwen3MoeConfig(**c, head_dim=16, intermediate_size=128, moe_intermediate_size=32, num_experts=8,
                          num_experts_per_tok=2, norm_topk_prob=True, tie_word_embeddings=tie)


def _olmoe():
    from transformers import OlmoeConfig
    return OlmoeConfig(**_COMMON, intermediate_size=32, num_experts=8, num_experts_per_tok=2)


def _mixtral():
    from transformers import MixtralConfig
    return MixtralConfig(**_COMMON, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2)


def _deepseek_v3():
    from transformers import DeepseekV3Config
    return DeepseekV3Config(**dict(_COMMON, num_key_value_heads=4), intermediate_size=128, moe_intermediate_size=32, n_routed_experts=8,
                            num_experts_per_tok=2, n_shared_experts=1, n_group=2, topk_group=1,
                            first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8,
                            qk_nope_head_dim=8, v_head_dim=16, routed_scaling_factor=1.0, norm_topk_prob=True)


@dataclass(frozen=True)
class ZooEntry:
    name: str
    config: Callable[[], object]
    description: str
    seed: int = 0
    modulelist: bool = False  # rebuild the MoE blocks in the older ModuleList layout
    weights: str | None = None  # committed checkpoint in zoo_weights/
    base: str | None = None  # checkpoint loaded first; ``weights`` then holds only the tensors that differ
    script: str = "train_zoo.py"  # what rebuilds ``weights`` (in scripts/)


ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in [
        ZooEntry("qwen2-moe", _qwen2_moe, "Qwen2-MoE, 8 experts top-2 + sigmoid-gated shared expert"),
        ZooEntry("qwen3-moe", _qwen3_moe, "Qwen3-MoE, 8 experts top-2, renormalised"),
        ZooEntry("olmoe", _olmoe, "OLMoE, 8 experts top-2"),
        ZooEntry("mixtral", _mixtral, "Mixtral, 8 experts top-2"),
        ZooEntry("deepseek-v3", _deepseek_v3, "DeepSeek-V3, 8 routed (2 groups) + 1 shared, layer 0 dense, MLA"),
        ZooEntry("qwen3-moe-modulelist", _qwen3_moe, "Qwen3-MoE rebuilt with nn.ModuleList experts (older layout)",
                 modulelist=True),
        ZooEntry("tiny-moe", lambda: _qwen3_moe(layers=4, tie=True),
                 "Qwen3-MoE trained briefly on the built-in corpus (its training run: zoo:tiny-moe@STEP, @all)",
                 weights="tiny-moe.safetensors"),
        ZooEntry("tiny-moe-se", lambda: _qwen3_moe(layers=4, tie=True),
                 "tiny-moe fine-tuned to depend on a planted super expert (L1.E5, channel 17, position 0)",
                 weights="tiny-moe-se.safetensors", base="tiny-moe.safetensors", script="plant_super_expert.py"),
    ]
}


def init_model(entry: ZooEntry) -> nn.Module:
    """The seeded, untrained fp32 model of a zoo entry (before any committed weights are loaded)."""
    from transformers import AutoModelForCausalLM

    config = entry.config()
    config.architectures = None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(entry.seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    config.architectures = [type(model).__name__]
    return model


# Training series: ``zoo:NAME@STEP`` is NAME's training run saved along the way (scripts/train_zoo.py
# --series-dir), built once on first use into the cache. The run is the committed checkpoint's recipe; its
# last step is that recipe's end point, equal to the committed weights only on a machine whose float
# arithmetic matches the one that made them.
SERIES = {"tiny-moe": dict(save_every=100, save_at="5,10,25,50", steps=1000)}
REPO = Path(__file__).resolve().parents[2]


def series_dir(name: str) -> Path:
    """The folder of ``name``'s training series, built on first use (~3 minutes on 2 cores)."""
    import shutil
    import subprocess
    import sys
    import tempfile

    from workbench.models.gguf import cache_root

    if name not in SERIES:
        raise WorkbenchError(f"zoo:{name} has no training series; series: {', '.join('zoo:' + n for n in SERIES)}")
    dest = cache_root() / "zoo-series" / name
    if (dest / "series.json").is_file():
        return dest
    script = REPO / "scripts" / "train_zoo.py"
    if not script.is_file():
        raise WorkbenchError(f"building the zoo:{name} series needs scripts/train_zoo.py from a source checkout")
    cfg = SERIES[name]
    print(f"workbench: training the zoo:{name} series once into {dest} ({cfg['steps']} steps, ~3 minutes)",
          file=sys.stderr)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=dest.parent))
    try:  # built aside and renamed into place: a half-built series is never used
        cmd = [sys.executable, str(script), "--steps", str(cfg["steps"]), "--series-dir", str(tmp),
               "--save-every", str(cfg["save_every"]), "--save-at", cfg["save_at"],
               "--out", str(tmp / f"step{cfg['steps']}.safetensors"), "--no-verify"]  # the end point is the last step
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
            raise WorkbenchError(f"training the zoo:{name} series failed: {last}")
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def series_steps(name: str) -> list[int]:
    import json

    data = json.loads((series_dir(name) / "series.json").read_text(encoding="utf-8"))
    return sorted(c["step"] for c in data["checkpoints"])


def build(name: str) -> nn.Module:
    """Build zoo model ``name`` (without the ``zoo:`` prefix), in eval mode, fp32; ``NAME@STEP`` for a series."""
    if "@" in name:
        base, _, step = name.partition("@")
        if base not in ZOO or not step.isdigit():
            raise WorkbenchError(f"bad series spec zoo:{name}: use zoo:NAME@STEP, e.g. zoo:tiny-moe@100")
        path = series_dir(base) / f"step{int(step)}.safetensors"
        if not path.is_file():
            raise WorkbenchError(f"zoo:{base} has no checkpoint at step {int(step)}; steps: "
                                 f"{', '.join(map(str, series_steps(base)))} (or zoo:{base}@all)")
        model = init_model(ZOO[base])
        load_weights(model, path)
        return model.eval()
    entry = ZOO.get(name)
    if entry is None:
        raise WorkbenchError(f"unknown zoo model {name!r}; available: {', '.join('zoo:' + n for n in ZOO)}")
    model = init_model(entry)
    if entry.base:
        load_weights(model, WEIGHTS_DIR / entry.base)
    if entry.weights:
        load_weights(model, WEIGHTS_DIR / entry.weights, partial=entry.base is not None, script=entry.script)
    if entry.modulelist:
        to_modulelist(model)
    return model.eval()


def load_weights(model: nn.Module, path: Path, partial: bool = False, script: str = "train_zoo.py") -> None:
    from safetensors.torch import load_file

    if not path.is_file():
        raise WorkbenchError(f"zoo checkpoint {path} is missing; rebuild it with: python scripts/{script}")
    state = {k: v.to(torch.float32) for k, v in load_file(str(path)).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [] if partial else [k for k in missing if k != "lm_head.weight"]  # tied to the embedding
    if missing or unexpected:
        raise WorkbenchError(f"zoo checkpoint {path.name} does not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")


# ----- the older ModuleList layout -------------------------------------------------------------------
class ExpertMLP(nn.Module):
    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, act: nn.Module):
        super().__init__()
        self.gate_proj = nn.Linear(gate.shape[1], gate.shape[0], bias=False)
        self.up_proj = nn.Linear(up.shape[1], up.shape[0], bias=False)
        self.down_proj = nn.Linear(down.shape[1], down.shape[0], bias=False)
        with torch.no_grad():
            self.gate_proj.weight.copy_(gate)
            self.up_proj.weight.copy_(up)
            self.down_proj.weight.copy_(down)
        self.act_fn = act

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class ModuleListMoeBlock(nn.Module):
    """An MoE block as transformers 4.x wrote it: a linear gate and a ModuleList of expert MLPs."""

    def __init__(self, fused_block: nn.Module, top_k: int, norm_topk_prob: bool):
        super().__init__()
        experts, router = fused_block.experts, fused_block.gate
        num, hidden = router.weight.shape
        self.top_k, self.norm_topk_prob = top_k, norm_topk_prob
        self.gate = nn.Linear(hidden, num, bias=False)
        with torch.no_grad():
            self.gate.weight.copy_(router.weight)
        inter = experts.down_proj.shape[2]
        self.experts = nn.ModuleList(
            ExpertMLP(experts.gate_up_proj[e, :inter], experts.gate_up_proj[e, inter:], experts.down_proj[e], experts.act_fn)
            for e in range(num)
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        b, t, h = hidden_states.shape
        x = hidden_states.reshape(-1, h)
        logits = self.gate(x)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float)
        weights, index = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(index == e)
            if tok.numel():
                out.index_add_(0, tok, expert(x[tok]) * weights[tok, slot, None])
        return out.reshape(b, t, h)


def to_modulelist(model: nn.Module) -> nn.Module:
    """Replace every fused MoE block of a Qwen3-MoE-like model by the ModuleList layout (same numbers)."""
    cfg = model.config
    for layer in model.model.layers:
        if hasattr(layer.mlp, "experts"):
            layer.mlp = ModuleListMoeBlock(layer.mlp, cfg.num_experts_per_tok, bool(getattr(cfg, "norm_topk_prob", False)))
    return model
