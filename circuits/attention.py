"""Attention layouts circuits can read: where queries, keys and values are projected from the residual
stream (so each query head and KV group reads its own receiver copy) and how the output projection
splits into per-head outputs. Layouts are recognised from the modules, never from model names:

* ``qkv``: ``q_proj`` / ``k_proj`` / ``v_proj`` linear layers and ``o_proj`` (Phi: ``dense``) (Llama,
  Mistral, Qwen, OLMoE, Mixtral ...). GQA is native: a KV group is one node with one k and one v receiver.
* ``fused``: one linear layer projects queries, keys and values (``qkv_proj``: Phi-3; ``Wqkv``: DBRX,
  whose attention clips the projection itself; ``query_key_value``: GPT-NeoX, Falcon), in one of three row
  orders: ``blocks`` (all queries, then all keys, then all values: Phi-3, DBRX, Falcon's multi-query attention), ``interleaved`` (per head its
  query, key and value: GPT-NeoX, Falcon's classic attention) or ``grouped`` (per KV group its queries,
  key and value: Falcon's new decoder architecture). The order is read from the module's own
  attributes and tested against the model's attention (tests/test_circuit_models.py).
* ``c_attn``: GPT-2's fused ``c_attn`` Conv1D (all queries, then keys, then values: the ``blocks``
  order below) and ``c_proj``; every head is its own KV group.
* ``mla``: DeepSeek's multi-head latent attention. Queries per head (``q_proj``, or ``q_a_proj`` ->
  ``q_a_layernorm`` -> ``q_b_proj``); keys and values of every head come from one shared latent
  (``kv_a_proj_with_mqa`` -> ``kv_a_layernorm`` -> ``kv_b_proj``, plus the shared rotary key), so the
  layer has a single KV group: its k receiver feeds the keys (latent and rotary part), its v receiver
  the values (the latent is computed twice, once from each copy).

Each stand-in module calls the model's own module when the runner has no receiver copies for its
stage, so plain forwards are the model's own numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from workbench.errors import WorkbenchError

KINDS = ("qkv", "fused", "c_attn", "mla")
FUSED_NAMES = ("qkv_proj", "query_key_value", "Wqkv")
OUT_NAMES = ("o_proj", "dense", "out_proj")


@dataclass(frozen=True)
class AttentionSpec:
    kind: str  # one of KINDS
    n_heads: int
    n_kv: int
    head_dim: int  # per-head width of the output projection's input (the value head size)
    layout: str = ""  # fused and c_attn: the row order (blocks, interleaved or grouped)
    out_name: str = "o_proj"


def fused_slots(spec: AttentionSpec) -> torch.Tensor:
    """The receiver copy each output row of a fused projection reads (queries 0..H-1, then the KV
    groups' keys, then their values), in the projection's own row order."""
    H, K, hd = spec.n_heads, spec.n_kv, spec.head_dim
    q, k, v = list(range(H)), [H + g for g in range(K)], [H + K + g for g in range(K)]
    if spec.layout == "blocks":
        order = q + k + v
    elif spec.layout == "interleaved":
        order = [s for h in range(H) for s in (q[h], k[h], v[h])]
    elif spec.layout == "grouped":
        G = H // K
        order = [s for g in range(K) for s in (*q[g * G:(g + 1) * G], k[g], v[g])]
    else:
        raise ValueError(spec.layout)
    return torch.tensor(order).repeat_interleave(hd)


def _is_conv1d(m) -> bool:
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and getattr(m, "weight", None) is not None


def attention_spec(attn: nn.Module, config, where: str) -> AttentionSpec:
    """The layout of ``attn`` (a WorkbenchError naming ``where`` if circuits cannot read it)."""
    n_heads = int(config.num_attention_heads)
    d = int(config.hidden_size)
    if all(isinstance(getattr(attn, n, None), nn.Linear) for n in ("kv_a_proj_with_mqa", "kv_b_proj", "o_proj")):
        v_dim = int(getattr(attn, "v_head_dim", 0) or getattr(config, "v_head_dim", 0))
        q_ok = isinstance(getattr(attn, "q_proj", None), nn.Linear) or all(
            isinstance(getattr(attn, n, None), nn.Linear) for n in ("q_a_proj", "q_b_proj"))
        if not q_ok or not v_dim or attn.o_proj.in_features != n_heads * v_dim:
            raise WorkbenchError(f"unexpected multi-head latent attention in {where}")
        return AttentionSpec("mla", n_heads, 1, v_dim)
    out_name = next((n for n in OUT_NAMES if isinstance(getattr(attn, n, None), nn.Linear)), None)
    hd = int(getattr(attn, "head_dim", 0) or getattr(attn, "head_size", 0) or getattr(config, "head_dim", 0)
             or d // n_heads)
    parts = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj")]
    if out_name and all(isinstance(p, nn.Linear) for p in parts):
        n_kv = int(getattr(config, "num_key_value_heads", None) or n_heads)
        q, k, v = parts
        o = getattr(attn, out_name)
        if q.out_features != n_heads * hd or k.out_features != n_kv * hd or v.out_features != n_kv * hd \
                or o.in_features != n_heads * hd or n_heads % n_kv:
            raise WorkbenchError(f"unexpected attention shapes in {where}: q {q.out_features}, k {k.out_features}, "
                                 f"v {v.out_features}, o {o.in_features}, heads {n_heads}/{n_kv}")
        return AttentionSpec("qkv", n_heads, n_kv, hd, out_name=out_name)
    fused = next((n for n in FUSED_NAMES if isinstance(getattr(attn, n, None), nn.Linear)), None)
    if out_name and fused:
        if getattr(attn, "new_decoder_architecture", False):  # Falcon's new decoder: per KV group
            layout, n_kv = "grouped", int(attn.num_kv_heads)
        elif getattr(attn, "multi_query", False):  # Falcon's multi-query attention
            layout, n_kv = "blocks", 1
        elif fused in ("qkv_proj", "Wqkv"):  # Phi-3, DBRX
            layout, n_kv = "blocks", int(getattr(attn, "num_key_value_heads", None)
                                         or getattr(config, "num_key_value_heads", None) or n_heads)
        else:  # GPT-NeoX, Falcon's classic attention: per head
            layout, n_kv = "interleaved", n_heads
        proj, o = getattr(attn, fused), getattr(attn, out_name)
        if proj.out_features != (n_heads + 2 * n_kv) * hd or o.in_features != n_heads * hd or n_heads % n_kv:
            raise WorkbenchError(f"unexpected fused attention shapes in {where}: {fused} {proj.out_features}, "
                                 f"{out_name} {o.in_features}, heads {n_heads}/{n_kv} of size {hd}")
        return AttentionSpec("fused", n_heads, n_kv, hd, layout, out_name)
    c_attn, c_proj = getattr(attn, "c_attn", None), getattr(attn, "c_proj", None)
    if _is_conv1d(c_attn) and _is_conv1d(c_proj) and not getattr(attn, "is_cross_attention", False):
        hd = d // n_heads
        if c_attn.nf != 3 * n_heads * hd or c_proj.weight.shape[0] != n_heads * hd:
            raise WorkbenchError(f"unexpected fused attention shapes in {where}")
        return AttentionSpec("c_attn", n_heads, n_heads, hd, "blocks")  # all queries, then keys, then values
    raise WorkbenchError(f"circuits need attention with q_proj/k_proj/v_proj (or a fused qkv_proj/query_key_value) "
                         f"and o_proj/dense linear layers, GPT-2's c_attn/c_proj or DeepSeek's latent attention; "
                         f"{where} has {type(attn).__name__} with {', '.join(n for n, _ in attn.named_children())}")


def out_proj(attn: nn.Module, spec: AttentionSpec) -> nn.Module:
    return attn.c_proj if spec.kind == "c_attn" else getattr(attn, spec.out_name)


def head_outputs(proj: nn.Module, z: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Each head's share of the output projection (no bias) ``[H, B, T, d]`` from its input ``z [B, T, H*hd]``."""
    B, T, _ = z.shape
    zh = z.reshape(B, T, n_heads, head_dim)
    if isinstance(proj, nn.Linear):
        return torch.einsum("bthk,dhk->hbtd", zh, proj.weight.view(proj.out_features, n_heads, head_dim))
    return torch.einsum("bthk,hkd->hbtd", zh, proj.weight.view(n_heads, head_dim, -1))  # Conv1D: [in, out]


def install(runner, attn: nn.Module, spec: AttentionSpec, stage: int) -> None:
    """Swap ``attn``'s input projections for stand-ins reading receiver copies of ``stage`` (queries
    first: copies 0..H-1, then the KV groups' k copies, then their v copies)."""
    nh, nkv = spec.n_heads, spec.n_kv
    if spec.kind == "qkv":
        for name, first, n in (("q_proj", 0, nh), ("k_proj", nh, nkv), ("v_proj", nh + nkv, nkv)):
            runner._swap(attn, name, _HeadProj(getattr(attn, name), runner, stage, first, n, spec.head_dim))
    elif spec.kind == "fused":
        name = next(n for n in FUSED_NAMES if isinstance(getattr(attn, n, None), nn.Linear))
        runner._swap(attn, name, _SlotRows(getattr(attn, name), runner, stage, fused_slots(spec), nh + 2 * nkv))
    elif spec.kind == "c_attn":  # a Conv1D: weight [in, out]
        runner._swap(attn, "c_attn", _SlotRows(attn.c_attn, runner, stage, fused_slots(spec), 3 * nh, transposed=True))
    else:
        qk = int(attn.qk_head_dim)
        if isinstance(getattr(attn, "q_proj", None), nn.Linear):
            runner._swap(attn, "q_proj", _HeadProj(attn.q_proj, runner, stage, 0, nh, qk))
        else:
            runner._swap(attn, "q_a_proj", _PerHeadIn(attn.q_a_proj, runner, stage, 0, nh))
            runner._swap(attn, "q_b_proj", _PerHeadOut(attn.q_b_proj, runner, stage, nh, qk))
        runner._swap(attn, "kv_a_proj_with_mqa", _LatentKV(attn.kv_a_proj_with_mqa, runner, stage, nh, nh + 1))
        runner._swap(attn, "kv_b_proj", _LatentExpand(attn.kv_b_proj, runner, stage, attn))


class _StandIn(nn.Module):
    """Base of the stand-ins (here and in circuits/runner.py): keeps the replaced module as ``base``, forwards
    attribute reads to it, and reads its stage's receiver copies from the runner."""

    def __init__(self, base: nn.Module, runner, stage: int):
        super().__init__()
        self.base, self.runner, self.stage = base, runner, stage

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["base"], name)

    def copies(self) -> torch.Tensor | None:
        return self.runner._stash.get(self.stage)


