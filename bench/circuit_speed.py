"""EAP and EAP-IG speed and faithfulness on SmolLM2-135M: wall time, peak RSS, the time in forward+backward
passes, and the faithfulness of the circuits they give.

    .venv/bin/python bench/circuit_speed.py [--facts 32] [--batch-size 32] [--steps 5] [--threads N]
        [--relation capital_of|other|located_in|...] [--methods eap,eap-ig,eap-ig-edges,refine]
        [--context TOKENS] [--lean] [--store-dtype float32|bfloat16|float16] [--device cpu|cuda]

Memory: each child samples its RSS while ``attribute`` runs and reports the peak above the RSS it
started from per token of the largest batch (``MB/token``), and that against the floor, every sender's
output difference at every position (senders x d x bytes of the storage dtype: ``x floor``).
``--context N`` puts about N tokens of a neutral paragraph before each prompt ("She said that the
capital of X is"), the long prompts of issue 24; ``--lean`` and ``--store-dtype`` are the circuit
command's memory options, used by the children and the parent's evaluation alike. With ``--device cuda``
the model and the attribution run on the GPU, and memory is the GPU's: the peak the caching allocator had
allocated (``torch.cuda.max_memory_allocated``) above what it held when the attribution started, per token,
against the same floor; ``peak RSS GB`` is then the GPU's peak allocation, model included.

For each method a fresh child process loads the model, times one forward+backward on the same batch
(the model's own forward on the facts' clean prompts, log-probability of the answer at the last
position, backward to the input embeddings with parameters frozen: the pass attribution repeats), then
scores every edge (``attribute``) and records the peak RSS of the process (model included). Methods:
``eap``, ``eap-ig`` (on the input embeddings, as the reference), ``eap-ig-edges`` (on the edges: the
default of ``workbench circuit``), and ``refine``: ``eap-ig-edges`` plus re-scoring the best 2 x N edges
within themselves (``--refine 2``, N = 1 % of the edges; timed together).

The parent then evaluates, by path patching, for each method: the ``top`` circuit (the 1 % of edges
with the largest |score|, then pruned to input->logits paths, which leaves fewer), the ``fill``
circuit (at most 1 % after pruning, as many as fit: the default selection) and the fill circuit with as many edges as
the reference's top-1 % (1,232 of 123,211); plus size-matched random circuits. Faithfulness is
(M(circuit) - M(corrupted)) / (M(full) - M(corrupted)) with M the summed logit difference.

Anchor (issue 6, same machine kind): hannamw/EAP-IG, GQA ungrouped, batches of 8, 32 capital-of facts:
EAP-IG(5) 77.5 s and 2.5 GB, EAP 34.7 s; top-1 % faithfulness 0.968 (EAP-IG), 0.926 (EAP).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

REFERENCE = {"eap-ig": {"seconds": 77.5, "faithfulness": 0.968}, "eap": {"seconds": 34.7, "faithfulness": 0.926}}
REFERENCE_EDGES = 1232  # 1 % of the reference graph's 123,211 edges
METHODS = ("eap", "eap-ig", "eap-ig-edges", "refine")


def _facts(n: int, relation: str = "capital_of"):
    """The first ``n`` built-in facts of ``relation`` (capital_of, the anchor's, topped up with other
    relations if short), or of every relation but capital_of (``other``)."""
    from workbench.circuits import builtin_facts

    if relation == "other":
        return [f for f in builtin_facts() if f.relation != "capital_of"][:n]
    facts = [f for f in builtin_facts() if f.relation == relation]
    if not facts:
        raise SystemExit(f"no built-in facts of relation {relation!r}")
    if relation == "capital_of" and len(facts) < n:
        facts += [f for f in builtin_facts() if f.relation != "capital_of"]
    return facts[:n]


class PeakRSS:
    """Samples this process's RSS every 2 ms in a thread: the peak between ``start`` and ``stop``."""

    def __init__(self):
        import threading

        from workbench.circuits.memory import rss

        self.rss, self.peak, self.running = rss, 0, False
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while self.running:
            self.peak = max(self.peak, self.rss())
            time.sleep(0.002)

    def start(self) -> int:
        base = self.rss()
        self.peak, self.running = base, True
        self.thread.start()
        return base

    def stop(self) -> int:
        self.running = False
        self.thread.join()
        return max(self.peak, self.rss())


