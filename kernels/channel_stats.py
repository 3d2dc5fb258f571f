"""Per-channel statistics of an [N, d] activation matrix in one pass: kernel, launcher, reference.

``channel_stats(x)`` returns :class:`ChannelStats` with, per channel (column) ``c``:

* ``absmax`` [d] fp32: max |x[:, c]| over non-NaN entries; ``argmax`` [d] int64: the row where it
  occurs. Ties go to the **smallest row**. NaN never wins; ``inf`` is a value and wins.
  A channel without a non-NaN entry (N == 0, or all NaN) has absmax 0 and argmax -1, so a channel
  of exact zeros (absmax 0, argmax >= 0) stays distinguishable from an empty one.
* ``sum``, ``sumsq`` [d] fp32: sums of x and x**2 over the **finite** entries, accumulated in fp32
  (NaN and +-inf are skipped, as in the ``moments`` reducer), ``count`` [d] int64: the finite
  entries summed, ``nan`` [d] int64: the NaN entries. ``inf`` entries number N - count - nan.

Results are mergeable: :func:`merge_channel_stats` of two disjoint row ranges equals the stats of
their concatenation (absmax/argmax/counts exactly, sums to fp32 rounding).

Triton: a grid of (row splits x channel blocks); each program streams its rows once, keeping a
running max/row/sums per (row lane, channel) in registers (an elementwise loop body: no per-tile
reduction across threads), reduces its lanes once and writes one partial per split; the [splits, d]
partials are merged on the host (O(splits x d)). Row offsets are int64 (no 2**31 element limit).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from workbench.kernels.dispatch import backend_for, check_matrix, num_programs, next_pow2, triton_jit
from workbench.errors import WorkbenchError

tl = None  # triton.language, bound on the first launch (dispatch.triton_jit)
_BIG = torch.iinfo(torch.int64).max
_CHUNK = 1 << 22  # elements per reference chunk: bounds the reference's extra memory


class ChannelStats(NamedTuple):
    absmax: torch.Tensor  # [d] float32
    argmax: torch.Tensor  # [d] int64 row, -1 where no non-NaN entry
    sum: torch.Tensor  # [d] float32, finite entries
    sumsq: torch.Tensor  # [d] float32, finite entries
    count: torch.Tensor  # [d] int64 finite entries
    nan: torch.Tensor  # [d] int64 NaN entries

    @property
    def mean(self) -> torch.Tensor:
        """Mean of the finite entries (NaN where a channel has none), float64."""
        c = self.count.to(torch.float64)
        return torch.where(self.count > 0, self.sum.to(torch.float64) / c.clamp(min=1), float("nan"))

    @property
    def var(self) -> torch.Tensor:
        """Population variance of the finite entries from the fp32 sums (float64, clamped at 0). One pass, so it
        loses precision where |mean| >> std (a channel of 1000 +- 0.1 reads a std of 0.32); ``workbench reduce``
        reports the std of float64 moments instead (the ``moments`` reducer)."""
        c = self.count.to(torch.float64).clamp(min=1)
        v = self.sumsq.to(torch.float64) / c - self.mean ** 2
        return v.clamp(min=0.0)


def empty_channel_stats(d: int, device: torch.device | str = "cpu") -> ChannelStats:
    f = torch.zeros(d, dtype=torch.float32, device=device)
    i = torch.zeros(d, dtype=torch.int64, device=device)
    return ChannelStats(f, torch.full_like(i, -1), f.clone(), f.clone(), i, i.clone())


def merge_channel_stats(a: ChannelStats, b: ChannelStats, row_offset_b: int = 0) -> ChannelStats:
    """Stats of rows A followed by rows B, where B's rows are numbered from ``row_offset_b``.

    Exact for absmax/argmax/counts: the larger absmax wins, equal ones go to the smaller row index.
    """
    if a.absmax.shape != b.absmax.shape:
        raise WorkbenchError(f"cannot merge channel stats over {a.absmax.numel()} and {b.absmax.numel()} channels")
    b_arg = torch.where(b.argmax >= 0, b.argmax + row_offset_b, b.argmax)
    va, vb = a.argmax >= 0, b.argmax >= 0
    take_b = vb & (~va | (b.absmax > a.absmax) | ((b.absmax == a.absmax) & (b_arg < a.argmax)))
    return ChannelStats(torch.where(take_b, b.absmax, a.absmax), torch.where(take_b, b_arg, a.argmax),
                        a.sum + b.sum, a.sumsq + b.sumsq, a.count + b.count, a.nan + b.nan)


@triton_jit
def _channel_stats_kernel(x_ptr, absmax_ptr, argmax_ptr, sum_ptr, sumsq_ptr, count_ptr, nan_ptr,
                          n_rows, n_cols, stride_n, stride_d, rows_per_split,
                          BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    split = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < n_cols
    row_start = split.to(tl.int64) * rows_per_split
    n_here = tl.minimum(rows_per_split, n_rows - row_start).to(tl.int32)  # rows_per_split < 2**31
    base = x_ptr + row_start * stride_n + (cols.to(tl.int64) * stride_d)[None, :]
    # One accumulator per (row lane, channel): the loop body is elementwise, so no tile needs a
    # cross-thread reduction; the BLOCK_N lanes are reduced once, after the loop.
    best = tl.full([BLOCK_N, BLOCK_D], -1.0, tl.float32)
    best_row = tl.zeros([BLOCK_N, BLOCK_D], tl.int32)
    s = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    ss = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    cnt = tl.zeros([BLOCK_N, BLOCK_D], tl.int32)
    nans = tl.zeros([BLOCK_N, BLOCK_D], tl.int32)
    for r0 in range(0, n_here, BLOCK_N):
        rows = r0 + tl.arange(0, BLOCK_N)  # relative to row_start
        m = (rows < n_here)[:, None] & cmask[None, :]
        x = tl.load(base + rows.to(tl.int64)[:, None] * stride_n, mask=m, other=0.0).to(tl.float32)
        a = tl.abs(x)
        av = tl.where(m & (x == x), a, -1.0)  # NaN and padding never win
        better = av > best  # strict: a lane visits its rows in order, so it keeps its first maximum
        best_row = tl.where(better, rows[:, None], best_row)
        best = tl.where(better, av, best)
        finite = m & (a <= 3.4028234663852886e38)
        xf = tl.where(finite, x, 0.0)
        s += xf
        ss += xf * xf
        cnt += finite.to(tl.int32)
        nans += (x != x).to(tl.int32)  # padding loads 0.0
    top = tl.max(best, axis=0)
    row = tl.min(tl.where(best == top[None, :], best_row, 2147483647), axis=0)  # ties: the smallest row
    out = split.to(tl.int64) * n_cols + cols
    tl.store(absmax_ptr + out, top, mask=cmask)
    tl.store(argmax_ptr + out, tl.where(top >= 0, row.to(tl.int64) + row_start, -1), mask=cmask)
    tl.store(sum_ptr + out, tl.sum(s, axis=0), mask=cmask)
    tl.store(sumsq_ptr + out, tl.sum(ss, axis=0), mask=cmask)
    tl.store(count_ptr + out, tl.sum(cnt, axis=0), mask=cmask)
    tl.store(nan_ptr + out, tl.sum(nans, axis=0), mask=cmask)


def _channel_stats_triton(x: torch.Tensor, splits: int | None = None, block_n: int = 32,
                          block_d: int | None = None, per_sm: int = 2, num_warps: int = 8) -> ChannelStats:
    # Defaults: bench/kernel_sweep.py on an H200 (2026-12-04), the fastest configuration across bf16
    # and fp32 at [65536, 4096] (0.39 ms bf16 = 3.0x the one-read floor, 0.44 ms fp32 = 1.7x).
    n, d = x.shape
    if n == 0 or d == 0:
        return empty_channel_stats(d, x.device)
    block_d = block_d or min(128, next_pow2(d))
    col_blocks = -(-d // block_d)
    if splits is None:
        splits = max(1, num_programs(x.device, per_sm) // col_blocks)
    splits = max(1, min(splits, -(-n // block_n)))
    rows_per_split = -(-(-(-n // splits)) // block_n) * block_n
    splits = -(-n // rows_per_split)
    dev = x.device
    pa = torch.empty(splits, d, dtype=torch.float32, device=dev)
    parg = torch.empty(splits, d, dtype=torch.int64, device=dev)
    ps, pss = torch.empty_like(pa), torch.empty_like(pa)
    pc = torch.empty(splits, d, dtype=torch.int32, device=dev)
    pn = torch.empty_like(pc)
    _channel_stats_kernel[(splits, col_blocks)](x, pa, parg, ps, pss, pc, pn, n, d, x.stride(0), x.stride(1),
                                                rows_per_split, BLOCK_N=block_n, BLOCK_D=block_d,
                                                num_warps=num_warps)
    best = pa.max(dim=0).values
    row = torch.where(pa == best, parg, _BIG).min(dim=0).values  # splits hold increasing row ranges
    none = best < 0
    return ChannelStats(best.masked_fill(none, 0.0), row.masked_fill(none, -1), ps.sum(0), pss.sum(0),
                        pc.sum(0, dtype=torch.int64), pn.sum(0, dtype=torch.int64))


def _channel_stats_chunk(x: torch.Tensor) -> ChannelStats:
    xf = x.float()
    av = xf.abs().nan_to_num_(nan=-1.0, posinf=math.inf)  # NaN -> -1: never wins; inf stays a value
    best, row = av.T.contiguous().max(dim=1)  # first (smallest) maximal row; the transposed copy is ~3x faster
    none = best < 0
    xz = xf.nan_to_num(0.0, 0.0, 0.0)  # finite entries only
    nan = av.clamp(max=0.0).sum(0).neg().to(torch.int64)  # -1 per NaN: exact (a chunk has < 2**24 rows)
    inf = (av == math.inf).sum(0) if bool(torch.isinf(av).any()) else 0  # bool sums are slow on CPU; inf is rare
    count = x.shape[0] - nan - inf
    return ChannelStats(best.masked_fill(none, 0.0), row.masked_fill(none, -1), xz.sum(0), xz.square().sum(0),
                        count, nan)


def _channel_stats_torch(x: torch.Tensor) -> ChannelStats:
    n, d = x.shape
    out = empty_channel_stats(d, x.device)
    step = max(1, _CHUNK // max(d, 1))
    for r0 in range(0, n if d else 0, step):
        out = merge_channel_stats(out, _channel_stats_chunk(x[r0:r0 + step]), r0)
    return out


def channel_stats(x: torch.Tensor, backend: str | None = None) -> ChannelStats:
    """Per-channel absmax/argmax row/sum/sumsq/count/nan of ``x`` [N, d] (bf16/fp16/fp32), one pass."""
    x = check_matrix(x)
    if backend_for(x, backend) == "triton":
        return _channel_stats_triton(x)
    return _channel_stats_torch(x)
