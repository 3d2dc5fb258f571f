"""Hook-based capture: read sites during a forward pass and hand their rows to sinks.

Hooks only read; they never return a value, so a captured forward is bit-identical to a plain one.
Per-expert outputs of fused experts (transformers 5.x keeps no per-expert module) are read from
transformers' own grouped/batched experts forward through its ``post_expert_norm`` slot (see
:meth:`Capture._tap_fused`); with any other experts implementation (``eager``, kernels of other
libraries) they are recomputed from the experts module's own inputs: ``down_proj[e] @ act(gate) * up``
on the tokens routed to e.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from workbench.adapters.base import Adapter, LayerInfo
from workbench.hooks import HookSet
from workbench.tracing.reducers import Payload, Scratch
from workbench.tracing.sites import QKV, Component, Site, validate


class Sink(Protocol):
    def update(self, p: Payload) -> None: ...


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _activate(experts: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """The fused experts' gated activation on the gate_up projection ``h`` (the module's own, if it has one)."""
    if hasattr(experts, "_apply_gate"):  # e.g. GPT-OSS's clamped, interleaved gate
        return experts._apply_gate(h)
    gate, up = h.chunk(2, dim=-1)
    return experts.act_fn(gate) * up


def _transposed(experts: nn.Module) -> bool:
    """Weights stored [E, in, out] (GPT-OSS) rather than [E, out, in]: the module says so (``is_transposed``),
    else the shapes do (gate_up [E, H, 2I] and down [E, I, H] vs gate_up [E, 2I, H] and down [E, H, I])."""
    flag = getattr(experts, "is_transposed", None)
    if flag is not None:
        return bool(flag)
    return experts.gate_up_proj.shape[-1] != experts.down_proj.shape[-2]


def _has_bias(experts: nn.Module) -> bool:
    flag = getattr(experts, "has_bias", None)
    if flag is not None:
        return bool(flag)
    return getattr(experts, "gate_up_proj_bias", None) is not None and getattr(experts, "down_proj_bias", None) is not None


def fused_expert_output(experts: nn.Module, hidden: torch.Tensor, e: int) -> torch.Tensor:
    """One fused expert's down_proj output on ``hidden [n, H]`` (before the routing weight).

    The same layouts as :func:`fused_grouped_output` (transposed weights, biases, a custom gate), with
    one ``F.linear`` per projection, as transformers computes it.
    """
    transposed, bias = _transposed(experts), _has_bias(experts)

    def project(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x @ weight if transposed else F.linear(x, weight)
    h = project(hidden, experts.gate_up_proj[e])
    if bias:
        h = h + experts.gate_up_proj_bias[e]
    out = project(_activate(experts, h), experts.down_proj[e])
    return out + experts.down_proj_bias[e] if bias else out


def _per_group(x: torch.Tensor, counts: torch.Tensor, run) -> torch.Tensor:
    """``run(g, rows)`` on each group's block of rows (rows sorted by group), concatenated."""
    parts, start = [], 0
    for g, n in enumerate(counts.tolist()):
        if n:
            parts.append(run(g, x[start:start + n]))
        start += n
    return torch.cat(parts) if parts else x.new_zeros((0, x.shape[-1]))


def _grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor, transposed: bool) -> torch.Tensor:
    """``x`` rows (sorted by expert, ``counts`` per expert) times each expert's weight, in one grouped matmul.

    ``weight`` is [E, out, in] (or [E, in, out] when ``transposed``). Falls back to one matmul per expert
    where ``grouped_mm`` is missing or refuses the inputs (dtype, device).
    """
    w = weight if transposed else weight.transpose(-2, -1)  # [E, in, out]
    grouped = getattr(F, "grouped_mm", None)
    if grouped is not None and x.shape[0]:
        try:
            return grouped(x.to(w.dtype), w, offs=torch.cumsum(counts, 0).to(torch.int32))
        except (RuntimeError, NotImplementedError):
            pass
    return _per_group(x, counts, lambda e, rows: rows.to(w.dtype) @ w[e])


