"""``workbench circuit``: wired into workbench/cli.py with :func:`add_circuit_parser`."""

from __future__ import annotations

import argparse
import warnings

from workbench.args import COUNT, COUNT_OR_OFF, Number
from workbench.io import clear_stale_temps, output_dir

# the default circuit: the smallest curve budget up to DEFAULT_MAX_FRACTION of the edges with faithfulness >=
# DEFAULT_TARGET, else that largest circuit sharpened by up to DEFAULT_SWAPS rounds of swaps (issue 19)
DEFAULT_TARGET = 0.85
DEFAULT_HIT_SHARE = 0.8  # ... with Hit@10 at least this share of the full model's
DEFAULT_MAX_FRACTION = 0.02
DEFAULT_SWAPS = 6


def add_circuit_parser(subparsers) -> argparse.ArgumentParser:
    c = subparsers.add_parser(
        "circuit", help="find a knowledge circuit with EAP / EAP-IG and evaluate it",
        description="Score every edge of MODEL's graph (input, attention heads with q/k/v inputs, MLPs or routed "
                    "and shared experts, logits) on the facts with EAP or EAP-IG, keep the top edges pruned to "
                    "input->logits paths, and evaluate them by path patching. Writes OUT/circuit.json (networkx "
                    "node-link), circuit.graphml, circuit.dot, circuit.svg and circuit.png (layered drawing), "
                    "edges.parquet (every scored edge) and metrics.json.")
    c.add_argument("model", help="model spec (see `workbench models`)")
    c.add_argument("--facts", default=None,
                   help='JSONL, one {"prompt", "answer", "corrupted_prompt"?, "corrupted_answer"?, "relation"?, '
                        '"subject"?} per line (default: the built-in facts)')
    c.add_argument("--relation", default=None, metavar="NAME",
                   help="keep only the facts of this relation (the facts' `relation` field; e.g. located_in of the "
                        "built-in facts)")
    c.add_argument("--method", choices=["eap-ig-edges", "eap-ig", "eap"], default="eap-ig-edges",
                   help="eap-ig-edges: integrated gradients over the edges, all scaled together from corrupted to "
                        "clean (default); eap-ig: over the input embeddings (Hanna et al.); eap: clean gradient only")
    c.add_argument("--steps", type=COUNT, default=5, help="EAP-IG interpolation steps (default 5)")
    c.add_argument("--metric", choices=["logit_diff", "logprob", "prob", "kl"], default="logit_diff",
                   help="what the gradients are taken of (faithfulness is always on the logit difference)")
    sel = c.add_mutually_exclusive_group()
    sel.add_argument("--top-edges", type=COUNT, default=None, help="keep the N edges with the largest |score| "
                                                                 "(a fixed budget instead of the default target)")
    sel.add_argument("--threshold", type=Number(float, 0), default=None, help="keep edges with |score| >= T")
    sel.add_argument("--target-faithfulness", type=Number(float, 0, 1), default=None, metavar="F",
                     help=f"the smallest circuit on the faithfulness curve (0.1%% up to --max-fraction of the edges) "
                          f"reaching F; where none does, the --max-fraction circuit sharpened by --swaps rounds until "
                          f"it does (the default, with F = {DEFAULT_TARGET:g}, unless --top-edges or --threshold is "
                          "given)")
    c.add_argument("--target-hit-share", type=Number(float, 0, 1), default=None, metavar="S",
                   help="with a target faithfulness, the circuit must also keep Hit@10 at >= S x the full model's "
                        f"(default {DEFAULT_HIT_SHARE:g}; 0: faithfulness alone)")
    c.add_argument("--max-fraction", type=Number(float, 0, 1, open_low=True), default=None, metavar="P",
                   help="the largest circuit the target may pick, as a fraction of all edges (default "
                        f"{DEFAULT_MAX_FRACTION:g})")
    c.add_argument("--no-curve", action="store_true",
                   help="skip the faithfulness curve (faithfulness and Hit@10 at 0.1%%-20%% of the edges; on by "
                        "default); without a size flag the circuit is then 1%% of the edges")
    c.add_argument("--no-per-relation", action="store_true",
                   help="with facts of several relations (given or inferred), skip each relation's own circuit "
                        "(OUT/relations/*.json) and the overlap report")
    c.add_argument("--selection", choices=["fill", "top", "greedy", "signed"], default="fill",
                   help="fill: the smallest top-|score| set whose pruned circuit has N edges (default); top: the N "
                        "highest |score| edges, then pruned to input->logits paths; greedy: grown backward from the "
                        "logits; signed: fill over the edges that carry the answer only (no edge that works against "
                        "it; faithfulness can exceed 1)")
    c.add_argument("--refine", type=Number(int, 2, off=0), default=0, metavar="K",
                   help="re-score the best K x N edges with eap-ig-edges within that candidate circuit (every other "
                        "edge corrupted) and keep the best N of them (K >= 2; default 0: off)")
    c.add_argument("--swaps", type=Number(int, 1, off=0), default=None, metavar="ROUNDS",
                   help="after selection, up to ROUNDS rounds of edge swaps chosen by the gradient at the circuit "
                        "itself (every other edge corrupted), each kept only if it brings the facts' logit differences "
                        "closer to the full model's (summed squared error) without lowering Hit@10; same budget; with "
                        f"a target, only where the curve does not reach it, and stopped once it is reached (default "
                        f"{DEFAULT_SWAPS} with a target, 0: off with --top-edges or --threshold)")
    c.add_argument("--random-seeds", type=COUNT_OR_OFF, default=3, help="size-matched random circuits for the control")
    c.add_argument("--batch-size", type=COUNT, default=16, help="facts per batch at most (default 16; fewer where "
                                                                  "the memory budget needs it)")
    c.add_argument("--max-memory", type=Number(float, 0, open_low=True), default=None, metavar="GB",
                   help="memory budget of the whole run in GB (default: what the machine has free; with --device "
                        "cuda, GB on the GPU and what it has free); the batch size and mode are chosen to fit it, "
                        "printed at the start, and a run that cannot fit stops before any work")
    c.add_argument("--lean", action="store_true",
                   help="lean mode even where fast mode fits: one buffer of sender differences and checkpointed "
                        "layers (about two thirds of the memory per token, up to twice the time)")
    c.add_argument("--store-dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="dtype the senders' outputs and differences are kept in (bfloat16/float16 halve the memory "
                        "per token; scores and gradients stay float32)")
    c.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (CUDA where there is one): where the "
                                                   "model and the attribution's buffers live")
    c.add_argument("--quiet", action="store_true", help="no progress bars")
    c.add_argument("--out", required=True, help="output folder")
    c.set_defaults(func=cmd_circuit)
    return c


