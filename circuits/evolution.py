"""Knowledge circuits across training checkpoints (as DynamicKnowledgeCircuits, Ou et al. 2025, "How do
LLMs acquire new knowledge? A knowledge circuits perspective on continual pre-training", follows a
circuit over continued pretraining): each checkpoint's circuit on the same facts, with the same edge
budget, its faithfulness and Hit@10, its edge and node Jaccard with the final checkpoint's circuit,
and its node composition (attention heads, MLPs, routed and shared experts).
"""

from __future__ import annotations

import gc
import re
import warnings
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

from workbench.args import COUNT
from workbench.errors import WorkbenchError
from workbench.io import clear_stale_temps, output_dir

KINDS = ("head", "kv", "mlp", "expert", "shared", "router")  # node kinds counted in the composition


def evolution(specs: Sequence[str], facts, *, load: Callable[[str], object], options=None,
              progress: Callable[[str], None] | None = None) -> tuple[dict, list]:
    """Find each checkpoint's circuit (one model in memory at a time); compare each with the final one.

    Returns ``(result, circuits)``: ``result["rows"]`` has one entry per checkpoint with ``faithfulness``,
    ``hit_at_10_full``, ``hit_at_10_circuit``, ``hit_at_1_full``, ``n_edges``, ``edge_jaccard_final``,
    ``node_jaccard_final`` and ``composition`` ({kind: nodes}).
    """
    from workbench.circuits.diff import diff
    from workbench.circuits.discover import CircuitOptions, find_circuit
    from workbench.models.specs import check_series, step_of

    check_series(list(specs), "circuit-evolution")
    options = options or CircuitOptions(per_relation=False, random_seeds=1)
    rows, circuits, total, first = [], [], None, None
    for i, spec in enumerate(specs):
        if progress:
            progress(f"[{i + 1}/{len(specs)}] {spec}")
        lm = load(spec)
        try:
            # before any work: a checkpoint of another model, or tokenizing the facts otherwise, is not of the series
            seen = (type(lm.model).__name__, [lm.tokenizer(f.prompt)["input_ids"] for f in facts])
            if first is None:
                first = seen
            elif seen[1] != first[1]:
                raise WorkbenchError(f"{spec} tokenizes the facts differently from {specs[0]}: checkpoints of one "
                                     "series must share the tokenizer")
            if seen[0] != first[0]:  # the edge count below refuses graphs of other shapes
                warnings.warn(f"{spec} is a {seen[0]}, {specs[0]} a {first[0]}: the circuits compared are of two "
                              "models, not checkpoints of one", stacklevel=2)
            circuit, _, _ = find_circuit(lm, facts, options)
        finally:
            del lm
            gc.collect()
        n_total = circuit.meta["n_edges_total"]
        if total is not None and n_total != total:
            raise WorkbenchError(f"{spec}'s graph has {n_total} edges, {specs[0]}'s {total}: the checkpoints of one "
                                 "series must share the architecture")
        total = n_total
        m = circuit.meta.get("metrics", {})
        kinds = Counter(a.get("kind") for a in circuit.nodes.values())
        # every kind of writer the model's graph has, 0 where the circuit has none (a MoE showed "mlp 0" and hid
        # its experts until one joined), so each checkpoint's row has the same columns
        graph_kinds = (circuit.meta.get("graph") or {}).get("node_kinds") or {"head": 1, "mlp": 1}
        rows.append({"checkpoint": i, "spec": spec, "step": step_of(spec), "n_edges": circuit.n_edges,
                     "faithfulness": m.get("faithfulness"), "faithfulness_random": m.get("faithfulness_random"),
                     "hit_at_10_full": m.get("hit_at_10_full"), "hit_at_10_circuit": m.get("hit_at_10_circuit"),
                     "hit_at_1_full": m.get("hit_at_1_full"),
                     # how much the model prefers the answers over the corrupted ones: faithfulness divides by it,
                     # so it is noise where this gap is near 0 (a checkpoint that does not know the facts yet)
                     "gap": (m["metric_full"] - m["metric_corrupted"]) if "metric_full" in m else None,
                     "composition": {k: kinds.get(k, 0) for k in KINDS if kinds.get(k, 0) or k in graph_kinds}})
        circuits.append(circuit)
    for row, c in zip(rows, circuits):
        d = diff(c, circuits[-1])
        row["edge_jaccard_final"] = d["edges"]["jaccard"]
        row["node_jaccard_final"] = d["nodes"]["jaccard"]
    return {"checkpoints": list(specs), "n_facts": len(facts), "n_edges_total": total, "rows": rows}, circuits


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    steps = all(r["step"] is not None for r in rows)
    x = [r["step"] if steps else r["checkpoint"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    for key, label in (("hit_at_10_full", "Hit@10, full model"), ("hit_at_10_circuit", "Hit@10, circuit"),
                       ("faithfulness", "faithfulness")):
        axes[0].plot(x, [r[key] for r in rows], marker="o", ms=3, label=label)
    axes[0].set_title("what the model knows, and what its circuit keeps", fontsize=10)
    axes[0].legend(fontsize=8)
    axes[1].plot(x, [r["edge_jaccard_final"] for r in rows], marker="o", ms=3, label="edges")
    axes[1].plot(x, [r["node_jaccard_final"] for r in rows], marker="o", ms=3, label="nodes")
    axes[1].set_title("Jaccard with the final checkpoint's circuit", fontsize=10)
    axes[1].legend(fontsize=8)
    kinds = sorted({k for r in rows for k in r["composition"]})
    bottom = [0] * len(rows)
    for k in kinds:
        v = [r["composition"].get(k, 0) for r in rows]
        axes[2].bar(range(len(rows)), v, bottom=bottom, label=k)
        bottom = [a + b for a, b in zip(bottom, v)]
    axes[2].set_xticks(range(len(rows)), [str(v) for v in x], rotation=60, fontsize=7)
    axes[2].set_title("circuit nodes by kind", fontsize=10)
    axes[2].legend(fontsize=8)
    for ax in axes[:2]:
        ax.set_xlabel("training step" if steps else "checkpoint")
        if steps and max(x) > 20 * max(1, min(v for v in x if v > 0)):
            ax.set_xscale("symlog", linthresh=max(1, min(v for v in x if v > 0)))
        ax.grid(alpha=0.3)
    axes[2].set_xlabel("training step" if steps else "checkpoint")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(result: dict, circuits: list, out_dir: str | Path, plots: bool = True) -> list[Path]:
    """OUT/circuits/ckpt{i}.json, evolution.parquet, evolution.png and evolution.json (last)."""
    import pandas as pd

    from workbench.circuits import export
    from workbench.io import write_result_set

    out = Path(out_dir)
    for old in (out / "circuits").glob("ckpt*.json"):  # an earlier run's checkpoints beyond this run's count
        if re.fullmatch(r"ckpt\d+\.json", old.name) and int(old.stem[4:]) >= len(circuits):
            old.unlink()
    flat = [{**{k: v for k, v in r.items() if k != "composition"},
             **{f"nodes_{k}": v for k, v in r["composition"].items()}} for r in result["rows"]]
    return write_result_set(out, "evolution", result, pd.DataFrame(flat),
                            (lambda path: plot(result, path)) if plots else None,
                            before=[lambda c=c, i=i: export.write_json(c, out / "circuits" / f"ckpt{i}.json")
                                    for i, c in enumerate(circuits)])


def add_evolution_parser(subparsers) -> None:
    c = subparsers.add_parser(
        "circuit-evolution", help="knowledge circuits across training checkpoints",
        description="Find the circuit of the same facts in every CHECKPOINT (training order; the last is the final "
                    "one; zoo:tiny-moe@all names the built-in series) with the same edge budget, and write "
                    "OUT/evolution.json|parquet|png (faithfulness, Hit@10, edge and node Jaccard with the final "
                    "circuit, node composition) and OUT/circuits/ckpt<i>.json.")
    c.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT", help="model specs or folders, in training order")
    c.add_argument("--facts", default=None, help="JSONL facts (default: the built-in facts)")
    c.add_argument("--relation", default=None, metavar="NAME", help="keep only the facts of this relation")
    c.add_argument("--top-edges", type=COUNT, default=None, help="edges per circuit (default: 1%% of all edges)")
    c.add_argument("--steps", type=COUNT, default=5, help="EAP-IG interpolation steps (default 5)")
    c.add_argument("--batch-size", type=COUNT, default=16, help="facts per batch at most (default 16)")
    c.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (CUDA where there is one); default cpu")
    c.add_argument("--no-plots", action="store_true", help="no evolution.png")
    c.add_argument("--quiet", action="store_true", help="no progress bars")
    c.add_argument("--out", required=True, help="output folder (evolution.json, circuits/)")
    c.set_defaults(func=cmd_evolution)


def cmd_evolution(args) -> int:
    import sys

    from workbench.circuits.cli import only_relation
    from workbench.circuits.discover import CircuitOptions
    from workbench.circuits.facts import builtin_facts, read_facts
    from workbench.models.specs import expand_series, load

    facts = read_facts(args.facts) if args.facts else builtin_facts()
    if args.relation is not None:
        facts = only_relation(facts, args.relation)
    specs = [s for spec in args.checkpoints for s in expand_series(spec)]
    out = output_dir(args.out, command="circuit-evolution")
    clear_stale_temps(out, ["evolution.*"])
    opts = CircuitOptions(steps=args.steps, top_edges=args.top_edges, batch_size=args.batch_size, random_seeds=1,
                          per_relation=False)
    from workbench.cli import quiet_loading

    quiet_loading(args)  # (each checkpoint is loaded here, not through the CLI's _load)
    say = None if args.quiet else (lambda s: print(s, file=sys.stderr))
    result, circuits = evolution(specs, facts, load=lambda s: load(s, device=args.device), options=opts, progress=say)
    write(result, circuits, out, plots=not args.no_plots)
    sizes = sorted({r["n_edges"] for r in result["rows"]})  # one size, unless a checkpoint scores fewer edges
    size = f"{sizes[0]}-edge" if len(sizes) == 1 else f"{sizes[0]}- to {sizes[-1]}-edge"
    print(f"{len(facts)} facts, {size} circuits of {result['n_edges_total']} edges:")
    print(f"{'checkpoint':<22}{'Hit@10 full':>12}{'circuit':>9}{'gap':>8}{'faithful':>10}{'Jaccard':>9}  nodes")
    for r in result["rows"]:
        comp = " ".join(f"{k} {v}" for k, v in r["composition"].items())
        print(f"{r['spec']:<22}{r['hit_at_10_full']:>12.3f}{r['hit_at_10_circuit']:>9.3f}{r['gap']:>8.3g}"
              f"{r['faithfulness']:>10.3f}"
              f"{r['edge_jaccard_final']:>9.2f}  {comp}")
    print(f"wrote {out / 'evolution.json'}, evolution.parquet" + ("" if args.no_plots else ", evolution.png")
          + f" and {len(circuits)} circuits in {out / 'circuits'}")
    from workbench.report import announce

    announce(out)
    return 0
