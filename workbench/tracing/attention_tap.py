"""Read or change the queries, keys and values an attention layer hands to its attention function.

Every transformers 5.x attention module projects Q, K and V, applies RoPE (and q/k norms), updates the
KV cache and then calls an attention function chosen by name (``config._attn_implementation``).
:class:`AttentionTap` registers one implementation per underlying one (``workbench_tap+eager``,
``workbench_tap+sdpa`` ...) that runs the taps installed for the calling module, then calls the
implementation the model was using: the family's own eager function (soft-capping, learned sinks and
all) or transformers' registered one, with that implementation's own mask function. With taps that
only read, the forward computes exactly what it computed before (same kernels, same buffers).

A tap is ``fn(module, q, k, v) -> (q, k, v) | None`` with ``q [B, H, T, d]`` after RoPE and ``k``,
``v [B, KV, T', d]`` as the cache holds them (T' > T in cached generation); returning tensors replaces
them for this call. Several taps (a meter and an intervention) can be installed on one model; the
implementation is switched by the first and restored by the last. Attention that does not go through
transformers' attention interface (Falcon) is never tapped: :meth:`AttentionTap.tapped` says which
modules were.
"""

from __future__ import annotations

import sys
from typing import Callable

from torch import nn

Tap = Callable  # (module, q, k, v) -> (q, k, v) | None

_TAPS: dict[int, list[Tap]] = {}  # id(attention module) -> taps, in installation order
_CALLED: set[int] = set()  # modules whose attention came through a tap implementation
_MODELS: dict[int, list] = {}  # id(model) -> [implementation before, forced, count]
_REGISTERED: set[str] = set()
PREFIX = "workbench_tap+"


def _eager(module: nn.Module):
    """The eager attention function of ``module``'s own modelling file (None where it has none)."""
    return getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)


def untappable(module: nn.Module) -> str | None:
    """Why ``module``'s queries, keys and values cannot be tapped (None: they can). Attention written without
    transformers' attention interface (Falcon) has no eager function beside it."""
    if _eager(module) is None:
        return (f"{type(module).__name__} does not use transformers' attention interface, where queries, keys "
                "and values are read")
    return None


def _implementation(before: str) -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = PREFIX + before
    if name in _REGISTERED:
        return name

    def attend(module, query, key, value, attention_mask, **kwargs):
        _CALLED.add(id(module))
        for tap in _TAPS.get(id(module), ()):
            new = tap(module, query, key, value)
            if new is not None:
                query, key, value = new
        if before == "eager":  # the family's own eager function
            fn = _eager(module)
        else:
            fn = ALL_ATTENTION_FUNCTIONS[before]
        return fn(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(name, attend)
    masks = ALL_MASK_ATTENTION_FUNCTIONS
    AttentionMaskInterface.register(name, masks[before] if before in masks.keys() else masks["eager"])
    _REGISTERED.add(name)
    return name


class AttentionTap:
    """Install ``taps`` (attention module -> tap) on ``model`` until :meth:`remove`."""

    def __init__(self, model: nn.Module, taps: dict[nn.Module, Tap]):
        self.model, self.taps = model, dict(taps)
        self._installed = False

    def install(self) -> "AttentionTap":
        for module, tap in self.taps.items():
            _TAPS.setdefault(id(module), []).append(tap)
            _CALLED.discard(id(module))
        state = _MODELS.get(id(self.model))
        if state is None:
            cfg = self.model.config
            before = getattr(cfg, "_attn_implementation", None) or "eager"
            name = _implementation(before)
            self.model.set_attn_implementation(name)
            forced = getattr(cfg, "_attn_implementation", None) != name
            if forced:  # models that refuse the dynamic switch but read the config at forward time
                cfg._attn_implementation = name
            state = _MODELS[id(self.model)] = [before, forced, 0]
        state[2] += 1
        self._installed = True
        return self

    def tapped(self, module: nn.Module) -> bool:
        """Whether ``module``'s attention has come through a tap since :meth:`install`."""
        return id(module) in _CALLED

    def remove(self) -> None:
        if not self._installed:
            return
        self._installed = False
        for module, tap in self.taps.items():
            taps = _TAPS.get(id(module), [])
            if tap in taps:
                taps.remove(tap)
            if not taps:
                _TAPS.pop(id(module), None)
        state = _MODELS[id(self.model)]
        state[2] -= 1
        if state[2] == 0:
            before, forced, _ = _MODELS.pop(id(self.model))
            if forced:
                self.model.config._attn_implementation = before
            else:
                self.model.set_attn_implementation(before)

    def __enter__(self) -> "AttentionTap":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.remove()
