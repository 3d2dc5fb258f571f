"""Compile every Triton kernel of workbench.kernels for a GPU target, without a GPU.

``triton.compile`` runs the whole pipeline (TTIR, TTGIR, LLVM, PTX, and ``ptxas``, which ships
with the triton wheel) on a CPU-only machine, so it catches what Triton's interpreter does not:
type errors, unsupported ops, lowering failures. Nothing is launched.

    .venv/bin/python -m workbench.kernels.compile_check [--arch 90] [--dtypes fp32,bf16,fp16]
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

P, I, L = "*{dt}", "i32", "i64"
# (module, kernel, argument types in order, constexprs): the types a launcher passes for large tensors,
# and the launchers' default block sizes and warps (num_warps, where given, is a launch option).
KERNELS = [
    ("channel_stats", "_channel_stats_kernel", [P, "*fp32", "*i64", "*fp32", "*fp32", "*i32", "*i32", L, I, L, I, L],
     dict(BLOCK_N=32, BLOCK_D=128, num_warps=8)),
    ("token_absmax", "_token_absmax_kernel", [P, "*fp32", "*i64", L, I, L, I], dict(BLOCK_N=16, BLOCK_D=256)),
    ("grouped_absmax", "_grouped_absmax_kernel", [P, "*i64", "*i64", L, I, L, I], dict(BLOCK_N=16, BLOCK_D=256, num_warps=8)),
    ("topk_abs", "_block_max_kernel", [P, "*i32", L], dict(BLOCK=1024)),
    ("topk_abs", "_bits_hist_kernel", [P, "*i32", L, I, I], dict(PREFIX_SHIFT=20, SHIFT=9, NB=2048, BLOCK=1024)),
    ("topk_abs", "_tie_count_kernel", [P, "*i32", L, I], dict(BLOCK=1024)),
    ("topk_abs", "_compact_kernel", [P, "*i64", "*i64", "*i64", L, I, L, I, I], dict(SHIFT=0, TIES=True, BLOCK=1024)),
    ("log_histogram", "_log_histogram_kernel", [P, "*i32", "*i32", L, I, "fp32", "fp32", I], dict(NB=128, BLOCK=1024)),
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 80, 90 (default 90)")
    p.add_argument("--dtypes", default="fp32,bf16,fp16", help="input dtypes to compile for")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET"):
        sys.exit("compile_check: unset TRITON_INTERPRET (the interpreter does not compile)")
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from workbench.kernels.dispatch import _LazyKernel

    target = GPUTarget("cuda", args.arch, 32)
    for dt in args.dtypes.split(","):
        for module, name, types, const in KERNELS:
            mod = importlib.import_module(f"workbench.kernels.{module}")
            mod.tl = tl
            for k, v in list(vars(mod).items()):
                if isinstance(v, _LazyKernel):
                    setattr(mod, k, triton.jit(v.fn))
            fn = getattr(mod, name)
            const = dict(const)
            warps = const.pop("num_warps", 4)
            sig = dict(zip(fn.arg_names, [t.format(dt=dt) for t in types] + ["constexpr"] * len(const)))
            kernel = triton.compile(ASTSource(fn, sig, const), target=target, options={"num_warps": warps})
            print(f"{name} {dt} sm_{args.arch}: {len(kernel.asm['cubin'])} B cubin, "
                  f"{kernel.metadata.shared} B shared memory ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
