"""workbench.kernels: each Triton kernel, run by Triton's interpreter on CPU, against its torch reference.

The kernels are jitted on their first launch (``dispatch.triton_jit``), so setting
``TRITON_INTERPRET=1`` for this module (fixture below) before any launch is enough, whether or not
``triton`` was imported earlier. Interpreter inputs stay small: the interpreter is slow.
"""

import importlib
import json
import re
import math
import os
import subprocess
import sys

import pytest
import torch

from helpers import PROMPTS
from workbench.errors import WorkbenchError
from workbench.kernels import (backend_for, channel_stats, grouped_absmax, log_histogram, log_histogram_edges,
                               merge_channel_stats, token_absmax, topk_abs)
from workbench.kernels import dispatch
from workbench.kernels.channel_stats import _channel_stats_torch, _channel_stats_triton
from workbench.kernels.grouped_absmax import _grouped_absmax_torch, _grouped_absmax_triton
from workbench.kernels.log_histogram import _log_histogram_torch, _log_histogram_triton
from workbench.kernels.reduce_dump import add_reduce_parser, reduce_dump
from workbench.kernels.token_absmax import _token_absmax_torch, _token_absmax_triton
from workbench.kernels.topk_abs import _topk_abs_torch, _topk_abs_triton

TOLERANCES = {torch.bfloat16: (1e-2, 1e-2), torch.float16: (1e-3, 1e-3), torch.float32: (1e-4, 1e-4)}
DTYPES = list(TOLERANCES)
SHAPES = [(1, 193), (6, 7), (67, 193), (33, 760)]  # one row, d not a power of two, N*d not a block multiple
NAN, INF = float("nan"), float("inf")
BACKENDS = ["triton", "torch"]


@pytest.fixture(autouse=True, scope="module")
def interpreter():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        mp.delenv("WORKBENCH_KERNELS", raising=False)
        yield


def matrix(n: int, d: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Random rows with planted NaN, +-inf, ties, a zero channel, an all-NaN channel and an all-NaN row."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * torch.linspace(0.5, 4.0, d)
    if n >= 6 and d >= 7:
        x[1, 0] = NAN
        x[:, 1] = NAN  # channel without a non-NaN value: absmax 0, argmax -1
        x[2, 2], x[3, 2] = INF, -INF  # tie of infinities: row 2
        x[:, 3] = 0.0  # exact zeros: absmax 0, argmax 0
        x[0, 4], x[n - 1, 4] = 50.0, -50.0  # tie across the whole range: row 0
        x[n // 2, 5], x[n - 1, 5] = 60.0, 60.0  # tie: row n // 2
        x[0, d - 1] = -50.0  # row 0: tie between channels 4 and d-1 -> channel 4
        x[n - 2, :] = NAN  # a row without a non-NaN value
    return x.to(dtype)


def assert_stats(a, b, dtype, exact=("absmax", "argmax", "count", "nan")):
    rtol, atol = TOLERANCES[dtype]
    for name, u, v in zip(a._fields, a, b):
        if name in exact:
            assert torch.equal(u, v), name
        else:
            torch.testing.assert_close(u, v, rtol=rtol, atol=atol, msg=name)


# --- each kernel against its reference -------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_channel_stats_kernel_matches_reference(dtype, shape):
    x = matrix(*shape, dtype)
    got = channel_stats(x, backend="triton")
    assert_stats(got, channel_stats(x, backend="torch"), dtype)
    assert got.absmax.dtype == torch.float32 and got.argmax.dtype == torch.int64 and got.sum.dtype == torch.float32
    # Invariants: every entry is finite, NaN or inf; sums agree with a float64 sum of the finite entries.
    xf = x.double()
    assert torch.equal(got.count, torch.isfinite(xf).sum(0)) and torch.equal(got.nan, torch.isnan(xf).sum(0))
    ref = torch.where(torch.isfinite(xf), xf, 0.0).sum(0)
    torch.testing.assert_close(got.sum.double(), ref, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_channel_stats_splits_and_merge(dtype):
    x = matrix(67, 193, dtype, seed=1)
    x[5, 7], x[60, 7] = 99.0, -99.0  # a tie whose rows fall in different splits
    ref = channel_stats(x, backend="torch")
    for splits in (2, 3, 9):
        assert_stats(_channel_stats_triton(x, splits=splits, block_n=8), ref, dtype)
    assert int(ref.argmax[7]) == 5
    for backend in BACKENDS:
        merged = merge_channel_stats(channel_stats(x[:29], backend=backend), channel_stats(x[29:], backend=backend), 29)
        assert_stats(merged, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_token_absmax_kernel_matches_reference(dtype, shape):
    x = matrix(*shape, dtype)
    got = token_absmax(x, backend="triton")
    ref = token_absmax(x, backend="torch")
    assert torch.equal(got.absmax, ref.absmax) and torch.equal(got.argmax, ref.argmax)
    small_blocks = _token_absmax_triton(x, block_n=8, block_d=16)  # ties across channel blocks
    assert torch.equal(small_blocks.absmax, ref.absmax) and torch.equal(small_blocks.argmax, ref.argmax)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 193), (67, 193), (33, 760)])
def test_grouped_absmax_kernel_matches_reference(dtype, shape):
    x = matrix(*shape, dtype)
    n = shape[0]
    gid = torch.randint(0, 5, (n,), generator=torch.Generator().manual_seed(2))
    gid[gid == 3] = 4  # group 3 empty; group 5 never used
    if n > 40:
        gid[0], gid[n - 1], gid[n // 2] = 0, 0, 0  # the planted ties share a group
    got = grouped_absmax(x, gid, 6, backend="triton")
    ref = grouped_absmax(x, gid, 6, backend="torch")
    assert torch.equal(got.absmax, ref.absmax) and torch.equal(got.argmax, ref.argmax)
    assert (got.argmax[3] == -1).all() and (got.absmax[3] == 0).all() and (got.argmax[5] == -1).all()
    tiles = _grouped_absmax_triton(x, gid, 6, block_n=4, block_d=16)
    assert torch.equal(tiles.absmax, ref.absmax) and torch.equal(tiles.argmax, ref.argmax)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 193), (6, 7), (67, 193)])
