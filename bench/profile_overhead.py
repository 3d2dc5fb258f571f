"""Profile pass vs plain forward vs what researchers write today, on the same prompts, same run.

Variants (each in its own subprocess, so peak RSS is its own; the clock starts after the imports, the model load
and a ``gc.collect()``, one-time costs of the process):
  plain    model forward only (batches of --batch prompts, right-padded)
  body     the same forward without the LM head (the profile pass skips it: no statistic needs logits)
  body-length  the same headless forward over the batches the profile pass runs: prompts of similar length
           together (workbench.tracing.runner.batch_members), so less padding; against it, `profile` shows
           what the hooks and reducers cost, without the padding the grouping saves
  body-inference  the headless forward under torch.inference_mode instead of no_grad, as the pass runs (ops are
           cheaper there); against it, `profile` shows what the hooks and reducers cost without that gain
  profile  workbench's full profile pass, as `workbench profile` runs it by default (super experts, router,
           massive activations, sinks, Q/K/V norms; prompts of similar length batched together)
  profile-noqk  the same without the Q/K/V norms (`--no-qk`): with `profile`, what they cost
  profile-given  the profile pass over the batches in the prompts' order (`--batch-order given`), as `body`
  nnsight  nnsight trace that .save()s every down_proj output, reduced (absmax) after the run
  tl       TransformerLens TransformerBridge run_with_cache on the same down_proj sites, reduced after

The prompt set is the built-in prompts repeated until --tokens tokens (6-37 tokens each, so the pass's length
batching saves padding); --prompt-length N cuts their text into prompts of N tokens instead (one length, as
chunks of a corpus: no padding to save). Prints tokens/s, the ratio to plain, and peak RSS; with --rss-scan it
also prints the profile pass's peak RSS at other sizes. A variant that fails says why in its row; a model that does
not load stops the run at once (one ``error:`` line, exit status 2), and so does every variant failing (status 1).

    .venv/bin/python bench/profile_overhead.py --model smollm2-135m --tokens 10000 --rss-scan 100000
    .venv/bin/python bench/profile_overhead.py --model zoo:qwen2-moe --tokens 10000 --variants plain,profile --repeat 3
    .venv/bin/python bench/profile_overhead.py --model smollm2-135m --tokens 3000 --variants profile,profile-noqk --repeat 11
    .venv/bin/python bench/profile_overhead.py --model zoo:olmoe --prompt-length 32 --variants body,profile --repeat 5
    .venv/bin/python bench/profile_overhead.py --model bench:qwen3-moe-1024x64 --tokens 3000 \
        --variants plain,body,profile,trace,nnsight --repeat 3

``bench:NAME`` models have real-model shapes and random (seeded) weights; they are built on first use
(~20 s) into ``$WORKBENCH_CACHE/bench/NAME`` (default ``~/.cache/workbench``) and loaded from there:

  qwen3-moe-1024x64   Qwen3-MoE with OLMoE-like layers: hidden 1,024, 16 heads (4 KV, head dim 64),
                      64 experts of width 384, top-8, 4 layers, SmolLM2's tokenizer; 363M parameters

``--breakdown`` runs the profile pass again in this process (warm) and prints each part's own wall time
(every reducer by class, the attention-sink and Q/K/V meters, the capture's bookkeeping; the rest is the
forward itself) against a headless forward of the same process, then the same pass under cProfile.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from bench_cli import fail, run as run_main
from workbench.args import COUNT, COUNT_OR_OFF, NumberList, Parser

VARIANTS = ("plain", "body", "body-length", "body-inference", "profile", "profile-noqk", "profile-given", "trace",
            "nnsight", "tl")
LOAD_FAILED = 3  # a child's exit status when the model does not load: no variant can run, the parent stops

BENCH_MODELS = {
    "qwen3-moe-1024x64": dict(model_type="qwen3_moe", hidden_size=1024, num_hidden_layers=4, num_attention_heads=16,
                              num_key_value_heads=4, head_dim=64, intermediate_size=3072, moe_intermediate_size=384,
                              num_experts=64, num_experts_per_tok=8, vocab_size=49152, max_position_embeddings=4096,
                              tie_word_embeddings=False),
    # TinyLlama-1.1B's layer shapes with SmolLM2's vocabulary (49,152 rows instead of 32,000): 1.17B parameters
    "tinyllama-1.1b": dict(model_type="llama", hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                           num_attention_heads=32, num_key_value_heads=4, rms_norm_eps=1e-5, rope_theta=10000.0,
                           vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=False),
}


def bench_model(spec: str) -> str:
    """The folder of a ``bench:NAME`` model, built (seeded, random weights) on first use; other specs as given."""
    if not spec.startswith("bench:"):
        return spec
    name = spec.split(":", 1)[1]
    if name not in BENCH_MODELS:
        fail(f"unknown bench model {name!r}; choose from {', '.join(BENCH_MODELS)}")
    from pathlib import Path

    root = Path(os.environ.get("WORKBENCH_CACHE", Path.home() / ".cache" / "workbench")) / "bench"
    final = root / name
    if (final / "config.json").is_file():
        return str(final)
    import shutil
    import tempfile

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from workbench.models.gguf import tokenizer_dir
    from workbench.models.specs import _tokenizer

    root.mkdir(parents=True, exist_ok=True)
    print(f"building {spec} (seeded random weights) into {final} ...", file=sys.stderr)
    cfg = dict(BENCH_MODELS[name])
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}."))
    try:  # built aside and renamed into place: a half-built folder is never used
        model.save_pretrained(tmp)
        _tokenizer(tokenizer_dir()).save_pretrained(tmp)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(final)


def prompts_for(tokenizer, tokens: int, length: int = 0) -> list[str]:
    """The built-in prompts repeated until ``tokens`` tokens; with ``length``, their text cut into prompts of
    ``length`` tokens instead (decoded again, so a prompt may tokenise to a token more or less): every prompt has
    about one length, as chunks of a corpus do, so grouping prompts by length saves nothing."""
    from workbench.data import default_prompts

    base = default_prompts()
    if length:
        ids = tokenizer(" ".join(base)).input_ids
        while len(ids) < tokens:
            ids = ids + ids
        return [tokenizer.decode(ids[i:i + length]) for i in range(0, tokens, length)]
    out, n, i = [], 0, 0
    while n < tokens:
        p = base[i % len(base)]
        out.append(p)
        n += len(tokenizer(p).input_ids)
        i += 1
    return out


def batches(prompts, size):
    for i in range(0, len(prompts), size):
        yield prompts[i:i + size]


def length_batches(lm, prompts, size) -> list[list[str]]:
    """The prompts of each batch the profile pass runs (prompts of similar length together)."""
    import torch

    from workbench.tracing.runner import batch_members, tokenize

    lengths = torch.tensor([len(x) for x in tokenize(lm, prompts)])
    return [[prompts[i] for i in m.tolist()] for m in batch_members(lengths, size)]


def run(args) -> dict:
    import torch

    from workbench.errors import WorkbenchError
    from workbench.models.specs import load

    torch.set_num_threads(args.threads)
    try:
        lm = load(args.model, device=args.device)
    except WorkbenchError as e:
        fail(str(e), LOAD_FAILED)
    prompts = prompts_for(lm.tokenizer, args.tokens, args.prompt_length)
    cuda = lm.device.type == "cuda"
    _imports(args.variant)  # module imports (and JIT loads) are a process's one-time cost, not the pass's: untimed
    if args.variant == "body-length":  # the pass's own batches, worked out before the clock starts
        args.groups = length_batches(lm, prompts, args.batch)
    if cuda:  # CUDA context, cuBLAS handles and Triton's compilation stay out of the timing
        work(args, lm, prompts[:args.batch])
        torch.cuda.synchronize()
    # The first full garbage collection after the imports and the model load walks their ~0.5M objects (0.2 s
    # on the tiny zoo): whichever variant allocates enough to trigger it paid it inside its timing (the profile
    # pass, mostly). Every variant starts from a collected heap instead (timeit turns collection off altogether).
    gc.collect()
    start = time.perf_counter()
    work(args, lm, prompts)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    n_tokens = sum(len(lm.tokenizer(p).input_ids) for p in prompts)
    return {"variant": args.variant, "seconds": seconds, "tokens": n_tokens, "prompts": len(prompts),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None}


def _imports(variant: str) -> None:
    """Import what ``variant`` uses (each variant imports it again inside ``work``; then it is cached)."""
    import importlib

    mods = {"profile": ["workbench.experts.profile"], "profile-noqk": ["workbench.experts.profile"],
            "profile-given": ["workbench.experts.profile"],
            "trace": ["workbench.tracing.runner", "workbench.tracing.sites"],
            "nnsight": ["nnsight", "workbench.tracing.capture"], "tl": ["transformer_lens"]}.get(variant, [])
    for m in mods:
        try:
            importlib.import_module(m)
        except ImportError:
            pass  # the variant reports it when it runs
    if variant.startswith("profile"):  # likewise numba's load of the SCH and SRP loops (~0.4 s, once per process)
        from workbench.experts.router import load_kernels

        load_kernels()


def work(args, lm, prompts) -> None:
    """One variant over ``prompts``."""
    import torch

    n_layers = len(lm.layer_infos())
    dev = lm.device
    if args.variant == "plain":
        with torch.no_grad():
            for chunk in batches(prompts, args.batch):
                enc = lm.tokenizer(chunk, return_tensors="pt", padding=True).to(dev)
                lm.model(**enc, use_cache=False)
    elif args.variant in ("body", "body-length", "body-inference"):  # the decoder stack alone, without the LM head
        body = lm.adapter.body(lm.model)
        groups = getattr(args, "groups", None) if len(prompts) > args.batch else None  # (not the CUDA warm-up)
        with torch.inference_mode() if args.variant == "body-inference" else torch.no_grad():
            for chunk in groups or batches(prompts, args.batch):
                enc = lm.tokenizer(chunk, return_tensors="pt", padding=True).to(dev)
                body(**enc, use_cache=False)
    elif args.variant in ("profile", "profile-noqk", "profile-given"):  # noqk: without the Q/K/V norms (experts/qk.py)
        from workbench.experts.profile import ProfileOptions, profile

        profile(lm, prompts, ProfileOptions(batch_size=args.batch, qk=args.variant != "profile-noqk",
                                            by_length=args.variant != "profile-given"), progress=False)
    elif args.variant == "trace":  # `workbench trace --components expert` (absmax per expert)
        from workbench.tracing.runner import trace
        from workbench.tracing.sites import all_sites

        trace(lm, prompts, all_sites(lm.adapter, lm.model, ["expert"]), ["absmax"], batch_size=args.batch,
              progress=False)
    elif args.variant == "nnsight":
        from workbench.tracing.capture import fused_expert_output

        nn_model = lm.to_nnsight()
        infos = lm.layer_infos()
        saved = []
        torch.set_grad_enabled(False)  # as a careful user would: otherwise every saved output keeps its graph
        for chunk in batches(prompts, args.batch):
            outs = []
            with nn_model.trace(chunk):
                for i in range(n_layers):
                    mlp = nn_model.model.layers[i].mlp
                    # Fused MoE experts have no per-expert down_proj to read: save the experts' inputs
                    # (hidden states, chosen experts) and recompute each expert's output afterwards.
                    outs.append(mlp.experts.inputs.save() if infos[i].layout == "fused" else mlp.down_proj.output.save())
            saved.append(outs)
        maxima = []
        for i in range(n_layers):
            if infos[i].layout != "fused":
                maxima.append(max(float(b[i].abs().max()) for b in saved))
                continue
            experts = lm.model.model.layers[i].mlp.experts
            best = torch.zeros(infos[i].num_experts, device=dev)
            for b in saved:
                hidden, index = b[i][0][0], b[i][0][1]
                for e in range(infos[i].num_experts):
                    rows = (index == e).any(-1)
                    if rows.any():
                        best[e] = max(best[e], fused_expert_output(experts, hidden[rows], e).abs().max())
            maxima.append(best.tolist())
    elif args.variant == "tl":
        if any(info.layout != "dense" for info in lm.layer_infos()):
            raise SystemExit("TransformerLens exposes no per-expert down_proj hook for MoE experts")
        bridge = lm.to_transformer_lens()
        names = {f"blocks.{i}.mlp.out.hook_out" for i in range(n_layers)}
        caches = []
        for chunk in batches(prompts, args.batch):
            _, cache = bridge.run_with_cache(chunk, prepend_bos=False, names_filter=lambda n: n in names)
            caches.append(cache)
        maxima = [max(float(c[n].abs().max()) for c in caches) for n in sorted(names)]


def breakdown(args) -> None:
    """Where the profile pass's time goes, in this process: each part's own wall time, then cProfile."""
    import cProfile
    import pstats

    import torch

    from workbench.experts.profile import ProfileOptions, profile
    from workbench.models.specs import load

    torch.set_num_threads(args.threads)
    lm = load(args.model)
    prompts = prompts_for(lm.tokenizer, args.tokens, args.prompt_length)
    options = ProfileOptions(batch_size=args.batch)
    profile(lm, prompts, options, progress=False)  # warm: first-call costs are not a part's
    body = lm.adapter.body(lm.model)
    grouped = length_batches(lm, prompts, args.batch)

    def forward(groups) -> float:
        with torch.no_grad():
            t = time.perf_counter()
            for chunk in groups:
                body(**lm.tokenizer(chunk, return_tensors="pt", padding=True).to(lm.device), use_cache=False)
            return time.perf_counter() - t
    headless, headless_len = forward(batches(prompts, args.batch)), forward(grouped)
    with Parts() as parts:
        t = time.perf_counter()
        profile(lm, prompts, options, progress=False)
        total = time.perf_counter() - t
    print(f"\nprofile pass {total:.3f} s = {total / headless:.2f}x this process's headless forward ({headless:.3f} s; "
          f"{total / headless_len:.2f}x the same over the pass's batches, {headless_len:.3f} s); own wall time of "
          "each part (exclusive of the parts it calls):")
    for name, (sec, calls) in sorted(parts.own.items(), key=lambda kv: -kv[1][0]):
        print(f"  {sec * 1000:8.1f} ms {100 * sec / total:5.1f} % {calls:>7} calls  {name}")
    outside = total - parts.traced
    print(f"  {outside * 1000:8.1f} ms {100 * outside / total:5.1f} %           the profile's set-up and summary, "
          "outside the traced forward")
    rest = parts.traced - sum(sec for sec, _ in parts.own.values())
    print(f"  {rest * 1000:8.1f} ms {100 * rest / total:5.1f} %           the rest of the traced forward: the model "
          f"(eager attention), hook dispatch, tokenising ({rest / headless_len:.2f}x the headless forward over the "
          "same batches)")
    prof = cProfile.Profile()
    prof.enable()
    profile(lm, prompts, options, progress=False)
    prof.disable()
    st = pstats.Stats(prof)
    print(f"\nprofile pass under cProfile: {st.total_tt:.2f} s (cProfile adds its own overhead); most own time:")
    rows = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:25]
    for (path, line, fn), (_, calls, tottime, cumtime, _) in rows:
        where = f"{os.path.basename(path)}:{line}({fn})" if line else fn
        print(f"  {tottime:8.2f} s own {cumtime:8.2f} s cum {calls:>8} calls  {where}")


class Parts:
    """Times the profile pass's parts while installed: every reducer's ``update`` (by class), the sink and
    Q/K/V meters, the capture's hook-side bookkeeping and the summary after the pass, each exclusive of
    the timed parts it calls."""

    def __init__(self):
        self.own: dict[str, list] = {}
        self._stack: list[list[float]] = []
        self._undo: list = []
        self.traced = 0.0  # seconds inside trace(): the pass without the profile's set-up and summary

    def _wrap(self, cls, method: str, name: str) -> None:
        import functools

        f = cls.__dict__[method]

        @functools.wraps(f)
        def timed(*a, **k):
            self._stack.append([0.0])
            t = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                spent = time.perf_counter() - t
                inner = self._stack.pop()[0]
                if self._stack:
                    self._stack[-1][0] += spent
                entry = self.own.setdefault(name, [0.0, 0])
                entry[0] += spent - inner
                entry[1] += 1
        setattr(cls, method, timed)
        self._undo.append((cls, method, f))

    def __enter__(self) -> "Parts":
        from workbench.experts import massive, qk, router, sinks
        from workbench.experts import profile as prof
        from workbench.tracing import capture, reducers

        for mod in (reducers, router, massive):
            for cls in vars(mod).values():
                if isinstance(cls, type) and cls.__module__ == mod.__name__ and "update" in cls.__dict__:
                    self._wrap(cls, "update", f"reducer {cls.__name__}")
        for method in ("update", "_finish", "begin_batch"):
            self._wrap(sinks.SinkMeter, method, "attention-sink meter")
        for method in ("update", "_flush", "begin_batch", "result"):
            self._wrap(qk.QKMeter, method, "Q/K/V meter")
        for method in ("begin_batch", "_rows", "_emit", "_deliver", "flush", "_emit_expert_rows"):
            self._wrap(capture.Capture, method, "capture bookkeeping (rows, holding, coalescing)")
        real_trace = prof.trace

        def trace(*a, **k):  # the pass itself; the profile's set-up and summary are what is outside it
            t = time.perf_counter()
            try:
                return real_trace(*a, **k)
            finally:
                self.traced += time.perf_counter() - t
        prof.trace = trace
        self._undo.append((prof, "trace", real_trace))
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, f in reversed(self._undo):
            setattr(owner, name, f)


def sub(args, variant: str, tokens: int) -> dict:
    cmd = [sys.executable, __file__, "--variant", variant, "--model", args.model, "--tokens", str(tokens),
           "--prompt-length", str(args.prompt_length),
           "--batch", str(args.batch), "--threads", str(args.threads), "--device", args.device]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode == LOAD_FAILED:  # the child's one line, "error: ...": every other variant would fail alike
        fail(out.stderr.strip().splitlines()[-1].removeprefix("error: "))
    if out.returncode:
        lines = [l for l in out.stderr.splitlines() if l.strip() and "it/s]" not in l]
        why = lines[-1] if lines else f"exit status {out.returncode}" + (" (killed: out of memory?)" if out.returncode < 0 else "")
        return {"variant": variant, "error": why}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tokens", type=COUNT, default=10000)
    p.add_argument("--prompt-length", type=COUNT_OR_OFF, default=0, metavar="N",
                   help="prompts of N tokens each (the built-in prompts' text in N-token pieces) instead of the "
                   "built-in prompts (6-37 tokens): one length, so the pass's length batching saves nothing")
    p.add_argument("--batch", type=COUNT, default=16)
    p.add_argument("--threads", type=COUNT, default=2)
    p.add_argument("--variants", default="plain,body,profile,nnsight,tl",
                   help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--device", default="cpu", help="cpu or cuda; on CUDA each variant runs once on one batch "
                   "before the timed run (context, kernels, Triton compilation) and the clock stops after a sync")
    p.add_argument("--repeat", type=COUNT, default=1,
                   help="run the variants this many times, interleaved; report medians")
    p.add_argument("--rss-scan", type=NumberList(COUNT), default=[],
                   help="comma-separated token counts for the profile pass's peak RSS")
    p.add_argument("--breakdown", action="store_true",
                   help="also print where the profile pass's time goes (each part's own time, then cProfile)")
    p.add_argument("--variant", help=argparse.SUPPRESS)
    args = p.parse_args()
    names = list(dict.fromkeys(v for v in args.variants.split(",") if v))
    unknown = [v for v in names + ([args.variant] if args.variant else []) if v not in VARIANTS]
    if unknown or not names:
        p.error(f"--variants: unknown {', '.join(map(repr, unknown))}; choose from {', '.join(VARIANTS)}" if unknown
                else f"--variants names no variant; choose from {', '.join(VARIANTS)}")
    args.model = bench_model(args.model)
    if args.variant:
        print(json.dumps(run(args)))
        return
    runs: dict[str, list[dict]] = {v: [] for v in names}
    for _ in range(args.repeat):  # interleaved, so a burst of load elsewhere hits every variant alike
        for v in names:
            runs[v].append(sub(args, v, args.tokens))
    rows = []
    for v in names:
        ok = sorted((r for r in runs[v] if "error" not in r), key=lambda r: r["seconds"])
        rows.append(ok[(len(ok) - 1) // 2] if ok else runs[v][0])  # the median run
    if all("error" in r for r in rows):
        fail("every variant failed: " + "; ".join(f"{r['variant']}: {r['error']}" for r in rows), 1)
    plain = next((r for r in rows if r["variant"] == "plain" and "error" not in r), None)
    first = next(r for r in rows if "error" not in r)
    print(f"model {args.model}: {first['tokens']} tokens in {first['prompts']} prompts"
          + (f" of ~{args.prompt_length} tokens" if args.prompt_length else "") + ", batch "
          f"{args.batch}, {args.threads} threads, {args.device}; median of {args.repeat} interleaved runs")
    body = next((r for r in rows if r["variant"] == "body" and "error" not in r), None)
    body_len = next((r for r in rows if r["variant"] == "body-length" and "error" not in r), None)
    body_inf = next((r for r in rows if r["variant"] == "body-inference" and "error" not in r), None)
    gpu = args.device != "cpu"
    print(f"{'variant':<16}{'seconds':>9}{'tokens/s':>10}{'x plain':>9}{'x body':>8}"
          + (f"{'x body-length':>15}" if body_len else "") + (f"{'x body-inference':>18}" if body_inf else "")
          + f"{'peak RSS MB':>13}"
          + (f"{'peak GPU MB':>13}" if gpu else ""))
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:<16} failed: {r['error']}")
            continue
        ratio = r["seconds"] / plain["seconds"] if plain else float("nan")
        headless = r["seconds"] / body["seconds"] if body else float("nan")
        print(f"{r['variant']:<16}{r['seconds']:>9.2f}{r['tokens'] / r['seconds']:>10.0f}{ratio:>9.2f}{headless:>8.2f}"
              + (f"{r['seconds'] / body_len['seconds']:>15.2f}" if body_len else "")
              + (f"{r['seconds'] / body_inf['seconds']:>18.2f}" if body_inf else "")
              + f"{r['peak_rss_mb']:>13.0f}" + (f"{r['peak_gpu_mb'] or 0:>13.0f}" if gpu else ""))
    base = "body-length" if body_len else "body" if body else None
    if args.repeat > 1 and base:  # paired: each run against the baseline's run of the same round (load hits both)
        print(f"each round's ratio to that round's {base} run, and their median:")
        for v in names:
            pairs = [r["seconds"] / b["seconds"] for r, b in zip(runs[v], runs[base])
                     if "error" not in r and "error" not in b]
            if v != base and pairs:
                print(f"  {v:<16}" + " ".join(f"{x:5.2f}" for x in pairs) + f"   median {statistics.median(pairs):.2f}")
    if args.breakdown:
        breakdown(args)
    for n in args.rss_scan:
        r = sub(args, "profile", n)
        print(f"profile at {r.get('tokens')} tokens: {r.get('seconds', float('nan')):.1f} s, "
              f"peak RSS {r.get('peak_rss_mb', float('nan')):.0f} MB")


if __name__ == "__main__":
    run_main(main)
