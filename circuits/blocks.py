"""How each decoder block reads and writes the residual stream, read off one forward of the model.

Circuits need to know, per layer, where the attention and the MLP read the residual stream (through
which norm, if any) and how their outputs get back into it. Decoder families differ:

* **pre-norm** (Llama, Qwen, Mistral, GPT-2 ...): ``h = x + attn(n1(x))``, ``out = h + mlp(n2(h))``;
* **sandwich** (Gemma 2/3, GLM-4): a second norm on each sublayer's output before the add,
  ``h = x + n1'(attn(n1(x)))``;
* **post-norm** (OLMo 2/3, EXAONE 4): no norm on the way in, one on the way out, ``h = x + n(attn(x))``;
* **parallel** (GPT-NeoX, Phi, Cohere, Falcon): attention and MLP both read the layer input (one
  shared norm or one each), ``out = x + attn(n1(x)) + mlp(n2(x))``;
* **scaled** (Granite): each sublayer's output is multiplied by a constant before the add.

:func:`block_layouts` does not trust module names for this (Gemma 2's ``post_attention_layernorm``
is an output norm; Llama's is the MLP's input norm): it runs 5 tokens with hooks on the layer, its
attention, its MLP and every other module of the layer outside them, and matches tensors. Each layer must then satisfy
``out = x + a * A + m * M`` (A, M the sublayer outputs after their output norms, a and m constants)
or circuits refuse it, naming the layer and what did not match.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from workbench.adapters.base import Adapter
from workbench.errors import WorkbenchError


@dataclass(frozen=True)
class BlockLayout:
    """One decoder layer's residual-stream wiring (modules by dotted path from the layer; "" for none)."""

    attn_in: str  # the norm the attention reads through ("" : it reads the residual itself)
    attn_out: str  # the norm on the attention's output before the add
    mlp_in: str
    mlp_out: str
    parallel: bool  # the MLP reads the layer input (not the residual after the attention)
    attn_scale: float = 1.0  # the constant the attention's contribution is multiplied by
    mlp_scale: float = 1.0

    @property
    def kind(self) -> str:
        if self.parallel:
            return "parallel"
        if self.attn_out or self.mlp_out:
            return "sandwich" if (self.attn_in or self.mlp_in) else "post-norm"
        return "pre-norm"


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    # the tolerance of the coarser dtype (it was read after the cast to float32, so a bf16 / fp16 model met float32's
    # and was "not the residual plus the MLP's contribution")
    half = {a.dtype, b.dtype} & {torch.float16, torch.bfloat16}
    tol = 1e-2 if half else 1e-5
    a, b = a.float(), b.float()
    scale = float(b.abs().max().clamp(min=1e-6))
    return bool((a - b).abs().max() <= tol * 10 * scale)


def _fit(target: torch.Tensor, part: torch.Tensor) -> float:
    """The scalar c minimising |target - c part| (a sublayer's residual multiplier)."""
    t, p = target.float().flatten(), part.float().flatten()
    return float(t @ p / (p @ p).clamp(min=1e-30))


def _rounded(c: float) -> float:
    """A fitted multiplier to 6 significant digits (what float32 arithmetic can tell apart)."""
    return float(f"{c:.6g}")