@pytest.mark.parametrize("k", [1, 17, 100000])
def test_topk_abs_kernel_matches_reference(dtype, shape, k):
    x = matrix(*shape, dtype)
    got = topk_abs(x, k, backend="triton")
    ref = topk_abs(x, k, backend="torch")
    for u, v in zip(got, ref):
        assert torch.equal(u, v)
    assert got.values.numel() == min(k, int((~torch.isnan(x)).sum()))


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_input(dtype):
    x = matrix(50, 41, dtype).T[:, ::2]  # [41, 25], neither dimension contiguous
    gid = torch.arange(41) % 3
    for op in (channel_stats, token_absmax, lambda x, backend: grouped_absmax(x, gid, 3, backend=backend),
               lambda x, backend: topk_abs(x, 9, backend=backend), lambda x, backend: log_histogram(x, 9, backend=backend)):
        got, ref = op(x, backend="triton"), op(x.contiguous(), backend="torch")
        assert_stats(got, ref, dtype, exact=("absmax", "argmax", "count", "nan", "values", "rows", "cols", "counts",
                                             "zeros", "under", "over"))


def test_topk_abs_threshold_pass_needs_no_histogram(monkeypatch):
    mod = importlib.import_module("workbench.kernels.topk_abs")
    topk_abs(torch.ones(1, 1), 1, backend="triton")  # jit the module's kernels before replacing one

    class NoHistogram:
        def __getitem__(self, grid):
            raise AssertionError("the radix-select fallback ran")

    monkeypatch.setattr(mod, "_bits_hist_kernel", NoHistogram())
    for dtype in DTYPES:
        x = matrix(67, 193, dtype, seed=5)
        for k in (1, 17, 90):  # 102 blocks of 128: the block-max threshold applies
            got, ref = _topk_abs_triton(x, k, block=128), _topk_abs_torch(x, k)
            for u, v in zip(got, ref):
                assert torch.equal(u, v)
    with pytest.raises(AssertionError, match="fallback ran"):
        _topk_abs_triton(x, 17, cap=17, block=128)  # more candidates than cap


@pytest.mark.parametrize("cap", [None, 1, 40])
def test_topk_abs_refinement_and_ties(cap):
    x = matrix(67, 193, torch.float32, seed=3)
    x[x.abs() > 3.0] = 3.0  # hundreds of exact ties at the top
    x[9, 9], x[10, 10] = 7.0, -7.0
    for k in (1, 2, 5, 300):
        got = _topk_abs_triton(x, k, cap=cap, block=256)
        ref = _topk_abs_torch(x, k)
        for u, v in zip(got, ref):
            assert torch.equal(u, v)
    # Ties go to row-major order: after the two 7s, the first 3s in row-major order.
    a = x.abs().masked_fill(torch.isnan(x), -1).flatten()
    first = torch.nonzero(a == 3.0).flatten()[:3]
    got = _topk_abs_triton(x, 5, cap=cap, block=256)
    assert got.rows[:2].tolist() == [9, 10] and (got.rows[2:] * 193 + got.cols[2:]).tolist() == first.tolist()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_log_histogram_kernel_matches_reference(dtype, shape):
    x = matrix(*shape, dtype) * torch.logspace(-8, 8, shape[1]).to(dtype)
    for bins, lo, hi in ((96, -6.0, 6.0), (7, -1.5, 2.25), (1200, -6.0, 6.0)):
        got = log_histogram(x, bins, lo, hi, backend="triton")
        ref = log_histogram(x, bins, lo, hi, backend="torch")
        for u, v in zip(got, ref):
            assert torch.equal(u, v)
        assert int(sum(v.sum() for v in got)) == x.numel()