def with_context(facts, tokens: int):
    """The facts with about ``tokens`` tokens of a neutral paragraph before "She said that the capital of
    X is" (issue 24's long prompts; subject swaps keep each pair the same length)."""
    from dataclasses import replace

    from circuit_scale import FILLER

    if not tokens:
        return facts
    words = (FILLER * (tokens // 60 + 2)).split(" ")
    text = " ".join(words[:int(tokens * 0.78)]) + " "  # ~1.28 tokens per word in this filler
    return [replace(f, prompt=text + "She said that " + f.prompt[0].lower() + f.prompt[1:]) for f in facts]


def child(args) -> dict:
    import torch

    from workbench.circuits import attribute, prepare
    from workbench.circuits.attribution import metric_values
    from workbench.circuits.discover import CircuitOptions, SELECTIONS, default_top_edges, refine
    from workbench.circuits.facts import batches, pad_id
    from workbench.models.specs import load

    if args.threads:
        torch.set_num_threads(args.threads)
    from workbench.circuits import memory

    if args.lean:  # as the CLI's lean mode, from the start (a heap grown by the timing below stays fragmented)
        memory.limit_heap_growth()
    lm = load("smollm2-135m", device=args.device)
    cuda = lm.device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize(lm.device)

    prepared = prepare(lm.tokenizer, with_context(_facts(args.facts, args.relation), args.context))
    # one forward+backward of the plain model on the same batches
    fb = []
    for b in batches(prepared, args.batch_size, pad_id(lm.tokenizer), lm.device):
        for p in lm.model.parameters():
            p.requires_grad_(False)
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            emb = lm.model.model.embed_tokens(b.ids).detach().requires_grad_(True)
            out = lm.model(inputs_embeds=emb, logits_to_keep=0).logits
            logits = out[torch.arange(len(b.last), device=lm.device), b.last]
            metric_values("logprob", logits, b).sum().backward()
            sync()
            times.append(time.perf_counter() - t0)
        fb.append(min(times))
        for p in lm.model.parameters():
            p.requires_grad_(True)
    method = "eap-ig-edges" if args.child == "refine" else args.child
    from workbench.circuits.attribution import STORE_DTYPES
    from workbench.circuits.facts import batches as make_batches

    store = STORE_DTYPES[args.store_dtype]
    # a one-fact, one-step warm-up: the base below then holds the one-time costs (weights paged in on first
    # use, library workspaces), so the peak above it is what grows with the batch's tokens
    attribute(lm, prepared[:1], method=method, steps=1, batch_size=1, lean=args.lean, store=store)
    if cuda:  # the GPU's memory: what the caching allocator hands out, sampled by the allocator itself
        sync()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(lm.device)
        base = torch.cuda.memory_allocated(lm.device)
    else:
        memory.trim_heap()
        sampler = PeakRSS()
        base = sampler.start()
    t0 = time.perf_counter()
    scores = attribute(lm, prepared, method=method, steps=args.steps, batch_size=args.batch_size, lean=args.lean,
                       store=store)
    sync()
    peak = torch.cuda.max_memory_allocated(lm.device) if cuda else sampler.stop()
    tokens = max(b.ids.numel() for b in make_batches(prepared, args.batch_size))
    floor = memory.floor_per_token(scores.graph, store)
    matrices = {"scores": scores.matrix}
    if args.child == "refine":
        opts = CircuitOptions(method=method, steps=args.steps, batch_size=args.batch_size, refine=2)
        n1 = default_top_edges(scores.graph.n_edges)
        refine(lm, prepared, scores, SELECTIONS[opts.selection], n1, opts)
        matrices["refined"] = scores.refined  # NaN outside the candidates
    sync()
    seconds = time.perf_counter() - t0
    if args.child == "refine":  # the same at the reference's edge count (not timed)
        refine(lm, prepared, scores, SELECTIONS[opts.selection], REFERENCE_EDGES, opts)
        matrices["refined_ref"] = scores.refined
    torch.save(matrices, args.scores)
    return {"method": args.child, "seconds": seconds, "fwd_bwd_seconds": sum(fb),
            "peak_rss_gb": peak / 2**30 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "device": str(lm.device),
            "mb_per_token": (peak - base) / tokens / 2**20, "x_floor": (peak - base) / tokens / floor,
            "floor_mb": floor / 2**20, "tokens": tokens,
            "threads": torch.get_num_threads(), "edges": scores.graph.n_edges,
            "baselines": {k: sum(p.baseline == k for p in prepared)
                          for k in ("swap", "given", "neighbour", "entity", "mean")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--facts", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    ap.add_argument("--relation", default="capital_of",
                    help="built-in facts of this relation (default capital_of, as the reference), or 'other': "
                         "every relation but capital_of")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    ap.add_argument("--context", type=int, default=0,
                    help="about this many tokens of a neutral paragraph before each prompt (issue 24's long prompts)")
    ap.add_argument("--lean", action="store_true", help="lean mode: one sender buffer, checkpointed layers")
    ap.add_argument("--store-dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]: where the model and the attribution run "
                                                    "(memory is then the GPU's; see above)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--scores", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.child:
        print(json.dumps(child(args)))
        return

    import tempfile

    import torch

    from workbench.circuits import build_graph, prepare
    from workbench.circuits.attribution import STORE_DTYPES
    from workbench.circuits.discover import default_top_edges
    from workbench.circuits.evaluate import evaluate, prune, select_fill, select_random, select_top
    from workbench.models.specs import load

    from workbench.errors import WorkbenchError
    from workbench.models.specs import resolve_device

    try:
        args.device = resolve_device(args.device)
    except WorkbenchError as e:
        ap.error(str(e))
    methods = [m for m in args.methods.split(",") if m]
    if not set(methods) <= set(METHODS):
        ap.error(f"--methods: choose from {', '.join(METHODS)}")
    runs, matrices = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in methods:
            path = os.path.join(tmp, f"{method}.pt")
            cmd = [sys.executable, __file__, "--child", method, "--scores", path, "--facts", str(args.facts),
                   "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--threads", str(args.threads),
                   "--relation", args.relation, "--context", str(args.context), "--store-dtype", args.store_dtype,
                   "--device", args.device, *(["--lean"] if args.lean else [])]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            runs[method] = json.loads(out.strip().splitlines()[-1])
            matrices[method] = torch.load(path, weights_only=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load("smollm2-135m", device=args.device)
    prepared = prepare(lm.tokenizer, with_context(_facts(args.facts, args.relation), args.context))
    graph = build_graph(lm.model, lm.adapter)
    n1 = default_top_edges(graph.n_edges)
    circuits = {}
    for method, ms in matrices.items():
        m = ms["scores"]
        circuits[f"{method}/top"] = prune(graph, select_top(graph, m, n1))
        if method == "refine":  # as discover.find_circuit: fill among the candidates by their refined scores
            for key, size in (("fill", n1), ("ref", REFERENCE_EDGES)):
                refined = ms["refined" if key == "fill" else "refined_ref"]
                circuits[f"{method}/{key}"] = prune(graph, select_fill(graph, refined.nan_to_num(0.0), size)
                                                    & ~refined.isnan())
        else:
            circuits[f"{method}/fill"] = select_fill(graph, m, n1)
            circuits[f"{method}/ref"] = select_fill(graph, m, REFERENCE_EDGES)
    for seed in range(3):
        circuits[f"random{seed}"] = select_random(graph, n1, seed)
    t0 = time.perf_counter()
    ev = evaluate(lm, prepared, graph, circuits, batch_size=args.batch_size, lean=args.lean,
                  store=STORE_DTYPES[args.store_dtype])
    eval_s = time.perf_counter() - t0
    c = ev["circuits"]
    rand_f = sum(c[f"random{s}"]["faithfulness"] for s in range(3)) / 3
    rand_h = sum(c[f"random{s}"]["hit_at_10"] for s in range(3)) / 3
    first = runs[methods[0]]
    gpu = first["device"].startswith("cuda")
    print(f"SmolLM2-135M, {len(prepared)} {args.relation} facts of {min(len(p.ids) for p in prepared)}-"
          f"{max(len(p.ids) for p in prepared)} tokens, batch {args.batch_size}, {'lean' if args.lean else 'fast'} mode, "
          f"{args.store_dtype} storage, graph {graph.n_senders} senders x "
          f"{graph.n_receivers} receivers = {graph.n_edges} edges (GQA native), 1 % = {n1} edges; "
          f"baselines {first['baselines']}; {first['threads']} threads; device {first['device']}")
    print(f"full model: Hit@10 {ev['hit_at_10_full']:.3f}, Hit@1 {ev['hit_at_1_full']:.3f}; corrupted Hit@10 "
          f"{ev['hit_at_10_corrupted']:.3f}")
    print(f"{'method':<22} {'seconds':>8} {'ref s':>6} {'x ref':>6} {'fwd+bwd s':>9} {'x fwd+bwd':>9} "
          f"{'peak GPU GB' if gpu else 'peak RSS GB':>11} {'MB/token':>8} {'x floor':>7} {'faith top':>9} "
          f"{'(edges)':>7} "
          f"{'faith 1%':>8} {'(edges)':>7} {'Hit@10 1%':>9} "
          f"{f'faith {REFERENCE_EDGES}':>10} {'ref faith':>9}")
    for method in methods:
        r = runs[method]
        steps = f"({args.steps})"
        name = {"eap": "eap", "eap-ig": f"eap-ig{steps}", "eap-ig-edges": f"eap-ig-edges{steps}",
                "refine": f"eap-ig-edges{steps}+refine"}[method]
        ref = REFERENCE.get("eap" if method == "eap" else "eap-ig")
        top, fill, at_ref = c[f"{method}/top"], c[f"{method}/fill"], c[f"{method}/ref"]
        print(f"{name:<22} {r['seconds']:>8.1f} {ref['seconds']:>6.1f} {r['seconds'] / ref['seconds']:>6.2f} "
              f"{r['fwd_bwd_seconds']:>9.2f} {r['seconds'] / r['fwd_bwd_seconds']:>9.1f} {r['peak_rss_gb']:>11.2f} "
              f"{r['mb_per_token']:>8.2f} {r['x_floor']:>7.2f} "
              f"{top['faithfulness']:>9.3f} {top['n_edges']:>7} {fill['faithfulness']:>8.3f} {fill['n_edges']:>7} "
              f"{fill['hit_at_10']:>9.3f} {at_ref['faithfulness']:>10.3f} {ref['faithfulness']:>9.3f}")
    print(f"faith top: top-{n1} by |score| then pruned (edges left in brackets); faith 1%: at most {n1} edges "
          f"after pruning (fill, the default selection; for +refine chosen among 2 x {n1} re-scored candidates)")
    print(f"MB/token: the attribution's peak {'GPU allocation' if gpu else 'RSS'} above "
          f"{'the allocation' if gpu else 'the RSS'} it started from (after a one-fact warm-up run), "
          f"per token of the largest batch "
          f"({first['tokens']} padded tokens; MB = 2^20 bytes); x floor: against senders x d x bytes = "
          f"{first['floor_mb']:.2f} MB per token")
    print(f"random circuits of {n1} edges (3 seeds): faithfulness {rand_f:.3f}, Hit@10 {rand_h:.3f}; "
          f"evaluation of {len(circuits)} circuits took {eval_s:.1f} s")


if __name__ == "__main__":
    main()
