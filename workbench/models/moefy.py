"""``smollm2-moe``: SmolLM2-135M split into a Qwen2-MoE whose experts carry SmolLM2's own weights.

MoEfication (Zhang et al. 2022): each layer's 1,536 SwiGLU neurons are partitioned; a set of neurons
nearly every token needs becomes the Qwen2-MoE *shared expert*, the rest become 16 routed experts of
equal size, and a linear router per layer picks the experts a token needs; rank-16 corrections to the
gate, up and down projections, distilled from SmolLM2 through the MoE's own routing, are added before the
neurons are sliced into experts. Only the small learned parts (the neuron partition, the routers and the
corrections, 7.4 MB, ``zoo_weights/smollm2-moe-parts.safetensors``) are committed;
``scripts/moefy_smollm2.py`` rebuilds them. The checkpoint is assembled from SmolLM2's
weights on first use (seconds) and cached as a plain ``save_pretrained`` Qwen2-MoE folder that
transformers loads without workbench.

Why Qwen2-MoE: its attention is Llama's exactly once ``qkv_bias=False`` (Qwen3-MoE and OLMoE normalise
queries and keys, DeepSeek-V3 uses latent attention), so only the MLP changes; it has a shared expert;
and its renormalised top-k softmax can represent "the sum of the chosen clusters": every routed
expert's ``down_proj`` is multiplied by ``k`` and the router's logits are scaled by a small
per-layer temperature fitted on training text, so the renormalised weights are close to ``1/k`` and
the block computes close to the sum of the chosen experts' neurons. The shared expert's gate is a zero
vector (``sigmoid(0) = 1/2``) and its ``down_proj`` is doubled, so it adds its neurons exactly.
With ``top_k == num_experts`` (every expert on) and a zero router (equal gates) the block reproduces
the MLP it was sliced from (SmolLM2's, plus the corrections where the parts have them) to float
tolerance (``tests/test_smollm2_moe.py``). Quality at each top-k, and why no
sparse size reaches SmolLM2's perplexity without training the experts: README, ``bench/smollm2_moe_quality.py``.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from workbench.errors import WorkbenchError

PARTS = Path(__file__).parent / "zoo_weights" / "smollm2-moe-parts.safetensors"
SCRIPT = "scripts/moefy_smollm2.py"
DEFAULT_TOP_K = 15
SPEC = "smollm2-moe"
# SmolLM2-135M-Instruct's config (as the GGUF conversion writes it), so listing needs no weights.
SMOLLM2_CONFIG = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, hidden_act="silu", max_position_embeddings=8192,
                      rms_norm_eps=9.999999747378752e-06, tie_word_embeddings=True, head_dim=64,
                      rope_parameters={"rope_theta": 100000.0, "rope_type": "default"},
                      bos_token_id=1, eos_token_id=2, pad_token_id=2)
DESCRIPTION = ("SmolLM2-135M-Instruct MoEfied: Qwen2-MoE, 16 experts + 1 shared, top-{k}, "
               "experts carry SmolLM2's pretrained neurons (distilled)")


def parse_spec(spec: str) -> int:
    """``smollm2-moe`` -> the default top-k; ``smollm2-moe:top8`` -> 8 (1 to the number of experts)."""
    if spec == SPEC:
        return DEFAULT_TOP_K
    tail = spec[len(SPEC) + 1:] if spec.startswith(SPEC + ":") else ""
    experts = read_parts()[1]["experts"]
    if tail.startswith("top") and tail[3:].isdigit() and 1 <= int(tail[3:]) <= experts:
        return int(tail[3:])
    raise WorkbenchError(f"bad model spec {spec!r}: use {SPEC} (top-{DEFAULT_TOP_K}) or {SPEC}:topK with K from 1 to "
                         f"{experts}, e.g. {SPEC}:top8")


def read_parts(path: Path = PARTS) -> tuple[dict[str, torch.Tensor], dict]:
    """The committed partition and routers, and their metadata (experts, shared neurons, ...)."""
    from safetensors import safe_open

    if not path.is_file():
        raise WorkbenchError(f"{path} is missing; rebuild it with: python {SCRIPT}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types
        raise WorkbenchError(f"corrupt {path.name}: {str(e).splitlines()[0]}; rebuild it with: python {SCRIPT}") from None
    return tensors, meta


def expert_neurons(perm: torch.Tensor, experts: int, shared: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One layer's partition: (shared neuron indices, [neuron indices of expert e])."""
    n = (perm.numel() - shared) // experts
    return perm[:shared], [perm[shared + e * n: shared + (e + 1) * n] for e in range(experts)]


def moe_config(dense_config, meta: dict, top_k: int):
    from transformers import Qwen2MoeConfig

    d = dense_config
    n = (d.intermediate_size - meta["shared"]) // meta["experts"]
    cfg = Qwen2MoeConfig(
        vocab_size=d.vocab_size, hidden_size=d.hidden_size, intermediate_size=d.intermediate_size,
        num_hidden_layers=d.num_hidden_layers, num_attention_heads=d.num_attention_heads,
        num_key_value_heads=d.num_key_value_heads, hidden_act=d.hidden_act,
        max_position_embeddings=d.max_position_embeddings, rms_norm_eps=d.rms_norm_eps,
        tie_word_embeddings=d.tie_word_embeddings, rope_parameters=dict(d.rope_parameters),
        use_sliding_window=False, qkv_bias=False, decoder_sparse_step=1, mlp_only_layers=[],
        moe_intermediate_size=n, shared_expert_intermediate_size=meta["shared"], num_experts=meta["experts"],
        num_experts_per_tok=top_k, norm_topk_prob=True, output_router_logits=False, router_aux_loss_coef=0.0,
        bos_token_id=d.bos_token_id, eos_token_id=d.eos_token_id, pad_token_id=d.pad_token_id,
    )
    cfg.head_dim = d.hidden_size // d.num_attention_heads
    cfg.architectures = ["Qwen2MoeForCausalLM"]
    return cfg


