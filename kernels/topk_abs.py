"""The k largest |x| of an [N, d] matrix with their row and column: kernel, launcher, reference.

``topk_abs(x, k)`` returns :class:`TopKAbs` with ``values`` [k'] fp32 (|x|, descending), ``rows``
and ``cols`` [k'] int64, where k' = min(k, number of non-NaN entries). The order is total, so the
result does not depend on the backend or on scheduling: larger value first, then smaller row,
then smaller column (row-major position). NaN is never selected; ``inf`` is a value.

Triton, without a full sort. For non-negative floats the fp32 bit pattern orders like the value,
so every comparison is on the 31 bits of |x|.

1. Threshold pass: each block of 1024 entries writes its max. If at least k blocks hold a non-NaN
   entry, the k-th largest block max t is a lower bound of the k-th largest |x| (k blocks each hold
   an entry >= t).
2. Compaction pass: the entries >= t (one atomic per block for its output offset) go to a candidate
   buffer of ``cap`` entries (default max(4k, 2**20)), which are sorted on the host.

Typical inputs take these 2 reads of x. When the threshold pass cannot be used (fewer than k
blocks) or admits more than ``cap`` candidates, a radix select takes over: histogram passes over
the top 11, next 11 and last 9 bits (``tl.histogram``) narrow down the bucket of the k-th largest
until it fits, and if even its exact value has more than ``cap`` copies, a counting pass gives each
block its offset among those ties so that the compaction keeps the first ones in row-major order.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from workbench.errors import WorkbenchError
from workbench.kernels.dispatch import backend_for, check_matrix, num_programs, triton_jit

tl = None  # triton.language, bound on the first launch (dispatch.triton_jit)
_LEVELS = ((31, 20, 2048), (20, 9, 2048), (9, 0, 512))  # (prefix shift, bin shift, bins) of the radix select
_CHUNK = 1 << 22  # elements per reference tie-scan chunk


class TopKAbs(NamedTuple):
    values: torch.Tensor  # [k'] float32 |x|, descending
    rows: torch.Tensor  # [k'] int64
    cols: torch.Tensor  # [k'] int64


@triton_jit
def _block_max_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    bits = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32).to(tl.int32, bitcast=True) & 0x7FFFFFFF
    tl.store(out_ptr + pid, tl.max(tl.where(m & (bits <= 0x7F800000), bits, -1), axis=0))  # -1: no non-NaN entry


@triton_jit
def _bits_hist_kernel(x_ptr, hist_ptr, n, prefix, blocks_per_prog, PREFIX_SHIFT: tl.constexpr,
                      SHIFT: tl.constexpr, NB: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    h = tl.zeros([NB], tl.int32)
    first = pid.to(tl.int64) * blocks_per_prog
    for i in range(0, blocks_per_prog):
        offs = (first + i) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        bits = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32).to(tl.int32, bitcast=True) & 0x7FFFFFFF
        sel = m & (bits <= 0x7F800000) & ((bits >> PREFIX_SHIFT) == prefix)
        h += tl.histogram((bits >> SHIFT) & (NB - 1), NB, mask=sel)
    tl.store(hist_ptr + pid * NB + tl.arange(0, NB), h)


@triton_jit
def _tie_count_kernel(x_ptr, count_ptr, n, thr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    bits = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32).to(tl.int32, bitcast=True) & 0x7FFFFFFF
    tl.store(count_ptr + pid, tl.sum((m & (bits == thr)).to(tl.int32), axis=0))


@triton_jit
def _compact_kernel(x_ptr, idx_ptr, counter_ptr, tie_off_ptr, n, thr, capacity, ties_base, m_ties,
                    SHIFT: tl.constexpr, TIES: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    bits = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32).to(tl.int32, bitcast=True) & 0x7FFFFFFF
    valid = m & (bits <= 0x7F800000)
    key = bits >> SHIFT
    if TIES:
        sel = valid & (key > thr)
    else:
        sel = valid & (key >= thr)
    s = sel.to(tl.int32)
    pos = tl.atomic_add(counter_ptr, tl.sum(s, axis=0).to(tl.int64)) + tl.cumsum(s, axis=0) - 1
    tl.store(idx_ptr + pos, offs, mask=sel & (pos < capacity))  # the counter still counts past capacity
    if TIES:
        t = valid & (key == thr)
        rank = tl.load(tie_off_ptr + pid) + tl.cumsum(t.to(tl.int32), axis=0) - 1
        tl.store(idx_ptr + ties_base + rank, offs, mask=t & (rank < m_ties))


def _finish(flat: torch.Tensor, idx: torch.Tensor, k: int, d: int) -> TopKAbs:
    """Order candidates by (|x| descending, position ascending) and keep k."""
    idx = torch.sort(idx).values
    v = flat[idx].float().abs()
    order = torch.argsort(-v, stable=True)[:k]
    idx = idx[order]
    return TopKAbs(v[order], idx // d, idx % d)


def _empty(device) -> TopKAbs:
    e = torch.zeros(0, dtype=torch.int64, device=device)
    return TopKAbs(torch.zeros(0, dtype=torch.float32, device=device), e, e.clone())


def _topk_abs_triton(x: torch.Tensor, k: int, cap: int | None = None, block: int = 1024) -> TopKAbs:
    d = x.shape[1]
    flat = x.contiguous().view(-1)
    n, dev = flat.numel(), flat.device
    if n == 0 or k == 0:
        return _empty(dev)
    cap = max(k, cap if cap is not None else max(4 * k, 1 << 20))
    blocks = -(-n // block)
    counter = torch.zeros(1, dtype=torch.int64, device=dev)
    if blocks >= k:  # threshold pass: the k-th largest block max bounds the k-th largest entry from below
        bmax = torch.empty(blocks, dtype=torch.int32, device=dev)
        _block_max_kernel[(blocks,)](flat, bmax, n, BLOCK=block)
        t = int(torch.topk(bmax, k, sorted=False).values.min())
        if t >= 0:
            idx = torch.empty(min(cap, n), dtype=torch.int64, device=dev)
            _compact_kernel[(blocks,)](flat, idx, counter, counter, n, t, idx.numel(), 0, 0, SHIFT=0, TIES=False,
                                       BLOCK=block)
            found = int(counter)
            if found <= idx.numel():
                return _finish(flat, idx[:found], k, d)
            counter.zero_()
    per_prog = -(-blocks // min(num_programs(dev), blocks))
    nprog = -(-blocks // per_prog)
    above = prefix = kk = 0
    for level, (pshift, shift, nb) in enumerate(_LEVELS):
        part = torch.empty(nprog, nb, dtype=torch.int32, device=dev)
        _bits_hist_kernel[(nprog,)](flat, part, n, prefix, per_prog, PREFIX_SHIFT=pshift, SHIFT=shift, NB=nb,
                                    BLOCK=block)
        h = part.sum(0, dtype=torch.int64).cpu()
        if level == 0:
            kk = min(k, int(h.sum()))  # h counts every non-NaN entry
            if kk == 0:
                return _empty(dev)
        from_top = h.flip(0).cumsum(0)
        j = int(torch.searchsorted(from_top, kk - above))  # first bucket from the top reaching k
        b = nb - 1 - j
        above += int(from_top[j] - h[b])
        prefix = (prefix << (pshift - shift)) | b
        if above + int(h[b]) <= cap:
            idx = torch.empty(above + int(h[b]), dtype=torch.int64, device=dev)
            _compact_kernel[(blocks,)](flat, idx, counter, counter, n, prefix, idx.numel(), 0, 0, SHIFT=shift,
                                       TIES=False, BLOCK=block)
            return _finish(flat, idx, kk, d)
    # prefix is now the exact bit pattern of the k-th largest |x|, and it has more than cap copies.
    ties = torch.empty(blocks, dtype=torch.int32, device=dev)
    _tie_count_kernel[(blocks,)](flat, ties, n, prefix, BLOCK=block)
    offsets = torch.cumsum(ties, 0, dtype=torch.int64) - ties
    idx = torch.empty(kk, dtype=torch.int64, device=dev)
    _compact_kernel[(blocks,)](flat, idx, counter, offsets, n, prefix, above, above, kk - above, SHIFT=0, TIES=True,
                               BLOCK=block)
    return _finish(flat, idx, kk, d)


def _topk_abs_torch(x: torch.Tensor, k: int) -> TopKAbs:
    d = x.shape[1]
    flat = x.reshape(-1)
    if flat.numel() == 0 or k == 0:
        return _empty(x.device)
    a = flat.float().abs().masked_fill(torch.isnan(flat), -1.0)
    kk = min(k, int((a >= 0).sum()))
    if kk == 0:
        return _empty(x.device)
    kth = torch.topk(a, kk, sorted=False).values.min()
    above = torch.nonzero(a > kth).flatten()  # fewer than kk
    need, found = kk - above.numel(), []
    for s in range(0, a.numel(), _CHUNK):  # the first `need` ties in row-major order, in bounded chunks
        if need <= 0:
            break
        hit = torch.nonzero(a[s:s + _CHUNK] == kth).flatten()[:need] + s
        found.append(hit)
        need -= hit.numel()
    return _finish(flat, torch.cat([above, *found]), kk, d)


def topk_abs(x: torch.Tensor, k: int, backend: str | None = None) -> TopKAbs:
    """The ``k`` largest |x| of ``x`` [N, d] with rows and columns (ties: smaller row, then column)."""
    x = check_matrix(x)
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise WorkbenchError(f"k must be a non-negative int, got {k!r}")
    if backend_for(x, backend) == "triton":
        return _topk_abs_triton(x, k)
    return _topk_abs_torch(x, k)
