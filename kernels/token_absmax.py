"""Per-token (row) max |x| and the channel where it occurs: kernel, launcher, reference.

``token_absmax(x)`` over ``x`` [N, d] (bf16/fp16/fp32) returns :class:`TokenAbsMax` with
``absmax`` [N] fp32 and ``argmax`` [N] int64 channel. Same rules as ``channel_stats``: NaN never
wins, ``inf`` is a value, ties go to the **smallest channel**, and a row without a non-NaN entry
(all NaN, or d == 0) has absmax 0 and argmax -1. N == 0 gives empty tensors.

Triton: one program per block of rows, streaming the channels in blocks with a running max per row.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from workbench.kernels.dispatch import backend_for, check_matrix, next_pow2, triton_jit

tl = None  # triton.language, bound on the first launch (dispatch.triton_jit)
_CHUNK = 1 << 22  # elements per reference chunk


class TokenAbsMax(NamedTuple):
    absmax: torch.Tensor  # [N] float32
    argmax: torch.Tensor  # [N] int64 channel, -1 where no non-NaN entry


@triton_jit
def _token_absmax_kernel(x_ptr, absmax_ptr, argmax_ptr, n_rows, n_cols, stride_n, stride_d,
                         BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < n_rows
    row_off = rows * stride_n
    best = tl.full([BLOCK_N], -1.0, tl.float32)
    best_col = tl.full([BLOCK_N], -1, tl.int64)
    for c0 in range(0, n_cols, BLOCK_D):
        cols = c0 + tl.arange(0, BLOCK_D).to(tl.int64)
        m = rmask[:, None] & (cols < n_cols)[None, :]
        x = tl.load(x_ptr + row_off[:, None] + cols[None, :] * stride_d, mask=m, other=0.0).to(tl.float32)
        av = tl.where(m & (x == x), tl.abs(x), -1.0)
        tmax = tl.max(av, axis=1)
        tcol = tl.min(tl.where(av == tmax[:, None], cols[None, :], 9223372036854775807), axis=1)
        better = tmax > best  # strict: an earlier block (smaller channels) keeps its tie
        best_col = tl.where(better, tcol, best_col)
        best = tl.where(better, tmax, best)
    tl.store(absmax_ptr + rows, tl.maximum(best, 0.0), mask=rmask)
    tl.store(argmax_ptr + rows, best_col, mask=rmask)


def _token_absmax_triton(x: torch.Tensor, block_n: int = 16, block_d: int | None = None) -> TokenAbsMax:
    n, d = x.shape
    absmax = torch.zeros(n, dtype=torch.float32, device=x.device)
    argmax = torch.full((n,), -1, dtype=torch.int64, device=x.device)
    if n == 0 or d == 0:
        return TokenAbsMax(absmax, argmax)
    block_d = block_d or min(256, next_pow2(d))
    _token_absmax_kernel[(-(-n // block_n),)](x, absmax, argmax, n, d, x.stride(0), x.stride(1),
                                              BLOCK_N=block_n, BLOCK_D=block_d)
    return TokenAbsMax(absmax, argmax)


def _token_absmax_torch(x: torch.Tensor) -> TokenAbsMax:
    n, d = x.shape
    absmax = torch.zeros(n, dtype=torch.float32, device=x.device)
    argmax = torch.full((n,), -1, dtype=torch.int64, device=x.device)
    if d == 0:
        return TokenAbsMax(absmax, argmax)
    step = max(1, _CHUNK // d)
    for r0 in range(0, n, step):
        av = x[r0:r0 + step].float().abs().nan_to_num_(nan=-1.0, posinf=math.inf)  # NaN never wins
        best, col = av.max(dim=1)  # first (smallest) maximal channel
        none = best < 0
        absmax[r0:r0 + step] = best.masked_fill(none, 0.0)
        argmax[r0:r0 + step] = col.masked_fill(none, -1)
    return TokenAbsMax(absmax, argmax)


def token_absmax(x: torch.Tensor, backend: str | None = None) -> TokenAbsMax:
    """Per-row max |x| of ``x`` [N, d] and its channel (smallest channel on ties, NaN skipped)."""
    x = check_matrix(x)
    if backend_for(x, backend) == "triton":
        return _token_absmax_triton(x)
    return _token_absmax_torch(x)
