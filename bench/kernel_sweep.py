"""Launch configurations of the channel_stats and grouped_absmax Triton kernels, timed on one GPU.

For each dtype (bf16, fp32) and each configuration: the result checked against the torch reference
(absmax, argmax and counts exact), then the median time (``triton.testing.do_bench``) and the
ratio to the one-read floor measured in the same run (``x.clone()`` moves 2 x bytes(x)). Also the
small matrices the profiler hands channel_stats per batch ([tokens in a batch, hidden]). The
defaults in kernels/channel_stats.py and kernels/grouped_absmax.py come from this table.

    python3 bench/kernel_sweep.py [--rows 65536] [--cols 4096]      (needs CUDA)
"""

from __future__ import annotations

import argparse
import itertools

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=65536)
    p.add_argument("--cols", type=int, default=4096)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: kernel_sweep needs a CUDA device")
    from triton.testing import do_bench

    from workbench.kernels.channel_stats import _channel_stats_torch, _channel_stats_triton
    from workbench.kernels.grouped_absmax import _grouped_absmax_torch, _grouped_absmax_triton

    def bench(fn):
        return do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3

    print(torch.cuda.get_device_name(), torch.__version__)
    for dtype, (n, d) in itertools.product((torch.bfloat16, torch.float32),
                                           ((args.rows, args.cols), (2048, 1024), (8192, 576))):
        g = torch.Generator(device="cuda").manual_seed(n + d)
        x = (torch.randn(n, d, generator=g, device="cuda") * torch.linspace(0.5, 4, d, device="cuda")).to(dtype)
        gid = torch.randint(0, 64, (n,), generator=g, device="cuda")
        nbytes = x.numel() * x.element_size()
        floor = bench(lambda: x.clone()) / 2
        print(f"\n[{n}, {d}] {str(dtype)[6:]}: {nbytes / 1e6:.1f} MB, one-read floor {floor * 1e3:.4f} ms")
        ref = _channel_stats_torch(x)
        rows = []
        for bn, bd, warps, per_sm in itertools.product((8, 16, 32), (128, 256, 512), (4, 8), (2, 4, 8)):
            if bn * bd > 8192 or bd > 2 * d:
                continue
            fn = lambda: _channel_stats_triton(x, block_n=bn, block_d=bd, num_warps=warps, per_sm=per_sm)
            got = fn()
            ok = all(torch.equal(getattr(got, f), getattr(ref, f)) for f in ("absmax", "argmax", "count", "nan"))
            rows.append((bench(fn), f"channel_stats  BLOCK_N={bn:<3} BLOCK_D={bd:<4} warps={warps} per_sm={per_sm}", ok))
        gref = _grouped_absmax_torch(x, gid, 64)
        for bn, bd, warps in itertools.product((16, 32, 64), (64, 128, 256), (4, 8)):
            if bn * bd > 16384 or bd > 2 * d:
                continue
            fn = lambda: _grouped_absmax_triton(x, gid, 64, block_n=bn, block_d=bd, num_warps=warps)
            got = fn()
            ok = torch.equal(got.absmax, gref.absmax) and torch.equal(got.argmax, gref.argmax)
            rows.append((bench(fn), f"grouped_absmax BLOCK_N={bn:<3} BLOCK_D={bd:<4} warps={warps}", ok))
        for name in ("channel_stats", "grouped_absmax"):
            mine = sorted(r for r in rows if r[1].startswith(name))
            for s, label, ok in mine[:4] + mine[-1:]:
                print(f"  {label:<62} {s * 1e3:8.4f} ms {s / floor:6.2f} x floor {nbytes / s / 1e9:7.0f} GB/s"
                      + ("" if ok else "  WRONG"))
            bad = [r for r in mine if not r[2]]
            if bad:
                print(f"  {len(bad)} {name} configurations gave a wrong result: {[r[1] for r in bad]}")
            default = [r for r in mine if ("BLOCK_N=32  BLOCK_D=128  warps=8 per_sm=2" in r[1] if name == "channel_stats"
                                           else "BLOCK_N=16  BLOCK_D=256  warps=8" in r[1])]
            if default:
                print(f"  current default: {default[0][0] * 1e3:.4f} ms, rank {mine.index(default[0]) + 1} of {len(mine)}")


if __name__ == "__main__":
    main()
