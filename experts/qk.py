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


def rotary_frequencies(model: nn.Module) -> torch.Tensor | None:
    """The model's rotary inverse frequencies ``[rot / 2]`` (the first rotary embedding found), or None."""
    for m in model.modules():
        f = getattr(m, "inv_freq", None)
        if isinstance(f, torch.Tensor) and f.ndim == 1:
            return f.detach().float().cpu()
    return None


class QKMeter:
    """Per (layer, q|k|v, head, dim): sums of squares over real tokens, and without each prompt's first token."""

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        # layer -> (heads per part, [2, H * d] float64 sums: all tokens | without the first) per part: one part
        # with Q, K and V heads side by side where their head dims agree, else one part per projection
        self._acc: dict[int, tuple[tuple[tuple[int, ...], ...], list[torch.Tensor]]] = {}
        self._n = [[0, 0] for _ in range(num_layers)]  # per layer: tokens counted (all, without the first)
        self._held: list = []  # (layer, [B, T, heads, d] rows of ours, the batch's grid) not reduced yet
        self._held_elements = 0
        self._last_masks: tuple = (None,)  # (grid, masks, count, count without the first): see _masks
        self._tap: AttentionTap | None = None
        self._attn: dict[int, nn.Module] = {}
        self.layers_without_attention: list[int] = []
        self.latent = False  # DeepSeek's latent attention: its rotary dims are the last ones of a head
        self._rope: tuple[int, int, bool] | None = None  # latent attention: (nope dims, rope dims, interleaved pairs)

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

        def tap(i):
            def fn(module, q, k, v):
                self.update(i, q, k, v)
            return fn
        self._tap = AttentionTap(model, {m: tap(i) for i, m in self._attn.items()}).install()

    def remove(self) -> None:
        self._flush()
        if self._tap is not None:
            self._tap.remove()
            self._tap = None
        self._attn.clear()

    def begin_batch(self, grid: torch.Tensor) -> None:
        """The batch's token grid ``[B, T]`` (-1 at padding), kept as it is: its masks are made when its rows are
        reduced (between forwards, every op costs several times what it costs in a tight loop)."""
        self._grid = grid
        self._shape = tuple(grid.shape)

    def _masks(self, grid: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """``[2, B * T]`` float32 masks (all real tokens; without each prompt's first) and their token counts, made
        once per batch (the last grid's are kept: every layer, held or not, comes to the same batch in turn)."""
        if self._last_masks[0] is not grid:
            valid = grid.detach().cpu().numpy() >= 0
            no0 = valid.copy()
            no0[np.arange(valid.shape[0]), valid.argmax(-1)] = False  # each prompt's first real token (either padding)
            self._last_masks = (grid, torch.from_numpy(np.stack([valid.ravel(), no0.ravel()]).astype(np.float32)),
                                int(valid.sum()), int(no0.sum()))
        return self._last_masks[1:]

    # ----- reduction ---------------------------------------------------------------------------------
    def update(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """``q [B, H, T, d]``, ``k`` and ``v [B, KV, T, d]`` as the attention function gets them (after RoPE).

        The cost is per call on small models, so a call does little: Q, K and V side by side in their
        token-major layout (one copy, ours), held with the batch's grid while the held rows are few (the
        trace's coalescing budgets: ``SMALL_PAYLOAD`` per call, ``SITE_ELEMENTS`` in all; a larger budget
        measured slower, its rows no longer in cache); then each layer's held rows are squared together and
        each call's reduced against both token masks by its own small product (as if reduced at once, so the
        sums do not depend on what was held together), into the layer's float64 totals. Large calls (wide
        models) are reduced at once, holding nothing."""
        if getattr(self, "_shape", None) != (q.shape[0], q.shape[2]):  # not the batch's prompt pass (a cached step)
            return
        if torch.is_grad_enabled():  # (the profile runs without; a context costs microseconds per call)
            with torch.no_grad():
                return self.update(layer, q, k, v)
        same = q.shape[-1] == k.shape[-1] == v.shape[-1]
        # token-major [B, T, heads, d]: the projections' own layout (q, k, v arrive as transposed views of it)
        xs = [x.transpose(1, 2) for x in (q, k, v)]
        if same:
            xs = [torch.cat(xs, dim=2)]
        if layer not in self._acc:
            heads = (((q.shape[1], k.shape[1], v.shape[1]),) if same
                     else ((q.shape[1],), (k.shape[1],), (v.shape[1],)))
            self._acc[layer] = (heads, [torch.zeros(2, x.shape[2] * x.shape[3], dtype=torch.float64,
                                                    device=x.device) for x in xs])
        if same and xs[0].numel() < SMALL_PAYLOAD:  # our own copy: hold it
            self._held.append((layer, xs[0], self._grid))
            self._held_elements += xs[0].numel()
            if self._held_elements >= SITE_ELEMENTS:
                self._flush()
            return
        masks, n, n0 = self._masks(self._grid)
        self._count(layer, n, n0)
        with few_threads(work=q.numel()):
            for x, total in zip(xs, self._acc[layer][1]):
                sq = x.reshape(-1, x.shape[2] * x.shape[3]).float()  # [B * T, heads * d]
                # in place only on our own copy: reshape and float return the model's tensor where they can
                sq = sq.square_() if same or sq.data_ptr() != x.data_ptr() else sq.square()
                total.add_(torch.mm(masks.to(sq.device), sq))  # [2, B * T] @ [B * T, heads * d]

    def _count(self, layer: int, n: int, n0: int) -> None:
        self._n[layer][0] += n
        self._n[layer][1] += n0

    def _flush(self) -> None:
        """Reduce the held rows: per layer, its held calls' rows squared together, then one small product per call."""
        held, self._held, self._held_elements = self._held, [], 0
        if not held:
            return
        by_layer: dict[int, list] = {}
        for layer, x, grid in held:
            m, n, n0 = self._masks(grid)
            self._count(layer, n, n0)
            by_layer.setdefault(layer, []).append((x, m))
        with torch.no_grad(), few_threads(work=max(sum(x.numel() for x, _ in v) for v in by_layer.values())):
            for layer, parts in by_layer.items():
                total = self._acc[layer][1][0]
                rows = torch.cat([x.reshape(-1, total.shape[1]) for x, _ in parts]).float().square_()
                # one product per held call, each on its own rows as an unheld call would compute it, so the float32
                # sums do not depend on which calls were held together (a checkpoint reduces at other points);
                # in a tight loop here they cost a fraction of what they cost between forwards
                sums, start = [], 0
                for x, m in parts:
                    n = m.shape[1]
                    sums.append(torch.mm(m.to(rows.device), rows[start:start + n]))  # [2, B * T] @ [B * T, heads * d]
                    start += n
                total.add_(torch.stack(sums).double().sum(0))

    def merge(self, other: "QKMeter") -> "QKMeter":
        self._flush()
        other._flush()
        for layer, (heads, parts) in other._acc.items():
            if layer in self._acc and self._acc[layer][0] == heads:
                for total, part in zip(self._acc[layer][1], parts):
                    total.add_(part.to(total.device))
            elif layer in self._acc:
                raise ValueError(f"QKMeter: layer {layer}'s heads differ between the meters merged")
            else:
                self._acc[layer] = (heads, [p.clone() for p in parts])
        for mine, theirs in zip(self._n, other._n):
            mine[0] += theirs[0]
            mine[1] += theirs[1]
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"tokens": self.tokens, **{f"sum.{k}": v.contiguous().clone() for k, v in self.sums.items()}}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> "QKMeter":
        self._held, self._held_elements = [], 0
        sums: dict[int, dict[str, list]] = {}
        for name, v in state.items():
            if name == "tokens":
                if tuple(v.shape) != (self.num_layers, 2):
                    raise ValueError("QKMeter state 'tokens' does not fit")
                self._n = v.tolist()
            elif name.startswith("sum.") and len(parts := name[4:].split(".")) == 3 and parts[0].isdigit() \
                    and parts[1] in PROJ and parts[2] in ("all", "no0"):
                sums.setdefault(int(parts[0]), {}).setdefault(parts[1], [None, None])[parts[2] == "no0"] = v
            else:
                raise ValueError(f"QKMeter state {name!r} does not fit")
        self._acc = {}
        for layer, by_proj in sums.items():
            if set(by_proj) != set(PROJ) or any(t is None for pair in by_proj.values() for t in pair):
                raise ValueError(f"QKMeter state of layer {layer} is incomplete")
            parts = [torch.stack(by_proj[p]).double() for p in PROJ]  # [2, H, d] each
            heads = tuple(p.shape[1] for p in parts)
            if len({p.shape[-1] for p in parts}) == 1:
                self._acc[layer] = (heads,), [torch.cat(parts, dim=1).flatten(1)]
            else:
                self._acc[layer] = tuple((h,) for h in heads), [p.flatten(1) for p in parts]
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
                         (N[1].gather(1, idx) / med[1, :, None]).tolist())
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
                            pair = self.pair_of(dim, d, rot) if proj != "v" else None
                            if pair is not None and pair < rot // 2:
                                e["pair"], e["wavelength"] = pair, 2 * math.pi / float(freqs[pair])
                            entries.append(e)
            by_layer.append(row)
        out = {"entries": entries, "by_layer": by_layer, "rotary_dims": rot, "context_length": context,
               "tokens": self.tokens[:, 0].tolist(), "latent": self.latent, "norms": norms}
        qk_dim = next((len(h[0]) for h in norms["q"] if h), 0)
        out["pair_of_dim"] = [self.pair_of(d, qk_dim, rot) for d in range(qk_dim)]  # Q and K; V has no rotation
        if unmeasured:
            out["unmeasured_layers"] = unmeasured  # their attention does not use transformers' attention interface
        if self.layers_without_attention:
            out["no_attention"] = list(self.layers_without_attention)
        return out