def test_log_histogram_bins_as_narrow_as_allowed_match_the_reference():
    """4092 bins over [3, 3.0004) (1e-7 decades each) put values in the wrong bins through the kernel, whose fp32
    guess then missed by more than its corrections: such bins are refused, and the narrowest allowed, where fp32 is
    coarsest (near 1e38), bin alike through both backends."""
    g = torch.Generator().manual_seed(1)
    for lo in (37.98, -37.0, 0.3):
        hi = lo + 0.01  # 1,000 bins of 1e-5 decades
        x = (10 ** (lo + (hi - lo) * torch.rand(1, 4000, generator=g, dtype=torch.float64))).float()
        got, ref = log_histogram(x, 1000, lo, hi, backend="triton"), log_histogram(x, 1000, lo, hi, backend="torch")
        assert all(torch.equal(u, v) for u, v in zip(got, ref)) and int(ref.counts.sum()) > 3900
    with pytest.raises(WorkbenchError, match=r"^log_histogram bins of 9\.78e-08 decades \(4092 over \[3, 3\.0004\)\) "
                                             r"are narrower than 1e-05"):
        log_histogram(x, 4092, 3.0, 3.0004, backend="torch")


def test_log_histogram_edges_are_exact():
    edges = log_histogram_edges(96).float()
    below = torch.nextafter(edges, torch.tensor(0.0))
    x = torch.stack([edges, -below])  # +edge[i] opens bin i; just below it closes bin i - 1
    for backend in BACKENDS:
        h = log_histogram(x, 96, backend=backend)
        assert h.counts.tolist() == [2] * 96 and int(h.under) == 1 and int(h.over) == 1
    # Bins are edge[i] <= |x| < edge[i+1] with edges 10**linspace(lo, hi) rounded up to fp32.
    assert float(edges[48]) == 1.0 and float(log_histogram_edges(96)[0]) >= 1e-6


# --- documented semantics, checked by hand on both backends ---------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_semantics_by_hand(backend):
    x = torch.tensor([[1.0, NAN, -3.0, 0.0],
                      [-2.0, NAN, 3.0, 0.0],
                      [INF, NAN, NAN, 0.0],
                      [NAN, NAN, NAN, NAN]])
    s = channel_stats(x, backend=backend)
    assert s.absmax.tolist() == [INF, 0.0, 3.0, 0.0] and s.argmax.tolist() == [2, -1, 0, 0]
    assert s.sum.tolist() == [-1.0, 0.0, 0.0, 0.0] and s.sumsq.tolist() == [5.0, 0.0, 18.0, 0.0]
    assert s.count.tolist() == [2, 0, 2, 3] and s.nan.tolist() == [1, 4, 2, 1]
    t = token_absmax(x, backend=backend)
    assert t.absmax.tolist() == [3.0, 3.0, INF, 0.0] and t.argmax.tolist() == [2, 2, 0, -1]
    g = grouped_absmax(x, torch.tensor([1, 1, 0, 1]), 3, backend=backend)
    assert g.absmax.tolist() == [[INF, 0.0, 0.0, 0.0], [2.0, 0.0, 3.0, 0.0], [0.0] * 4]
    assert g.argmax.tolist() == [[2, -1, -1, 2], [1, -1, 0, 0], [-1] * 4]
    k = topk_abs(x, 4, backend=backend)
    assert k.values.tolist() == [INF, 3.0, 3.0, 2.0] and k.rows.tolist() == [2, 0, 1, 1] and k.cols.tolist() == [0, 2, 2, 0]
    assert topk_abs(x, 100, backend=backend).values.numel() == 8  # only non-NaN entries are ranked
    h = log_histogram(x, 3, 0.0, 0.45, backend=backend)  # edges 1, 1.41, 2.00, 2.82: 1 | - | 2 | 3, 3, inf
    assert h.counts.tolist() == [1, 0, 1] and (int(h.zeros), int(h.under), int(h.over), int(h.nan)) == (3, 0, 3, 8)
    h = log_histogram(x, 3, 0.5, 0.6, backend=backend)
    assert h.counts.tolist() == [0, 0, 0] and (int(h.under), int(h.over)) == (4, 1)  # 1, 2, 3, 3 | inf


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (0, 0)])
def test_empty_inputs(backend, shape):
    n, d = shape
    x = torch.zeros(shape, dtype=torch.bfloat16)
    s = channel_stats(x, backend=backend)
    assert s.absmax.tolist() == [0.0] * d and s.argmax.tolist() == [-1] * d and s.sum.tolist() == [0.0] * d
    assert s.count.tolist() == [0] * d and s.nan.tolist() == [0] * d
    t = token_absmax(x, backend=backend)
    assert t.absmax.tolist() == [0.0] * n and t.argmax.tolist() == [-1] * n
    g = grouped_absmax(x, torch.zeros(n, dtype=torch.int64), 2, backend=backend)
    assert g.absmax.shape == (2, d) and (g.argmax == -1).all() and (g.absmax == 0).all()
    assert topk_abs(x, 3, backend=backend).values.numel() == 0
    h = log_histogram(x, 4, backend=backend)
    assert h.counts.tolist() == [0] * 4 and int(h.zeros) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_arguments(backend):
    x = torch.ones(4, 3)
    with pytest.raises(WorkbenchError, match=r"group_ids must lie in \[0, 2\)"):
        grouped_absmax(x, torch.tensor([0, 1, 2, 0]), 2, backend=backend)
    # the dtype that is wrong is named (it said "got (4,)", the right shape); a bool mask was read as groups 0 and 1
    for ids, got in ((torch.zeros(4), "float32 (4,)"), (torch.ones(4, dtype=torch.bool), "bool (4,)"),
                     (torch.zeros(3, dtype=torch.int64), "int64 (3,)"), ([0, 1, 0, 1], "list")):
        with pytest.raises(WorkbenchError,
                           match=rf"^group_ids must be an integer tensor \[N=4\], got {re.escape(got)}$"):
            grouped_absmax(x, ids, 2, backend=backend)
    with pytest.raises(WorkbenchError, match="2-D"):
        channel_stats(torch.ones(3), backend=backend)
    with pytest.raises(WorkbenchError, match="bfloat16, float16 or float32"):
        token_absmax(torch.ones(2, 2, dtype=torch.float64), backend=backend)
    with pytest.raises(WorkbenchError, match="k must be"):
        topk_abs(x, -1, backend=backend)
    with pytest.raises(WorkbenchError, match="bins"):
        log_histogram(x, 0, backend=backend)
    # raw TypeErrors, and 2.7 groups read as 2, before
    with pytest.raises(WorkbenchError, match=r"^num_groups must be an integer >= 0, got 2\.7$"):
        grouped_absmax(x, torch.tensor([0, 1, 1, 0]), 2.7, backend=backend)
    with pytest.raises(WorkbenchError, match=r"^num_groups must be an integer >= 0, got None$"):
        grouped_absmax(x, torch.tensor([0, 1, 1, 0]), None, backend=backend)
    with pytest.raises(WorkbenchError, match=r"^log_histogram's lo must be a number \(a power of 10\), got 'a'$"):
        log_histogram(x, 8, "a", 1.0, backend=backend)