def block_layouts(model: nn.Module, adapter: Adapter) -> tuple[list[BlockLayout], float]:
    """Each decoder layer's :class:`BlockLayout` (a WorkbenchError naming the layer if one matches none), and
    the constant the embedding is multiplied by before the first layer (Granite's ``embedding_multiplier``;
    1 where the first layer reads the embedding plus a position term, as GPT-2's)."""
    layers = adapter.decoder_layers(model)
    seen: dict = {}
    handles = []
    emb = adapter.embedding(model)

    def first(args, kwargs):
        if args and isinstance(args[0], torch.Tensor):
            return args[0]
        return kwargs.get("hidden_states", next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None))

    def keep(i, key):
        def hook(mod, args, kwargs, out):
            o = out[0] if isinstance(out, tuple) else out
            x = first(args, kwargs)
            if isinstance(o, torch.Tensor) and isinstance(x, torch.Tensor):
                # Values are cloned (Falcon adds to the MLP output in place); the tensors themselves are kept alive
                # so that no two share an address, which tells apart norms with equal outputs (a fresh model's).
                seen[(i, key)] = (x.detach().clone(), o.detach().clone(), x, o)
        return hook

    for i, layer in enumerate(layers):
        attn, mlp = adapter.attention(layer), adapter.mlp(layer)
        handles.append(layer.register_forward_hook(keep(i, "layer"), with_kwargs=True))
        handles.append(attn.register_forward_hook(keep(i, "attn"), with_kwargs=True))
        handles.append(mlp.register_forward_hook(keep(i, "mlp"), with_kwargs=True))
        for name, child in _norm_candidates(layer, attn, mlp):
            handles.append(child.register_forward_hook(keep(i, "." + name), with_kwargs=True))
    handles.append(emb.register_forward_hook(keep(-1, "embed"), with_kwargs=True))
    vocab = int(getattr(model.config, "vocab_size", 2) or 2)
    ids = (torch.arange(5) * 7 + 3).remainder(vocab)[None].to(next(model.parameters()).device)
    try:
        with torch.no_grad():
            adapter.body(model)(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    where = type(model).__name__
    if (-1, "embed") not in seen or (0, "layer") not in seen:
        raise WorkbenchError(f"circuits cannot read {where}: its embedding or first layer did not run in a forward")
    e, x0 = seen[(-1, "embed")][1], seen[(0, "layer")][0]
    scale = _rounded(_fit(x0, e)) if e.shape == x0.shape else 1.0
    scale = scale if e.shape == x0.shape and _close(x0, scale * e) else 1.0
    return [_match(i, {k[1]: v for k, v in seen.items() if k[0] == i}, where) for i in range(len(layers))], scale


def _norm_candidates(layer: nn.Module, attn: nn.Module, mlp: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layer's modules that may sit between the residual stream and a sublayer (its norms): every
    module outside the attention and the MLP that holds neither (DBRX nests its norms with the attention
    in ``norm_attn_norm``), by dotted path, dropouts left out."""
    inside = {id(m) for part in (attn, mlp) for m in part.modules()}
    holders = {id(m) for m in layer.modules() if any(c is attn or c is mlp for c in m.modules())}
    return [(name, m) for name, m in layer.named_modules()
            if name and id(m) not in inside and id(m) not in holders and not isinstance(m, nn.Dropout)]


def _match(i: int, s: dict, where: str) -> BlockLayout:
    def fail(what: str) -> WorkbenchError:
        return WorkbenchError(f"circuits cannot read layer {i} of {where} as a residual block: {what}")

    if not {"layer", "attn", "mlp"} <= set(s):
        raise fail("its attention or MLP did not run in a forward")
    x, out = s["layer"][:2]
    ai, ao, ai_ptr, ao_ptr = (*s["attn"][:2], *(t.data_ptr() for t in s["attn"][2:]))
    mi, mo, mi_ptr, mo_ptr = (*s["mlp"][:2], *(t.data_ptr() for t in s["mlp"][2:]))
    norms = {k[1:]: v for k, v in s.items() if k.startswith(".")}

    def find(t: torch.Tensor, ptr: int, side: int) -> str:
        """The child whose output (side 1) or input (side 0) is ``t``: the same storage first, else equal values ("" if none)."""
        same = [n for n, v in norms.items() if v[2 + side].data_ptr() == ptr and v[side].shape == t.shape]
        return (same or [n for n, v in norms.items() if v[side].shape == t.shape and torch.equal(v[side], t)] or [""])[0]

    def reading(inp: torch.Tensor, ptr: int) -> str:
        return find(inp, ptr, 1)

    def writing(o: torch.Tensor, ptr: int) -> str:
        return find(o, ptr, 0)

    attn_in = reading(ai, ai_ptr)
    if not (torch.equal(norms[attn_in][0], x) if attn_in else torch.equal(ai, x)):
        raise fail("the attention reads neither the layer's input nor a norm of it")
    attn_out = writing(ao, ao_ptr)
    A = norms[attn_out][1] if attn_out else ao
    mlp_in = reading(mi, mi_ptr)
    m_read = norms[mlp_in][0] if mlp_in else mi
    mlp_out = writing(mo, mo_ptr)
    if mlp_out == attn_out and mlp_out:
        mlp_out = ""
    M = norms[mlp_out][1] if mlp_out else mo
    if torch.equal(m_read, x):  # parallel: the MLP reads the layer input
        if not _close(out, x + A + M):
            raise fail("attention and MLP both read the layer input, and the output is not input + attention + MLP")
        return BlockLayout(attn_in, attn_out, mlp_in, mlp_out, True)
    a = _rounded(_fit(m_read - x, A))
    if not _close(m_read, x + a * A):
        raise fail("the MLP reads neither the layer input nor the residual after the attention (or a norm of either)")
    h = m_read  # the residual after the attention
    m = _rounded(_fit(out - h, M))
    if not _close(out, h + m * M):
        raise fail("the output is not the residual plus the MLP's contribution")
    return BlockLayout(attn_in, attn_out, mlp_in, mlp_out, False, a, m)
