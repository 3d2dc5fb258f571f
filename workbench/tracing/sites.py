"""Typed capture sites: (layer, component, expert). Built from the adapter, never parsed from hook names.

A site's *rows* are tokens: ``[n_tokens, channels]``. For a routed expert the rows are only the
tokens routed to it (its down_proj output before the routing weight is applied). The grouped
``experts`` site carries all routed experts of a layer in one payload, rows sorted by expert (then
token) and tagged with their expert, so one reducer update covers a whole layer.
"""

from __future__ import annotations

import enum
import numbers
import re
from dataclasses import dataclass
from typing import Iterable

from torch import nn

from workbench.adapters.base import Adapter
from workbench.errors import WorkbenchError


class Component(str, enum.Enum):
    RESID_PRE = "resid_pre"  # decoder layer input [tokens, d_model]
    RESID_POST = "resid_post"  # decoder layer output [tokens, d_model]
    ATTN_OUT = "attn_out"  # attention block output [tokens, d_model]
    MLP_OUT = "mlp_out"  # MLP / MoE block output (all experts combined) [tokens, d_model]
    ROUTER = "router"  # router logits [tokens, num_experts], with the chosen top-k indices
    EXPERT = "expert"  # one routed (or dense) expert's down_proj output [routed tokens, d_model]
    EXPERTS = "experts"  # every routed expert of a MoE layer at once [routed (token, expert) pairs, d_model]
    SHARED_EXPERT = "shared_expert"  # one shared expert's down_proj output [tokens, d_model]
    Q = "q"  # queries after RoPE, as the attention function gets them [tokens, heads * head_dim], head-major
    K = "k"  # keys after RoPE [tokens, kv_heads * head_dim]
    V = "v"  # values [tokens, kv_heads * head_dim]


QKV = (Component.Q, Component.K, Component.V)


def component(c: Component | str, where: str = "site") -> Component:
    """``c`` as a :class:`Component`; an unknown name is a one-line error listing the known ones."""
    try:
        return Component(c)
    except ValueError:
        raise WorkbenchError(f"{where}: unknown component {c!r}; known: {', '.join(x.value for x in Component)}") \
            from None


_PER_EXPERT = (Component.EXPERT, Component.SHARED_EXPERT)
_KEY = re.compile(r"^L(\d+)\.([a-z_]+)(?:\.E(\d+))?$")


@dataclass(frozen=True, order=True)
class Site:
    layer: int
    component: Component
    expert: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "component", component(self.component, f"site L{self.layer}"))
        for name in ("layer", "expert"):
            v = getattr(self, name)
            if v is None and name == "expert":
                continue
            if not isinstance(v, numbers.Integral) or isinstance(v, bool):
                raise WorkbenchError(f"site {self.component.value}: {name} must be an integer, got {v!r}")
            object.__setattr__(self, name, int(v))
        if (self.component in _PER_EXPERT) != (self.expert is not None):
            raise WorkbenchError(f"site {self.component.value}: expert index is required exactly for expert sites")

    @property
    def key(self) -> str:
        """Stable text form, e.g. ``L3.expert.E5``, used in file names and JSON."""
        tail = f".E{self.expert}" if self.expert is not None else ""
        return f"L{self.layer}.{self.component.value}{tail}"

    @classmethod
    def from_key(cls, key: str) -> "Site":
        m = _KEY.match(key)
        if not m:
            raise WorkbenchError(f"bad site {key!r}: expected L<layer>.<component>[.E<expert>]")
        try:
            comp = Component(m.group(2))
        except ValueError:
            raise WorkbenchError(
                f"bad site {key!r}: unknown component {m.group(2)!r}; known: {', '.join(c.value for c in Component)}"
            ) from None
        return cls(int(m.group(1)), comp, None if m.group(3) is None else int(m.group(3)))

    def __str__(self) -> str:
        return self.key


def all_sites(adapter: Adapter, model: nn.Module, components: Iterable[Component | str], layers: Iterable[int] | None = None) -> list[Site]:
    """Every site of the given components over ``layers`` (default: all), experts expanded."""
    if isinstance(components, (str, Component)):
        raise WorkbenchError("components must be a list of components, not one: wrap it in a list")
    if isinstance(layers, numbers.Integral):
        raise WorkbenchError("layers must be a list of layer indices, not one: wrap it in a list")
    infos = adapter.layer_infos(model)
    chosen = range(len(infos)) if layers is None else list(layers)
    odd = next((i for i in chosen if not isinstance(i, numbers.Integral) or isinstance(i, bool)), None)
    if odd is not None:  # ('1' failed in a comparison of int and str; 1.5 was out of range by chance)
        raise WorkbenchError(f"layers must be integers, got {odd!r}")
    out: list[Site] = []
    for comp in [component(c, "all_sites") for c in components]:
        for i in chosen:
            if not 0 <= i < len(infos):
                raise WorkbenchError(f"layer {i} out of range: model has {len(infos)} layers (0..{len(infos) - 1})")
            info = infos[i]
            if comp is Component.EXPERT:
                out += [Site(i, comp, e) for e in range(info.num_experts)]
            elif comp is Component.SHARED_EXPERT:
                out += [Site(i, comp, e) for e in range(info.num_shared)]
            elif comp in (Component.ROUTER, Component.EXPERTS):
                if info.kind == "moe":
                    out.append(Site(i, comp))
            elif comp in QKV:  # layers whose attention hands Q, K, V to transformers' attention interface
                if not qkv_unreadable(adapter, model, i):
                    out.append(Site(i, comp))
            else:
                out.append(Site(i, comp))
    return out


def qkv_unreadable(adapter: Adapter, model: nn.Module, layer: int) -> str | None:
    """Why layer ``layer``'s queries, keys and values cannot be read (None: they can)."""
    from workbench.tracing.attention_tap import untappable

    block = adapter.decoder_layers(model)[layer]
    if not adapter.has_attention(block):
        return f"layer {layer} has no softmax attention ({adapter.mixer_kind(block)})"
    return untappable(adapter.attention(block))


def validate(adapter: Adapter, model: nn.Module, sites: Iterable[Site]) -> None:
    infos = adapter.layer_infos(model)
    for s in sites:
        if not 0 <= s.layer < len(infos):
            raise WorkbenchError(f"site {s}: layer out of range (model has {len(infos)} layers)")
        info = infos[s.layer]
        if s.component in (Component.ROUTER, Component.EXPERTS) and info.kind != "moe":
            what = "router" if s.component is Component.ROUTER else "routed experts"
            raise WorkbenchError(f"site {s}: layer {s.layer} is dense and has no {what}")
        if s.component in QKV:
            why = qkv_unreadable(adapter, model, s.layer)
            if why:
                raise WorkbenchError(f"site {s}: {why}")
        limit = {Component.EXPERT: info.num_experts, Component.SHARED_EXPERT: info.num_shared}.get(s.component)
        if limit is not None and not 0 <= s.expert < limit:
            raise WorkbenchError(f"site {s}: expert out of range (layer {s.layer} has {limit})")
