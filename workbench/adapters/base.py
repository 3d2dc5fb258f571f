"""Architecture adapters: where each family keeps its layers, router, experts and heads.

An adapter is declared once per model family and registered by the ``config.model_type`` values
it serves (see ``llama.py``, ``qwen_moe.py`` ...). Nothing else in workbench branches on model
names: analysis code asks the adapter.

Two expert layouts are supported:

* **fused** (transformers 5.x): ``mlp.experts`` holds ``gate_up_proj [E, 2I, H]`` and
  ``down_proj [E, H, I]`` and is called as ``experts(hidden [T, H], top_k_index [T, k],
  top_k_weights [T, k])``; the router ``mlp.gate`` returns ``(logits, weights, indices)``.
* **modulelist** (older checkpoints, remote-code models): ``mlp.experts`` is an ``nn.ModuleList``
  of MLPs and ``mlp.gate`` is a linear layer returning router logits; experts are chosen by
  softmax top-k (optionally renormalised), as the 4.x implementations of these families did.

Dense models are adapters too: each layer's MLP is one expert of kind ``"dense"``.
"""

from __future__ import annotations

import contextlib

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from workbench.errors import WorkbenchError

ExpertKind = Literal["routed", "shared", "dense"]


@dataclass(frozen=True)
class LayerInfo:
    """What one decoder layer contains, as far as experts go."""

    index: int
    kind: Literal["moe", "dense"]
    num_experts: int  # routed experts (1 for a dense layer: its MLP)
    num_shared: int
    top_k: int  # routed experts per token (1 for a dense layer)
    layout: Literal["fused", "modulelist", "dense"]


def get_path(root: nn.Module, path: str) -> nn.Module | None:
    """Follow a dotted attribute path; ``None`` where any step is missing."""
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


