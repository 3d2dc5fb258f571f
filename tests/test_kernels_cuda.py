"""workbench.kernels compiled and launched on a real GPU, against the torch references on the same tensors.

test_kernels.py runs every kernel through Triton's interpreter on CPU. What only the GPU shows is
checked here: the compiled code at sizes that fill the chip (many programs, many row splits, blocks
that do not divide the shape), 64-bit offsets past 2**31 elements, and fresh random draws each
time. Skipped where torch sees no CUDA device (CI); run on a lent GPU with
``python3 -m pytest tests/test_kernels_cuda.py`` (bench/gpu_check.sh does that and the benchmarks).

Tolerances: absmax, argmax, counts, top-k and histograms are exact (they are selections or counts
of the same elements); sums and sums of squares are fp32 accumulations in a different order than
torch's, so they get the fp32 tolerance of ``TOLERANCES`` scaled to the row count.
"""

import pytest
import torch

from workbench.kernels import channel_stats, grouped_absmax, log_histogram, token_absmax, topk_abs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# Shapes: one row; d not a power of two; N*d not a block multiple; a realistic dump (64k tokens x 4096).
SHAPES = [(1, 193), (4099, 1000), (65536, 4096), (100003, 768)]
NAN, INF = float("nan"), float("inf")


@pytest.fixture(autouse=True)
def no_backend_override(monkeypatch):
    monkeypatch.delenv("WORKBENCH_KERNELS", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def cuda_matrix(n: int, d: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random rows with per-channel scales, planted NaN, +-inf and ties, drawn on the GPU."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(n, d, generator=g, device="cuda") * torch.linspace(0.5, 4.0, d, device="cuda")
    if n >= 8 and d >= 8:
        x[1, 0] = NAN
        x[:, 1] = NAN
        x[2, 2], x[n - 1, 2] = INF, -INF  # tie of infinities: the first row wins
        x[:, 3] = 0.0
        x[0, 4], x[n - 1, 4] = 50.0, -50.0  # tie across the whole range
        x[n // 2, 5], x[n - 1, 5] = 60.0, 60.0
        x[n - 2, :] = NAN
    return x.to(dtype)


def same(a, b, fields):
    for name in fields:
        u, v = getattr(a, name), getattr(b, name)
        assert u.shape == v.shape and torch.equal(u, v), name


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_channel_stats_on_gpu(dtype, shape):
    x = cuda_matrix(*shape, dtype, seed=shape[0] + shape[1])
    got, ref = channel_stats(x), channel_stats(x, backend="torch")
    same(got, ref, ("absmax", "argmax", "count", "nan"))
    # fp32 sums in another order: relative error grows like sqrt(N) * eps at worst, measured against
    # the float64 sum of |x| (a cancelling sum is compared at the scale of its terms).
    xf = x.double()
    fin = torch.where(torch.isfinite(xf), xf, 0.0)
    for name, exact, scale in (("sum", fin.sum(0), fin.abs().sum(0)), ("sumsq", (fin * fin).sum(0), (fin * fin).sum(0))):
        err = (getattr(got, name).double() - exact).abs()
        assert bool((err <= 1e-5 * scale + 1e-6).all()), (name, float((err / (scale + 1e-30)).max()))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_token_and_grouped_absmax_on_gpu(dtype, shape):
    x = cuda_matrix(*shape, dtype, seed=7 + shape[0])
    same(token_absmax(x), token_absmax(x, backend="torch"), ("absmax", "argmax"))
    groups = 64
    gid = torch.randint(0, groups - 1, (shape[0],), device="cuda")  # the last group stays empty
    got, ref = grouped_absmax(x, gid, groups), grouped_absmax(x, gid, groups, backend="torch")
    same(got, ref, ("absmax", "argmax"))
    assert bool((got.argmax[groups - 1] == -1).all())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [1, 64, 5000])
def test_topk_abs_on_gpu(dtype, shape, k):
    x = cuda_matrix(*shape, dtype, seed=11 + k)
    same(topk_abs(x, k), topk_abs(x, k, backend="torch"), ("values", "rows", "cols"))


def test_topk_abs_many_ties_on_gpu():
    """More tied candidates than the compaction buffer holds: the radix select and tie counting run."""
    x = cuda_matrix(65536, 1024, torch.bfloat16, seed=3).clamp(-2.0, 2.0)  # ~2.4M entries tie at 2.0
    for k in (1, 100, 1 << 21):
        same(topk_abs(x, k), topk_abs(x, k, backend="torch"), ("values", "rows", "cols"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_log_histogram_on_gpu(dtype, shape):
    x = cuda_matrix(*shape, dtype, seed=5) * torch.logspace(-8, 8, shape[1], device="cuda").to(dtype)
    got, ref = log_histogram(x, 96), log_histogram(x, 96, backend="torch")
    same(got, ref, got._fields)
    assert int(sum(v.sum() for v in got)) == x.numel()


def test_strided_input_on_gpu():
    x = cuda_matrix(8192, 2048, torch.bfloat16, seed=9).T[:, ::2]  # [2048, 4096], neither dim contiguous
    y = x.contiguous()
    gid = torch.arange(x.shape[0], device="cuda") % 5
    same(channel_stats(x), channel_stats(y, backend="torch"), ("absmax", "argmax", "count", "nan"))
    same(token_absmax(x), token_absmax(y, backend="torch"), ("absmax", "argmax"))
    same(grouped_absmax(x, gid, 5), grouped_absmax(y, gid, 5, backend="torch"), ("absmax", "argmax"))
    same(topk_abs(x, 77), topk_abs(y, 77, backend="torch"), ("values", "rows", "cols"))


def test_offsets_past_two_to_the_31():
    """A [524291, 4096] bf16 dump (2**31 + 12,288 elements, 4.3 GB): the maxima planted past element 2**31."""
    n, d = (1 << 31) // 4096 + 3, 4096
    free, _ = torch.cuda.mem_get_info()
    if free < 16 * n * d:  # x, its |x| copies in the references, headroom
        pytest.skip("needs ~35 GB of free GPU memory")
    x = torch.empty(n, d, dtype=torch.bfloat16, device="cuda").uniform_(-1.0, 1.0)
    x[n - 1, d - 1] = -1000.0  # element n*d - 1
    x[n - 2, 7] = 900.0
    cs = channel_stats(x)
    assert int(cs.argmax[d - 1]) == n - 1 and float(cs.absmax[d - 1]) == 1000.0
    assert int(cs.argmax[7]) == n - 2 and int(cs.count.sum()) == n * d
    ta = token_absmax(x)
    assert int(ta.argmax[n - 1]) == d - 1 and int(ta.argmax[n - 2]) == 7
    gid = torch.zeros(n, dtype=torch.int64, device="cuda")
    gid[n - 1] = 1
    ga = grouped_absmax(x, gid, 2)
    assert int(ga.argmax[1, d - 1]) == n - 1 and int(ga.argmax[0, 7]) == n - 2
    tk = topk_abs(x, 2)
    assert tk.rows.tolist() == [n - 1, n - 2] and tk.cols.tolist() == [d - 1, 7]
    h = log_histogram(x, 96)
    assert int(sum(v.sum() for v in h)) == n * d
