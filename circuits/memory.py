"""How much memory a circuit run needs, and the batch size and mode that keep it within a budget.

The floor of edge attribution is what must be kept while a batch is scored: every sender's output
difference (corrupted - current) at every position, ``S x d`` values per prompt token in the storage
dtype (``floor_per_token``). Per token of the batch in flight a run keeps, besides the model:

* ``fast`` mode (the default when it fits): the corrupted senders and this step's senders (two
  floors), the corrupted residual at every stage (``P x d``), the model's own autograd activations
  (measured by :func:`autograd_per_token` on the facts' longest prompt) and the backward's transients;
  evaluation keeps the corrupted and the current senders (two floors) and the residuals.
* ``lean`` mode: one sender buffer (one floor; the corrupted forward is rerun into it every step and
  before every evaluated circuit), the residuals, each decoder layer's input (activation checkpointing:
  one layer's activations at a time) and the same transients: about two more forwards per IG step.
  The heap is kept from fragmenting (glibc's mmap threshold is fixed at 64 KB), which costs time too.

The backward's transients (each stage's receiver gradients, mapped through the norm and laid out for
the contraction, and autograd's own) are ``TRANSIENT x`` the largest stage's receivers x d x 4 bytes in
fast mode (a constant measured on SmolLM2-135M with 8 prompts of 165 tokens) and ``TRANSIENT_LEAN x``
in lean mode, where only one checkpointed layer's backward is in flight: fitted, on 8 prompts of 161
tokens at batch 8, to SmolLM2-135M (1.13 MB per token measured above the plan's base, 2.9 units) and the
hidden-1,024 64-expert Qwen3-MoE of ``bench/profile_overhead.py`` (2.98 MB, 4.6 units), rounded up, so
the lean per-token estimate is 7 % and 4 % above those runs' (it was 31 % and 72 % above with 12) and
8 % above the peak of a held-out run (8 prompts of 350 tokens). ``bench/circuit_scale.py`` prints a
run's estimate beside its measured peak (TinyLlama-shaped 1.1B, 512 tokens: 14.9 GB estimated, 13.4 GB
peak RSS; SmolLM2, the same 8 prompts, fast mode: 5.0 GB estimated, 4.98 GB peak).

On a GPU (``--device cuda``) the buffers, the model and its activations live on the device, so the plan's
base is what the process has allocated there and the budget what the device has free (:func:`in_use`); the
per-token figures are the same (the autograd probe counts bytes, wherever they are).
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
from dataclasses import dataclass

import torch

from workbench.errors import WorkbenchError

TRANSIENT = 12  # backward transients, in units of (largest stage's receivers x d x 4 bytes) per token
TRANSIENT_LEAN = 5  # the same in lean mode (one checkpointed layer's backward at a time)
SLACK = 1.15  # allocator overhead and what the constants miss
PROBE_TOKENS = 256  # the autograd probe runs on at most this many tokens of the longest prompt
GB = 2**30


@dataclass
class Plan:
    batch_size: int
    lean: bool
    store: torch.dtype
    estimate: int  # bytes: the process's peak, model included
    base: int  # bytes in use before the run (model, runtime)
    per_token: int  # bytes per token of the batch in flight
    floor_per_token: int
    budget: int | None  # bytes, or None (no limit)
    tokens: int  # the largest batch's padded token count
    device: str = "cpu"  # where the run's buffers live: the CPU (figures are the process's RSS) or a GPU

    def describe(self) -> str:
        budget = f"; budget {self.budget / GB:.1f} GB" if self.budget else ""
        where = "" if self.device == "cpu" else f" on {self.device}"
        store = str(self.store).replace("torch.", "")
        return (f"memory: ~{self.estimate / GB:.1f} GB{where} for these facts (batch {self.batch_size} of up to "
                f"{self.tokens} padded tokens, {'lean' if self.lean else 'fast'} mode, {store} storage: "
                f"{self.per_token / 2**20:.2f} MB per token, {self.per_token / self.floor_per_token:.1f}x the "
                f"floor of {self.floor_per_token / 2**20:.2f} MB{budget})")

    def to_dict(self) -> dict:
        return {"batch_size": self.batch_size, "mode": "lean" if self.lean else "fast",
                "store": str(self.store).replace("torch.", ""), "estimate_gb": round(self.estimate / GB, 3),
                "per_token_mb": round(self.per_token / 2**20, 4),
                "floor_per_token_mb": round(self.floor_per_token / 2**20, 4),
                "budget_gb": None if self.budget is None else round(self.budget / GB, 3), "max_batch_tokens": self.tokens,
                "base_gb": round(self.base / GB, 3), "device": self.device}


def rss() -> int:
    """This process's resident memory in bytes (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def available() -> int | None:
    """Bytes the system can still give (MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def in_use(device: torch.device) -> tuple[int, int | None]:
    """``(bytes in use, bytes still free)`` where a run on ``device`` keeps its buffers: on a CUDA device the
    caching allocator's allocated bytes (its cache emptied first) and the device's free memory; elsewhere this
    process's RSS (the heap trimmed first) and what the system has available (None where unknown)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return torch.cuda.memory_allocated(device), torch.cuda.mem_get_info(device)[0]
    trim_heap()
    return rss(), available()


def floor_per_token(graph, store: torch.dtype) -> int:
    return graph.n_senders * graph.d_model * torch.empty(0, dtype=store).element_size()


