"""Router statistics across layers: load, entropy, margin, co-activation, and top-1 change rate."""

from __future__ import annotations

import torch

from workbench.tracing.reducers import Payload


def top1(p: Payload) -> torch.Tensor:
    """The highest-scored chosen expert per token (chosen slots need not be sorted, e.g. DeepSeek)."""
    scores = p.values.gather(1, p.topk.to(torch.int64))
    return p.topk.gather(1, scores.argmax(1, keepdim=True)).squeeze(1).to(torch.int64)


class ChangeRate:
    """Share of tokens whose top-1 expert index differs between adjacent MoE layers.

    Router sites fire in layer order within a forward; we keep only the previous layer's top-1 of
    the current batch (tokens x 1 integers), so memory does not grow with the corpus.
    """

    def __init__(self, layers: list[int]):
        self.layers = sorted(layers)
        self.changed = {l: 0 for l in self.layers[1:]}
        self.total = {l: 0 for l in self.layers[1:]}
        self._last: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def sink(self, layer: int):
        tracker = self

        class _Sink:
            def update(self, p: Payload) -> None:
                tracker._update(layer, p)

        return _Sink()

    def _update(self, layer: int, p: Payload) -> None:
        tokens, t1 = p.tokens.cpu(), top1(p).cpu()
        i = self.layers.index(layer)
        if i > 0:
            prev = self._last.get(self.layers[i - 1])
            if prev is not None and torch.equal(prev[0], tokens):
                self.changed[layer] += int((prev[1] != t1).sum())
                self.total[layer] += int(t1.numel())
        self._last[layer] = (tokens, t1)

    def merge(self, other: "ChangeRate") -> "ChangeRate":
        for l in self.changed:
            self.changed[l] += other.changed[l]
            self.total[l] += other.total[l]
        return self

    def result(self) -> dict[int, float]:
        return {l: self.changed[l] / self.total[l] if self.total[l] else float("nan") for l in self.changed}
