"""Declarative interventions on experts, routers and channels, applied as a context manager.

An :class:`Intervention` is a small serialisable record (dict / JSON / YAML) saying *what* to change;
:func:`apply` installs hooks that do it and removes them on exit, so the model is restored exactly.

Operations (``op``):

* ``zero``   an expert's output (the router still sends tokens to it: the paper's pruning);
* ``scale``  an expert's output by ``factor`` (for routed experts: its routing weight, equivalently; every scale op
  needs its ``factor``, and ``factor``, ``weight``, ``value`` and ``coef`` must be finite);
* ``drop``   an expert from routing: it cannot be chosen, top-k is re-picked and renormalised as the
  architecture does;
* ``force``  an expert into every token's top-k with routing weight ``weight`` (it replaces the
  lowest-weighted choice when not already chosen);
* ``bias``   add ``value`` to an expert's router logit (steering), then route as usual;
* ``zero_channel`` / ``scale_channel``: a residual-stream channel at the output of ``layers``;
* ``zero_neuron`` / ``scale_neuron``: a neuron (``channel``) of a dense MLP, at down_proj's input;
* ``sae_steer``: add ``coef`` x an SAE feature's decoder direction at the SAE's site (``sae``: a folder
  in SAELens' format, ``feature``, ``coef``, optional ``site``; see :mod:`workbench.sae.steer`);
* ``zero_head`` / ``scale_head``: attention heads' outputs (``heads``: their slices of the output
  projection's input), by ``factor``;
* ``mean_qk``: replace chosen dimensions of the queries and/or keys (after RoPE; ``proj``: q, k, qk,
  or v for the values) by their mean over the prompt's tokens, during the prompt's forward (the changed
  keys are what the KV cache keeps), as Jin et al. 2025 disrupt massive values. The dimensions: ``dims``
  (a list, in the model's own head layout), or ``top: N`` / ``bottom: N`` per head and prompt by their
  L2 norm over the prompt's tokens, or ``random: N`` per head from the dims outside each head's top 3
  by norm (drawn with ``seed``: a control of non-massive dims). ``heads`` (query heads; a key head is changed when one of its query heads is
  named) defaults to all. ``keep_first: true`` leaves each prompt's first token as it is and out of the
  mean (the attention-sink control). Rotary-attention models only; through transformers' attention
  interface (:mod:`workbench.tracing.attention_tap`).

``kind`` picks routed (default) or shared experts. ``layers`` is one layer or a list. ``positions``
restricts the change to token positions (negative counts from the end of each prompt, padding
ignored), ``token`` to tokens whose text contains that string, and ``prompts`` to prompt indices
of a runner that numbers its prompts (:meth:`Applied.set_prompts`; ablation studies number their
texts). Outside such a runner a prompt-scoped intervention touches nothing.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from workbench.errors import WorkbenchError
from workbench.hooks import HookSet
from workbench.io import read_structured

EXPERT_OPS = ("zero", "scale", "drop", "force", "bias")
CHANNEL_OPS = ("zero_channel", "scale_channel", "zero_neuron", "scale_neuron")
SAE_OPS = ("sae_steer",)
HEAD_OPS = ("zero_head", "scale_head")
QK_OPS = ("mean_qk",)
OPS = EXPERT_OPS + CHANNEL_OPS + SAE_OPS + HEAD_OPS + QK_OPS
SCALE_OPS = ("scale", "scale_channel", "scale_neuron", "scale_head")  # need a factor (0.0 would silently zero)


def token_texts(tokenizer, token_ids: list[int]) -> list[str]:
    """Each token's text as it reads inside a text, its leading space included: the decode of an anchor token and
    it, less the anchor's. Decoded alone, a SentencePiece token loses its leading space (the decoders of Llama-2,
    Mistral and Mixtral strip a text's first space), so a ``token: " Paris"`` scope would match nothing there."""
    anchor = tokenizer("a", add_special_tokens=False)["input_ids"][-1:] if token_ids else []
    if not anchor:
        return [tokenizer.decode([t]) for t in token_ids]
    head = tokenizer.decode(anchor)
    out = []
    for t in token_ids:
        both = tokenizer.decode(anchor + [t])
        out.append(both[len(head):] if both.startswith(head) else tokenizer.decode([t]))
    return out