def fused_grouped_output(experts: nn.Module, hidden: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Every fused expert's down_proj output on its rows of ``hidden`` (sorted by expert, ``counts`` each)."""
    transposed = _transposed(experts)
    ids = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
    h = _grouped_linear(hidden, experts.gate_up_proj, counts, transposed)
    if _has_bias(experts):
        h = h + experts.gate_up_proj_bias[ids]
    out = _grouped_linear(_activate(experts, h), experts.down_proj, counts, transposed)
    if _has_bias(experts):
        out = out + experts.down_proj_bias[ids]
    return out


# Above this many elements a reduction is worth the intra-op threads (it takes ~1 ms or more); below
# it, one thread avoids waiting on a descheduled second thread.
MANY_ELEMENTS = 1 << 20


@contextlib.contextmanager
def few_threads(n: int = 1, work: int = 0):
    """Run small reductions (``work`` elements, when given, below :data:`MANY_ELEMENTS`) on one CPU thread.

    Reducer updates are many small ops; with several OpenMP threads on a busy machine each op can
    wait a scheduler time slice (milliseconds), which made traced runs 10-40x slower than plain ones.
    Large payloads (the per-expert outputs of a real-size MoE layer: tokens x top-k x hidden) keep
    every thread: there one thread made the profile pass 1.18x a headless forward instead of 1.10x
    (bench:qwen3-moe-1024x64, 1,000 tokens).
    """
    before = torch.get_num_threads()
    if before <= n or work >= MANY_ELEMENTS:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# transformers' experts implementations that call ``post_expert_norm`` on the per-expert outputs.
_TAPPABLE = ("grouped_mm", "batched_mm")


class _Tap(nn.Module):
    """Stands in for a fused experts module's ``post_expert_norm``: returns its input (or the wrapped
    norm's output) unchanged and hands it to ``fn``."""

    def __init__(self, fn, inner: nn.Module | None):
        super().__init__()
        self.fn, self.inner = fn, inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x if self.inner is None else self.inner(x)
        self.fn(y)
        return y

    @classmethod
    def install(cls, experts: nn.Module, fn) -> "_Restore":
        had = experts.__dict__.get("has_post_expert_norm", False)
        inner = experts._modules.get("post_expert_norm") if had else None
        experts.post_expert_norm = cls(fn, inner)
        experts.has_post_expert_norm = True
        return _Restore(experts, had, inner)


class _Restore:
    """Puts back what :meth:`_Tap.install` replaced (a handle like a hook's: ``remove()``)."""

    def __init__(self, experts: nn.Module, had: bool, inner: nn.Module | None):
        self.experts, self.had, self.inner = experts, had, inner

    def remove(self) -> None:
        if self.experts is None:
            return
        e, self.experts = self.experts, None
        e.has_post_expert_norm = self.had
        if self.inner is not None:
            e.post_expert_norm = self.inner
        else:
            del e.post_expert_norm


# Coalescing (``Capture(coalesce=True)``): payloads under SMALL_PAYLOAD elements are held, copied, until
# the held rows of all sites reach HELD_ELEMENTS (or one site's reach SITE_ELEMENTS), then each site's
# rows go to its sinks as one payload. A reducer update costs tens of small ops whatever its size; on a
# small model (hidden 64) that fixed cost, paid per layer per batch, was most of the profile's overhead.
# The first batch goes out as it comes and measures the small payloads; when one batch's would fill more
# than a quarter of HELD_ELEMENTS (a wide or deep model, where the ops are not small), nothing is held.
SMALL_PAYLOAD = 1 << 17
SITE_ELEMENTS = 1 << 19
HELD_ELEMENTS = 1 << 22  # 16 MB of float32 (plus one batch) at most, whatever the model's width and depth


class Capture(HookSet):
    """Context manager that installs read-only hooks for ``sinks`` on ``model``.

    Call :meth:`begin_batch` with the batch's token grid ``[B, T]`` (global token index, -1 at
    padding) before each forward; rows at padding positions never reach a sink.

    With ``coalesce=True``, small payloads are held and handed over several batches at a time to the
    sinks that take them (``sink.coalesce`` true: reducers, whose result does not depend on how rows
    are split into payloads). Held rows go out between forwards (:meth:`begin_batch`), all sites at
    once in layer order, and at :meth:`flush` (called on leaving the context without an error); read
    the sinks after that. ``in_order``: the batches come in prompt order (each batch's tokens after the
    last one's), so tokens keep increasing within a coalesced payload; otherwise its order is checked
    where a sink needs it (``Payload.increasing``).
    """

    def __init__(self, model: nn.Module, adapter: Adapter, sinks: dict[Site, list[Sink]], *, coalesce: bool = False,
                 in_order: bool = True):
        super().__init__()
        self.model, self.adapter = model, adapter
        self.sinks = {s: list(v) for s, v in sinks.items() if v}
        validate(adapter, model, self.sinks)
        self._grid: torch.Tensor | None = None
        self._valid: torch.Tensor | None = None
        self._keep_idx: torch.Tensor | None = None
        self._tokens: torch.Tensor | None = None
        self._rerouting = False  # ModuleList experts re-run the router to learn the routing
        # per site: the sinks that take coalesced payloads, the others, and the held parts (a list of payloads)
        self._later = {s: [k for k in v if getattr(k, "coalesce", False)] for s, v in self.sinks.items()} \
            if coalesce else {}
        self._now = {s: [k for k in v if not getattr(k, "coalesce", False)] for s, v in self.sinks.items()}
        self._held: dict[Site, list[Payload]] = {}
        self._order = {s: i for i, s in enumerate(self.sinks)}
        self._in_order = in_order
        self._holding = False  # from the second batch on, when the first one's small payloads were small enough
        self._batches = 0
        self._first_batch = 0  # elements of the first batch's payloads that could be held
        self._scratch = Scratch()  # reducers' payload-sized temporaries, kept between updates (reducers.Scratch)

    def __exit__(self, *exc) -> None:
        try:
            if exc[0] is None:
                self.flush()
        finally:
            self._held.clear()
            self._scratch = Scratch()  # the buffers go with the trace
            super().__exit__(*exc)

    # ----- batch bookkeeping -------------------------------------------------------------------
    def begin_batch(self, grid: torch.Tensor) -> None:
        self._batches += 1
        if self._batches == 2 and self._later:  # between forwards: every site switches at the same batch
            self._holding = 0 < self._first_batch * 4 <= HELD_ELEMENTS
        held = [sum(q.values.numel() for q in parts) for parts in self._held.values()]
        if held and (sum(held) >= HELD_ELEMENTS or max(held) >= SITE_ELEMENTS):
            self.flush()
        flat = grid.reshape(-1)
        self._grid = flat
        if flat.device.type == "cpu":  # numpy: a few small ops per batch, each several times cheaper than torch's
            valid = flat.numpy() >= 0
            self._valid = torch.from_numpy(valid)
            self._keep_idx = None if valid.all() else torch.from_numpy(np.flatnonzero(valid))
        else:
            self._valid = flat >= 0
            self._keep_idx = None if bool(self._valid.all()) else self._valid.nonzero().flatten()
        self._tokens = self._keep(flat)

    def _keep(self, x: torch.Tensor) -> torch.Tensor:
        """The rows of ``x`` ([batch*seq, ...]) at real tokens (all of them when nothing is padded)."""
        return x if self._keep_idx is None else x.index_select(0, self._keep_idx)

    def _rows(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._grid is None:
            raise RuntimeError("Capture.begin_batch() was not called before the forward pass")
        flat = x.detach().reshape(-1, x.shape[-1])
        if flat.shape[0] != self._grid.shape[0]:
            raise RuntimeError(f"captured {flat.shape[0]} rows but the batch has {self._grid.shape[0]} tokens")
        return self._keep(flat), self._tokens

    def _emit(self, site: Site, values: torch.Tensor, tokens: torch.Tensor, topk: torch.Tensor | None = None):
        p = Payload(values, tokens, topk, ordered=tokens is self._tokens or None)  # the batch's own rows are in order
        self._deliver(site, p, owned=self._keep_idx is not None)  # padded batch: _rows copied the rows out

    def _deliver(self, site: Site, p: Payload, owned: bool = False) -> None:
        """Hand ``p`` to the site's sinks now, or hold it for the coalescing ones. ``owned``: the values (and
        top-k / expert ids) are copies made here, not the model's own tensors; token indices always are ours."""
        later = self._later.get(site)
        hold = bool(later) and p.values.numel() < SMALL_PAYLOAD
        if hold and not self._holding:
            if self._batches <= 1:
                self._first_batch += p.values.numel()
            hold = False
        if hold:
            # the model's own tensors are copied: it may reuse or change them in place after the hook returns
            keep = (lambda t: t) if owned else (lambda t: None if t is None else t.detach().clone())
            self._held.setdefault(site, []).append(Payload(keep(p.values), p.tokens, keep(p.topk), keep(p.experts),
                                                           ordered=p.ordered))
            now = self._now[site]
        else:
            now = self.sinks[site]
        if now:
            p.scratch = self._scratch
            with few_threads(work=p.values.numel()):
                for sink in now:
                    sink.update(p)

    def flush(self) -> None:
        """Hand every held payload to its sinks (one payload per site, sites in layer order)."""
        held, self._held = self._held, {}
        for site in sorted(held, key=lambda s: (s.layer, self._order[s])):
            parts = held[site]
            p = parts[0] if len(parts) == 1 else Payload(
                torch.cat([q.values for q in parts]), torch.cat([q.tokens for q in parts]),
                None if parts[0].topk is None else torch.cat([q.topk for q in parts]),
                None if parts[0].experts is None else torch.cat([q.experts for q in parts]),
                ordered=True if self._in_order and all(q.ordered for q in parts) else None)
            p.scratch = self._scratch
            with few_threads(work=p.values.numel()):
                for sink in self._later[site]:
                    sink.update(p)

    # ----- install ---------------------------------------------------------------------------------
    def _install(self) -> None:
        by_layer: dict[int, dict[Component, list[Site]]] = defaultdict(lambda: defaultdict(list))
        for s in self.sinks:
            by_layer[s.layer][s.component].append(s)
        layers = self.adapter.decoder_layers(self.model)
        for i, comps in by_layer.items():
            self._install_layer(layers[i], self.adapter.layer_info(self.model, i), comps)

    def _install_layer(self, layer: nn.Module, info: LayerInfo, comps: dict[Component, list[Site]]) -> None:
        ad = self.adapter
        for site in comps.get(Component.RESID_PRE, []):
            def pre(mod, args, kwargs, site=site):
                hs = args[0] if args else kwargs["hidden_states"]
                self._emit(site, *self._rows(hs))
            self._hook(layer, pre, pre=True)
        simple = {Component.RESID_POST: layer, Component.ATTN_OUT: ad.mixer(layer), Component.MLP_OUT: ad.mlp(layer)}
        for comp, module in simple.items():
            for site in comps.get(comp, []):
                def post(mod, args, kwargs, out, site=site):
                    self._emit(site, *self._rows(_first(out)))
                self._hook(module, post)
        for site in comps.get(Component.SHARED_EXPERT, []):
            down = ad.shared_down_proj(ad.shared_experts(layer)[site.expert])
            def shared(mod, args, kwargs, out, site=site):
                self._emit(site, *self._rows(out))
            self._hook(down, shared)
        qkv = {c: comps[c] for c in QKV if c in comps}
        if qkv:
            self._install_qkv(layer, qkv)
        if Component.ROUTER in comps:
            self._install_router(layer, info, comps[Component.ROUTER][0])
        if Component.EXPERT in comps or Component.EXPERTS in comps:
            grouped = comps[Component.EXPERTS][0] if Component.EXPERTS in comps else None
            self._install_experts(layer, info, {s.expert: s for s in comps.get(Component.EXPERT, [])}, grouped)

    def _install_qkv(self, layer: nn.Module, sites: dict) -> None:
        """Q (after RoPE), K (after RoPE) and V as the layer hands them to its attention function
        (:class:`~workbench.tracing.attention_tap.AttentionTap`): one row per token, heads side by side."""
        from workbench.tracing.attention_tap import AttentionTap

        def tap(module, q, k, v):
            if self._grid is None or q.shape[0] * q.shape[2] != self._grid.shape[0] or k.shape[2] != q.shape[2]:
                return None  # a cached generation step: not the batch's tokens
            for comp, x in zip(QKV, (q, k, v)):
                for site in sites.get(comp, []):
                    B, H, T, d = x.shape
                    self._emit(site, *self._rows(x.transpose(1, 2).reshape(B, T, H * d)))
            return None
        self._handles.append(AttentionTap(self.model, {self.adapter.attention(layer): tap}).install())

    def _install_router(self, layer: nn.Module, info: LayerInfo, site: Site) -> None:
        router = self.adapter.router(layer)
        if info.layout == "fused":
            def hook(mod, args, kwargs, out):
                logits, _, index = out[0], out[1], out[2]
                self._emit_routed_rows(site, logits, index)
        else:
            def hook(mod, args, kwargs, out):
                if self._rerouting:
                    return
                logits = _first(out)
                _, index = self.adapter.select_experts(self.model, logits.reshape(-1, logits.shape[-1]), router)
                self._emit_routed_rows(site, logits, index)
        self._hook(router, hook)

    def _emit_routed_rows(self, site: Site, logits: torch.Tensor, index: torch.Tensor) -> None:
        values, tokens = self._rows(logits)
        self._emit(site, values, tokens, self._keep(index.detach().reshape(-1, index.shape[-1])))

    def _install_experts(self, layer: nn.Module, info: LayerInfo, wanted: dict[int, Site],
                         grouped: Site | None = None) -> None:
        """Per-expert sites (``wanted``) and/or the layer's grouped ``experts`` site."""
        ad = self.adapter
        if info.layout == "dense":
            def dense(mod, args, kwargs, out):
                self._emit(wanted[0], *self._rows(out))
            self._hook(ad.dense_down_proj(layer), dense)
            return
        if info.layout == "fused":
            module = experts = ad.experts(layer)
            impl = getattr(getattr(experts, "config", None), "_experts_implementation", None)
            if impl in _TAPPABLE and not getattr(experts, "_is_expert_parallel", False):
                self._tap_fused(experts, impl, wanted, grouped, info.num_experts)
                return
            one = lambda e, h: fused_expert_output(experts, h, e)  # noqa: E731
            many = lambda h, counts: fused_grouped_output(experts, h, counts)  # noqa: E731

            def inputs(args, kwargs):
                return (args[0] if args else kwargs["hidden_states"],
                        args[1] if len(args) > 1 else kwargs["top_k_index"])
        else:  # ModuleList: route again from the block's input with the adapter's rule, then run each expert
            module, router, experts = ad.mlp(layer), ad.router(layer), ad.experts(layer)
            one = lambda e, h: experts[e](h)  # noqa: E731
            many = lambda h, counts: _per_group(h, counts, one)  # noqa: E731

            def inputs(args, kwargs):
                hidden = args[0] if args else kwargs["hidden_states"]
                hidden = hidden.reshape(-1, hidden.shape[-1])
                self._rerouting = True  # the router site must not count this second call (interventions still apply)
                try:
                    logits = router(hidden)
                finally:
                    self._rerouting = False
                return hidden, ad.select_experts(self.model, logits, router)[1]

        def hook(mod, args, kwargs, out):
            hidden, index = inputs(args, kwargs)
            if grouped is None:
                self._emit_experts(wanted, hidden, index, one)
            else:
                self._emit_grouped(grouped, wanted, hidden, index, info.num_experts, many)
        self._hook(module, hook)

    def _tap_fused(self, experts: nn.Module, impl: str, wanted: dict[int, Site], grouped: Site | None,
                   num_experts: int) -> None:
        """Per-expert outputs straight from transformers' own grouped/batched experts forward, no recompute.

        Both implementations call ``post_expert_norm`` on the down_proj outputs of every (token, slot)
        pair just before the routing weights multiply them, when ``has_post_expert_norm`` is set. The
        capture sets it for the duration, with a :class:`_Tap` that returns its input unchanged (or the
        model's own norm's output, where it has one) and hands it to the sinks: the forward computes
        exactly what it computes unhooked. A forward pre-hook keeps ``top_k_index``, from which the rows'
        experts and tokens follow: ``grouped_mm`` orders them by ``torch.sort(top_k_index.reshape(-1))``
        (the same call, so the same permutation), ``batched_mm`` keeps (token, slot) order.
        """
        index: list[torch.Tensor] = []

        def keep_index(mod, args, kwargs):
            index.append(args[1] if len(args) > 1 else kwargs["top_k_index"])

        def emit(out: torch.Tensor) -> None:
            if self._grid is None:
                raise RuntimeError("Capture.begin_batch() was not called before the forward pass")
            top = index.pop()
            k, flat = top.shape[-1], top.reshape(-1)
            if impl == "grouped_mm":
                ids, perm = torch.sort(flat)
                token_rows, by_expert = perm // k, True
            else:
                ids, by_expert = flat, False
                token_rows = torch.arange(flat.numel(), device=flat.device) // k
            with torch.no_grad(), few_threads(work=out.numel()):
                tokens = self._grid[token_rows]
                if self._keep_idx is not None:  # padding rows never reach a sink
                    real = (tokens >= 0).nonzero().flatten()
                    out, ids, tokens = out.index_select(0, real), ids[real], tokens[real]
                self._emit_expert_rows(grouped, wanted, out.detach(), ids, tokens, num_experts, by_expert,
                                       owned=self._keep_idx is not None)  # padded: the rows were copied out

        self._hook(experts, keep_index, pre=True)
        self._handles.append(_Tap.install(experts, emit))

    def _emit_expert_rows(self, grouped: Site | None, wanted: dict[int, Site], out: torch.Tensor, ids: torch.Tensor,
                          tokens: torch.Tensor, num_experts: int, by_expert: bool, owned: bool) -> None:
        """Hand (token, slot) rows of expert outputs to the grouped site and to per-expert sites (``owned``:
        ``out`` and ``ids`` are copies made here, not the model's tensors)."""
        if grouped is not None:
            self._deliver(grouped, Payload(out, tokens, experts=ids), owned=owned)
        if not wanted:
            return
        if by_expert:
            ends = torch.cumsum(torch.bincount(ids, minlength=num_experts), 0).tolist()
            for e, s in wanted.items():
                lo = ends[e - 1] if e else 0
                self._emit(s, out[lo:ends[e]], tokens[lo:ends[e]])
        else:
            for e, s in wanted.items():
                rows = (ids == e).nonzero().flatten()
                self._emit(s, out.index_select(0, rows), tokens[rows])

    def _emit_grouped(self, site: Site, wanted: dict[int, Site], hidden: torch.Tensor, index: torch.Tensor,
                      num_experts: int, run) -> None:
        if self._grid is None:
            raise RuntimeError("Capture.begin_batch() was not called before the forward pass")
        with torch.no_grad(), few_threads(work=hidden.numel() * index.shape[-1]):
            k = index.shape[-1]
            ids = self._keep(index.reshape(-1, k)).reshape(-1)  # (token, slot) pairs, token-major
            rows = torch.arange(ids.numel() // k, device=ids.device).repeat_interleave(k)
            ids, perm = torch.sort(ids, stable=True)  # by expert; within an expert, tokens stay in order
            rows = rows[perm]
            counts = torch.bincount(ids, minlength=num_experts)
            out = run(self._keep(hidden.reshape(-1, hidden.shape[-1]))[rows], counts)
            self._emit_expert_rows(site, wanted, out, ids, self._tokens[rows], num_experts, by_expert=True, owned=True)

    def _emit_experts(self, wanted: dict[int, Site], hidden: torch.Tensor, index: torch.Tensor, run) -> None:
        if self._grid is None:
            raise RuntimeError("Capture.begin_batch() was not called before the forward pass")
        with torch.no_grad(), few_threads(work=hidden.numel()):
            for e, site in wanted.items():
                rows = ((index == e).any(dim=-1) & self._valid).nonzero().flatten()
                out = run(e, hidden[rows]) if rows.numel() else hidden.new_zeros((0, hidden.shape[-1]))
                self._emit(site, out, self._grid[rows])
