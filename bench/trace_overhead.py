"""Tracing overhead on smollm2-135m: plain forward vs forward with absmax reducers on every down_proj.

Each variant runs in its own subprocess (so peak RSS is its own), on the same fixed batch, with
warm-up; the time is the median of --repeats forwards. Prints both and the ratio.

    .venv/bin/python bench/trace_overhead.py [--model smollm2-135m] [--batch 16] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from bench_cli import fail, run
from workbench.args import COUNT, Parser


def run_variant(args) -> dict:
    import torch

    from workbench.data import default_prompts
    from workbench.models.specs import load
    from workbench.tracing.capture import Capture
    from workbench.tracing.reducers import AbsMax
    from workbench.tracing.sites import all_sites

    torch.set_num_threads(args.threads)
    lm = load(args.model)
    prompts = default_prompts()[: args.batch]
    enc = lm.tokenizer(prompts, return_tensors="pt", padding=True)
    grid = torch.where(enc.attention_mask.bool(), torch.arange(enc.input_ids.numel()).view_as(enc.input_ids), -1)
    sites = all_sites(lm.adapter, lm.model, ["expert"])
    times = []
    with torch.no_grad():
        if args.variant == "plain":
            for i in range(args.repeats + 1):
                t = time.perf_counter()
                lm.model(**enc, use_cache=False)
                times.append(time.perf_counter() - t)
        else:
            sinks = {s: [AbsMax()] for s in sites}
            with Capture(lm.model, lm.adapter, sinks) as cap:
                for i in range(args.repeats + 1):
                    cap.begin_batch(grid)
                    t = time.perf_counter()
                    lm.model(**enc, use_cache=False)
                    times.append(time.perf_counter() - t)
    return {"variant": args.variant, "seconds": statistics.median(times[1:]), "sites": len(sites),
            "tokens": int(enc.attention_mask.sum()), "shape": list(enc.input_ids.shape),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main():
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--batch", type=COUNT, default=16)
    p.add_argument("--repeats", type=COUNT, default=5)
    p.add_argument("--threads", type=COUNT, default=2)
    p.add_argument("--variant", choices=["plain", "absmax"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    res = {}
    for variant in ("plain", "absmax", "plain", "absmax"):  # interleaved, to even out machine noise
        cmd = [sys.executable, __file__, "--variant", variant, "--model", args.model, "--batch", str(args.batch),
               "--repeats", str(args.repeats), "--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if out.returncode:
            last = (out.stderr.strip().splitlines() or [""])[-1]
            if last.startswith("error: "):  # the child's one-line user error (a model that does not load)
                fail(last.removeprefix("error: "))
            sys.exit(out.stderr)  # a bug: its traceback
        r = json.loads(out.stdout.strip().splitlines()[-1])
        prev = res.get(variant)
        res[variant] = r if prev is None or r["seconds"] < prev["seconds"] else prev
    plain, hooked = res["plain"], res["absmax"]
    print(f"model {args.model}, batch {plain['shape'][0]} x {plain['shape'][1]} tokens ({plain['tokens']} real), "
          f"{args.threads} threads, median of {args.repeats} forwards (best of 2 processes)")
    print(f"{'variant':<34}{'forward s':>10}{'peak RSS MB':>13}")
    print(f"{'plain forward':<34}{plain['seconds']:>10.3f}{plain['peak_rss_mb']:>13.0f}")
    print(f"{'absmax on every down_proj (' + str(hooked['sites']) + ')':<34}{hooked['seconds']:>10.3f}"
          f"{hooked['peak_rss_mb']:>13.0f}")
    print(f"ratio traced / plain: time {hooked['seconds'] / plain['seconds']:.3f}x, "
          f"peak RSS {hooked['peak_rss_mb'] / plain['peak_rss_mb']:.3f}x")


if __name__ == "__main__":
    run(main)