LORA = ("gate", "up", "down")


def distilled_weights(mlp, tensors: dict[str, torch.Tensor], layer: int):
    """One dense layer's gate, up and down projections with the distillation's low-rank corrections
    (``lora.X_a @ lora.X_b``, from ``scripts/moefy_smollm2.py``) added, where the parts have them."""
    out = []
    for name in LORA:
        w = getattr(mlp, f"{name}_proj").weight
        if f"lora.{name}_a" in tensors:
            w = w + tensors[f"lora.{name}_a"][layer].float() @ tensors[f"lora.{name}_b"][layer].float()
        out.append(w)
    return tuple(out)


def assemble(dense, top_k: int, parts: tuple[dict, dict] | None = None):
    """A ``Qwen2MoeForCausalLM`` from a dense Llama model (SmolLM2) and the partition + routers."""
    from transformers import Qwen2MoeForCausalLM

    tensors, meta = parts if parts is not None else read_parts()
    E, S = meta["experts"], meta["shared"]
    if not 1 <= top_k <= E:
        raise WorkbenchError(f"top_k must be 1 to {E}, got {top_k}")
    cfg = moe_config(dense.config, meta, top_k)
    with torch.device("meta"):
        moe = Qwen2MoeForCausalLM(cfg)
    state = {}
    for k, v in dense.state_dict().items():
        if ".mlp." not in k:
            state[k] = v
    for i, layer in enumerate(dense.model.layers):
        perm = tensors["perm"][i].long()
        shared, idx = expert_neurons(perm, E, S)
        g, u, d = distilled_weights(layer.mlp, tensors, i)
        p = f"model.layers.{i}.mlp."
        state[p + "gate.weight"] = tensors["router"][i].float().clone()
        state[p + "experts.gate_up_proj"] = torch.stack([torch.cat([g[j], u[j]]) for j in idx])
        state[p + "experts.down_proj"] = torch.stack([d[:, j] * top_k for j in idx])
        state[p + "shared_expert.gate_proj.weight"] = g[shared].clone()
        state[p + "shared_expert.up_proj.weight"] = u[shared].clone()
        state[p + "shared_expert.down_proj.weight"] = d[:, shared] * 2
        state[p + "shared_expert_gate.weight"] = torch.zeros(1, cfg.hidden_size)
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    moe.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        moe.tie_weights()
    missing = [k for k, v in moe.state_dict().items() if v.is_meta]
    if missing:
        raise WorkbenchError(f"smollm2-moe assembly left {len(missing)} tensors unset, e.g. {missing[:3]}")
    moe.model.rotary_emb = type(moe.model.rotary_emb)(cfg)  # computed buffers, not in the state dict
    return moe.eval()


def checkpoint_dir(top_k: int = DEFAULT_TOP_K) -> Path:
    """The cached ``save_pretrained`` folder of ``smollm2-moe`` at ``top_k``, assembled once (seconds).

    The folder is written elsewhere and renamed into place, so a half-built cache is never used; a
    cache whose weights do not read back is rebuilt with a one-line notice.
    """
    from workbench.models import gguf
    from workbench.models.specs import _check_safetensors

    dest = gguf.cache_root() / f"smollm2-moe-top{top_k}"
    stamp = _parts_stamp()
    if (dest / "config.json").is_file() and (dest / "model.safetensors").is_file():
        try:
            _check_safetensors(dest / "model.safetensors")
            if json.loads((dest / "workbench-moe.json").read_text()).get("parts") == stamp:
                return dest
            why = "the committed partition/routers changed"
        except (WorkbenchError, OSError, ValueError) as e:
            why = str(e).splitlines()[0]
        print(f"workbench: rebuilding the {SPEC} cache {dest} ({why})", file=sys.stderr)
        shutil.rmtree(dest, ignore_errors=True)
    from transformers import AutoTokenizer, LlamaForCausalLM

    print(f"workbench: assembling {SPEC} top-{top_k} from SmolLM2's weights into {dest} once (~10 s)", file=sys.stderr)
    src = gguf.checkpoint_dir()
    dense = LlamaForCausalLM.from_pretrained(src, dtype=torch.float32)
    moe = assemble(dense, top_k)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-moe-", dir=dest.parent))
    try:
        moe.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(src).save_pretrained(tmp)
        (tmp / "workbench-moe.json").write_text(json.dumps({"parts": stamp, "top_k": top_k, "script": SCRIPT}))
        gguf._publish(tmp, dest, "config.json")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _parts_stamp() -> str:
    import hashlib

    if not PARTS.is_file():
        raise WorkbenchError(f"{PARTS} is missing; rebuild it with: python {SCRIPT}")
    return hashlib.sha256(PARTS.read_bytes()).hexdigest()[:16]
