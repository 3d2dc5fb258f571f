"""Data-parallel runs on torch.distributed: each rank reduces a contiguous block of batches.

``torchrun --nproc-per-node N -m workbench profile ...`` starts N copies of the command; each reads
its rank from the environment torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``/``MASTER_PORT``), runs batches ``[n*rank/N, n*(rank+1)/N)`` of the same batching a
single process would use (so every batch, and every global token index, is what it would be in one
process), and at the end rank 0 gathers every rank's reducer state (as flat tensor dicts, over gloo
even when the model runs on NCCL/GPU) and merges them in rank order. Only rank 0 writes outputs.

Exactness: every batch's forward is the single-process one, and absmax, top-k, histograms and counts
merge exactly; float64 sums (router probabilities and entropies, attention-sink shares, moments)
are added in a different order and agree to rounding (~1e-16 relative), which profile.json's 8
significant digits do not show.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Mapping, Sequence

import torch

from workbench.errors import WorkbenchError


@dataclass(frozen=True)
class Shard:
    """This process's place in a data-parallel run."""

    rank: int = 0
    world: int = 1
    group: Any = field(default=None, compare=False, repr=False)  # a gloo process group for CPU objects

    def __post_init__(self):
        if not 0 <= self.rank < self.world:
            raise WorkbenchError(f"rank {self.rank} outside a world of {self.world}")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def batches(self, costs: int | Sequence[int]) -> range:
        """This rank's contiguous block of the batches: ``costs`` is each batch's work (the positions its forward
        computes) or a count of equal batches. A batch goes to the rank whose share of the total work its midpoint
        falls in, so the ranks' work is balanced to within about one batch. (Equal shares of the batch count gave a
        length-sorted run's rank 0 its shortest batches: 156 positions against rank 1's 3,530.)"""
        costs = [1] * costs if isinstance(costs, int) else [int(c) for c in costs]
        total, mids, run = sum(costs), [], 0
        for c in costs:
            mids.append(run + c / 2)
            run += c

        def cut(r: int) -> int:  # batches before rank r's block: those whose midpoint lies in an earlier rank's share
            return len(costs) if r == self.world else sum(m < total * r / self.world for m in mids)
        return range(cut(self.rank), cut(self.rank + 1))

    def combine(self, objs: Mapping[str, Any], info: Any = None) -> list | None:
        """Gather every rank's state on rank 0 and merge it into ``objs`` there, in rank order; on rank 0, return
        every rank's ``info`` (plain data: what it ran), in rank order (None elsewhere)."""
        import torch.distributed as dist

        from workbench.tracing import state

        flat = state.flatten(objs)
        gathered = [None] * self.world if self.is_main else None
        dist.gather_object((flat, info), gathered, dst=0, group=self.group)
        if not self.is_main:
            return None
        for r in range(1, self.world):
            state.merge(objs, gathered[r][0])
        return [g[1] for g in gathered]

    def agree(self, ok: bool) -> bool:
        """Rank 0's ``ok`` on every rank (e.g. "outputs written"): a barrier with one bit of news."""
        import torch.distributed as dist

        box = [bool(ok)]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return bool(box[0])


def env_int(name: str, default: int, low: int = 0) -> int:
    """The integer environment variable ``name`` (``default`` when unset or empty), at least ``low``."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise WorkbenchError(f"environment variable {name}={raw!r} is not an integer") from None
    if value < low:
        raise WorkbenchError(f"environment variable {name}={value} must be at least {low}")
    return value


def from_env(device: str = "cpu") -> tuple[Shard | None, str]:
    """Join the process group torchrun describes, if any; return ``(shard, this rank's device)``.

    Without ``WORLD_SIZE`` > 1 in the environment this does nothing and returns ``(None, device)``.
    CPU runs use gloo; CUDA runs use NCCL for the default group, one GPU per local rank, and a gloo
    group for gathering reducer state (which lives on the CPU).
    """
    world = env_int("WORLD_SIZE", 1)
    if world <= 1:
        return None, device
    import torch.distributed as dist

    if "RANK" not in os.environ:
        raise WorkbenchError("WORLD_SIZE is set but RANK is not: start distributed runs with torchrun")
    rank = env_int("RANK", 0)
    local = env_int("LOCAL_RANK", rank)
    Shard(rank, world)  # a rank outside the world, before waiting for the others
    timeout = timedelta(seconds=env_int("WORKBENCH_DIST_TIMEOUT", 1800, low=1))
    cuda = device.startswith("cuda")
    if cuda:
        if torch.cuda.device_count() <= local:
            raise WorkbenchError(f"local rank {local} has no GPU ({torch.cuda.device_count()} visible)")
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=timeout)
    group = dist.new_group(backend="gloo") if cuda else None
    return Shard(rank, world, group), device


def finish(shard: Shard | None) -> None:
    """Leave the process group (a no-op outside distributed runs)."""
    if shard is None:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
