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

    Router sites fire in layer order within a forward; we keep a layer's top-1 of a batch (tokens x 1
    integers) until the next MoE layer has seen the same batch, so memory does not grow with the
    corpus. Batches are matched by their token indices, so the count is the same whether the run goes
    batch by batch (all layers) or layer by layer (all batches, as in layer streaming).
    """

    def __init__(self, layers: list[int]):
        self.layers = sorted(layers)
        self.changed = {l: 0 for l in self.layers[1:]}
        self.total = {l: 0 for l in self.layers[1:]}
        self._last: dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {l: {} for l in self.layers}

    def sink(self, layer: int):
        tracker = self

        class _Sink:
            def update(self, p: Payload) -> None:
                tracker._update(layer, p)

        return _Sink()

    def _update(self, layer: int, p: Payload) -> None:
        tokens, t1 = p.tokens.cpu(), top1(p).cpu()
        if tokens.numel() == 0:
            return
        key = int(tokens[0])  # a batch's first token index identifies it (indices are unique over a run)
        i = self.layers.index(layer)
        if i > 0:
            prev = self._last[self.layers[i - 1]].pop(key, None)
            if prev is not None and torch.equal(prev[0], tokens):
                self.changed[layer] += int((prev[1] != t1).sum())
                self.total[layer] += int(t1.numel())
        if i < len(self.layers) - 1:
            self._last[layer][key] = (tokens, t1)

    def merge(self, other: "ChangeRate") -> "ChangeRate":
        for l in self.changed:
            self.changed[l] += other.changed[l]
            self.total[l] += other.total[l]
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Counts per layer pair (the pending top-1 of an unfinished batch is not state: runs resume at batches)."""
        return {"changed": torch.tensor([self.changed[l] for l in self.layers[1:]], dtype=torch.int64),
                "total": torch.tensor([self.total[l] for l in self.layers[1:]], dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> "ChangeRate":
        for name in ("changed", "total"):
            if name in state:
                v = state[name].tolist()
                if len(v) != len(self.layers[1:]):  # layer pairs: none for a dense model or a single MoE layer
                    raise ValueError(f"ChangeRate state {name!r} has {len(v)} layers, expected {len(self.layers[1:])}")
                setattr(self, name, dict(zip(self.layers[1:], v)))
        return self

    def empty(self) -> "ChangeRate":
        return ChangeRate(self.layers)

    def result(self) -> dict[int, float]:
        return {l: self.changed[l] / self.total[l] if self.total[l] else float("nan") for l in self.changed}