@dataclass(frozen=True)
class Adapter:
    """Where a family keeps its parts. Subclass per family only to override behaviour."""

    name: str
    model_types: tuple[str, ...]
    layers_path: str = "model.layers"
    embed_path: str = "model.embed_tokens"
    final_norm_path: str = "model.norm"
    lm_head_path: str = "lm_head"
    attn_name: str = "self_attn"
    # Hybrid models: token mixers without attention probabilities (linear attention, state space) in
    # the layers that have no ``attn_name`` module, e.g. ("linear_attn",) for Qwen3-Next.
    linear_attn_names: tuple[str, ...] = ()
    # ... or an ``attn_name`` module of a linear kind in some layers (MiniMax's lightning attention), by class name.
    linear_attn_classes: tuple[str, ...] = ()
    mlp_name: str = "mlp"
    input_norm_name: str = "input_layernorm"
    post_attn_norm_name: str = "post_attention_layernorm"
    # Inside an MoE block:
    router_name: str = "gate"
    experts_name: str = "experts"
    shared_names: tuple[str, ...] = ()  # e.g. ("shared_expert",) or ("shared_experts",)
    shared_gate_name: str | None = None  # Qwen2-MoE's sigmoid gate on the shared expert
    router_scoring: str = "softmax"  # how router logits become expert scores: "softmax" or "sigmoid" (DeepSeek-V3)
    # Inside a dense MLP or a shared expert: the module whose output is the MLP's output.
    down_proj_name: str = "down_proj"
    # ModuleList layout: how experts are chosen from router logits.
    norm_topk_prob_attr: str | None = "norm_topk_prob"
    top_k_attr: str = "num_experts_per_tok"

    registry: ClassVar[dict[str, "Adapter"]] = {}

    def prepare(self, model: nn.Module) -> None:
        """Bring a loaded model to the contract the workbench reads (module docstring), in place; called
        by :func:`adapter_for` on every model it serves, so it must be idempotent. The default does nothing.

        A family whose MoE block computes what the contract describes but splits it differently (DBRX: the
        routing inside the block, the experts' weights stored per row) swaps its modules' classes for
        subclasses that keep every parameter (so ``state_dict`` and ``save_pretrained`` are unchanged) and
        compute the same numbers through the contract's calls; the family coverage test checks it
        (hooked == plain, routing, block rebuilt). Such a subclass sets ``_contract = True`` so that
        :meth:`unprepare` can undo it.
        """

    def unprepare(self, model: nn.Module) -> None:
        """Undo :meth:`prepare`, in place: every module of a contract subclass (``_contract``) gets its class back.
        For code that walks the module tree by attribute and expects transformers' own modules (its weight
        loader, TransformerLens' bridge): a contract layer may answer an attribute with another module."""
        for m in model.modules():
            if type(m).__dict__.get("_contract"):
                m.__class__ = type(m).__bases__[0]

    @contextlib.contextmanager
    def unprepared(self, model: nn.Module):
        """:meth:`unprepare` for the block, :meth:`prepare` after it."""
        self.unprepare(model)
        try:
            yield model
        finally:
            self.prepare(model)

    # ----- structure -------------------------------------------------------------------------
    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        layers = get_path(model, self.layers_path)
        if layers is None:
            raise WorkbenchError(f"{self.name} adapter: model has no '{self.layers_path}'")
        return layers

    def attention(self, layer: nn.Module) -> nn.Module:
        """The layer's softmax attention; a hybrid model's linear-attention layers have none (an error)."""
        if not self.has_attention(layer):
            raise WorkbenchError(f"{self.name} adapter: this layer has no softmax attention '{self.attn_name}' "
                                 f"(a {self.mixer_kind(layer)} layer)")
        return get_path(layer, self.attn_name)

    def has_attention(self, layer: nn.Module) -> bool:
        attn = get_path(layer, self.attn_name)
        return attn is not None and not any(c in type(attn).__name__ for c in self.linear_attn_classes)

    def mixer(self, layer: nn.Module) -> nn.Module:
        """The layer's token mixer: its attention, or a hybrid model's linear attention / state-space module
        (what the ``attn_out`` site reads: the mixer's contribution to the residual stream)."""
        for name in (self.attn_name, *self.linear_attn_names):
            mod = get_path(layer, name)
            if mod is not None:
                return mod
        raise WorkbenchError(f"{self.name} adapter: layer has no token mixer among "
                             f"{', '.join((self.attn_name, *self.linear_attn_names))}")

    def mixer_kind(self, layer: nn.Module) -> str:
        if self.has_attention(layer):
            return "attention"
        attn = get_path(layer, self.attn_name)
        if attn is not None:
            return type(attn).__name__
        return next((n for n in self.linear_attn_names if get_path(layer, n) is not None), "mixer-less")

    def mlp(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.mlp_name)

    def norms(self, layer: nn.Module) -> dict[str, nn.Module]:
        out = {}
        for key, name in (("input", self.input_norm_name), ("post_attention", self.post_attn_norm_name)):
            mod = get_path(layer, name)
            if mod is not None:
                out[key] = mod
        return out

    def lm_head(self, model: nn.Module) -> nn.Module:
        return get_path(model, self.lm_head_path)

    def body(self, model: nn.Module) -> nn.Module:
        """The decoder stack without the LM head (the module holding ``layers_path``), else the model.

        Passes that read only activations run this: no statistic needs the logits, and the head is a
        large share of a small model's compute (SmolLM2: a 576 x 49152 matmul per token).
        """
        parent = self.layers_path.rpartition(".")[0]
        body = get_path(model, parent) if parent else None
        return body if isinstance(body, nn.Module) else model

    def embedding(self, model: nn.Module) -> nn.Module:
        return get_path(model, self.embed_path)

    def router(self, layer: nn.Module) -> nn.Module | None:
        return getattr(self.mlp(layer), self.router_name, None)

    def experts(self, layer: nn.Module) -> nn.Module | None:
        mlp = self.mlp(layer)
        if getattr(mlp, self.router_name, None) is None:
            return None
        return getattr(mlp, self.experts_name, None)

    def shared_experts(self, layer: nn.Module) -> list[nn.Module]:
        mlp = self.mlp(layer)
        return [m for m in (getattr(mlp, n, None) for n in self.shared_names) if m is not None]

    def dense_down_proj(self, layer: nn.Module) -> nn.Module:
        return getattr(self.mlp(layer), self.down_proj_name)

    def shared_down_proj(self, shared: nn.Module) -> nn.Module:
        return getattr(shared, self.down_proj_name)

    def layer_info(self, model: nn.Module, index: int) -> LayerInfo:
        layer = self.decoder_layers(model)[index]
        experts = self.experts(layer)
        if experts is None:
            return LayerInfo(index, "dense", 1, 0, 1, "dense")
        if isinstance(experts, nn.ModuleList):
            layout, n = "modulelist", len(experts)
        elif hasattr(experts, "gate_up_proj") and hasattr(experts, "down_proj"):
            layout, n = "fused", int(experts.down_proj.shape[0])
        else:
            raise WorkbenchError(
                f"{self.name} adapter: layer {index} has experts of type {type(experts).__name__}, "
                "which is neither fused (gate_up_proj/down_proj) nor an nn.ModuleList"
            )
        return LayerInfo(index, "moe", n, len(self.shared_experts(layer)), self.top_k(model), layout)

    def layer_infos(self, model: nn.Module) -> list[LayerInfo]:
        return [self.layer_info(model, i) for i in range(len(self.decoder_layers(model)))]

    def top_k(self, model: nn.Module) -> int:
        k = getattr(model.config, self.top_k_attr, None)
        return 1 if k is None else int(k)  # 0 stays 0: the model routes nothing, and load() refuses it

    # ----- routing ------------------------------------------------------------------------------
    def select_experts(self, model: nn.Module, logits: torch.Tensor, router: nn.Module | None = None,
                       exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Route as the family does: softmax, top-k, optional renormalisation (Qwen, OLMoE).

        ``exclude`` ([tokens, experts] bool, optional) removes experts from the choice before
        routing, so the remaining ones are renormalised exactly as the architecture would.
        Used for the ModuleList layout and for interventions that re-route.
        """
        if exclude is not None:
            logits = logits.masked_fill(exclude, float("-inf"))
        probs = torch.softmax(logits, dim=-1, dtype=torch.float)
        weights, index = torch.topk(probs, self.top_k(model), dim=-1)
        if self.norm_topk_prob_attr and getattr(model.config, self.norm_topk_prob_attr, False):
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(logits.dtype), index


def register_adapter(adapter: Adapter) -> Adapter:
    """Register ``adapter`` for each of its ``model_types``. Returns it, so it can be a module constant."""
    for mt in adapter.model_types:
        if mt in Adapter.registry and Adapter.registry[mt] is not adapter:
            raise ValueError(f"model_type {mt!r} is already served by adapter {Adapter.registry[mt].name!r}")
        Adapter.registry[mt] = adapter
    return adapter


def supported_model_types() -> list[str]:
    _load_builtin_adapters()
    return sorted(Adapter.registry)


def adapter_for(model_or_type: nn.Module | str) -> Adapter:
    """The adapter for a model (by ``config.model_type``) or a model_type string.

    A model of an undeclared dense family gets an adapter read from its module tree and verified on
    one forward (:func:`workbench.adapters.infer.infer_adapter`).
    """
    _load_builtin_adapters()
    mt = model_or_type if isinstance(model_or_type, str) else getattr(model_or_type.config, "model_type", None)
    if mt not in Adapter.registry and not isinstance(model_or_type, str):
        from workbench.adapters.infer import infer_adapter

        return infer_adapter(model_or_type)  # read from the module tree and verified, or a one-line error
    if mt not in Adapter.registry:
        raise WorkbenchError(
            f"unsupported architecture {mt!r}; supported model types: {', '.join(sorted(Adapter.registry))}"
        )
    adapter = Adapter.registry[mt]
    if not isinstance(model_or_type, str):
        adapter.prepare(model_or_type)
    return adapter


_LOADED = False


def _load_builtin_adapters() -> None:
    global _LOADED
    if not _LOADED:
        from workbench.adapters import families  # noqa: F401  (registers on import)

        _LOADED = True