def only_relation(facts, relation: str):
    """The facts whose ``relation`` (given, else inferred from plain facts' shared template, such as
    ``"The capital of {} is"``) is ``relation``; a one-line error naming the relations there are."""
    from workbench.circuits.facts import infer_templates
    from workbench.errors import WorkbenchError

    inferred = infer_templates(facts)
    kept = [f for f, g in zip(facts, inferred) if (f.relation or g.relation) == relation]
    if not kept:
        known = sorted({g.relation for g in inferred if g.relation}, key=str)
        raise WorkbenchError(f"no fact has relation {relation!r}; the facts' relations: "
                             + (", ".join(repr(k) for k in known) if known else "none (plain facts sharing no template)"))
    return kept


def cmd_circuit(args) -> int:
    from workbench.circuits.discover import CircuitOptions, find_circuit, write_outputs
    from workbench.circuits.facts import builtin_facts, read_facts
    from workbench.errors import WorkbenchError
    from workbench.models.specs import load

    facts = read_facts(args.facts) if args.facts else builtin_facts()  # reject bad input before loading a model
    if args.relation is not None:
        facts = only_relation(facts, args.relation)
    target = args.target_faithfulness
    if target is None and args.top_edges is None and args.threshold is None and not args.no_curve:
        target = DEFAULT_TARGET  # the default circuit size: the answer of the curve (without it: 1 % of the edges)
    without = "--no-curve" if args.no_curve and args.top_edges is None and args.threshold is None else \
        "--top-edges or --threshold"  # what took the target away
    if args.max_fraction is not None and target is None:
        raise WorkbenchError(f"--max-fraction bounds the target's circuit: give it without {without}")
    if args.target_hit_share is not None and target is None:
        raise WorkbenchError(f"--target-hit-share is part of the target: give it without {without}")
    swaps = args.swaps if args.swaps is not None else (DEFAULT_SWAPS if target is not None else 0)
    hit_share = DEFAULT_HIT_SHARE if args.target_hit_share is None else args.target_hit_share
    out = output_dir(args.out, command="circuit")
    clear_stale_temps(out, ["circuit.*", "edges.parquet", "metrics.json"])  # what a killed run left half-written
    lm = load(args.model, device=args.device)
    opts = CircuitOptions(method=args.method, steps=args.steps, metric=args.metric, top_edges=args.top_edges,
                          threshold=args.threshold, selection=args.selection, refine=args.refine, swaps=swaps,
                          batch_size=args.batch_size, max_memory=args.max_memory, store=args.store_dtype,
                          lean=True if args.lean else None,
                          random_seeds=args.random_seeds, progress=not args.quiet,
                          curve=not args.no_curve, target_faithfulness=target, target_hit_share=hit_share,
                          max_fraction=args.max_fraction or DEFAULT_MAX_FRACTION,
                          per_relation=not args.no_per_relation)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="the circuit is empty")  # the error below says it
        circuit, scores, mask = find_circuit(lm, facts, opts)
    if "empty" in circuit.meta["selection"]:
        raise WorkbenchError(f"the circuit is empty: {circuit.meta['selection']['empty']}; nothing written")
    paths = write_outputs(circuit, scores, mask, out)
    m = circuit.meta.get("metrics", {})
    print(f"{args.method} on {len(facts)} facts: {circuit.n_edges} of {circuit.meta['n_edges_total']} edges "
          f"({circuit.meta['attribution_seconds']:.1f} s){_short_line(circuit.meta['selection'])}")
    if "swaps" in circuit.meta["selection"]:
        sw = circuit.meta["selection"]["swaps"]
        print(f"swaps: {len(sw['accepted'])} of {sw['rounds']} rounds kept, faithfulness "
              f"{sw['faithfulness_start']:.3f} -> {sw['faithfulness_end']:.3f}, "
              f"Hit@10 {sw['hit_at_10_start']:.3f} -> {sw['hit_at_10_end']:.3f} "
              f"({sw['seconds']:.1f} s)")
    if m:
        rand = m.get("random_seeds", 1) > 0  # --random-seeds 0: no control to print
        print(f"faithfulness {m['faithfulness']:.3f}" + (f" (random {m['faithfulness_random']:.3f})" if rand else "")
              + f"; Hit@10 full {m['hit_at_10_full']:.3f}, circuit {m['hit_at_10_circuit']:.3f}"
              + (f", random {m['hit_at_10_random']:.3f}" if rand else ""))
        lost = _lost_line(circuit.meta.get("facts", []))
        if lost:
            print(lost)
    if m.get("curve"):
        print(curve_line(m["curve"])
              + (_target_line(circuit.meta["selection"]["target"], circuit.n_edges)
                 if "target" in circuit.meta["selection"] else ""))
    if m.get("relations"):
        rel = m["relations"]
        for name, r in rel["per_relation"].items():
            print(f"  relation {name!r} ({r['n_facts']} facts): own circuit faithfulness {r['faithfulness']:.3f}, "
                  f"Hit@10 {r['hit_at_10_circuit']:.3f}; mixed circuit {r['faithfulness_mixed_circuit']:.3f}, "
                  f"{r['hit_at_10_mixed_circuit']:.3f}; Jaccard with mixed {r['jaccard_with_mixed']:.2f}")
        c = rel["combined"]
        print(f"each fact through its relation's circuit: faithfulness {c['faithfulness']:.3f} (mixed circuit "
              f"{c['faithfulness_mixed_circuit']:.3f}), Hit@10 {c['hit_at_10_circuits']:.3f} (full {c['hit_at_10_full']:.3f}); "
              f"mean pairwise Jaccard {_mean_jaccard(rel['overlap']):.2f}")
    print("wrote " + ", ".join(str(p) for p in paths))
    from workbench.report import announce

    announce(out)
    return 0


