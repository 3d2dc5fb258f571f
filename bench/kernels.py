"""Kernel figures: each reduction in workbench.kernels vs a plain-torch baseline on the same tensor.

For every kernel it prints time (median of --repeats after a warm-up), peak extra memory, the byte
model (bytes the op must move), the achieved GB/s and the ratio to the one-read floor: the time to
read x once at the copy bandwidth measured in the same run (``x.clone()`` moves 2 x bytes(x), so
floor = clone time / 2).

* On CUDA: ours = the Triton kernels (``backend="triton"``); time from ``torch.cuda.Event``, peak
  extra memory from ``torch.cuda.max_memory_allocated`` minus the memory allocated before the call.
* Elsewhere: ours = the torch reference path (``backend="torch"``) on a moderate tensor, timed with
  ``time.perf_counter``; memory is not measured, and the GPU figures are reported as unmeasured.

Baselines: channel absmax + mean + var with torch ops; token absmax with ``abs().max(1)``; top-k
with ``torch.topk`` on the flattened |x|; grouped absmax with ``scatter_reduce`` (values only);
log histogram with ``histc`` of ``log10|x|``.

    .venv/bin/python bench/kernels.py [--rows N] [--cols D] [--dtype fp32|bf16|fp16] [--repeats R]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from workbench.kernels import channel_stats, grouped_absmax, log_histogram, token_absmax, topk_abs

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def measure(fn, repeats: int, cuda: bool) -> tuple[float, float | None]:
    """Median seconds over ``repeats`` calls after one warm-up, and peak extra bytes (CUDA only)."""
    fn()
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times), float(peak)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), None


def baselines(x: torch.Tensor, gid: torch.Tensor, groups: int, k: int, bins: int) -> dict:
    def chan():
        xf = x.float()
        return xf.abs().max(0), xf.mean(0), xf.var(0)

    def grouped():
        idx = gid[:, None].expand(-1, x.shape[1])
        return torch.zeros(groups, x.shape[1], device=x.device).scatter_reduce(0, idx, x.float().abs(), "amax")

    return {
        "channel_stats": chan,
        "token_absmax": lambda: x.abs().max(1),
        "grouped_absmax": grouped,
        "topk_abs": lambda: torch.topk(x.abs().flatten(), k),
        "log_histogram": lambda: torch.histc(torch.log10(x.float().abs()), bins, -6.0, 6.0),
    }


def ours(x: torch.Tensor, gid: torch.Tensor, groups: int, k: int, bins: int, backend: str) -> dict:
    return {
        "channel_stats": lambda: channel_stats(x, backend=backend),
        "token_absmax": lambda: token_absmax(x, backend=backend),
        "grouped_absmax": lambda: grouped_absmax(x, gid, groups, backend=backend),
        "topk_abs": lambda: topk_abs(x, k, backend=backend),
        "log_histogram": lambda: log_histogram(x, bins, backend=backend),
    }


def byte_model(name: str, n: int, d: int, e: int, groups: int, k: int) -> tuple[int, str]:
    """Bytes our op must move at least, and the formula, per kernel."""
    x = n * d * e
    models = {
        "channel_stats": (x + d * 36, "N*d*e read + d*36 out"),
        "token_absmax": (x + n * 12, "N*d*e read + N*12 out"),
        "grouped_absmax": (x + n * 8 + groups * d * 8, "N*d*e + N*8 ids + G*d*8 keys"),
        "topk_abs": (2 * x + k * 16, "2 x N*d*e (block-max threshold + compaction) + k*16"),
        "log_histogram": (x, "N*d*e read"),
    }
    return models[name]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=None, help="N (default 65536 on CUDA, 8192 on CPU)")
    p.add_argument("--cols", type=int, default=None, help="d (default 4096 on CUDA, 1024 on CPU)")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--repeats", type=int, default=None, help="default 20 on CUDA, 5 on CPU")
    p.add_argument("--groups", type=int, default=64)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--bins", type=int, default=96)
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    n = args.rows or (65536 if cuda else 8192)
    d = args.cols or (4096 if cuda else 1024)
    dtype = DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    repeats = args.repeats or (20 if cuda else 5)
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(n, d, generator=g, device=dev).to(dtype)
    gid = torch.randint(0, args.groups, (n,), generator=g, device=dev)
    e = x.element_size()
    clone_s, _ = measure(lambda: x.clone(), repeats, cuda)
    bandwidth = 2 * x.numel() * e / clone_s
    floor = x.numel() * e / bandwidth
    backend = "triton" if cuda else "torch"
    where = torch.cuda.get_device_name(dev) if cuda else f"cpu, {torch.get_num_threads()} threads"
    print(f"x [{n}, {d}] {str(dtype).removeprefix('torch.')} on {where} ({x.numel() * e / 1e6:.1f} MB), "
          f"{args.groups} groups, k={args.k}, {args.bins} bins; median of {repeats}")
    print(f"copy bandwidth (x.clone(), 2 x bytes): {bandwidth / 1e9:.2f} GB/s; one-read floor {floor * 1e3:.3f} ms")
    if not cuda:
        print("no CUDA device: 'ours' is the torch reference path; GPU (Triton) figures are unmeasured here")
    head = f"{'kernel':<16}{'impl':<10}{'ms':>10}{'x floor':>9}{'GB/s':>8}{'peak MB':>9}  byte model"
    print(head)
    print("-" * len(head))
    ours_fns = ours(x, gid, args.groups, args.k, args.bins, backend)
    base_fns = baselines(x, gid, args.groups, args.k, args.bins)
    for name in ours_fns:
        nbytes, formula = byte_model(name, n, d, e, args.groups, args.k)
        for impl, fn in ((f"ours:{backend}", ours_fns[name]), ("baseline", base_fns[name])):
            s, peak = measure(fn, repeats, cuda)
            mem = f"{peak / 1e6:9.1f}" if peak is not None else f"{'-':>9}"
            model = f"{formula} = {nbytes / 1e6:.1f} MB" if impl != "baseline" else "(torch ops; x read >= once)"
            print(f"{name:<16}{impl:<10}{s * 1e3:>10.3f}{s / floor:>9.2f}{nbytes / s / 1e9:>8.2f}{mem}  {model}")


if __name__ == "__main__":
    main()
