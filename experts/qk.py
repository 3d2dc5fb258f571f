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

import torch
from torch import nn

from workbench.adapters.base import Adapter
from workbench.tracing.attention_tap import AttentionTap
from workbench.tracing.capture import few_threads

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
        self.sums: dict[str, torch.Tensor] = {}  # f"{layer}.{proj}.{all|no0}" -> [heads, dim] float64
        self.tokens = torch.zeros(num_layers, 2, dtype=torch.int64)  # [layer, all|no0]
        self._tap: AttentionTap | None = None
        self._attn: dict[int, nn.Module] = {}
        self.layers_without_attention: list[int] = []
        self.latent = False  # DeepSeek's latent attention: its rotary dims are the last ones of a head
        self._rope: tuple[int, int, bool] | None = None  # latent attention: (nope dims, rope dims, interleaved pairs)
        self._pending: list = []  # (layer, fused, heads per projection, heads, dim, [2, heads * dim]) of this batch
        self._seen: list[int] = []  # layers updated in this batch

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
        """The batch's token grid ``[B, T]`` (-1 at padding)."""
        self._flush()
        valid = grid >= 0
        no0 = valid.clone()
        first = valid.to(torch.int8).argmax(-1)  # each prompt's first real token (left or right padding)
        no0[torch.arange(grid.shape[0]), first] = False
        self._shape = tuple(grid.shape)
        self._masks = torch.stack([valid, no0], dim=1).float()[:, None]  # [B, 1, 2, T]: all tokens, without the first
        self._counts = (int(valid.sum()), int(no0.sum()))

    # ----- reduction ---------------------------------------------------------------------------------
    def update(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """``q [B, H, T, d]``, ``k`` and ``v [B, KV, T, d]`` as the attention function gets them (after RoPE).

        Few ops per call (the cost is per call on small models): Q, K and V side by side, squared in place,
        both token masks in one batched matmul over the [B, H, T, d] layout (no transposed copy), the batch's
        float32 sums kept on the device until the next batch adds them to the float64 totals."""
        if getattr(self, "_shape", None) != (q.shape[0], q.shape[2]):  # not the batch's prompt pass (a cached step)
            return
        with torch.no_grad(), few_threads(work=q.numel()):
            if self._masks.device != q.device:
                self._masks = self._masks.to(q.device)
            same = q.shape[-1] == k.shape[-1] == v.shape[-1]
            for x in ((torch.cat((q, k, v), dim=1),) if same else (q, k, v)):
                sq = x.float()
                sq = sq.square_() if same or sq is not x else sq.square()  # in place where it is our own copy
                # [B, 1, 2, T] @ [B, H, T, d] -> [B, H, 2, d], summed over prompts: both masks, no transposed copy
                self._pending.append((layer, same, (q.shape[1], k.shape[1], v.shape[1]), x.shape[1], x.shape[-1],
                                      torch.matmul(self._masks, sq).sum(0)))  # [H, 2, d]
            self._seen.append(layer)

    def _flush(self) -> None:
        """Add the pending float32 batch sums to the float64 totals."""
        pending, self._pending = self._pending, []
        split: dict[int, list] = {}
        for layer, same, heads, h, d, sq in pending:
            sq = sq.double().cpu().transpose(0, 1).contiguous()  # [2, H, d]
            parts = sq.split(list(heads), dim=1) if same else [sq]
            split.setdefault(layer, []).extend(parts)
        for layer, parts in split.items():
            for proj, part in zip(PROJ, parts):
                for which, t in zip(("all", "no0"), part):
                    key = f"{layer}.{proj}.{which}"
                    self.sums[key] = self.sums[key] + t if key in self.sums else t.clone()
        for layer in self._seen:
            self.tokens[layer, 0] += self._counts[0]
            self.tokens[layer, 1] += self._counts[1]
        self._seen = []

    def merge(self, other: "QKMeter") -> "QKMeter":
        self._flush()
        other._flush()
        for key, v in other.sums.items():
            self.sums[key] = self.sums[key] + v if key in self.sums else v.clone()
        self.tokens += other.tokens
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        self._flush()
        return {"tokens": self.tokens.clone(), **{f"sum.{k}": v.clone() for k, v in self.sums.items()}}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> "QKMeter":
        for name, v in state.items():
            if name == "tokens":
                if v.shape != self.tokens.shape:
                    raise ValueError("QKMeter state 'tokens' does not fit")
                self.tokens = v.clone()
            elif name.startswith("sum."):
                self.sums[name[4:]] = v.clone()
            else:
                raise ValueError(f"QKMeter state {name!r} does not fit")
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
        self._flush()
        s = self.sums.get(f"{layer}.{proj}.{which}")
        return None if s is None else s.sqrt()

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
        for layer in range(self.num_layers):
            row = {"layer": layer}
            if self.norms(layer, "q") is None:
                if layer not in self.layers_without_attention:
                    unmeasured.append(layer)  # its attention does not use transformers' attention interface
                for proj in PROJ:
                    norms[proj].append(None)
                continue
            for proj in PROJ:
                M, M0 = self.norms(layer, proj), self.norms(layer, proj, "no0")
                norms[proj].append(M.tolist())
                # the median as numpy has it (the mean of the two middle values for an even head size)
                med = M.quantile(0.5, dim=-1).clamp(min=1e-30)
                med0 = M0.quantile(0.5, dim=-1).clamp(min=1e-30)
                ratios = M.max(dim=-1).values / med
                row[proj] = float(ratios.max())
                for h in range(M.shape[0]):
                    for d in M[h].argsort(descending=True)[:top].tolist():
                        e = {"layer": layer, "proj": proj, "head": h, "dim": d, "norm": float(M[h, d]),
                             "ratio": float(M[h, d] / med[h]), "ratio_no_pos0": float(M0[h, d] / med0[h]),
                             "pair": None, "wavelength": None}
                        pair = self.pair_of(d, M.shape[1], rot) if proj != "v" else None
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
