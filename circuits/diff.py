"""Compare two circuits (e.g. the same facts across checkpoints): shared, added and removed edges and
nodes, Jaccard overlaps, and the rank correlation of the shared edges' scores."""

from __future__ import annotations

import math
import sys
from pathlib import Path

from workbench.circuits.export import Circuit, read_json


def _edges(c: Circuit) -> dict[tuple, float]:
    return {(e["source"], e["target"], e["port"]): float(e["score"]) for e in c.edges if e["port"] != "internal"}


def _spearman(a: list[float], b: list[float]) -> float:
    """Over the pairs with both scores finite (one NaN score made the whole correlation NaN)."""
    pairs = [(x, y) for x, y in zip(a, b) if math.isfinite(x) and math.isfinite(y)]
    a, b = [x for x, _ in pairs], [y for _, y in pairs]
    if len(a) < 2:
        return math.nan
    from scipy import stats

    rho = stats.spearmanr(a, b).statistic
    return float(rho) if rho == rho else math.nan


def diff(a: Circuit, b: Circuit) -> dict:
    """What changes from circuit ``a`` to circuit ``b``."""
    ea, eb = _edges(a), _edges(b)
    na, nb = set(a.nodes), set(b.nodes)
    shared = sorted(set(ea) & set(eb))
    union_e, union_n = set(ea) | set(eb), na | nb
    fmt = lambda keys: [{"source": s, "target": t, "port": p} for s, t, p in keys]  # noqa: E731
    return {
        "edges": {"a": len(ea), "b": len(eb), "shared": len(shared), "added": len(set(eb) - set(ea)),
                  "removed": len(set(ea) - set(eb)), "jaccard": len(shared) / len(union_e) if union_e else math.nan},
        "nodes": {"a": len(na), "b": len(nb), "shared": len(na & nb), "added": sorted(nb - na),
                  "removed": sorted(na - nb), "jaccard": len(na & nb) / len(union_n) if union_n else math.nan},
        "shared_score_spearman": _spearman([ea[k] for k in shared], [eb[k] for k in shared]),
        "added_edges": fmt(sorted(set(eb) - set(ea))),
        "removed_edges": fmt(sorted(set(ea) - set(eb))),
        "meta": {"a": {k: a.meta.get(k) for k in ("model", "method")}, "b": {k: b.meta.get(k) for k in ("model", "method")}},
        "warnings": mismatches(a, b),
    }


def mismatches(a: Circuit, b: Circuit) -> list[str]:
    """Why two circuits may not be comparable edge for edge (each a sentence; edges are matched by name only): graphs
    of other sizes or models of other architectures, other facts, or the same facts tokenized otherwise."""
    out = []
    sizes = [c.meta.get("n_edges_total") for c in (a, b)]
    arch = [c.meta.get("architecture") for c in (a, b)]  # recorded since 2026-12-07
    if None not in sizes and sizes[0] != sizes[1]:
        out.append(f"the circuits come from graphs of {sizes[0]} and {sizes[1]} edges ({a.meta.get('model')} and "
                   f"{b.meta.get('model')}): another architecture, so edges are matched by name only")
    elif None not in arch and arch[0] != arch[1]:
        out.append(f"the circuits are of a {arch[0]} and a {arch[1]}: two models, not checkpoints of one, so edges "
                   "are matched by name only")
    facts = [[f for f in c.meta.get("facts") or [] if isinstance(f, dict)] for c in (a, b)]
    if facts[0] and facts[1]:
        key = lambda f: (f.get("prompt"), f.get("answer"))  # noqa: E731
        ka, kb = [{key(f): f.get("answer_id") for f in fs} for fs in facts]
        if set(ka) != set(kb):
            out.append(f"the circuits are of other facts ({len(set(ka) & set(kb))} of A's {len(ka)} are among B's "
                       f"{len(kb)}): their edges answer other questions")
        elif any(ka[k] != kb[k] for k in ka):
            out.append("the same facts are tokenized otherwise (their answers' token ids differ): another tokenizer, "
                       "so the circuits score other tokens")
    return out


def diff_files(path_a: str | Path, path_b: str | Path) -> dict:
    return diff(read_json(path_a), read_json(path_b))


def add_circuit_diff_parser(subparsers) -> None:
    d = subparsers.add_parser("circuit-diff", help="compare two circuit.json files",
                              description="Shared, added and removed edges and nodes from circuit A to circuit B, "
                                          "Jaccard overlaps and the Spearman correlation of shared edge scores.")
    d.add_argument("a", help="circuit.json (before)")
    d.add_argument("b", help="circuit.json (after)")
    d.add_argument("--out", help="write the full comparison as JSON here")
    d.set_defaults(func=cmd_circuit_diff)


def cmd_circuit_diff(args) -> int:
    from workbench.errors import WorkbenchError
    from workbench.io import output_dir, write_json

    if args.out:  # before the work: a bad --out fails here, not after the comparison is printed
        out = Path(args.out)
        if out.is_dir():
            raise WorkbenchError(f"--out {out} is a folder; give a file name (e.g. {out / 'diff.json'})")
        output_dir(out.parent)  # the folder it goes in: not a file, not below one, writable
    r = diff(read_json(args.a), read_json(args.b))
    for why in r["warnings"]:  # (diff computes them: not a second time here)
        print(f"warning: {why}", file=sys.stderr)
    e, n = r["edges"], r["nodes"]
    print(f"edges: {e['a']} -> {e['b']}, shared {e['shared']}, added {e['added']}, removed {e['removed']}, "
          f"Jaccard {e['jaccard']:.3f}")
    print(f"nodes: {n['a']} -> {n['b']}, shared {n['shared']}, added {len(n['added'])}, removed {len(n['removed'])}, "
          f"Jaccard {n['jaccard']:.3f}")
    print(f"Spearman correlation of shared edge scores: {r['shared_score_spearman']:.3f}")
    if args.out:
        print(f"wrote {write_json(args.out, r)}")
    return 0