def test_references_match_brute_force():
    """The references themselves, against loops that follow the documented rules literally."""
    x = matrix(13, 9, torch.float32, seed=4)
    a = x.abs().tolist()
    cs, ta = _channel_stats_torch(x), _token_absmax_torch(x)
    for c in range(9):
        vals = [(a[r][c], r) for r in range(13) if not math.isnan(a[r][c])]
        best = max((v for v, _ in vals), default=None)
        assert (float(cs.absmax[c]), int(cs.argmax[c])) == ((best, min(r for v, r in vals if v == best))
                                                             if vals else (0.0, -1))
    for r in range(13):
        vals = [(a[r][c], c) for c in range(9) if not math.isnan(a[r][c])]
        best = max((v for v, _ in vals), default=None)
        assert (float(ta.absmax[r]), int(ta.argmax[r])) == ((best, min(c for v, c in vals if v == best))
                                                            if vals else (0.0, -1))
    gid = torch.tensor([0, 1] * 6 + [0])
    ga = _grouped_absmax_torch(x, gid, 2)
    for g in range(2):
        for c in range(9):
            vals = [(a[r][c], r) for r in range(13) if gid[r] == g and not math.isnan(a[r][c])]
            best = max((v for v, _ in vals), default=None)
            assert int(ga.argmax[g, c]) == (min(r for v, r in vals if v == best) if vals else -1)
    order = sorted(((-a[r][c], r, c) for r in range(13) for c in range(9) if not math.isnan(a[r][c])))[:20]
    tk = _topk_abs_torch(x, 20)
    assert list(zip((-tk.values).tolist(), tk.rows.tolist(), tk.cols.tolist())) == order
    h = _log_histogram_torch(x, 10, -1.0, 1.0)
    lg = [math.log10(v) for row in a for v in row if v > 0 and not math.isnan(v) and v != INF]
    expect = [sum(1 for v in lg if -1 + 0.2 * i <= v < -1 + 0.2 * (i + 1)) for i in range(10)]
    assert h.counts.tolist() == expect  # no value of this draw sits within rounding of an edge


# --- dispatch ---------------------------------------------------------------------------------------------------