@dataclass(frozen=True)
class Intervention:
    op: str
    layers: tuple[int, ...]
    expert: int | None = None
    channel: int | None = None
    kind: str = "routed"  # routed | shared (expert ops)
    factor: float | None = None  # scale ops (required there: 0.0 would silently zero)
    weight: float = 1.0  # force
    value: float = 0.0  # bias
    positions: tuple[int, ...] | None = None
    token: str | None = None
    prompts: tuple[int, ...] | None = None  # prompt indices, where the runner numbers its prompts
    sae: str | None = None  # sae_steer: SAE folder, feature index, coefficient, site key (default: the SAE's)
    feature: int | None = None
    coef: float = 0.0
    site: str | None = None
    heads: tuple[int, ...] | None = None  # head ops, mean_qk (query heads)
    dims: tuple[int, ...] | None = None  # mean_qk: head dimensions, or ...
    top: int | None = None  # ... the N largest by norm, or ...
    bottom: int | None = None  # ... the N smallest
    random: int | None = None  # ... or N random ones outside the head's top 3, or ...
    matched: int | None = None  # ... the highest-frequency rotary dims whose mean-ablation changes as much as the top N's
    seed: int = 0  # mean_qk random dims
    proj: str = "qk"  # mean_qk: q, k, qk or v
    keep_first: bool = False  # mean_qk: each prompt's first token untouched and out of the mean

    def __post_init__(self) -> None:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name, v in _checked(fields, "intervention").items():
            object.__setattr__(self, name, v)

    @classmethod
    def from_dict(cls, d: dict, where: str = "intervention") -> "Intervention":
        if not isinstance(d, dict):
            raise WorkbenchError(f"{where}: expected a mapping, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)} | {"layer", "head"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise WorkbenchError(f"{where}: unknown field {unknown[0]!r}; known: {', '.join(sorted(known))}")
        d = dict(d)
        if "layer" in d:
            d["layers"] = d.pop("layer")
        if "head" in d:
            d["heads"] = d.pop("head")
        if "op" not in d or d["op"] not in OPS:
            raise WorkbenchError(f"{where}: field 'op' must be one of {', '.join(OPS)}, got {d.get('op')!r}")
        if d["op"] in SAE_OPS:
            from workbench.sae.steer import complete

            d = complete(d, where)
        if "layers" not in d:
            raise WorkbenchError(f"{where}: field 'layers' is required")
        unused = sorted(set(d) - _uses(d["op"]))
        if unused:  # a field the op never reads (`{op: zero, factor: 2}` zeroes): maybe a slip, so said (a warning:
            # `{op: zero_channel, factor: 0}` is harmless and old files may hold such fields)
            warnings.warn(f"{where}: field {unused[0]!r} does not apply to op {d['op']!r} and is ignored (it reads "
                          f"{', '.join(sorted(_uses(d['op']) - {'op', 'layers'}))})", stacklevel=2)
            d = {k: v for k, v in d.items() if k not in unused}
        defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
        return cls(**_checked({**defaults, **d}, where))

    def to_dict(self) -> dict:
        out = {"op": self.op, "layers": list(self.layers)}
        for f in dataclasses.fields(self):
            if f.name in ("op", "layers"):
                continue
            v = getattr(self, f.name)
            if v != f.default or (f.name == "factor" and self.op in SCALE_OPS):  # required: written
                out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    def validate(self, lm, where: str = "intervention") -> None:
        """Check layer / expert / channel indices against the model; raise a one-line error naming the field."""
        if self.op in SAE_OPS:
            from workbench.sae.steer import validate

            return validate(lm, self, where)
        infos = lm.layer_infos()
        hidden = int(lm.config.hidden_size)
        for layer in self.layers:
            if not 0 <= layer < len(infos):
                raise WorkbenchError(f"{where}: field 'layers': layer {layer} out of range (model has {len(infos)})")
            info = infos[layer]
            if self.op in HEAD_OPS + QK_OPS:
                _attention_layout(lm, layer, self, where)
                continue
            if self.op in EXPERT_OPS:
                if info.kind != "moe":
                    raise WorkbenchError(f"{where}: field 'layers': layer {layer} is dense and has no experts")
                limit = info.num_experts if self.kind == "routed" else info.num_shared
                if not limit:
                    raise WorkbenchError(f"{where}: field 'kind': layer {layer} has no shared experts")
                if not 0 <= self.expert < limit:
                    raise WorkbenchError(f"{where}: field 'expert': {self.kind} expert {self.expert} out of range "
                                         f"(layer {layer} has {limit})")
            elif self.op in ("zero_neuron", "scale_neuron"):
                if info.kind != "dense":
                    raise WorkbenchError(f"{where}: op {self.op!r} needs a dense MLP layer; layer {layer} is MoE")
                inter = lm.adapter.dense_down_proj(lm.adapter.decoder_layers(lm.model)[layer]).weight
                size = inter.shape[1] if inter.shape[0] == hidden else inter.shape[0]
                if not 0 <= self.channel < size:
                    raise WorkbenchError(f"{where}: field 'channel': neuron {self.channel} out of range ({size})")
            elif not 0 <= self.channel < hidden:
                raise WorkbenchError(f"{where}: field 'channel': {self.channel} out of range (hidden size {hidden})")


def _uses(op: str) -> set[str]:
    """The fields ``op`` reads: op, layers, the scopes, and its own."""
    own = (("expert", "kind") if op in EXPERT_OPS else ("channel",) if op in CHANNEL_OPS else ("heads",)
           if op in HEAD_OPS else ("heads", "dims", "top", "bottom", "random", "matched", "seed", "proj", "keep_first")
           if op in QK_OPS else ("sae", "feature", "coef", "site"))
    extra = {"force": ("weight",), "bias": ("value",)}.get(op, ("factor",) if op in SCALE_OPS else ())
    return {"op", "layers", "positions", "token", "prompts", *own, *extra}


def _is_int(x) -> bool:
    """An integer, as ``layers`` has always taken them: Python or NumPy ints, not bools and not floats (``1.0``)."""
    return isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_))


