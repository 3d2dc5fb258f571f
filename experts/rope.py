"""Which query/key dimensions a layer's RoPE rotates together, and at what frequency, read from the rotation itself.

Families lay RoPE out differently: ``rotate_half`` pairs dim ``d`` with ``d + rot / 2`` (Llama, Qwen, Mistral),
GLM, Cohere, Helium and ERNIE pair ``2i`` with ``2i + 1`` (GLM and Helium are handed halves-ordered cos/sin and
interleave them inside); some layers are not rotated at all (SmolLM3's and Cohere2's NoPE layers); Gemma3 rotates
sliding and full layers with other frequencies, kept under other buffer names. Guessing rotate_half over the first
``inv_freq`` buffer got every one of these wrong.

:class:`RopeRecorder` wraps the ``apply_rotary_pos_emb`` function the attention modules' own modeling code calls,
for the duration of a pass; the caller says which layer's attention ran (:meth:`RopeRecorder.attention_ran`, from
its attention tap, which comes after the rotation in the same layer). At a layer's first call:

* no rotation before its attention: the layer is not rotated;
* which dims turn together: the function itself, called once more on a probe (cos 1, sin 1/2 everywhere, so any
  reordering the function does inside keeps them) shows ``rotate(q)``, whose entry ``j`` is +-q at ``j``'s
  partner. The same for every prompt (nothing read from the data); pairs are numbered by their lower dim, which
  is their frequency's rank in both layouts;
* the frequencies: ``atan2(sin, cos)`` at position 1 where the call starts at position 0, else the model's
  inverse-frequency buffer of that many entries; exact buffer values where they match.

The recorder changes nothing the model computes (it returns the function's own result) and stops reading once every
layer is known.
"""

from __future__ import annotations

import inspect
import math
import sys

import torch
from torch import nn

FUNCTION = "apply_rotary_pos_emb"
_TENSORS = ("q", "k", "x", "tensor", "query", "key")  # the rotated tensors' parameter names


class Layout:
    """One layer's rotation: ``pair[d]`` (pair index of rotated dim ``d``, pair 0 the highest frequency; None past
    the rotated dims) and ``freq[p]`` (radians per position; empty where not known)."""

    def __init__(self, pair: list[int | None], freq: list[float]):
        self.pair, self.freq = pair, freq

    @property
    def rotated(self) -> int:
        return sum(p is not None for p in self.pair)

    def pair_of(self, dim: int) -> int | None:
        return self.pair[dim] if 0 <= dim < len(self.pair) else None

    def wavelength(self, pair: int) -> float | None:
        return 2 * math.pi / self.freq[pair] if pair < len(self.freq) and self.freq[pair] > 0 else None

    def by_frequency(self) -> list[int]:
        """Rotated dims from the highest frequency down, each pair's two dims together (lower dim first)."""
        dims: dict[int, list[int]] = {}
        for d, p in enumerate(self.pair):
            if p is not None:
                dims.setdefault(p, []).append(d)
        return [d for p in sorted(dims) for d in dims[p]]


NOT_ROTATED = Layout([], [])


def probe_pairs(fn, names: list[str], r: int, head_dim: int) -> list[int | None] | None:
    """``pair[d]`` of the function ``fn`` rotating the first ``r`` of ``head_dim`` dims, from one call on a probe
    (see the module doc); None where the call does not show a pairing (a partner missing or shared)."""
    if r < 2 or r % 2 or r > head_dim:
        return None
    g = torch.Generator().manual_seed(0)
    q = torch.rand(1, 1, 1, head_dim, generator=g, dtype=torch.float64) + torch.arange(head_dim) + 1.0  # distinct
    kwargs = {n: q.clone() for n in names}
    try:
        out = fn(**kwargs, cos=torch.ones(1, 1, r, dtype=torch.float64), sin=torch.full((1, 1, r), 0.5,
                                                                                        dtype=torch.float64))
    except Exception:  # noqa: BLE001 (a function of another shape: no pairing read)
        return None
    out = out[0] if isinstance(out, (tuple, list)) else out
    if not isinstance(out, torch.Tensor) or out.shape != q.shape:
        return None
    rot = ((out - q) / 0.5).flatten()
    x = q.flatten()
    if not bool(torch.allclose(out.flatten()[r:], x[r:], rtol=1e-5)):
        return None
    partner = []
    for j in range(r):
        hit = ((rot[j].abs() - x[:r].abs()).abs() < 1e-3).nonzero().flatten().tolist()  # values ~1 apart; fp32 inside
        if len(hit) != 1 or hit[0] == j:
            return None
        partner.append(hit[0])
    if any(partner[partner[j]] != j for j in range(r)):
        return None
    lows = sorted({min(j, partner[j]) for j in range(r)})
    rank = {d: p for p, d in enumerate(lows)}
    return [rank[min(j, partner[j])] for j in range(r)] + [None] * (head_dim - r)