def autograd_per_token(lm, graph, ids: list[int]) -> float:
    """Bytes per token the model's autograd keeps for backward in a receivers' grad forward (parameters
    and the runner's own buffers excluded), measured on (at most ``PROBE_TOKENS`` of) ``ids``."""
    from workbench.circuits.runner import GraphRunner

    ids = torch.tensor([ids[:PROBE_TOKENS]], device=next(lm.model.parameters()).device)
    params = {p.untyped_storage().data_ptr() for p in lm.model.parameters()}
    seen: set[int] = set()
    total = [0]

    def pack(t):
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr not in params and ptr not in seen:
            seen.add(ptr)
            total[0] += st.nbytes()
        return t

    with GraphRunner(lm.model, lm.adapter, graph) as runner, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        runner.forward(ids, mode="grad", on_grad=lambda st, g: None)
    return total[0] / ids.shape[1]


def per_token_bytes(graph, store: torch.dtype, lean: bool, autograd: float, n_layers: int) -> int:
    """Bytes per token of the batch in flight (see the module docstring): the larger of attribution and
    evaluation."""
    S, P, d = graph.n_senders, len(graph.stages), graph.d_model
    isz = torch.empty(0, dtype=store).element_size()
    widest = max(st.size for st in graph.stages)
    transient = (TRANSIENT_LEAN if lean else TRANSIENT) * widest * d * 4
    senders = (1 if lean else 2) * S * d * isz
    resid = P * d * isz
    if lean:  # layer inputs kept, one layer's activations recomputed at a time
        grad = n_layers * d * 4 + autograd / max(n_layers, 1)
    else:  # the model's activations, and each stage's receiver input kept for the norm's VJP
        grad = autograd
    attribution = senders + resid + grad + transient
    evaluation = senders + resid + 3 * widest * d * 4 + 4 * d * 4
    return int(SLACK * max(attribution, evaluation))


def batch_tokens(lengths: list[int], batch_size: int) -> int:
    """The largest padded batch (rows x longest) when prompts sorted by length go in batches of ``batch_size``."""
    order = sorted(lengths)
    return max(len(order[i:i + batch_size]) * max(order[i:i + batch_size]) for i in range(0, len(order), batch_size))


def plan(lm, graph, prepared, batch_size: int, *, max_memory: float | None = None, store: torch.dtype = torch.float32,
         lean: bool | None = None) -> Plan:
    """The batch size (at most ``batch_size``) and mode for these facts within ``max_memory`` GB (None:
    what the system has available now plus what this process holds; on a GPU, the device's memory: what it
    has free plus what this process has allocated there). Fast mode at the largest batch
    that fits, else lean mode at the largest batch that fits (``lean`` True/False forces a mode); a
    WorkbenchError, before any work, when even one fact at a time cannot fit."""
    if max_memory is not None and not (max_memory > 0 and math.isfinite(max_memory)):
        raise WorkbenchError(f"--max-memory must be a positive number of GB, got {max_memory}")
    if not prepared:
        raise WorkbenchError("no facts to plan a circuit run for")
    from workbench.tracing.runner import check_number

    check_number("batch_size", batch_size)
    lengths = [len(p.ids) for p in prepared]
    longest = max(range(len(prepared)), key=lambda i: lengths[i])
    autograd = autograd_per_token(lm, graph, prepared[longest].ids)
    device = torch.device(lm.device)
    base, avail = in_use(device)  # (what the probe freed goes back first)
    if max_memory is not None:
        budget = int(max_memory * GB)
    else:
        budget = None if avail is None else base + int(0.9 * avail)
    n_layers = len(graph.layers)
    floor = floor_per_token(graph, store)
    modes = [False, True] if lean is None else [lean]
    for mode in modes:
        per = per_token_bytes(graph, store, mode, autograd, n_layers)
        for b in range(min(batch_size, len(prepared)), 0, -1):
            tokens = batch_tokens(lengths, b)
            p = Plan(b, mode, store, base + tokens * per, base, per, floor, budget, tokens, str(device))
            if budget is None or p.estimate <= budget:
                return p
            last = p  # the smallest batch in the leanest mode tried
    raise WorkbenchError(f"these facts need ~{last.estimate / GB:.1f} GB even {last.batch_size} at a time in "
                         f"{'lean' if last.lean else 'fast'} mode (longest prompt {max(lengths)} tokens, "
                         f"{last.per_token / 2**20:.2f} MB per token with {str(store).replace('torch.', '')} storage); "
                         f"the budget is {budget / GB:.2f} GB"
                         + (" (--max-memory)" if max_memory is not None else
                            " (what this machine has free)" if device.type != "cuda" else f" (what {device} has free)")
                         + ": use shorter prompts, --store-dtype bfloat16, or a machine with more memory")


def trim_heap() -> None:
    """Return the heap's free memory to the system (glibc's malloc_trim; nothing elsewhere)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


M_MMAP_THRESHOLD = -3


def limit_heap_growth(threshold: int = 65536) -> bool:
    """Have glibc's malloc serve allocations of ``threshold`` bytes and more by mmap (returned to the
    system when freed) instead of growing a fragmented heap: measured on SmolLM2 and 8 prompts of 165
    tokens in lean mode, peak RSS 3.85 -> 2.73 GB and wall 34 -> 44 s. Returns whether it took effect
    (glibc only)."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False


@contextlib.contextmanager
def heap_limited(on: bool = True):
    """:func:`limit_heap_growth` for the block, then glibc's default threshold (128 KB) again."""
    changed = on and limit_heap_growth()
    try:
        yield
    finally:
        if changed:
            limit_heap_growth(128 * 1024)