def _checked(d: dict, where: str) -> dict:
    """Every field of an :class:`Intervention` (``d``: all of them, defaults included) checked and normalised
    (integer lists to tuples of ints); a one-line error naming the field."""
    d = dict(d)
    if d["op"] not in OPS:
        raise WorkbenchError(f"{where}: field 'op' must be one of {', '.join(OPS)}, got {d['op']!r}")
    op = d["op"]
    if op in SCALE_OPS and d["factor"] is None:
        raise WorkbenchError(f"{where}: op {op!r} needs field 'factor' (0 zeroes, 1 leaves as is)")
    for name in ("factor", "weight", "value", "coef"):
        x = d[name]
        if (x is not None or name != "factor") and (not isinstance(x, numbers.Real) or isinstance(x, (bool, np.bool_))
                                                     or not math.isfinite(x)):
            hint = ""
            if isinstance(x, str):
                try:
                    float(x)
                    hint = " (a string: YAML reads a number like 1e30 as text; write 1.0e30)"
                except ValueError:
                    pass
            raise WorkbenchError(f"{where}: field {name!r} must be a finite number, got {x!r}{hint}")
        d[name] = x.item() if isinstance(x, np.generic) else x  # a NumPy float (a table's cell) as a Python one
    layers = d["layers"] if isinstance(d["layers"], (list, tuple)) else [d["layers"]]
    if not layers or not all(_is_int(x) for x in layers):
        raise WorkbenchError(f"{where}: field 'layers' must be an integer or a list of integers")
    twice = next((x for i, x in enumerate(layers) if x in layers[:i]), None)
    if twice is not None:  # each layer would get the op twice (a scale by 2 would scale by 4)
        raise WorkbenchError(f"{where}: field 'layers': layer {twice} is listed twice")
    d["layers"] = tuple(int(x) for x in layers)
    for name in ("positions", "prompts", "heads", "dims"):
        if d[name] is not None:
            vals = d[name] if isinstance(d[name], (list, tuple)) else [d[name]]
            if not all(_is_int(x) for x in vals):
                raise WorkbenchError(f"{where}: field {name!r} must be integers")
            if not vals and name in ("positions", "prompts"):  # a scope of nothing would touch no token
                raise WorkbenchError(f"{where}: field {name!r} is empty: leave it out to touch every {name[:-1]}")
            twice = next((x for i, x in enumerate(vals) if x in vals[:i]), None)
            if twice is not None:  # applied once all the same: a scale of head 1 listed twice would not scale twice
                raise WorkbenchError(f"{where}: field {name!r}: {name.rstrip('s')} {twice} is listed twice")
            d[name] = tuple(int(x) for x in vals)
    for name in ("expert", "channel", "feature"):
        if d[name] is not None and not _is_int(d[name]):
            raise WorkbenchError(f"{where}: field {name!r} must be an integer, got {d[name]!r}")
        d[name] = None if d[name] is None else int(d[name])
    for name in ("top", "bottom", "random", "matched"):
        if d[name] is not None and (not _is_int(d[name]) or d[name] < 1):
            raise WorkbenchError(f"{where}: field {name!r} must be a positive integer")
    if not _is_int(d["seed"]):
        raise WorkbenchError(f"{where}: field 'seed' must be an integer, got {d['seed']!r}")
    if d["token"] is not None and (not isinstance(d["token"], str) or not d["token"]):
        raise WorkbenchError(f"{where}: field 'token' must be a non-empty string (the text a token contains), got "
                             f"{d['token']!r}")
    for name in ("kind", "proj", "sae", "site"):
        if d[name] is not None and not isinstance(d[name], str):
            raise WorkbenchError(f"{where}: field {name!r} must be a string, got {d[name]!r}")
    if not isinstance(d["keep_first"], (bool, np.bool_)):
        raise WorkbenchError(f"{where}: field 'keep_first' must be true or false")
    _check_shape(op, d, where)
    return d


def _check_shape(op: str, d: dict, where: str) -> None:
    """The fields ``op`` needs, and the values they may take."""
    if op in SAE_OPS:  # the rest is checked against the SAE's cfg.json by workbench.sae.steer.complete
        if not d["sae"] or d["feature"] is None:
            raise WorkbenchError(f"{where}: op {op!r} needs fields 'sae' and 'feature'")
        return
    if op in HEAD_OPS:
        if not d["heads"]:
            raise WorkbenchError(f"{where}: op {op!r} needs field 'heads' (or 'head')")
        return
    if op in QK_OPS:
        if d["proj"] not in ("q", "k", "qk", "v"):
            raise WorkbenchError(f"{where}: field 'proj' must be 'q', 'k', 'qk' or 'v', got {d['proj']!r}")
        if sum(d[x] is not None for x in ("dims", "top", "bottom", "random", "matched")) != 1:
            raise WorkbenchError(f"{where}: op 'mean_qk' needs exactly one of 'dims', 'top', 'bottom', 'random' and "
                                 "'matched'")
        if d["matched"] is not None and d["proj"] == "v":
            raise WorkbenchError(f"{where}: field 'matched' picks rotary dims; values are not rotated (proj v)")
        return
    if op in EXPERT_OPS:
        if d["expert"] is None:
            raise WorkbenchError(f"{where}: op {op!r} needs field 'expert'")
        if d["kind"] not in ("routed", "shared"):
            raise WorkbenchError(f"{where}: field 'kind' must be 'routed' or 'shared'")
        if d["kind"] == "shared" and op not in ("zero", "scale"):
            raise WorkbenchError(f"{where}: shared experts support only 'zero' and 'scale'")
    elif d["channel"] is None:
        raise WorkbenchError(f"{where}: op {op!r} needs field 'channel'")


def reaches(positions: Sequence[int], length: int) -> bool:
    """Whether a ``positions`` scope (negative counts from the end) touches any token of a ``length``-token input."""
    return any(-length <= p < length for p in positions)