def frequencies(cos: torch.Tensor, sin: torch.Tensor, exact: list[torch.Tensor]) -> list[float]:
    """The ``r / 2`` frequencies, highest first: ``atan2(sin, cos)`` at position 1 of the first row where the call
    starts at position 0 (exact buffer values where they match one to 1e-3, or 4 eps of a half-precision cos), else
    the buffer of ``r / 2`` entries where all such are equal, else none."""
    r = cos.shape[-1]
    same = [f.detach().double().cpu().flatten().sort(descending=True).values for f in exact if f.numel() == r // 2]
    c = cos.detach().reshape(-1, cos.shape[-2], r)[0].double().cpu()
    s = sin.detach().reshape(-1, sin.shape[-2], r)[0].double().cpu()
    # cos/sin of a bf16 or fp16 model are rounded to its precision: read frequencies match the buffer to a few eps
    rtol = max(1e-3, 4 * torch.finfo(cos.dtype).eps) if cos.dtype.is_floating_point else 1e-3
    if c.shape[0] >= 2 and not bool(s[0].abs().max() > 0):
        read = sorted({float(x) for x in torch.atan2(s[1], c[1])}, reverse=True)
        if len(read) == r // 2:
            for f in same:
                if bool(torch.allclose(torch.tensor(read, dtype=torch.float64), f, rtol=rtol, atol=0)):
                    return f.tolist()
            return read
    return same[0].tolist() if same and all(torch.equal(f, same[0]) for f in same) else []


def inv_freq_buffers(model: nn.Module) -> list[torch.Tensor]:
    """Every 1-D buffer named ``inv_freq`` or ``*_inv_freq`` (Gemma3's ``sliding_attention_inv_freq`` ...), not
    ``original_inv_freq`` (kept beside ``inv_freq`` for dynamic scaling)."""
    out, seen = [], set()
    for m in model.modules():
        for name, b in m.named_buffers(recurse=False):
            if (name == "inv_freq" or name.endswith("_inv_freq") and not name.startswith("original")) \
                    and b.ndim == 1 and id(b) not in seen:  # (original_inv_freq: before dynamic scaling)
                seen.add(id(b))
                out.append(b)
    return out


def _unwrap(fn):
    """The modeling code's own function under any recorders' wrappers."""
    while hasattr(fn, "__wrapped_by_workbench__"):
        fn = fn.__wrapped_by_workbench__
    return fn


class RopeRecorder:
    """Each watched layer's :class:`Layout` (``layouts``; ``NOT_ROTATED`` for a layer whose attention ran without a
    rotation before it), read at its first call (see the module doc). Layers of other code (no such function, no
    ``cos``/``sin`` argument, a pairing the probe cannot read) are absent."""

    def __init__(self, model: nn.Module, attention: dict[int, nn.Module]):
        self.model, self.attention = model, attention
        self.layouts: dict[int, Layout] = {}
        self._pending = None  # (function, its tensor parameters, cos, sin) of the last call since the last attention
        self._called = False  # whether the rotation ran since the last attention
        self._patched: list[tuple[object, object]] = []  # (module, original function)
        self._watched: set[int] = set()
        self._exact = inv_freq_buffers(model)
        self._pairs: dict[tuple, list[int | None] | None] = {}  # (function, r, head_dim) -> probe_pairs
        self._hooks: list = []
        self._active = True

    def _starting(self, module, args) -> None:
        """A watched attention module starts: what ran before it (another layer's rotation) is not its own."""
        self._pending, self._called = None, False

    def install(self) -> "RopeRecorder":
        for i, attn in self.attention.items():
            mod = sys.modules.get(type(attn).__module__)
            fn = getattr(mod, FUNCTION, None) if mod is not None else None
            if fn is None:
                continue
            try:
                params = list(inspect.signature(_unwrap(fn)).parameters)
            except (TypeError, ValueError):
                continue
            if "cos" not in params or "sin" not in params or not any(n in params for n in _TENSORS):
                continue
            self._watched.add(i)
            self._hooks.append(attn.register_forward_pre_hook(self._starting))  # its own rotation comes after
            if not any(m is mod for m, _ in self._patched):
                setattr(mod, FUNCTION, self._wrap(fn, params))
                self._patched.append((mod, fn))
        return self

    def _wrap(self, fn, params: list[str]):
        recorder = self
        original = _unwrap(fn)
        sig = inspect.signature(original)
        names = [n for n in _TENSORS if n in params]

        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            if recorder._active and len(recorder.layouts) < len(recorder._watched):
                recorder._called = True
                try:
                    a = sig.bind(*args, **kwargs).arguments
                except TypeError:
                    return out
                if isinstance(a.get("cos"), torch.Tensor) and isinstance(a.get("sin"), torch.Tensor):
                    recorder._pending = (original, [n for n in names if n in a], a["cos"], a["sin"])
            return out

        wrapped.__wrapped_by_workbench__ = fn
        return wrapped

    def attention_ran(self, layer: int, head_dim: int) -> None:
        """Layer ``layer``'s attention function is running, with queries of ``head_dim`` dims: the rotation run
        since the last call is its own."""
        pending, called, self._pending, self._called = self._pending, self._called, None, False
        if layer in self.layouts or layer not in self._watched:
            return
        if not called:  # the attention ran with no rotation before it: a NoPE layer
            self.layouts[layer] = NOT_ROTATED
            return
        if pending is None:
            return
        fn, names, cos, sin = pending
        key = (fn, cos.shape[-1], head_dim)
        if key not in self._pairs:
            self._pairs[key] = probe_pairs(fn, names, cos.shape[-1], head_dim)
        pair = self._pairs[key]
        if pair is not None:
            self.layouts[layer] = Layout(pair, frequencies(cos, sin, self._exact))

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._active = False
        for mod, fn in reversed(self._patched):
            if getattr(getattr(mod, FUNCTION, None), "__wrapped_by_workbench__", None) is fn:
                setattr(mod, FUNCTION, fn)  # ours is the outermost: put back what we found
            # else another recorder wrapped ours and is still on: ours stays in its chain, passing calls through
        self._patched.clear()
