"""Massive values in queries, keys and values: the L2 norm over tokens of every head dimension.

Jin et al. 2025 ("Massive Values in Self-Attention Modules are the Key to Contextual Knowledge
Understanding", code MingyuJ666/Rope_with_LLM) find that the queries and keys of RoPE models (not the
values) concentrate large values in a few low-frequency rotary dimensions. Their statistic, per layer,
projection and head, is ``M[h, d] = ||X[:, h, d]||_2`` over the tokens, with Q and K taken after RoPE
(a rotary pair's joint norm is RoPE-invariant; a single dimension's is not).

:class:`QKMeter` is a meter of the trace (like the attention-sink meter): it reads the queries, keys
and values every attention layer hands to its attention function, through
:class:`workbench.tracing.attention_tap.AttentionTap` (read-only: the forward computes exactly what it
computed before). It keeps sums of squares per
(layer, projection, head, dim), over all real tokens and with each prompt's first token left out (the
first token is the attention sink): nothing of size tokens x dims, mergeable by addition. Families
whose attention does not go through transformers' attention interface (Falcon) report no entries and
are listed under ``unmeasured_layers``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from workbench.adapters.base import Adapter
from workbench.tracing.attention_tap import AttentionTap
from workbench.tracing.capture import SITE_ELEMENTS, SMALL_PAYLOAD, few_threads

PROJ = ("q", "k", "v")


def largest_dims(qk_values: dict | None) -> dict[str, str]:
    """Each projection's largest top-dim / median ratio and where it is ("21.1 (L3.H5 dim 23, rotary pair 23
    (wavelength 24656 tokens))"), from a profile's ``qk_values``: the CLI's summary and the report say the same.
    Empty where nothing was measured."""
    out = {}
    for proj in "qkv":
        entries = [e for e in (qk_values or {}).get("entries", []) if e["proj"] == proj]
        if not entries:
            continue
        e = max(entries, key=lambda x: x["ratio"])
        rope = "" if e.get("pair") is None else f", rotary pair {e['pair']}" + (
            f" (wavelength {e['wavelength']:.0f} tokens)" if e.get("wavelength") is not None else "")
        out[proj] = f"{e['ratio']:.1f} (L{e['layer']}.H{e['head']} dim {e['dim']}{rope})"
    return out


def rotary_frequencies(model: nn.Module) -> torch.Tensor | None:
    """The model's rotary inverse frequencies ``[rot / 2]`` (the first ``inv_freq`` or ``*_inv_freq`` buffer: Gemma3
    and OLMo3 keep theirs per layer type), or None. Which dims each layer rotates, and with which of them:
    :mod:`workbench.experts.rope`."""
    from workbench.experts.rope import inv_freq_buffers

    found = inv_freq_buffers(model)
    return found[0].detach().float().cpu() if found else None


def _finite_mm(masks: torch.Tensor, squares: torch.Tensor) -> torch.Tensor:
    """``masks @ squares``, where a token's NaN or inf (an overflow upstream, e.g. float16) adds nothing: it made
    the whole layer's norms NaN. ``squares`` is the meter's own copy (cleaned in place); the check costs one pass over
    the small result."""
    out = torch.mm(masks, squares)
    if bool(torch.isfinite(out).all()):
        return out
    return torch.mm(masks, squares.nan_to_num_(nan=0.0, posinf=0.0))


class QKMeter:
    """Per (layer, q|k|v, head, dim): sums of squares over real tokens, and without each prompt's first token."""

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        # layer -> (heads per part, [2, H * d] float64 sums: all tokens | without the first) per part: one part
        # with Q, K and V heads side by side where their head dims agree, else one part per projection
        self._acc: dict[int, tuple[tuple[tuple[int, ...], ...], list[torch.Tensor]]] = {}
        self._n = [[0, 0] for _ in range(num_layers)]  # per layer: tokens counted (all, without the first)
        self._held: list = []  # (layer, q, k, v, the batch's grid): calls not reduced yet
        self._held_elements = 0
        self._batch_elements = 0  # held elements of the current batch
        # [layers, 2, H * d] float64 totals per width (Q, K and V of one head dim side by side): a layer's part is a view
        # of its row, so a batch's reduced calls (its layers in order) are added by one op (_flush)
        self._pool: dict[int, torch.Tensor] = {}
        self._pooled: set[int] = set()  # layers whose totals are rows of a pool
        self._last_masks: tuple = (None,)  # (grid, masks, count, count without the first): see _masks
        self._tap: AttentionTap | None = None
        self._attn: dict[int, nn.Module] = {}
        self.layers_without_attention: list[int] = []
        self.latent = False  # DeepSeek's latent attention: its rotary dims are the last ones of a head
        self._rope: tuple[int, int, bool] | None = None  # latent attention: (nope dims, rope dims, interleaved pairs)
        self._recorder = None  # experts.rope.RopeRecorder: each layer's rotation as the pass ran it
        self._known: dict = {}  # layer -> Layout from a loaded or merged state

    @property
    def tokens(self) -> torch.Tensor:
        """``[layers, 2]``: tokens counted per layer, all and without each prompt's first."""
        self._flush()  # held calls are counted when they are reduced
        return torch.tensor(self._n, dtype=torch.int64).reshape(self.num_layers, 2)

    @property
    def sums(self) -> dict[str, torch.Tensor]:
        """``f"{layer}.{proj}.{all|no0}"`` -> sums of squares ``[heads, dim]`` (float64 views of the totals)."""
        self._flush()
        return {f"{layer}.{proj}.{which}": v[j] for layer in sorted(self._acc)
                for proj, v in self._views(layer).items() for j, which in enumerate(("all", "no0"))}

    def _views(self, layer: int) -> dict[str, torch.Tensor]:
        """proj -> ``[2, heads, dim]`` view of the layer's totals (empty where the layer was not measured)."""
        self._flush()
        if layer not in self._acc:
            return {}
        heads, parts = self._acc[layer]
        return dict(zip(PROJ, (v for hs, part in zip(heads, parts)
                               for v in part.view(2, sum(hs), -1).split(list(hs), dim=1))))

    # ----- install / remove (the trace's meter protocol) --------------------------------------------
    def install(self, model: nn.Module, adapter: Adapter) -> None:
        self.layers_without_attention = []
        for i, layer in enumerate(adapter.decoder_layers(model)):
            if adapter.has_attention(layer):
                self._attn[i] = adapter.attention(layer)
                a = self._attn[i]
                if hasattr(a, "qk_rope_head_dim"):
                    # After RoPE, DeepSeek-V2 (complex rotation) keeps pairs (2i, 2i+1); V3 de-interleaves its
                    # interleaved weights while rotating, so its output pairs are halves, as rotate_half's
                    # (both tested against the models' own rotation: tests/test_qk.py)
                    import sys

                    complex_rope = hasattr(sys.modules[type(a).__module__], "apply_rotary_emb")
                    self.latent = True
                    self._rope = (int(a.qk_nope_head_dim), int(a.qk_rope_head_dim), complex_rope)
            else:
                self.layers_without_attention.append(i)

        rec = None
        if not self.latent:  # which dims each layer rotates together, read from its rotation (experts/rope.py)
            from workbench.experts.rope import RopeRecorder

            rec = self._recorder = RopeRecorder(model, dict(self._attn)).install()

        def tap(i):
            def fn(module, q, k, v):
                if rec is not None:
                    rec.attention_ran(i, q.shape[-1])
                self.update(i, q, k, v)
            return fn
        self._tap = AttentionTap(model, {m: tap(i) for i, m in self._attn.items()}).install()

    def remove(self) -> None:
        self._flush()
        if self._tap is not None:
            self._tap.remove()
            self._tap = None
        if self._recorder is not None:
            self._recorder.remove()  # its layouts stay
        self._attn.clear()

    def begin_batch(self, grid: torch.Tensor) -> None:
        """The batch's token grid ``[B, T]`` (-1 at padding), kept as it is: its masks are made when its rows are
        reduced (between forwards, every op costs several times what it costs in a tight loop)."""
        if self._held_elements >= SITE_ELEMENTS:  # only whole batches are held past here
            self._flush()
        self._batch_elements = 0
        self._grid = grid
        self._shape = tuple(grid.shape)

    def _masks(self, grid: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """``[2, B * T]`` float32 masks (all real tokens; without each prompt's first) and their token counts, made
        once per batch (the last grid's are kept: every layer, held or not, comes to the same batch in turn)."""
        if self._last_masks[0] is not grid:
            valid = grid.detach().cpu().numpy() >= 0
            B, T = valid.shape
            masks = np.empty((2, B, T), dtype=np.float32)
            masks[0] = masks[1] = valid
            masks[1, np.arange(B), valid.argmax(-1)] = 0  # each prompt's first real token (either padding)
            n = int(np.count_nonzero(valid))
            self._last_masks = (grid, torch.from_numpy(masks.reshape(2, B * T)), n,
                                n - int(np.count_nonzero(valid.any(-1))))
        return self._last_masks[1:]

    # ----- reduction ---------------------------------------------------------------------------------
    def update(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """``q [B, H, T, d]``, ``k`` and ``v [B, KV, T, d]`` as the attention function gets them (after RoPE).

        The cost is per call on small models, so a call does nothing but keep Q, K and V (the tensors themselves,
        not copies: the model does not write them after its attention; a tap installed after this one that
        changes them in place, as ``mean_qk`` does, is then recorded as the attention used it) with the batch's grid. The held calls are reduced
        a batch at a time (see ``_flush``), and only whole batches are held past a batch's start (``SITE_ELEMENTS``
        in all, the trace's coalescing budget), so what is reduced together does not depend on where a checkpoint
        flushed. Large calls (``SMALL_PAYLOAD``, wide models) are reduced at once."""
        if getattr(self, "_shape", None) != (q.shape[0], q.shape[2]):  # not the batch's prompt pass (a cached step)
            return
        if torch.is_grad_enabled():  # (the profile runs without; a context costs microseconds per call)
            with torch.no_grad():
                return self.update(layer, q, k, v)
        same = q.shape[-1] == k.shape[-1] == v.shape[-1]
        if layer not in self._acc:
            if same:
                self._acc[layer] = ((q.shape[1], k.shape[1], v.shape[1]),), \
                    [self._pool_row(layer, (q.shape[1] + k.shape[1] + v.shape[1]) * q.shape[3], q.device)]
            else:
                self._acc[layer] = ((q.shape[1],), (k.shape[1],), (v.shape[1],)), \
                    [torch.zeros(2, x.shape[1] * x.shape[3], dtype=torch.float64, device=x.device) for x in (q, k, v)]
        if same and (size := q.numel() + k.numel() + v.numel()) < SMALL_PAYLOAD:
            self._held.append((layer, q, k, v, self._grid))
            self._held_elements += size
            self._batch_elements += size
            if self._batch_elements >= SITE_ELEMENTS:  # a large batch: reduced in parts fixed by the batch alone
                self._flush()
            return
        xs = [x.transpose(1, 2) for x in (q, k, v)]
        if same:
            xs = [torch.cat(xs, dim=2)]
        masks, n, n0 = self._masks(self._grid)
        self._count(layer, n, n0)
        with few_threads(work=q.numel()):
            for x, total in zip(xs, self._acc[layer][1]):
                sq = x.reshape(-1, x.shape[2] * x.shape[3]).float()  # [B * T, heads * d]
                # in place only on our own copy: reshape and float return the model's tensor where they can
                sq = sq.square_() if same or sq.data_ptr() != x.data_ptr() else sq.square()
                total.add_(_finite_mm(masks.to(sq.device), sq))  # [2, B * T] @ [B * T, heads * d]

    def _pool_row(self, layer: int, width: int, device: torch.device) -> torch.Tensor:
        """Layer ``layer``'s ``[2, width]`` float64 totals (zeros): a row of the width's pool."""
        pool = self._pool.get(width)
        if pool is None or pool.device != torch.device(device):
            pool = self._pool[width] = torch.zeros(self.num_layers, 2, width, dtype=torch.float64, device=device)
            self._pooled -= {other for other in self._pooled if self._acc[other][1][0].shape[1] == width}
        self._pooled.add(layer)
        return pool[layer]

    def _count(self, layer: int, n: int, n0: int) -> None:
        self._n[layer][0] += n
        self._n[layer][1] += n0

    def _flush(self) -> None:
        """Reduce the held calls a batch at a time: every held call of the batch side by side, token-major, in one
        copy (one ``cat``: the gather from DeepSeek's head-major queries included), squared, and reduced against
        both token masks by one product, into the layers' float64 totals: a few ops per batch, not per call
        (between forwards each op costs several times what it costs in a tight loop)."""
        held, self._held, self._held_elements, self._batch_elements = self._held, [], 0, 0
        if not held:
            return
        groups: dict[tuple, list] = {}  # (batch, head dim, dtype) -> [grid, (layer, q, k, v) ...] in call order
        for layer, q, k, v, grid in held:
            groups.setdefault((id(grid), q.shape[-1], q.dtype), [grid]).append((layer, q, k, v))
        with torch.no_grad(), few_threads(work=sum(x.numel() for _, *qkv in held for x in qkv[:3])):
            for grid, *calls in groups.values():
                m, n, n0 = self._masks(grid)
                # [B, T, every call's Q, K and V heads, d] -> [B * T, columns]: ours, squared in place
                rows = torch.cat([x.transpose(1, 2) for _, *qkv in calls for x in qkv], dim=2)
                rows = rows.view(m.shape[1], -1).float().square_()
                sums = _finite_mm(m.to(rows.device), rows).double()  # [2, B * T] @ [B * T, columns]
                layers = [layer for layer, *_ in calls]
                for layer in layers:
                    self._count(layer, n, n0)
                first, width = layers[0], sums.shape[1] // len(layers)
                pool = self._pool.get(width)
                if layers == list(range(first, first + len(layers))) and self._pooled.issuperset(layers) \
                        and all(q.shape[1] + k.shape[1] + v.shape[1] == calls[0][1].shape[1] + calls[0][2].shape[1]
                                + calls[0][3].shape[1] for _, q, k, v in calls) and pool.device == sums.device:
                    pool[first:first + len(layers)].add_(sums.view(2, len(layers), width).transpose(0, 1))
                else:
                    start = 0
                    for layer, *_ in calls:
                        total = self._acc[layer][1][0]
                        total.add_(sums[:, start:start + total.shape[1]])
                        start += total.shape[1]

    def merge(self, other: "QKMeter") -> "QKMeter":
        self._flush()
        other._flush()
        for layer, (heads, parts) in other._acc.items():
            if layer in self._acc and self._acc[layer][0] == heads:
                for total, part in zip(self._acc[layer][1], parts):
                    total.add_(part.to(total.device))
            elif layer in self._acc:
                raise ValueError(f"QKMeter: layer {layer}'s heads differ between the meters merged")
            elif len(parts) == 1:
                self._acc[layer] = (heads, [self._pool_row(layer, parts[0].shape[1], parts[0].device).copy_(parts[0])])
            else:
                self._acc[layer] = (heads, [p.clone() for p in parts])
        for mine, theirs in zip(self._n, other._n):
            mine[0] += theirs[0]
            mine[1] += theirs[1]
        for layer, lay in other.layouts().items():  # another part's rotations (a rank's, a checkpoint's)
            self._known.setdefault(layer, lay)
        return self

    def layouts(self) -> dict:
        """Layer -> :class:`workbench.experts.rope.Layout`: read in this pass, or held by a loaded or merged state."""
        return {**self._known, **(self._recorder.layouts if self._recorder is not None else {})}

    def state_dict(self) -> dict[str, torch.Tensor]:
        rope = {}
        for layer, lay in self.layouts().items():  # a resumed pass may not run a layer's first calls again
            rope[f"rope.{layer}.pair"] = torch.tensor([-1 if p is None else p for p in lay.pair], dtype=torch.int64)
            rope[f"rope.{layer}.freq"] = torch.tensor(lay.freq, dtype=torch.float64)
        return {"tokens": self.tokens, **{f"sum.{k}": v.contiguous().clone() for k, v in self.sums.items()}, **rope}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> "QKMeter":
        self._held, self._held_elements = [], 0
        sums: dict[int, dict[str, list]] = {}
        rope: dict[int, dict[str, torch.Tensor]] = {}
        for name, v in state.items():
            if name.startswith("rope.") and len(parts := name.split(".")) == 3 and parts[1].isdigit() \
                    and parts[2] in ("pair", "freq"):
                rope.setdefault(int(parts[1]), {})[parts[2]] = v
            elif name == "tokens":
                if tuple(v.shape) != (self.num_layers, 2):
                    raise ValueError("QKMeter state 'tokens' does not fit")
                self._n = v.tolist()
            elif name.startswith("sum.") and len(parts := name[4:].split(".")) == 3 and parts[0].isdigit() \
                    and parts[1] in PROJ and parts[2] in ("all", "no0"):
                sums.setdefault(int(parts[0]), {}).setdefault(parts[1], [None, None])[parts[2] == "no0"] = v
            else:
                raise ValueError(f"QKMeter state {name!r} does not fit")
        self._acc, self._pool, self._pooled = {}, {}, set()
        for layer, by_proj in sums.items():
            if set(by_proj) != set(PROJ) or any(t is None for pair in by_proj.values() for t in pair):
                raise ValueError(f"QKMeter state of layer {layer} is incomplete")
            parts = [torch.stack(by_proj[p]).double() for p in PROJ]  # [2, H, d] each
            heads = tuple(p.shape[1] for p in parts)
            if len({p.shape[-1] for p in parts}) == 1:
                flat = torch.cat(parts, dim=1).flatten(1)
                self._acc[layer] = (heads,), [self._pool_row(layer, flat.shape[1], flat.device).copy_(flat)]
            else:
                self._acc[layer] = tuple((h,) for h in heads), [p.flatten(1) for p in parts]
        from workbench.experts.rope import Layout

        for layer, t in rope.items():
            if set(t) != {"pair", "freq"}:
                raise ValueError(f"QKMeter state of layer {layer}'s rotation is incomplete")
            self._known[layer] = Layout([None if p < 0 else p for p in t["pair"].tolist()], t["freq"].tolist())
        return self

    def empty(self) -> "QKMeter":
        return QKMeter(self.num_layers)

    def pair_of(self, dim: int, head_dim: int, rot: int) -> int | None:
        """The rotary pair (frequency index) of a query/key dimension, None where it is not rotated. Standard
        layout: dims ``d`` and ``d + rot / 2`` share pair ``d`` (``rotate_half``, the first ``rot`` dims rotated);
        latent attention: the last ``rope`` dims, in interleaved pairs or halves."""
        if self._rope is not None:
            nope, rope, interleaved = self._rope
            if dim < nope or dim >= nope + rope:
                return None
            j = dim - nope
            return j // 2 if interleaved else j % (rope // 2)
        return dim % (rot // 2) if rot and dim < rot <= head_dim else None

    def norms(self, layer: int, proj: str, which: str = "all") -> torch.Tensor | None:
        """``M [heads, dim]``: the L2 norm over tokens of each head dimension (None if not measured)."""
        v = self._views(layer).get(proj)
        return None if v is None else v[("all", "no0").index(which)].sqrt()

    def result(self, model: nn.Module | None = None, top: int = 3) -> dict:
        """``entries``: per (layer, proj, head) its ``top`` dimensions by norm, each with ``ratio`` (its norm
        over the head's median norm), the same with the first token left out, and (Q and K of rotary
        attention) the rotary pair and its wavelength in tokens; ``by_layer``: the largest ratio over
        heads per projection; ``norms``: every ``M[h, d]``, per projection ``[layer][head][dim]``."""
        freqs = rotary_frequencies(model) if model is not None else None
        rot = 2 * int(freqs.numel()) if freqs is not None else 0
        # each layer's rotation as the pass ran it, where read (experts/rope.py); else rotate_half over the first
        # inv_freq buffer's frequencies, as for every layer before
        layouts = self.layouts()
        first = next((lay for _, lay in sorted(layouts.items()) if lay.rotated), None)
        if first is not None:
            rot = first.rotated
        context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        entries, by_layer, unmeasured = [], [], []
        norms: dict[str, list] = {proj: [] for proj in PROJ}  # [layer][head][dim] (None: not measured)
        self._flush()
        for layer in range(self.num_layers):
            row = {"layer": layer}
            if layer not in self._acc:
                if layer not in self.layers_without_attention:
                    unmeasured.append(layer)  # its attention does not use transformers' attention interface
                for proj in PROJ:
                    norms[proj].append(None)
                continue
            # per part (Q, K and V side by side where their head dims agree): every head at once, a few sorts and
            # tolist calls per layer, not per projection or head
            heads, parts = self._acc[layer]
            projs = iter(PROJ)
            for hs, part in zip(heads, parts):
                N = part.view(2, sum(hs), -1).sqrt()  # [all | without the first, heads, dim]
                d = N.shape[-1]
                # the median as numpy has it (the mean of the two middle values for an even head size)
                srt = N.sort(dim=-1).values
                med = ((srt[..., (d - 1) // 2] + srt[..., d // 2]) / 2).clamp(min=1e-30)  # [2, heads]
                idx = N[0].argsort(dim=-1, descending=True, stable=True)[:, :top]
                top_norms = N[0].gather(1, idx)
                lists = (N[0].tolist(), (N[0].max(dim=-1).values / med[0]).tolist(), idx.tolist(),
                         top_norms.tolist(), (top_norms / med[0, :, None]).tolist(),
                         (N[1].gather(1, idx) / med[1, :, None] if self._n[layer][1] else  # no token past the
                          torch.full_like(top_norms, math.nan)).tolist())  # first (one-token prompts): not measured
                start = 0
                for h_proj in hs:
                    proj = next(projs)
                    M, best, dims, vals, rat, rat0 = (x[start:start + h_proj] for x in lists)
                    start += h_proj
                    norms[proj].append(M)
                    row[proj] = max(best)
                    for h in range(h_proj):
                        for j, dim in enumerate(dims[h]):
                            e = {"layer": layer, "proj": proj, "head": h, "dim": dim, "norm": vals[h][j],
                                 "ratio": rat[h][j], "ratio_no_pos0": rat0[h][j], "pair": None, "wavelength": None}
                            lay = layouts.get(layer)
                            if proj == "v":
                                pass
                            elif lay is not None:
                                pair = lay.pair_of(dim)
                                if pair is not None:
                                    e["pair"], e["wavelength"] = pair, lay.wavelength(pair)
                            else:
                                pair = self.pair_of(dim, d, rot)
                                if pair is not None and freqs is not None and pair < freqs.numel():
                                    e["pair"], e["wavelength"] = pair, 2 * math.pi / float(freqs[pair])
                            entries.append(e)
            by_layer.append(row)
        out = {"entries": entries, "by_layer": by_layer, "rotary_dims": rot, "context_length": context,
               "tokens": self.tokens[:, 0].tolist(), "latent": self.latent, "norms": norms}
        qk_dim = next((len(h[0]) for h in norms["q"] if h), 0)
        # Q and K (V has no rotation): the first rotated layer's pairs; per layer where the layers differ
        out["pair_of_dim"] = [first.pair_of(d) for d in range(qk_dim)] if first is not None else \
            [self.pair_of(d, qk_dim, rot) for d in range(qk_dim)]
        if layouts:
            out["pair_of_dim_by_layer"] = [[layouts[i].pair_of(d) for d in range(qk_dim)] if i in layouts else None
                                           for i in range(self.num_layers)]
            out["not_rotated_layers"] = [i for i, lay in sorted(layouts.items()) if not lay.rotated]
        if unmeasured:
            out["unmeasured_layers"] = unmeasured  # their attention does not use transformers' attention interface
        if self.layers_without_attention:
            out["no_attention"] = list(self.layers_without_attention)
        return out