def check_set(lm, interventions: Sequence[Intervention], where: str = "interventions") -> None:
    """What no single intervention shows: ``drop`` ops that together leave a layer no routed expert to route to
    (the router's scores would all be masked and the block's output NaN), more forces than a layer's top-k, and one
    expert both dropped and forced, per scope (unscoped ops count in every scope)."""
    infos = lm.layer_infos()
    named: dict[str, dict] = {}
    for op in ("drop", "force"):
        groups = named[op] = {}  # scope -> layer -> experts
        for iv in interventions:
            if iv.op == op and iv.kind == "routed":
                scope = (iv.positions, iv.token, iv.prompts)
                for layer in iv.layers:
                    groups.setdefault(scope, {}).setdefault(layer, set()).add(iv.expert)
        everywhere = groups.get((None, None, None), {})
        for scope, layers in groups.items():
            for layer, experts in layers.items():
                n, k, experts = infos[layer].num_experts, infos[layer].top_k, experts | everywhere.get(layer, set())
                if op == "drop" and len(experts) >= n:
                    raise WorkbenchError(f"{where}: drop removes all {n} routed experts of layer {layer}, so no expert "
                                         "is left to route to (zero silences experts without re-routing)")
                if op == "drop" and n - len(experts) < k and scope == (None, None, None):
                    warnings.warn(f"{where}: drop leaves layer {layer} {n - len(experts)} routed expert(s), fewer than "
                                  f"the {k} each token is routed to: the other slot(s) weigh nothing", stacklevel=3)
                if op == "force" and len(experts) > k:
                    listed = ", ".join(map(str, sorted(experts)))
                    raise WorkbenchError(f"{where}: force puts {len(experts)} experts ({listed}) in layer {layer}, "
                                         f"which routes each token to {k}: they cannot all be chosen")
    everywhere = [named[op].get((None, None, None), {}) for op in ("drop", "force")]
    for scope in {*named["drop"], *named["force"]}:  # a drop and a force of one expert where both apply
        dropped, forced = named["drop"].get(scope, {}), named["force"].get(scope, {})
        for layer in sorted({*dropped, *forced}):
            both = ((dropped.get(layer, set()) | everywhere[0].get(layer, set()))
                    & (forced.get(layer, set()) | everywhere[1].get(layer, set())))
            if both:
                raise WorkbenchError(f"{where}: expert {min(both)} of layer {layer} is both dropped and forced; "
                                     "keep one of the two ops")


def _attention_layout(lm, layer: int, iv: Intervention, where: str):
    """Layer ``layer``'s attention module and layout, with ``iv``'s heads and dims checked against it."""
    from workbench.circuits.attention import attention_spec
    from workbench.experts.qk import rotary_frequencies

    ad = lm.adapter
    block = ad.decoder_layers(lm.model)[layer]
    if not ad.has_attention(block):
        raise WorkbenchError(f"{where}: field 'layers': layer {layer} has no softmax attention ({ad.mixer_kind(block)})")
    attn = ad.attention(block)
    try:
        spec = attention_spec(attn, lm.model.config, f"layer {layer}")
    except WorkbenchError as e:  # e.g. Qwen3-Next's gated attention (q_proj twice the heads' width)
        raise WorkbenchError(f"{where}: op {iv.op!r} reads attention heads, and layer {layer}'s attention is not of a "
                             f"layout it knows ({e})") from None
    bad = [h for h in iv.heads or () if not 0 <= h < spec.n_heads]
    if bad:
        raise WorkbenchError(f"{where}: field 'heads': head {bad[0]} out of range (layer {layer} has {spec.n_heads})")
    if iv.op in QK_OPS:
        if rotary_frequencies(lm.model) is None:
            raise WorkbenchError(f"{where}: op 'mean_qk' disrupts rotary dimensions; {type(lm.model).__name__} has no "
                                 "rotary attention")
        from workbench.tracing.attention_tap import untappable

        why = untappable(attn)
        if why:
            raise WorkbenchError(f"{where}: op 'mean_qk' reads queries and keys: {why}")
        qk_dim = spec.head_dim if iv.proj == "v" else int(getattr(attn, "qk_head_dim", 0) or getattr(attn, "head_dim", 0)
                                                            or spec.head_dim)
        bad = [x for x in iv.dims or () if not 0 <= x < qk_dim]
        n = iv.top or iv.bottom or iv.matched or (iv.random + 3 if iv.random else 0)
        if iv.matched is not None and getattr(attn, "qk_rope_head_dim", None):
            raise WorkbenchError(f"{where}: field 'matched' needs the standard rotary layout (rotate_half over the first "
                                 "dims); latent attention keeps its rotary dims apart: use 'dims'")
        if bad or n > qk_dim:
            field = "dims" if bad else "top" if iv.top else "bottom" if iv.bottom else "matched" if iv.matched else "random"
            what = f"dim {bad[0]}" if bad else f"{iv.top or iv.bottom or iv.matched or iv.random} dims"
            raise WorkbenchError(f"{where}: field '{field}': {what} out of range (heads of layer {layer} have {qk_dim}"
                                 + (", 3 of them the top ones left out" if field == "random" else "") + ")")
    return attn, spec


def parse(items: Any, where: str = "interventions") -> list[Intervention]:
    """Interventions from a list of dicts (as read from YAML/JSON)."""
    if isinstance(items, dict):
        items = [items]
    if not isinstance(items, list):
        raise WorkbenchError(f"{where}: expected a list of interventions")
    return [Intervention.from_dict(d, f"{where}[{i}]") for i, d in enumerate(items)]


def load_file(path: str | Path) -> list[Intervention]:
    """Read interventions from a .json or .yaml file (a list, or a mapping with key 'interventions')."""
    data, _ = read_structured(path, "interventions file")
    if isinstance(data, dict) and "interventions" in data:
        data = data["interventions"]
    return parse(data, str(path))


# ----- application -------------------------------------------------------------------------------
class _Tokens:
    """The current forward pass's token ids [B, t] and attention mask [B, T >= t] (t < T with a KV cache)."""

    def __init__(self):
        self.ids: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None


