"""What the Q/K/V norms (experts/qk.py) cost inside the default profile pass, timed from within.

Whole-run differences (``profile_overhead.py --variants profile,profile-noqk``) move by several per cent
between identical runs on a small shared VM, more than the meter costs. This times every call into the
meter (its tap's work, batch starts, reductions, result) inside the profile pass and prints that time over
the rest of the pass, per run and as the median. The attention interception's own dispatch (one Python
call per layer before the model's attention function) is not inside the meter and is not counted.

    .venv/bin/python bench/qk_cost.py zoo:olmoe --tokens 10000 --repeat 5
    .venv/bin/python bench/qk_cost.py smollm2-135m --tokens 3000 --repeat 3
"""

from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_cli import run  # noqa: E402
from workbench.args import COUNT, Parser  # noqa: E402


def main() -> None:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default="zoo:olmoe")
    p.add_argument("--tokens", type=COUNT, default=10000)
    p.add_argument("--batch", type=COUNT, default=16)
    p.add_argument("--threads", type=COUNT, default=2)
    p.add_argument("--repeat", type=COUNT, default=5)
    p.add_argument("--batch-order", choices=("length", "given"), default="length",
                   help="the pass's batches: prompts of similar length together (the default) or in prompt order")
    args = p.parse_args()

    import torch

    import profile_overhead as po
    from workbench.experts import qk
    from workbench.experts.profile import ProfileOptions, profile
    from workbench.models.specs import load

    torch.set_num_threads(args.threads)
    lm = load(po.bench_model(args.model))
    prompts = po.prompts_for(lm.tokenizer, args.tokens)
    spent = {"total": 0.0}
    depth = [0]

    def timed(name):
        fn = getattr(qk.QKMeter, name)

        def wrapper(*a, **k):
            depth[0] += 1
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                depth[0] -= 1
                if depth[0] == 0:  # outermost call only (update calls itself under grad, result flushes ...)
                    spent["total"] += time.perf_counter() - start
        setattr(qk.QKMeter, name, wrapper)

    for name in ("install", "begin_batch", "update", "remove", "result", "merge", "state_dict"):
        timed(name)
    options = ProfileOptions(batch_size=args.batch, by_length=args.batch_order == "length")
    assert options.qk, "the default profile measures Q/K/V"
    profile(lm, prompts[:4 * args.batch], options, progress=False)  # warm-up
    shares = []
    for _ in range(args.repeat):
        spent["total"] = 0.0
        start = time.perf_counter()
        profile(lm, prompts, options, progress=False)
        seconds = time.perf_counter() - start
        shares.append(spent["total"] / (seconds - spent["total"]))
        print(f"  pass {seconds:.3f} s, meter {spent['total'] * 1e3:.1f} ms: {shares[-1]:.1%}")
    print(f"{args.model}: {args.tokens} tokens, batch {args.batch} ({args.batch_order} order), {args.threads} threads: "
          "Q/K/V meter time over "
          f"the rest of the pass, median of {args.repeat}: {statistics.median(shares):.1%} "
          f"(range {min(shares):.1%} .. {max(shares):.1%})")


if __name__ == "__main__":
    run(main)
