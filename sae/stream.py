"""Forward prompts batch by batch under :class:`Capture`, handing each batch's captured rows to the caller.

The tracing runner reduces as it goes; SAE training and feature attribution need each batch's rows
together (a site and the experts writing into it), so this generator yields after every forward
pass and the caller drains its :class:`Buffer` sinks. Tokenisation, padding and global token indices
are the runner's (``workbench.tracing.runner.tokenize``): prompt order, right padding, padding never
reaches a sink.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from tqdm.auto import tqdm

from workbench.tracing.capture import Capture
from workbench.tracing.reducers import Payload
from workbench.tracing.runner import pad_token, tokenize
from workbench.tracing.sites import Site


class Buffer:
    """A sink that keeps one batch's rows (values, global token indices, router top-k) until taken."""

    def __init__(self):
        self._parts: list[Payload] = []

    def update(self, p: Payload) -> None:
        self._parts.append(p)

    def take(self) -> Payload | None:
        parts, self._parts = self._parts, []
        if not parts:
            return None
        topk = None if parts[0].topk is None else torch.cat([p.topk for p in parts])
        return Payload(torch.cat([p.values for p in parts]), torch.cat([p.tokens for p in parts]), topk)


@dataclass
class Tokens:
    """The tokenised prompts: global token index -> prompt, position, id."""

    ids: list[list[int]]
    prompt: torch.Tensor  # [N]
    position: torch.Tensor  # [N]
    token_id: torch.Tensor  # [N]

    @classmethod
    def of(cls, lm, prompts: Sequence[str], max_tokens: int | None) -> "Tokens":
        ids = tokenize(lm, prompts, max_tokens)
        lengths = torch.tensor([len(x) for x in ids])
        return cls(ids, torch.repeat_interleave(torch.arange(len(ids)), lengths),
                   torch.cat([torch.arange(n) for n in lengths.tolist()]),
                   torch.tensor([t for x in ids for t in x], dtype=torch.int64))

    @property
    def offsets(self) -> torch.Tensor:
        lengths = torch.tensor([len(x) for x in self.ids])
        return torch.cumsum(lengths, 0) - lengths


def forward_batches(lm, tokens: Tokens, sinks: dict[Site, list], *, batch_size: int = 8,
                    prompt_order: Sequence[int] | None = None, meters: Sequence = (), progress: bool = False,
                    desc: str = "") -> Iterator[torch.Tensor]:
    """Run the prompts (in ``prompt_order``, default all) with capture installed; yield each batch's grid [B, T]."""
    pad = pad_token(lm.tokenizer)
    order = list(range(len(tokens.ids))) if prompt_order is None else list(prompt_order)
    offsets = tokens.offsets.tolist()
    device = lm.device
    bar = tqdm(total=sum(len(tokens.ids[i]) for i in order), unit="tok", desc=desc or f"forward {lm.spec}",
               disable=not progress, file=sys.stderr, leave=False)
    body = lm.adapter.body(lm.model)  # activations only: the LM head is skipped
    with Capture(lm.model, lm.adapter, sinks) as cap:
        for b in range(0, len(order), batch_size):
            chunk = order[b:b + batch_size]
            width = max(len(tokens.ids[i]) for i in chunk)
            input_ids = torch.full((len(chunk), width), pad, dtype=torch.int64)
            grid = torch.full((len(chunk), width), -1, dtype=torch.int64)
            for r, i in enumerate(chunk):
                n = len(tokens.ids[i])
                input_ids[r, :n] = torch.tensor(tokens.ids[i])
                grid[r, :n] = torch.arange(offsets[i], offsets[i] + n)
            cap.begin_batch(grid.to(device))
            for m in meters:
                m.begin_batch(grid.to(device))
            with torch.no_grad():  # not around the yield: grad mode is global, and the caller may train
                body(input_ids=input_ids.to(device), attention_mask=(grid >= 0).to(torch.int64).to(device),
                     use_cache=False)
            bar.update(int((grid >= 0).sum()))
            yield grid
    bar.close()