# The sets applied to each model now, outermost first. Nested sets compose exactly as one list, outer set first:
# where one set's hooks would undo another's (re-routing from the router's own logits drops an outer set's
# drop/bias/force; a ModuleList block's correction is computed from one routing), the first set that hooks the
# stage computes it for every active set (see Applied._lead); the other hooks compose by stacking.
_ACTIVE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class Applied(HookSet):
    """Hooks for a set of interventions; use as a context manager (see :func:`apply`). Nested in another set on the
    same model, it applies as the combined list (the outer set's interventions first)."""

    def __init__(self, lm, interventions: Sequence[Intervention]):
        super().__init__()
        self.lm = lm
        self.interventions = list(interventions)
        for i, iv in enumerate(self.interventions):
            iv.validate(lm, f"intervention {i}")
        check_set(lm, self.interventions)
        self._tokens = _Tokens()
        self._decoded: dict[int, str] = {}
        self._prompts: torch.Tensor | None = None
        self._stages: set[tuple[str, int]] = set()  # (stage, layer) hooked here that compute for every active set
        self._touched: dict[int, bool] = {}  # id of a scoped intervention -> whether its scope took any token yet

    def set_prompts(self, indices: Sequence[int] | None) -> None:
        """The prompt index of each row of the coming batches (None: not a numbered pass)."""
        self._prompts = None if indices is None else torch.as_tensor(list(indices), dtype=torch.int64)

    # ----- scope -------------------------------------------------------------------------------
    @staticmethod
    def _scoped(iv: Intervention) -> bool:
        return iv.positions is not None or iv.token is not None or iv.prompts is not None

    def _scope(self, iv: Intervention, rows: int) -> torch.Tensor | None:
        """[rows] bool mask of the tokens this intervention touches (None: all)."""
        if not self._scoped(iv):
            return None
        ids = self._tokens.ids
        if ids is None or ids.numel() != rows:
            raise RuntimeError("intervention scope needs the token ids of the current forward pass")
        b, t = ids.shape
        full = self._tokens.mask
        if full is None or full.shape[0] != b or full.shape[1] < t:
            full = torch.ones(b, t, dtype=torch.bool, device=ids.device)
        full = full.bool()
        keep = full[:, -t:].clone()  # the current tokens are the last t columns
        if iv.positions is not None:
            lengths = full.sum(-1, keepdim=True)
            # a token's position counts the real tokens before it: padding may sit between a cached prompt and
            # the tokens that continue it (workbench.tasks.option_logprobs), not only at the end
            pos = (full.cumsum(-1) - 1)[:, -t:]
            hit = torch.zeros_like(keep)
            for p in iv.positions:
                hit |= pos == (p if p >= 0 else lengths + p)
            keep &= hit
        if iv.prompts is not None:
            if self._prompts is not None and self._prompts.numel() != b:
                raise WorkbenchError(f"set_prompts gave {self._prompts.numel()} prompt indices for a batch of {b} rows")
            if self._prompts is None:
                keep &= False
            else:
                chosen = torch.isin(self._prompts, torch.tensor(iv.prompts)).to(keep.device)
                keep &= chosen[:, None]
        if iv.token is not None:
            new = [v for v in ids.unique().tolist() if v not in self._decoded]
            self._decoded.update(zip(new, token_texts(self.lm.tokenizer, new)))
            match = torch.tensor([iv.token in self._decoded[v] for v in ids.flatten().tolist()], device=ids.device)
            keep &= match.view(b, t)
        if not self._touched.get(id(iv)):
            self._touched[id(iv)] = bool(keep.any())
        return keep.reshape(-1)

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        if exc[0] is None:
            self._say_untouched()

    def _say_untouched(self) -> None:
        """Warn of each scoped intervention whose scope took no token in any pass it was asked about (a ``token``
        no prompt contains, a ``prompts`` list of other prompts): it changed nothing, which a table of metrics
        equal to the baseline's would not say."""
        for i, iv in enumerate(self.interventions):
            if self._touched.get(id(iv)) is False:
                scope = ", ".join(f"{k} {getattr(iv, k)!r}" for k in ("token", "positions", "prompts")
                                  if getattr(iv, k) is not None)
                warnings.warn(f"intervention {i} ({iv.op} at layers {list(iv.layers)}): its scope ({scope}) took no "
                              "token in this run, so it changed nothing", stacklevel=3)
        self._touched.clear()

    def remove(self) -> None:
        super().remove()
        active = _ACTIVE.get(self.lm.model, [])
        if self in active:
            active.remove(self)

    def _lead(self, stage: str, layer: int, want) -> list[tuple["Applied", Intervention]] | None:
        """None unless this set is the first active one that hooks ``stage`` at ``layer`` (the others' hooks of the
        stage pass); then the interventions ``want`` picks at ``layer`` of every active set, outer sets first, each
        with its set (whose tokens and prompts scope it)."""
        active = _ACTIVE.get(self.lm.model, [])
        if next((a for a in active if (stage, layer) in a._stages), None) is not self:
            return None
        return [(a, iv) for a in active for iv in a.interventions if layer in iv.layers and want(iv)]

    # ----- install -------------------------------------------------------------------------------
    def _install(self) -> None:
        ad, model = self.lm.adapter, self.lm.model
        active = _ACTIVE.setdefault(model, [])
        if active:  # what no set shows alone: drops of nested sets that together empty a layer
            check_set(self.lm, [iv for a in active for iv in a.interventions] + self.interventions,
                      "interventions (with the enclosing apply's)")
        active.append(self)
        self._stages.clear()

        def read_ids(mod, args, kwargs):
            ids = self._tokens.ids = args[0] if args else kwargs.get("input_ids")
            mask = kwargs.get("attention_mask")
            past = kwargs.get("past_key_values")
            if mask is None and past is not None and isinstance(ids, torch.Tensor) and hasattr(past, "get_seq_length"):
                # a cached step without a mask (a hand-written decoding loop): its tokens follow the cached ones,
                # all real; positions counted the new token as position 0
                seen = int(past.get_seq_length())
                if seen:
                    mask = torch.ones(ids.shape[0], seen + ids.shape[1], dtype=torch.long, device=ids.device)
            self._tokens.mask = mask
        self._hook(model, read_ids, pre=True)
        body = ad.body(model)
        if body is not model:  # passes that skip the LM head (traces, profiles) call the body
            self._hook(body, read_ids, pre=True)
        layers = ad.decoder_layers(model)
        by_layer: dict[int, list[Intervention]] = {}
        for iv in self.interventions:
            for layer in iv.layers:
                by_layer.setdefault(layer, []).append(iv)
        for idx, ivs in sorted(by_layer.items()):
            layer, info = layers[idx], self.lm.layer_infos()[idx]
            routing = [iv for iv in ivs if iv.op in ("drop", "force", "bias")]
            weighting = [iv for iv in ivs if iv.op in ("zero", "scale") and iv.kind == "routed"]
            if routing:
                self._install_routing(idx, layer, info, routing)
            if info.layout == "modulelist":  # force and scoped zero/scale: a correction of the block's output
                delta = [iv for iv in ivs if iv.op == "force" or (iv in weighting and self._scoped(iv))]
                weighting = [iv for iv in weighting if iv not in delta]
                if delta:
                    self._install_modulelist_delta(idx, layer)
            if weighting:
                self._install_weighting(layer, info, weighting)
            for iv in ivs:
                if iv.op in ("zero", "scale") and iv.kind == "shared":
                    self._install_output_scale(ad.shared_experts(layer)[iv.expert], iv)
                elif iv.op in ("zero_channel", "scale_channel"):
                    self._install_channel(layer, iv)
                elif iv.op in ("zero_neuron", "scale_neuron"):
                    self._install_neuron(ad.dense_down_proj(layer), iv)
                elif iv.op in SAE_OPS:
                    from workbench.sae.steer import install

                    install(self, iv)
                elif iv.op in HEAD_OPS:
                    self._install_heads(idx, iv)
                elif iv.op in QK_OPS:
                    self._install_mean_qk(idx, iv)

    def _install_routing(self, idx: int, layer, info, ivs: list[Intervention]) -> None:
        ad, model = self.lm.adapter, self.lm.model
        router = ad.router(layer)

        if info.layout == "fused":
            self._stages.add(("route", idx))

            def hook(mod, args, kwargs, out):
                pairs = self._lead("route", idx, lambda iv: iv.op in ("drop", "force", "bias"))
                if pairs is None:
                    return None
                logits = out[0]
                new_logits, exclude = _adjust_logits(pairs, logits)
                if exclude is None and not any(iv.op == "bias" for _, iv in pairs):
                    weights, index = out[1], out[2]
                else:
                    weights, index = ad.select_experts(model, new_logits, router, exclude=exclude)
                weights, index = _force(pairs, weights, index)
                return (logits, weights.to(out[1].dtype), index)
        else:  # ModuleList: the block routes from the gate's logits itself (nested sets' masks and biases stack)
            def hook(mod, args, kwargs, out):
                logits, exclude = _adjust_logits([(self, iv) for iv in ivs], out)
                return logits if exclude is None else logits.masked_fill(exclude, float("-inf"))
        self._hook(router, hook)

    def _install_modulelist_delta(self, idx: int, layer) -> None:
        """``force`` and scoped ``zero``/``scale`` on a ModuleList block, which routes inside its forward.

        The block runs unchanged; its output is then corrected by the (token, slot) pairs whose expert
        or weight the interventions change: minus what they contributed, plus what they contribute now
        (the experts are run again on those tokens only). Equal to the fused layout's result up to
        float rounding (tested against the same weights in the fused layout).
        """
        ad, model = self.lm.adapter, self.lm.model
        block, router, experts = ad.mlp(layer), ad.router(layer), ad.experts(layer)
        seen: dict[str, torch.Tensor] = {}
        self._stages.add(("delta", idx))

        def record(mod, args, kwargs, out):  # the gate's own logits, before any set's drop/bias hook
            seen["logits"] = out[0] if isinstance(out, tuple) else out
        self._hook(router, record, prepend=True)

        def hook(mod, args, kwargs, out):
            raw = seen.pop("logits")
            pairs = self._lead("delta", idx, lambda iv: iv.op == "force" or (
                iv.op in ("zero", "scale") and iv.kind == "routed" and self._scoped(iv)))
            if pairs is None:
                return None
            hs = out[0] if isinstance(out, tuple) else out
            x = args[0] if args else kwargs["hidden_states"]
            x = x.reshape(-1, x.shape[-1])
            # the logits the block routed from: every active set's drop/bias, as their gate hooks applied them
            routing = [(a, iv) for a in _ACTIVE.get(model, []) for iv in a.interventions
                       if idx in iv.layers and iv.op in ("drop", "bias")]
            logits, exclude = _adjust_logits(routing, raw)
            logits = logits if exclude is None else logits.masked_fill(exclude, float("-inf"))
            weights, index = ad.select_experts(model, logits.reshape(-1, logits.shape[-1]), router)
            new_w, new_i = _force([p for p in pairs if p[1].op == "force"], weights, index)
            new_w = _reweight([p for p in pairs if p[1].op != "force"], new_w, new_i)
            tok, slot = torch.nonzero((new_i != index) | (new_w != weights), as_tuple=True)
            if tok.numel() == 0:
                return out
            delta = torch.zeros_like(x)
            old_e, new_e = index[tok, slot], new_i[tok, slot]
            for e in torch.unique(torch.cat([old_e, new_e])).tolist():
                for which, w, sign in ((old_e, weights, -1.0), (new_e, new_w, 1.0)):
                    m = which == e
                    if m.any():
                        t = tok[m]
                        delta.index_add_(0, t, experts[e](x[t]) * (sign * w[t, slot[m], None]).to(x.dtype))
            hs = hs + delta.view(hs.shape)
            return (hs, *out[1:]) if isinstance(out, tuple) else hs
        self._hook(block, hook)

    def _install_weighting(self, layer, info, ivs: list[Intervention]) -> None:
        ad = self.lm.adapter
        if info.layout == "fused":
            def pre(mod, args, kwargs):
                args, kwargs = list(args), dict(kwargs)
                get = lambda i, k: args[i] if len(args) > i else kwargs[k]  # noqa: E731
                index = get(1, "top_k_index")
                weights = _reweight([(self, iv) for iv in ivs], get(2, "top_k_weights"), index)
                if len(args) > 2:
                    args[2] = weights
                else:
                    kwargs["top_k_weights"] = weights
                return tuple(args), kwargs
            self._hook(ad.experts(layer), pre, pre=True)
        else:
            for iv in ivs:
                self._install_output_scale(ad.experts(layer)[iv.expert], iv)

    def _install_output_scale(self, module: nn.Module, iv: Intervention) -> None:
        f = 0.0 if iv.op == "zero" else iv.factor

        def hook(mod, args, kwargs, out):
            flat = out.reshape(-1, out.shape[-1])
            scope = self._scope(iv, flat.shape[0])
            if scope is None:
                return out * f
            return torch.where(scope[:, None], flat * f, flat).reshape(out.shape)
        self._hook(module, hook)

    def _install_channel(self, layer: nn.Module, iv: Intervention) -> None:
        f = 0.0 if iv.op == "zero_channel" else iv.factor

        def hook(mod, args, kwargs, out):
            hs = out[0] if isinstance(out, tuple) else out
            hs = hs.clone()
            flat = hs.view(-1, hs.shape[-1])
            scope = self._scope(iv, flat.shape[0])
            rows = slice(None) if scope is None else scope
            flat[rows, iv.channel] *= f
            return (hs, *out[1:]) if isinstance(out, tuple) else hs
        self._hook(layer, hook)

    def _install_neuron(self, down_proj: nn.Module, iv: Intervention) -> None:
        f = 0.0 if iv.op == "zero_neuron" else iv.factor

        def pre(mod, args, kwargs):
            x = (args[0] if args else kwargs["input"]).clone()
            flat = x.view(-1, x.shape[-1])
            scope = self._scope(iv, flat.shape[0])
            rows = slice(None) if scope is None else scope
            flat[rows, iv.channel] *= f
            return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "input": x})
        self._hook(down_proj, pre, pre=True)


    def _install_heads(self, layer: int, iv: Intervention) -> None:
        """``zero_head`` / ``scale_head``: the heads' slices of the output projection's input."""
        from workbench.circuits.attention import out_proj

        attn, spec = _attention_layout(self.lm, layer, iv, "intervention")
        f = 0.0 if iv.op == "zero_head" else iv.factor
        cols = torch.cat([torch.arange(h * spec.head_dim, (h + 1) * spec.head_dim) for h in iv.heads])

        def pre(mod, args, kwargs):
            z = (args[0] if args else kwargs["input"]).clone()
            flat = z.view(-1, z.shape[-1])
            scope = self._scope(iv, flat.shape[0])
            c = cols.to(z.device)
            if scope is None:
                flat[:, c] *= f
            else:
                rows = scope.nonzero().flatten()
                flat[rows[:, None], c[None, :]] *= f
            return ((z, *args[1:]), kwargs) if args else (args, {**kwargs, "input": z})
        self._hook(out_proj(attn, spec), pre, pre=True)

    def _install_mean_qk(self, layer: int, iv: Intervention) -> None:
        """``mean_qk``: a tap on the layer's attention call (see :func:`mean_qk`)."""
        from workbench.tracing.attention_tap import AttentionTap

        attn, _ = _attention_layout(self.lm, layer, iv, "intervention")
        order = rec = None
        if iv.matched is not None:  # rotary dims from the highest frequency down: pair p is dims p and p + rot / 2
            from workbench.experts.qk import rotary_frequencies
            from workbench.experts.rope import RopeRecorder

            half = int(rotary_frequencies(self.lm.model).numel())
            order = torch.tensor([d for p in range(half) for d in (p, p + half)])
            # ... in rotate_half's layout; the layer's own rotation, read as it runs (interleaved pairs in GLM,
            # Cohere, Helium, ERNIE; none in a NoPE layer), replaces that guess where it is read
            rec = RopeRecorder(self.lm.model, {layer: attn}).install()
            self._handles.append(rec)

        def tap(module, q, k, v):
            nonlocal order, rec
            B, T = q.shape[0], q.shape[2]
            if rec is not None:  # until the layer's rotation is read (its first call at positions 0 and 1)
                rec.attention_ran(layer, q.shape[-1])
                lay = rec.layouts.get(layer)
                if lay is not None and not lay.rotated:
                    raise WorkbenchError(f"intervention: op 'mean_qk' with 'matched' picks rotary dims; layer {layer} "
                                         "is not rotated (a NoPE layer): use 'dims', 'top' or 'random'")
                if lay is not None:
                    order, rec = torch.tensor(lay.by_frequency()), None
            if k.shape[2] != T:  # a cached generation step: the prompt's keys were changed when it ran
                return None
            mask = self._tokens.mask
            valid = (mask[:, -T:].bool() if mask is not None and mask.shape[0] == B and mask.shape[1] >= T
                     else torch.ones(B, T, dtype=torch.bool, device=q.device)).to(q.device)
            scope = self._scope(iv, B * T)
            replace = valid if scope is None else valid & scope.view(B, T).to(q.device)
            mean_qk(q, k, iv, valid, replace, v, order=order)
            return q, k, v
        t = AttentionTap(self.lm.model, {attn: tap})
        t.install()
        self._handles.append(t)