def test_dispatch_backends(monkeypatch):
    x = torch.ones(2, 3)
    assert backend_for(x) == "torch"  # auto on CPU, even with TRITON_INTERPRET=1
    assert backend_for(x, "triton") == "triton"  # interpreter
    monkeypatch.setenv("WORKBENCH_KERNELS", "torch")
    assert backend_for(x) == "torch" and channel_stats(x).absmax.tolist() == [1.0] * 3
    monkeypatch.setenv("WORKBENCH_KERNELS", "triton")
    assert backend_for(x) == "triton" and backend_for(x, "torch") == "torch"  # the argument wins
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(WorkbenchError, match="needs a CUDA tensor") as e:
        channel_stats(x)
    assert "\n" not in str(e.value)
    with pytest.raises(WorkbenchError, match="needs a CUDA tensor"):
        topk_abs(x, 2, backend="triton")
    monkeypatch.setenv("WORKBENCH_KERNELS", "cuda")
    with pytest.raises(WorkbenchError, match="WORKBENCH_KERNELS='cuda' is not a kernel backend"):
        token_absmax(x)
    with pytest.raises(WorkbenchError, match="backend=5 is not a kernel backend"):  # an AttributeError on .strip
        token_absmax(x, backend=5)


def test_dispatch_without_triton(monkeypatch):
    monkeypatch.setattr(dispatch, "_triton", {"error": "ImportError: no module named triton"})
    x = torch.ones(2, 3)
    assert backend_for(x) == "torch" and channel_stats(x).argmax.tolist() == [0, 0, 0]
    with pytest.raises(WorkbenchError, match="triton does not import"):
        channel_stats(x, backend="triton")


