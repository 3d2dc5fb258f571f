"""Attention sinks: how much attention mass each head sends to position 0 and to its top key.

Needs attention probabilities, so the profile runs with eager attention (the model's attention
implementation is switched for the pass and restored after). Each prompt's share is the mean over
its queries (position 0 is left out: it can only attend to itself); the reported figure is the
mean over prompts (prompts of one token are skipped, and so is a prompt whose attention in a layer is not
finite, from an overflow upstream: it is left out of that layer and counted in ``nonfinite_prompts``).
Shares are of the whole softmax: where a learned sink takes part of it (gpt-oss, whose returned probabilities
leave its column out and sum to less than 1), that part is ``share_learned_sink``, reported only there.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn

from workbench.adapters.base import Adapter
from workbench.tracing.capture import few_threads


def strongest_heads(share_pos0: list[list[float]], n: int) -> list[tuple[float, int, int]]:
    """The ``n`` heads with the largest share of attention on position 0 (``attention_sinks.share_pos0`` of a
    profile), as (share, layer, head), largest first; heads without a measurement (NaN) are skipped."""
    return sorted(((v, l, h) for l, row in enumerate(share_pos0) for h, v in enumerate(row) if v == v), reverse=True)[:n]


class SinkMeter:
    """Per (layer, head): mean share of attention on key 0, and on each prompt's top key."""

    def __init__(self, num_layers: int, num_heads: int):
        self.pos0_sum = torch.zeros(num_layers, num_heads, dtype=torch.float64)
        self.queries = torch.zeros(num_layers, dtype=torch.int64)
        self.top_sum = torch.zeros(num_layers, num_heads, dtype=torch.float64)
        self.top_is_first = torch.zeros(num_layers, num_heads, dtype=torch.int64)
        self.prompts = torch.zeros(num_layers, dtype=torch.int64)
        # prompts left out of a layer because its attention there was not finite (NaN from an overflow upstream)
        self.nonfinite = torch.zeros(num_layers, dtype=torch.int64)
        # the attention the returned probabilities hold (per prompt, summed over keys): below 1 where a learned sink
        # (gpt-oss) takes the rest of the softmax
        self.mass_sum = torch.zeros(num_layers, num_heads, dtype=torch.float64)
        self._handles: list = []
        self._prompts = 0  # prompts with queries in the current batch (set by begin_batch)
        self.no_attention: list[int] = []  # layers without softmax attention (set by install)
        self._batch: list[tuple[int, torch.Tensor]] = []  # this batch's (layer, per-key sums), finished together
        self._eps = torch.finfo(torch.float32).eps  # of the coarsest probabilities met: their row sums are 1 to it

    def install(self, model: nn.Module, adapter: Adapter) -> None:
        """Hook every layer's attention; a hybrid model's linear-attention layers have no probabilities and
        report NaN (``result()["no_attention"]`` lists them)."""
        self.no_attention = []
        for i, layer in enumerate(adapter.decoder_layers(model)):
            if not adapter.has_attention(layer):
                self.no_attention.append(i)
                continue
            self._handles.append(adapter.attention(layer).register_forward_hook(self._hook(i)))

    def remove(self) -> None:
        self._finish()
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def begin_batch(self, grid: torch.Tensor) -> None:
        """The batch's token grid ``[B, T]`` (-1 at padding); what every layer's update shares is set up once (in
        numpy: a dozen torch ops per batch cost more than the arithmetic on a small model)."""
        self._finish()
        q_ok = grid.detach().cpu().numpy() >= 0
        q_ok[:, 0] = False  # position 0 can only attend to itself
        nq = q_ok.sum(-1)  # [B] queries per prompt
        has = np.flatnonzero(nq > 0)
        self._has = None if has.size == nq.size else torch.from_numpy(has).to(grid.device)  # None: every prompt
        self._rows = torch.from_numpy(q_ok.astype(np.float32)).to(grid.device)[:, None, None, :]  # [B, 1, 1, Tq]
        self._nq = torch.from_numpy(nq[has].astype(np.float64)).to(grid.device)[:, None, None]
        self._queries, self._prompts = int(nq.sum()), int(has.size)

    def _hook(self, layer: int):
        def hook(mod, args, out):
            weights = out[1] if isinstance(out, tuple) and len(out) > 1 else None
            if weights is None:
                raise RuntimeError("attention weights are not returned: run with eager attention")
            with few_threads(work=weights.numel()):
                self.update(layer, weights.detach())
        return hook

    def update(self, layer: int, weights: torch.Tensor) -> None:
        """``weights [B, H, Tq, Tk]`` for the current batch (padding rows are dropped here)."""
        if not self._prompts:
            return
        # Sum over valid queries as one batched matmul in the weights' dtype (float32 accumulation):
        # [B, 1, 1, Tq] @ [B, H, Tq, Tk] -> [B, H, Tk] (2.5-7x faster on CPU than the same einsum, which copies
        # the weights to contract over Tq). The rest waits for the batch's other layers (_finish).
        rows = self._rows if weights.dtype == torch.float32 else self._rows.to(weights.dtype)
        if weights.dtype.is_floating_point:
            self._eps = max(self._eps, torch.finfo(weights.dtype).eps)
        self._batch.append((layer, torch.matmul(rows, weights).squeeze(2)))

    def _finish(self) -> None:
        """The batch's per-prompt means (float64), their top key and position 0: all its layers at once."""
        if not self._batch:
            return
        batch, self._batch = self._batch, []
        layers = torch.tensor([l for l, _ in batch])
        summed = torch.stack([x for _, x in batch])  # [L, B, H, Tk]
        if self._has is not None:
            summed = summed.index_select(1, self._has)
        per_key = summed.to(torch.float64).div_(self._nq)  # [L, b, H, Tk]: per-prompt means
        top, pos = per_key.max(-1)  # a NaN anywhere in a prompt's keys makes its top NaN
        top_sum, pos0, first = top.sum(1), per_key[..., 0], pos == 0
        mass = per_key.sum(-1)  # [L, b, H]
        if bool(torch.isfinite(top_sum).all()):
            queries = torch.full((len(batch),), self._queries)
            prompts = torch.full((len(batch),), self._prompts)
        else:  # prompts whose attention in a layer is not finite are left out of that layer, and counted
            ok = torch.isfinite(top).all(-1)  # [L, b]
            top_sum = torch.where(ok[..., None], top, 0).sum(1)
            mass = torch.where(ok[..., None], mass, 0)
            pos0, first = torch.where(ok[..., None], pos0, 0), first & ok[..., None]
            queries = (self._nq.flatten() * ok).sum(1).round().to(torch.int64).cpu()
            prompts = ok.sum(1).cpu()
            self.nonfinite.index_add_(0, layers, (~ok).sum(1).cpu())
        self.pos0_sum.index_add_(0, layers, pos0.sum(1).cpu())
        self.top_sum.index_add_(0, layers, top_sum.cpu())
        self.mass_sum.index_add_(0, layers, mass.sum(1).cpu())
        self.top_is_first.index_add_(0, layers, first.sum(1).cpu())
        self.queries.index_add_(0, layers, queries)  # a layer run twice counts twice
        self.prompts.index_add_(0, layers, prompts)

    STATE = ("pos0_sum", "queries", "top_sum", "top_is_first", "prompts", "nonfinite", "mass_sum")

    def merge(self, other: "SinkMeter") -> "SinkMeter":
        self._finish()
        other._finish()
        for name in self.STATE:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self._eps = max(self._eps, other._eps)
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Copies of the running sums (for checkpoints and merging ranks)."""
        self._finish()
        return {name: getattr(self, name).clone() for name in self.STATE}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> "SinkMeter":
        for name, v in state.items():
            if name not in self.STATE or v.shape != getattr(self, name).shape:
                raise ValueError(f"SinkMeter state {name!r} does not fit")
            setattr(self, name, v.clone())
        if "mass_sum" not in state:  # a state written before it was kept: the learned-sink share is not known
            self.mass_sum = torch.full_like(self.mass_sum, float("nan"))
        return self

    def empty(self) -> "SinkMeter":
        return SinkMeter(*self.pos0_sum.shape)

    def result(self) -> dict:
        self._finish()
        n = self.prompts.clamp(min=1).to(torch.float64)[:, None]
        skip = self.no_attention
        unmeasured = self.prompts == 0  # no prompt of 2+ tokens reached the layer: nothing was measured there

        def per_layer(x: torch.Tensor) -> list:
            x = x.clone()
            x[skip] = float("nan")  # linear-attention layers: no attention probabilities
            x[unmeasured] = float("nan")
            return x.tolist()
        out = {
            "share_pos0": per_layer(self.pos0_sum / n),  # [layer][head], mean over prompts
            "share_top": per_layer(self.top_sum / n),
            "top_is_pos0": per_layer(self.top_is_first / n),
            "queries": self.queries.tolist(),
            "prompts": self.prompts.tolist(),
        }
        if skip:
            out["no_attention"] = list(skip)
        learned = per_layer(1 - self.mass_sum / n)  # NaN where nothing was measured
        # a learned sink took part of the softmax (gpt-oss); bf16 probabilities alone miss 1 by up to ~1e-3, which
        # made SmolLM2 "have" learned sinks of -0.00
        if any(v > max(1e-4, self._eps) for row in learned for v in row):
            out["share_learned_sink"] = learned
        if bool(self.nonfinite.any()):
            out["nonfinite_prompts"] = self.nonfinite.tolist()  # per layer: left out, their attention not finite
        return out


@contextlib.contextmanager
def eager_attention(model: nn.Module):
    """Temporarily switch a transformers model to eager attention (which returns probabilities)."""
    before = getattr(model.config, "_attn_implementation", None)
    if before == "eager":
        yield
        return
    model.set_attn_implementation("eager")
    # Models that refuse the dynamic switch (transformers warns: Falcon) but read the config at forward time.
    forced = getattr(model.config, "_attn_implementation", None) != "eager"
    if forced:
        model.config._attn_implementation = "eager"
    try:
        yield
    finally:
        if forced:
            model.config._attn_implementation = before
        elif before is not None:
            model.set_attn_implementation(before)
