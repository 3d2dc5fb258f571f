"""Histogram of log10|x| over fixed edges: kernel, launcher, reference.

``log_histogram(x, bins, lo=-6.0, hi=6.0)`` over ``x`` [N, d] (bf16/fp16/fp32) returns
:class:`LogHistogram` with ``counts`` [bins] int64 and 0-d int64 tensors ``zeros``, ``under``,
``over``, ``nan``. Every entry lands in exactly one of them:

* ``nan``: NaN entries;
* ``zeros``: x == 0 (either sign);
* ``under``: 0 < |x| < edges[0] (subnormals included);
* ``counts[i]``: edges[i] <= |x| < edges[i + 1];
* ``over``: |x| >= edges[bins], ``inf`` included.

``edges = log_histogram_edges(bins, lo, hi)`` are ``10 ** linspace(lo, hi, bins + 1)`` computed in
float64 and rounded up to float32, so "|x| >= edge" is the same test in fp32 and fp64. Binning
compares the fp32 bit pattern of |x| with the edges' bit patterns (exact integer compares that
order like the values), so kernel and reference agree bit for bit; the Triton kernel guesses the
bin from a fp32 log2 and corrects it with two compares each way. 1 <= bins <= 4092,
-37 <= lo < hi <= 38 (edges are normal fp32 numbers) and bins at least ``MIN_BIN_WIDTH`` (1e-5) decades wide:
the guess's fp32 error (~4e-6 decades near 1e38) must stay within the corrections; [3, 3.0004) in 4092 bins put
values in the wrong bins. Counts from disjoint parts add up exactly.

Triton: a fixed grid of programs, each streaming a contiguous range of blocks and keeping one
``tl.histogram`` in registers; per-program partials [programs, bins + 4] are summed on the host.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch

from workbench.errors import WorkbenchError
from workbench.kernels.dispatch import backend_for, check_matrix, next_pow2, num_programs, triton_jit

tl = None  # triton.language, bound on the first launch (dispatch.triton_jit)
MAX_BINS = 4092
MIN_BIN_WIDTH = 1e-5  # decades: (hi - lo) / bins at least this (see the module doc)
_CHUNK = 1 << 22  # elements per reference chunk


class LogHistogram(NamedTuple):
    counts: torch.Tensor  # [bins] int64
    zeros: torch.Tensor  # () int64
    under: torch.Tensor  # () int64
    over: torch.Tensor  # () int64
    nan: torch.Tensor  # () int64


def log_histogram_edges(bins: int, lo: float = -6.0, hi: float = 6.0) -> torch.Tensor:
    """The bins + 1 edges, float64 values of float32 numbers (10**linspace rounded up to fp32)."""
    e = torch.pow(10.0, torch.linspace(lo, hi, bins + 1, dtype=torch.float64))
    e32 = e.to(torch.float32)
    e32 = torch.where(e32.to(torch.float64) < e, torch.nextafter(e32, torch.tensor(math.inf)), e32)
    return e32.to(torch.float64)


def _edge_bits(bins: int, lo: float, hi: float, device) -> torch.Tensor:
    return log_histogram_edges(bins, lo, hi).to(torch.float32).view(torch.int32).to(device)


def merge_log_histograms(a: LogHistogram, b: LogHistogram) -> LogHistogram:
    """Counts of two disjoint parts over the same edges, added (exact)."""
    if a.counts.shape != b.counts.shape:
        raise WorkbenchError(f"cannot merge histograms of {a.counts.numel()} and {b.counts.numel()} bins")
    return LogHistogram(*(u + v for u, v in zip(a, b)))


@triton_jit
def _log_histogram_kernel(x_ptr, table_ptr, hist_ptr, n, blocks_per_prog, lo, scale, bins,
                          NB: tl.constexpr, BLOCK: tl.constexpr):
    # code: 0 NaN, 1 zero, 2 under, 3 + i bin i, bins + 3 over. table[c] = lower bound (bits) of c = code - 2.
    pid = tl.program_id(0)
    h = tl.zeros([NB], tl.int32)
    first = pid.to(tl.int64) * blocks_per_prog
    for i in range(0, blocks_per_prog):
        offs = (first + i) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
        bits = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
        a = bits.to(tl.float32, bitcast=True)
        pos = (tl.log2(tl.maximum(a, 1.1754944e-38)) * 0.30102999566398120 - lo) * scale  # 0, subnormal: FLT_MIN
        pos = tl.minimum(tl.maximum(pos, -1.0), bins + 0.0)  # NaN lanes are fixed below
        c = tl.minimum(tl.maximum(tl.floor(pos).to(tl.int32) + 1, 0), bins + 1)
        ok = m & (bits <= 0x7F800000)  # NaN lanes never index the table
        for _ in tl.static_range(2):
            c = tl.where(bits < tl.load(table_ptr + c, mask=ok, other=0), c - 1, c)
            c = tl.where(bits >= tl.load(table_ptr + c + 1, mask=ok, other=0x7FFFFFFF), c + 1, c)
        code = tl.where(bits > 0x7F800000, 0, tl.where(bits == 0, 1, c + 2))
        h += tl.histogram(code, NB, mask=m)
    tl.store(hist_ptr + pid * NB + tl.arange(0, NB), h)


def _split(h: torch.Tensor, bins: int) -> LogHistogram:
    return LogHistogram(h[3:3 + bins].clone(), h[1].clone(), h[2].clone(), h[bins + 3].clone(), h[0].clone())


def _log_histogram_triton(x: torch.Tensor, bins: int, lo: float, hi: float, block: int = 1024) -> LogHistogram:
    flat = x.contiguous().view(-1)
    n, dev = flat.numel(), flat.device
    if n == 0:
        return _split(torch.zeros(bins + 4, dtype=torch.int64, device=dev), bins)
    edges = _edge_bits(bins, lo, hi, dev)
    lim = torch.tensor([0x7FFFFFFF], dtype=torch.int32, device=dev)
    table = torch.cat([torch.zeros(1, dtype=torch.int32, device=dev), edges, lim])  # [bins + 3]
    blocks = -(-n // block)
    per_prog = -(-blocks // min(num_programs(dev), blocks))
    nprog = -(-blocks // per_prog)
    nb = next_pow2(bins + 4)
    part = torch.empty(nprog, nb, dtype=torch.int32, device=dev)
    _log_histogram_kernel[(nprog,)](flat, table, part, n, per_prog, float(lo), bins / (hi - lo), bins,
                                    NB=nb, BLOCK=block)
    return _split(part.sum(0, dtype=torch.int64), bins)


def _log_histogram_torch(x: torch.Tensor, bins: int, lo: float, hi: float) -> LogHistogram:
    flat = x.reshape(-1)
    # One search over [1, edges..., inf + 1]: 0 zero, 1 under, 2 + i bin i, bins + 2 over, bins + 3 NaN.
    i32 = dict(dtype=torch.int32, device=x.device)
    bounds = torch.cat([torch.ones(1, **i32), _edge_bits(bins, lo, hi, x.device), torch.full((1,), 0x7F800001, **i32)])
    h = torch.zeros(bins + 4, dtype=torch.int64, device=x.device)
    for s in range(0, flat.numel(), _CHUNK):
        bits = flat[s:s + _CHUNK].float().view(torch.int32) & 0x7FFFFFFF
        h += torch.bincount(torch.bucketize(bits, bounds, right=True, out_int32=True), minlength=bins + 4)
    return LogHistogram(h[2:2 + bins].clone(), h[0].clone(), h[1].clone(), h[bins + 2].clone(), h[bins + 3].clone())


def log_histogram(x: torch.Tensor, bins: int, lo: float = -6.0, hi: float = 6.0,
                  backend: str | None = None) -> LogHistogram:
    """Histogram of log10|x| on ``bins`` equal-width bins over [lo, hi); see the module doc."""
    x = check_matrix(x)
    if isinstance(bins, bool) or not isinstance(bins, int) or not 1 <= bins <= MAX_BINS:
        raise WorkbenchError(f"bins must be an int in [1, {MAX_BINS}], got {bins!r}")
    for name, v in (("lo", lo), ("hi", hi)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise WorkbenchError(f"log_histogram's {name} must be a number (a power of 10), got {v!r}")
    if not (-37.0 <= lo < hi <= 38.0):
        raise WorkbenchError(f"log_histogram needs -37 <= lo < hi <= 38 (normal fp32 edges), got lo={lo}, hi={hi}")
    if (hi - lo) / bins < MIN_BIN_WIDTH * (1 - 1e-9):  # (38 - 37.99) / 1000 rounds just below
        raise WorkbenchError(f"log_histogram bins of {(hi - lo) / bins:.3g} decades ({bins} over [{lo:g}, {hi:g})) are "
                             f"narrower than {MIN_BIN_WIDTH:g}: fp32 cannot place values that finely; use fewer bins "
                             "or a wider range")
    if backend_for(x, backend) == "triton":
        return _log_histogram_triton(x, bins, float(lo), float(hi))
    return _log_histogram_torch(x, bins, float(lo), float(hi))