def test_import_is_lazy_and_survives_a_broken_triton():
    code = ("import sys, types; import workbench.kernels as k; assert not {'torch', 'triton'} & set(sys.modules); "
            "from workbench.kernels.topk_abs import TopKAbs; assert isinstance(k.topk_abs, types.FunctionType); "
            "import torch; sys.modules['triton'] = None; x = torch.randn(5, 4); "
            "assert k.backend_for(x) == 'torch' and k.channel_stats(x).count.tolist() == [5] * 4\n"
            "try:\n    k.token_absmax(x, backend='triton')\nexcept Exception as e:\n    print(type(e).__name__, e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("WorkbenchError") and "triton does not import" in out.stdout


def test_kernels_compile_for_sm90_without_a_gpu(tmp_path):
    """The interpreter misses what only the compiler checks (types, lowering); ptxas ships with triton."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    out = subprocess.run([sys.executable, "-m", "workbench.kernels.compile_check", "--dtypes", "fp32,bf16"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count(" ok") == 16, out.stdout


def test_interpreter_works_after_an_early_triton_import():
    """torch._dynamo imports triton before a test can set TRITON_INTERPRET; the kernels must still run."""
    code = ("import os, torch, triton, triton.language\n"  # imported in compiled mode
            "os.environ['TRITON_INTERPRET'] = '1'\n"
            "from workbench.kernels import channel_stats\n"
            "x = torch.randn(9, 5)\n"
            "a, b = channel_stats(x, backend='triton'), channel_stats(x, backend='torch')\n"
            "assert torch.equal(a.argmax, b.argmax) and torch.equal(a.absmax, b.absmax)\n"
            "print('ok')")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


# --- reduce_dump on a real dump ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def traced_dump(tmp_path_factory):
    from workbench.models.specs import load
    from workbench.tracing.runner import trace
    from workbench.tracing.sites import all_sites

    lm = load("zoo:qwen3-moe")
    sites = all_sites(lm.adapter, lm.model, ["expert", "resid_post"], [1])
    d = tmp_path_factory.mktemp("dump") / "d"
    res = trace(lm, PROMPTS * 2, sites, ["absmax"], batch_size=3, dump_dir=d, dump_shard_rows=16, progress=False)
    return d, res, sites


@pytest.mark.parametrize("backend", BACKENDS)
def test_reduce_dump_matches_absmax_reducer(traced_dump, tmp_path, backend):
    d, res, sites = traced_dump
    out = tmp_path / "stats.json"
    stats = reduce_dump(d, out, progress=False, backend=backend)
    assert stats["backend"] == backend
    assert json.loads(out.read_text())["sites"].keys() == stats["sites"].keys()
    assert sum(len(json.loads((d / "index.json").read_text())["sites"][s.key]) > 1 for s in sites) >= 1
    for site in sites:
        red, got = res[site]["absmax"], stats["sites"][site.key]
        assert got["rows"] == int(red.rows)
        if not got["rows"]:
            continue
        tok = torch.tensor(got["channel"]["argmax_token"])
        assert torch.equal(tok, red.token)
        seen = red.token >= 0
        assert torch.equal(torch.tensor(got["channel"]["absmax"], dtype=torch.float64)[seen], red.absmax[seen])
        want = red.result()
        assert (got["peak"]["max_abs"], got["peak"]["channel"], got["peak"]["token"]) == (
            want["max_abs"], want["channel"], want["token"])
        assert got["top_tokens"][0]["token"] == want["token"] and got["top_tokens"][0]["max_abs"] == want["max_abs"]
        h = got["log_histogram"]
        assert sum(h["counts"]) + h["zeros"] + h["under"] + h["over"] + h["nan_count"] == got["rows"] * got["channels"]
    if backend == "torch":
        again = reduce_dump(d, tmp_path / "again.json", progress=False, backend="triton")
        for key, s in stats["sites"].items():
            assert again["sites"][key]["channel"]["argmax_token"] == s["channel"]["argmax_token"]
            assert again["sites"][key]["log_histogram"] == s["log_histogram"]


def test_reduce_dump_empty_and_unordered_shards(tmp_path):
    from workbench.tracing.dump import DumpWriter
    from workbench.tracing.reducers import Payload
    from workbench.tracing.sites import Component, Site

    w, site, idle = DumpWriter(tmp_path / "d", shard_rows=1), Site(0, Component.RESID_POST), Site(1, Component.RESID_POST)
    x = torch.tensor([[1.0, -4.0], [4.0, 2.0], [-1.0, 4.0]])
    w.sink(idle).update(Payload(torch.zeros(0, 2), torch.zeros(0, dtype=torch.int64)))
    w.sink(site).update(Payload(torch.zeros(0, 2), torch.zeros(0, dtype=torch.int64)))
    w.sink(site).update(Payload(x[:2], torch.tensor([7, 3])))  # tokens out of order within a shard
    w.sink(site).update(Payload(x[2:], torch.tensor([1])))
    w.close(torch.zeros(8, dtype=torch.int64), torch.arange(8), {"num_tokens": 8})
    got = reduce_dump(tmp_path / "d", tmp_path / "stats.json", progress=False)["sites"]
    assert got[idle.key]["rows"] == 0 and got[idle.key]["peak"]["token"] == -1
    s = got[site.key]
    assert s["rows"] == 3 and s["channel"]["absmax"] == [4.0, 4.0] and s["channel"]["argmax_token"] == [3, 1]
    # the smallest token wins the tie; its prompt and position from the token table (prompt 0, position = token)
    assert s["peak"] == {"max_abs": 4.0, "channel": 1, "token": 1, "prompt_index": 0, "position": 1}
    assert [t["token"] for t in s["top_tokens"]] == [1, 3, 7] and [t["position"] for t in s["top_tokens"]] == [1, 3, 7]
    assert got[idle.key]["peak"]["prompt_index"] is None


def test_reduce_dump_errors(traced_dump, tmp_path):
    d, _, sites = traced_dump
    with pytest.raises(WorkbenchError, match="does not exist"):
        reduce_dump(tmp_path / "nope", tmp_path / "s.json", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(WorkbenchError, match="no index.json"):
        reduce_dump(tmp_path / "empty", tmp_path / "s.json", progress=False)
    (tmp_path / "empty" / "index.json").write_text("{not json")
    with pytest.raises(WorkbenchError, match="cannot read"):
        reduce_dump(tmp_path / "empty", tmp_path / "s.json", progress=False)
    head = {"format": "workbench-dump-1", "num_tokens": 1}
    from safetensors.torch import save_file

    save_file({"prompt": torch.zeros(1, dtype=torch.int64), "position": torch.zeros(1, dtype=torch.int64)},
              str(tmp_path / "empty" / "tokens.safetensors"))  # a token table of its 1 token: the shard is what fails
    missing = {**head, "sites": {"L1.resid_post": ["L1.resid_post/missing.safetensors"]}}
    (tmp_path / "empty" / "index.json").write_text(json.dumps(missing))
    with pytest.raises(WorkbenchError, match="cannot read a shard of site L1.resid_post") as e:
        reduce_dump(tmp_path / "empty", tmp_path / "s.json", progress=False)
    assert "\n" not in str(e.value) and not (tmp_path / "s.json").exists()
    (tmp_path / "outside.safetensors").write_bytes(b"")  # an edited index pointing out of the dump is refused
    for shard in ("../outside.safetensors", str(tmp_path / "outside.safetensors")):
        (tmp_path / "empty" / "index.json").write_text(json.dumps({**head, "sites": {"L1.resid_post": [shard]}}))
        with pytest.raises(WorkbenchError, match="lists a shard outside the dump folder"):
            reduce_dump(tmp_path / "empty", tmp_path / "s.json", progress=False)
    (tmp_path / "empty" / "index.json").write_text(json.dumps({"format": "workbench-dump-1", "sites": {}}))
    with pytest.raises(WorkbenchError, match="lists no sites"):
        reduce_dump(tmp_path / "empty", tmp_path / "s.json", progress=False)
    assert not (tmp_path / "s.json").exists()


def test_reduce_refuses_an_index_or_shard_that_is_not_this_dumps(traced_dump, tmp_path):
    """An edited or mixed dump was reduced without a word: another format, a key that is no site, a shard copied
    in from another dump (a sweep's run: 196 rows of a 1-token dump, its peak at token 166)."""
    import shutil

    from safetensors.torch import save_file

    d, _, _ = traced_dump
    index = json.loads((d / "index.json").read_text())
    key = sorted(index["sites"])[0]
    for change, needle in [({"format": "other-9"}, "format 'other-9', not 'workbench-dump-1'"),
                           ({"num_tokens": "7"}, "'num_tokens' must be a count of tokens"),
                           ({"sites": {**index["sites"], "bogus site": []}}, "'bogus site' is not a site key"),
                           ({"num_tokens": 3}, f"site {key}: a shard holds tokens outside the dump's 0..2")]:
        shutil.rmtree(tmp_path / "d", ignore_errors=True)
        shutil.copytree(d, tmp_path / "d")
        (tmp_path / "d" / "index.json").write_text(json.dumps({**index, **change}))
        if change.get("num_tokens") == 3:  # the token table of a 3-token dump, so the shard is what is refused
            save_file({"prompt": torch.zeros(3, dtype=torch.int64), "position": torch.arange(3)},
                      str(tmp_path / "d" / "tokens.safetensors"))
        with pytest.raises(WorkbenchError, match=re.escape(needle)):
            reduce_dump(tmp_path / "d", tmp_path / "s.json", progress=False)
        assert not (tmp_path / "s.json").exists()


def test_reduce_refuses_another_dumps_shard_and_a_broken_token_table(traced_dump, tmp_path):
    """A sweep copied another model's router shard (8 experts for 4, as many rows) into a dump and truncated its
    tokens.safetensors: reduce wrote both without a word, the token table never read."""
    import shutil

    from safetensors.torch import load_file, save_file

    d, res, sites = traced_dump
    index = json.loads((d / "index.json").read_text())
    resid = next(s.key for s in sites if s.key.endswith("resid_post"))
    assert index["channels"][resid] == 64 and index["value_dtypes"][resid] == "float32"
    good = reduce_dump(d, tmp_path / "good.json", progress=False)["sites"][resid]["peak"]
    loc = res.locate(good["token"])
    assert (good["prompt_index"], good["position"]) == (loc["prompt_index"], loc["position"])
    shard = index["sites"][resid][0]
    for edit, needle in [(lambda t: {"values": torch.cat([t["values"], t["values"][:, :8]], 1), "tokens": t["tokens"]},
                          f"site {resid}: a shard holds 72 channels of float32, the dump's index says 64 of float32"),
                         (lambda t: {"values": t["values"].half(), "tokens": t["tokens"]},
                          "holds 64 channels of float16, the dump's index says 64 of float32")]:
        shutil.rmtree(tmp_path / "d", ignore_errors=True)
        shutil.copytree(d, tmp_path / "d")
        save_file(edit(load_file(str(d / shard))), str(tmp_path / "d" / shard))
        with pytest.raises(WorkbenchError, match=re.escape(needle)):
            reduce_dump(tmp_path / "d", tmp_path / "s.json", progress=False)
    shutil.rmtree(tmp_path / "d")
    shutil.copytree(d, tmp_path / "d")
    table = tmp_path / "d" / "tokens.safetensors"
    table.write_bytes(table.read_bytes()[:200])
    with pytest.raises(WorkbenchError, match="cannot read the dump's token table .*tokens.safetensors"):
        reduce_dump(tmp_path / "d", tmp_path / "s.json", progress=False)
    t = load_file(str(d / "tokens.safetensors"))
    save_file({"prompt": t["prompt"][:-1], "position": t["position"][:-1]}, str(table))
    with pytest.raises(WorkbenchError, match=r"holds prompt \(\d+,\) torch.int64 .*, not \d+ integers each"):
        reduce_dump(tmp_path / "d", tmp_path / "s.json", progress=False)
    assert not (tmp_path / "s.json").exists()


def test_reduce_refuses_an_edited_dump_and_an_out_over_its_own_files(traced_dump, tmp_path, capsys):
    """A shard listed twice counted its rows twice, a site could list another site's shards, a shard rewritten with
    fewer rows or with float tokens was reduced, and `reduce D --out D/index.json` wrote over the dump's index."""
    import shutil

    from safetensors.torch import load_file, save_file

    from workbench.cli import main

    d, _, sites = traced_dump
    index = json.loads((d / "index.json").read_text())
    resid = next(s.key for s in sites if s.key.endswith("resid_post"))
    other = next(k for k in index["sites"] if k != resid and index["sites"][k])
    shards = index["sites"][resid]
    for change, needle in [({"sites": {**index["sites"], resid: shards + shards[:1]}}, "is listed twice"),
                           ({"sites": {**index["sites"], resid: index["sites"][other]}}, "a shard of another folder"),
                           ({"rows": {resid: 1}}, "'rows' must give every site's row count")]:
        shutil.rmtree(tmp_path / "d", ignore_errors=True)
        shutil.copytree(d, tmp_path / "d")
        (tmp_path / "d" / "index.json").write_text(json.dumps({**index, **change}))
        with pytest.raises(WorkbenchError, match=re.escape(needle)):
            reduce_dump(tmp_path / "d", tmp_path / "s.json", progress=False)
    for edit, needle in [(lambda t: {"values": t["values"][:2], "tokens": t["tokens"][:2]},
                          f"site {resid}: its shards hold"),
                         (lambda t: {"values": t["values"], "tokens": t["tokens"].double()},
                          "shard tokens are torch.float64, not global token indices")]:
        shutil.rmtree(tmp_path / "d", ignore_errors=True)
        shutil.copytree(d, tmp_path / "d")
        shard = tmp_path / "d" / shards[0]
        save_file(edit(load_file(str(shard))), str(shard))
        with pytest.raises(WorkbenchError, match=re.escape(needle)):
            reduce_dump(tmp_path / "d", tmp_path / "s.json", progress=False)
        assert not (tmp_path / "s.json").exists()
    before = (d / "index.json").read_text()
    for out in (d / "index.json", d / resid / "x.json"):
        code = main(["reduce", str(d), "--out", str(out), "--quiet"])
        assert code == 2 and "is one of the dump's own files" in capsys.readouterr().err
    assert (d / "index.json").read_text() == before and not (d / resid / "x.json").exists()


def test_reduce_subcommand(traced_dump, tmp_path, capsys):
    import argparse

    d, _, _ = traced_dump
    parser = argparse.ArgumentParser(prog="workbench")
    add_reduce_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["reduce", str(d), "--out", str(tmp_path / "stats.json"), "--quiet"])
    assert args.func(args) == 0
    assert "wrote" in capsys.readouterr().out and (tmp_path / "stats.json").is_file()


def test_reduce_dump_std_holds_on_an_offset_channel(tmp_path):
    """The std came from the kernel's fp32 sum and sum of squares: a massive channel of 1000 +- 0.1 read 0.32, one of
    50 +- 0.01 over 100k rows 0, a one-row expert 1e-7. It is now trace's float64 moments, merged across shards."""
    from workbench.tracing.dump import DumpWriter
    from workbench.tracing.reducers import Moments, Payload
    from workbench.tracing.sites import Component, Site

    g = torch.Generator().manual_seed(0)
    n = 4096
    x = torch.stack([1000 + 0.1 * torch.randn(n, generator=g, dtype=torch.float64),
                     50 + 0.01 * torch.randn(n, generator=g, dtype=torch.float64),
                     torch.randn(n, generator=g, dtype=torch.float64)], 1).float()
    x[5, 2] = float("nan")
    site, one, idle = (Site(i, Component.RESID_POST) for i in range(3))
    w = DumpWriter(tmp_path / "d", shard_rows=1000)
    for r0 in range(0, n, 700):  # several shards per site
        w.sink(site).update(Payload(x[r0:r0 + 700], torch.arange(r0, min(n, r0 + 700))))
    w.sink(one).update(Payload(torch.tensor([[1e-3, -7.5]]), torch.tensor([3])))
    w.sink(idle).update(Payload(torch.zeros(0, 2), torch.zeros(0, dtype=torch.int64)))
    w.close(torch.zeros(n, dtype=torch.int64), torch.arange(n), {"num_tokens": n})
    got = reduce_dump(tmp_path / "d", tmp_path / "stats.json", progress=False)["sites"]
    finite = x.double().clone()
    want_std = [float(finite[:, 0].std(unbiased=False)), float(finite[:, 1].std(unbiased=False)),
                float(torch.cat([finite[:5, 2], finite[6:, 2]]).std(unbiased=False))]
    assert got[site.key]["channel"]["std"] == pytest.approx(want_std, rel=1e-9)
    moments = Moments()
    moments.update(Payload(x, torch.arange(n)))
    assert got[site.key]["channel"]["mean"] == pytest.approx(moments.mean.tolist(), rel=1e-12)
    assert got[one.key]["channel"]["std"] == [0.0, 0.0] and got[one.key]["channel"]["count"] == [1, 1]
    # an empty site has every key a site with rows has (code reading nan_count or top_tokens raised KeyError)
    assert got[idle.key].keys() == got[site.key].keys()
    assert got[idle.key]["channel"].keys() == got[site.key]["channel"].keys()
    assert got[idle.key]["rows"] == 0 and got[idle.key]["top_tokens"] == []
    assert all(v != v for v in got[idle.key]["channel"]["std"] + got[idle.key]["channel"]["mean"])  # NaN: no value