class _HeadProj(_StandIn):
    """Stands in for q_proj / k_proj / v_proj: head i is projected from receiver copy ``first + i``."""

    def __init__(self, base: nn.Linear, runner, stage: int, first: int, n: int, head_dim: int):
        super().__init__(base, runner, stage)
        self.first, self.n, self.head_dim = first, n, head_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.copies()
        if y is None:
            return self.base(x)
        ys = y[:, :, self.first:self.first + self.n]  # [B, T, n, d]
        w = self.base.weight.view(self.n, self.head_dim, -1)
        out = torch.einsum("btnd,nkd->btnk", ys, w).reshape(*ys.shape[:2], self.n * self.head_dim)
        if self.base.bias is not None:
            out = out + self.base.bias
        return out


class _SlotRows(_StandIn):
    """Stands in for a fused projection (a linear layer, or GPT-2's Conv1D with ``transposed`` weights
    ``[in, out]``) whose output row j reads receiver copy ``slots[j]`` (every copy feeds as many rows)."""

    def __init__(self, base: nn.Module, runner, stage: int, slots: torch.Tensor, n_slots: int,
                 transposed: bool = False):
        super().__init__(base, runner, stage)
        self.order = torch.argsort(slots, stable=True)  # rows grouped by copy
        self.inverse = torch.argsort(self.order)
        self.n_slots, self.per_slot, self.transposed = n_slots, len(slots) // n_slots, transposed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.copies()
        if y is None:
            return self.base(x)
        weight = self.base.weight.T if self.transposed else self.base.weight  # [out, in]
        w = weight[self.order.to(x.device)].view(self.n_slots, self.per_slot, -1)
        out = torch.einsum("btnd,nkd->btnk", y, w).flatten(-2)[..., self.inverse.to(x.device)]
        if self.base.bias is not None:
            out = out + self.base.bias
        return out