def curve_line(curve: list[dict]) -> str:
    """'faithfulness curve: 0.1% 0.52, ...': each budget's share of the edges to two significant digits, so the
    small budgets of a small graph stay apart (1 and 2 of 1,485 edges: 0.067 % and 0.13 %, both '0.1%' at .1%)."""
    return "faithfulness curve: " + ", ".join(f"{100 * c['fraction']:.2g}% {c['faithfulness']:.2f}" for c in curve)


def _short_line(sel: dict) -> str:
    """"" or, where the circuit has fewer edges than its budget, how many were asked and why fewer are kept."""
    asked, kept = sel.get("top_edges"), sel.get("after_pruning")
    if asked is None or kept is None or kept >= asked:
        return ""
    why = ("a larger top-|score| set would have gone over it once pruned" if sel["rule"] in ("fill", "signed") else
           f"{sel['selected']} selected, {kept} of them on input->logits paths")
    return f"; budget {asked}: {why}"


def _target_line(t: dict, kept: int | None = None) -> str:
    """``kept``: the circuit's edges; where the swaps left some without a path from the input to the logits, they
    were pruned and it has fewer than the budget (it read "the 1413-edge circuit" for a circuit of 1408)."""
    goal = f"{t['faithfulness']:g}" + (f" (Hit@10 >= {t['hit_share']:g} x full)" if t.get("hit_share") else "")
    if t["reached_on_curve"]:
        return f"; smallest reaching {goal}: {t['budget']} edges"
    return (f"; none up to {t['max_fraction']:.1%} reaches {goal}: the {t['budget']}-edge circuit, sharpened by "
            "swaps (above)" + (f", {kept} edges once those left off every input-to-logits path are pruned"
                               if kept is not None and kept != t["budget"] else ""))


def _lost_line(facts: list[dict], show: int = 5) -> str:
    """The facts whose answer the full model ranks in its top 10 and the circuit does not (from each fact's
    ``answer_rank_full`` and ``answer_rank_circuit``), the first ``show`` of them named; "" when there are none."""
    lost = [f for f in facts if "answer_rank_circuit" in f and f["answer_rank_full"] < 10 <= f["answer_rank_circuit"]]
    if not lost:
        return ""
    named = "; ".join(f"{f['prompt']!r} -> {f['answer']!r} (rank {f['answer_rank_full']} -> {f['answer_rank_circuit']})"
                      for f in lost[:show])
    more = f"; and {len(lost) - show} more" if len(lost) > show else ""
    return (f"the circuit loses {len(lost)} fact(s) the model has in its top 10 (answer rank full -> circuit, the "
            "tokens scored above it: Hit@10 counts ranks 0-9): "
            f"{named}{more}")


def _mean_jaccard(overlap: list[dict]) -> float:
    return sum(o["jaccard"] for o in overlap) / len(overlap) if overlap else float("nan")