def _adjust_logits(pairs: list[tuple[Applied, Intervention]], logits: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Router logits after the ``bias`` ops of ``pairs`` (each scoped by its set), and the mask of the ``drop`` ops
    (None: none)."""
    logits = logits.clone()
    exclude = None
    for owner, iv in pairs:
        scope = owner._scope(iv, logits.shape[0])
        rows = slice(None) if scope is None else scope
        if iv.op == "bias":
            logits[rows, iv.expert] += iv.value
        elif iv.op == "drop":
            if exclude is None:
                exclude = torch.zeros_like(logits, dtype=torch.bool)
            exclude[rows, iv.expert] = True
    return logits, exclude


def _force(pairs: list[tuple[Applied, Intervention]], weights: torch.Tensor, index: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Put each ``force`` expert in the top-k with its weight (in place of the lowest-weighted choice that no earlier
    force holds: two forces keep both experts, in either order)."""
    held = None  # [tokens, k] slots an earlier force set
    for owner, iv in pairs:
        if iv.op != "force":
            continue
        weights, index = weights.clone(), index.clone()
        held = torch.zeros_like(index, dtype=torch.bool) if held is None else held
        scope = owner._scope(iv, index.shape[0])
        chosen = (index == iv.expert).any(-1)
        last = weights.masked_fill(held, float("inf")).argmin(-1)  # the lowest-weighted free choice makes room
        rows = torch.arange(index.shape[0], device=index.device)
        slot = torch.where(chosen, (index == iv.expert).int().argmax(-1), last)
        on = torch.ones_like(chosen) if scope is None else scope
        index[rows[on], slot[on]] = iv.expert
        weights[rows[on], slot[on]] = iv.weight
        held[rows[on], slot[on]] = True
    return weights, index


def _reweight(pairs: list[tuple[Applied, Intervention]], weights: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Routing weights after ``zero`` / ``scale`` of routed experts (within each one's scope)."""
    for owner, iv in pairs:
        scope = owner._scope(iv, index.shape[0])
        hit = index == iv.expert
        if scope is not None:
            hit &= scope[:, None]
        weights = torch.where(hit, weights * (0.0 if iv.op == "zero" else iv.factor), weights)
    return weights


def mean_qk(q: torch.Tensor, k: torch.Tensor, iv: Intervention, valid: torch.Tensor, replace: torch.Tensor,
            v: torch.Tensor | None = None, order: torch.Tensor | None = None) -> None:
    """In place: the chosen dims of the chosen heads of ``q [B, H, T, d]`` / ``k [B, KV, T, d]`` at tokens
    ``replace [B, T]`` become their mean over the tokens ``valid [B, T]`` (each prompt's first real token out
    of both with ``keep_first``); ``top`` / ``bottom`` pick dims per prompt and head by their L2 norm over
    those tokens. ``matched: N`` (a size-matched control): the size of mean-ablating a dim is the squared
    change it makes, sum over replaced tokens of (x - mean)^2; per prompt and head, dims are taken in
    ``order`` (rotary dims, highest frequency first), skipping the top N by norm, until their summed size
    reaches the top N's (all of them if it never does)."""
    B, H, T, _ = q.shape
    use, replace = valid.clone(), replace.clone()
    if iv.keep_first:
        first = valid.to(torch.int8).argmax(-1)
        rows = torch.arange(B, device=valid.device)
        use[rows, first] = False
        replace[rows, first] = False
    group = H // k.shape[1]
    for name, x in (("q", q), ("k", k), ("v", v)):
        if name not in iv.proj:
            continue
        heads = range(x.shape[1]) if iv.heads is None else sorted({h if name == "q" else h // group for h in iv.heads})
        hs = torch.tensor(list(heads), device=x.device)
        xs = x[:, hs]  # [B, h, T, d] (a copy)
        d = x.shape[-1]
        w = use[:, None, :, None].to(x.dtype)
        mean = (xs * w).sum(2, keepdim=True) / w.sum(2, keepdim=True).clamp(min=1)
        sel = torch.zeros(B, len(hs), d, dtype=torch.bool, device=x.device)
        if iv.dims is not None:
            sel[:, :, list(iv.dims)] = True
        else:
            norms = (xs.float().square() * w.float()).sum(2)  # [B, h, d]
            if iv.random is not None:  # N random dims per (prompt, head) outside its 3 largest
                order = norms.argsort(dim=-1, descending=True)[..., 3:]
                g = torch.Generator().manual_seed(iv.seed)
                pick = torch.rand(order.shape, generator=g).argsort(-1)[..., :iv.random].to(order.device)
                sel.scatter_(-1, order.gather(-1, pick), True)
            elif iv.matched is not None:
                top = torch.zeros_like(sel).scatter_(-1, norms.topk(iv.matched, dim=-1).indices, True)
                r = replace[:, None, :, None].to(torch.float32)
                size = ((xs.float() - mean.float()).square() * r).sum(2)  # [B, h, d]
                target = (size * top).sum(-1, keepdim=True)
                o = order.to(x.device)
                cand = size[..., o] * ~top[..., o]  # candidate sizes in frequency order, top dims at 0
                before = cand.cumsum(-1) - cand  # size taken before each candidate
                take = (before < target) & ~top[..., o]
                sel[..., o] = take
            else:
                n = iv.top or iv.bottom
                sel.scatter_(-1, norms.topk(n, dim=-1, largest=iv.top is not None).indices, True)
        m = sel[:, :, None, :] & replace[:, None, :, None]
        x[:, hs] = torch.where(m, mean.expand_as(xs), xs)


def apply(lm, interventions: Iterable[Intervention | dict] | Intervention | dict) -> Applied:
    """``with apply(lm, [...]):`` run the model with the interventions (a list, or one of them); leaving restores it
    exactly. Nested in another ``apply`` on the same model, it runs the two as one list, the outer's first."""
    if isinstance(interventions, (dict, Intervention)):
        interventions = [interventions]
    if isinstance(interventions, (str, bytes)) or not isinstance(interventions, Iterable):
        raise WorkbenchError(f"interventions: expected a list of interventions, got {type(interventions).__name__}")
    ivs = [iv if isinstance(iv, Intervention) else Intervention.from_dict(iv, f"intervention {i}")
           for i, iv in enumerate(interventions)]
    return Applied(lm, ivs)