class _PerHeadIn(_StandIn):
    """Stands in for MLA's q_a_proj: the low-rank query input of head i from copy ``first + i``, ``[B, T, H, r]``."""

    def __init__(self, base: nn.Linear, runner, stage: int, first: int, n: int):
        super().__init__(base, runner, stage)
        self.first, self.n = first, n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.copies()
        return self.base(x) if y is None else self.base(y[:, :, self.first:self.first + self.n])


class _PerHeadOut(_StandIn):
    """Stands in for MLA's q_b_proj: head i's query from head i's own low-rank input ``[B, T, H, r]``."""

    def __init__(self, base: nn.Linear, runner, stage: int, n: int, head_dim: int):
        super().__init__(base, runner, stage)
        self.n, self.head_dim = n, head_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.copies() is None:
            return self.base(x)
        w = self.base.weight.view(self.n, self.head_dim, -1)
        out = torch.einsum("btnr,nkr->btnk", x, w)
        if self.base.bias is not None:
            out = out + self.base.bias.view(self.n, self.head_dim)
        return out.reshape(*x.shape[:2], self.n * self.head_dim)


class _LatentKV(_StandIn):
    """Stands in for MLA's kv_a_proj_with_mqa: returns the latent (and rotary key) of the k copy and keeps
    the v copy's latent for :class:`_LatentExpand`."""

    def __init__(self, base: nn.Linear, runner, stage: int, k_slot: int, v_slot: int):
        super().__init__(base, runner, stage)
        self.k_slot, self.v_slot = k_slot, v_slot

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.copies()
        if y is None:
            return self.base(x)
        self.runner._stash[(self.stage, "v_latent")] = self.base(y[:, :, self.v_slot])
        return self.base(y[:, :, self.k_slot])


class _LatentExpand(_StandIn):
    """Stands in for MLA's kv_b_proj: keys from the k copy's latent, values from the v copy's."""

    def __init__(self, base: nn.Linear, runner, stage: int, attn: nn.Module):
        super().__init__(base, runner, stage)
        self.nope, self.v_dim, self.rank = int(attn.qk_nope_head_dim), int(attn.v_head_dim), int(attn.kv_lora_rank)
        self.norm = attn.kv_a_layernorm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v_latent = self.runner._stash.pop((self.stage, "v_latent"), None)
        out = self.base(x)
        if v_latent is None:
            return out
        v_in = self.norm(v_latent[..., :self.rank]).view_as(x)
        both = torch.stack([out, self.base(v_in)]).unflatten(-1, (-1, self.nope + self.v_dim))
        return torch.cat([both[0, ..., :self.nope], both[1, ..., self.nope:]], dim=-1).flatten(-2)
