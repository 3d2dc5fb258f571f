"""Circuits from scores, and how faithful they are.

* :func:`select_top` / :func:`select_threshold`: edges by |score|; :func:`select_fill` (top edges until
  the pruned circuit has N) and :func:`select_greedy` (grown backward from the logits);
* :func:`prune`: keep only edges on some path input -> logits (internal edges KV group -> head and
  router -> expert always count as present);
* :func:`evaluate`: path patching on edges. Every receiver's input is the current outputs of its
  circuit senders plus the corrupted outputs of all other senders (``runner.Patch``); then
  ``faithfulness = (M(circuit) - M(corrupted)) / (M(full) - M(corrupted))`` with M the summed
  logit difference over facts, and Hit@10 = share of facts whose answer is among the circuit
  model's ten highest logits at the last position.
"""

from __future__ import annotations

import math

import numpy as np

import torch

from workbench.circuits.attribution import corrupted_run, last_logits, mean_residuals, metric_values, sender_means
from workbench.circuits.facts import Prepared, batches, fill_runner_up, pad_id
from workbench.circuits.graph import Graph
from workbench.circuits.runner import GraphRunner, Patch
from workbench.errors import WorkbenchError


def select_top(graph: Graph, matrix: torch.Tensor, n: int) -> torch.Tensor:
    """[S, R] bool: the ``n`` edges with the largest |score| (ties: canonical edge order)."""
    valid = graph.valid()
    flat = torch.where(valid, matrix.abs(), torch.full_like(matrix, -1.0)).flatten()
    n = max(0, min(int(n), int(valid.sum())))
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    if n:
        order = torch.sort(flat, descending=True, stable=True).indices[:n]
        mask[order] = True
    return mask.view_as(matrix)


def select_greedy(graph: Graph, matrix: torch.Tensor, n: int) -> torch.Tensor:
    """[S, R] bool: grow ``n`` edges backward from the logits (as in Hanna et al.'s EAP-IG code):
    repeatedly take the highest-|score| edge into a node already in the circuit, then add its sender.
    Every chosen edge leads to the logits; a KV group joins with its heads, a router with its experts."""
    import heapq

    valid = graph.valid()
    absm = matrix.abs()
    into: dict[str, list[int]] = {}
    for j, rec in enumerate(graph.receivers):
        into.setdefault(rec.node, []).append(j)
    parents: dict[str, list[str]] = {}
    for a, b in graph.internal:
        parents.setdefault(b, []).append(a)
    mask = torch.zeros_like(valid)
    heap: list[tuple[float, int, int]] = []
    joined: set[str] = set()

    def join(node: str) -> None:
        stack = [node]
        while stack:
            x = stack.pop()
            if x in joined:
                continue
            joined.add(x)
            for j in into.get(x, []):
                rows = valid[:, j].nonzero().flatten()
                for i, v in zip(rows.tolist(), absm[rows, j].tolist()):
                    heapq.heappush(heap, (-v, i, j))
            stack += parents.get(x, [])

    join("logits")
    chosen = 0
    while heap and chosen < n:
        _, i, j = heapq.heappop(heap)
        if mask[i, j]:
            continue
        mask[i, j] = True
        chosen += 1
        join(graph.senders[i])
    return mask


def select_fill(graph: Graph, matrix: torch.Tensor, n: int) -> torch.Tensor:
    """[S, R] bool: the pruned top-k circuit for the largest k whose pruned size is at most ``n`` edges
    (top-N by |score| spends part of its budget on edges that pruning then drops; this does not). The
    pruned size grows with k, but one edge can connect several at once, so it may stop a few short of n."""
    total = int(graph.valid().sum())
    n = max(0, min(int(n), total))
    lo, hi = n, total  # prune(top-n) has at most n edges
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if int(prune(graph, select_top(graph, matrix, mid)).sum()) <= n:
            lo = mid
        else:
            hi = mid - 1
    return prune(graph, select_top(graph, matrix, lo))


def select_signed(graph: Graph, matrix: torch.Tensor, n: int) -> torch.Tensor:
    """[S, R] bool: :func:`select_fill` over the edges that carry the answer only. A score is the metric's
    first-order change when the edge is corrupted (``(corrupted - clean) . gradient``), so the edges with the
    most negative scores are kept, and edges that work against the answer never are (Hanna et al.'s
    ``absolute=False``). Such a circuit can beat the full model's logit difference (faithfulness above 1):
    it leaves out what the model does against its own answer."""
    return select_fill(graph, (-matrix).clamp(min=0), n)


def select_threshold(graph: Graph, matrix: torch.Tensor, threshold: float) -> torch.Tensor:
    return graph.valid() & (matrix.abs() >= threshold)


def select_random(graph: Graph, n: int, seed: int) -> torch.Tensor:
    """``n`` edges drawn uniformly without replacement (the size-matched control)."""
    valid = graph.valid().flatten()
    idx = valid.nonzero().flatten()
    gen = torch.Generator().manual_seed(seed)
    pick = idx[torch.randperm(idx.numel(), generator=gen)[:n]]
    mask = torch.zeros_like(valid)
    mask[pick] = True
    return mask.view(graph.n_senders, graph.n_receivers)


def prune(graph: Graph, mask: torch.Tensor) -> torch.Tensor:
    """Edges of ``mask`` that lie on a path from the input to the logits."""
    names = {n.name: i for i, n in enumerate(graph.nodes)}
    N = len(graph.nodes)
    s, r = (mask & graph.valid()).nonzero(as_tuple=True)
    src = torch.tensor([names[graph.senders[i]] for i in s.tolist()], dtype=torch.long)
    dst = torch.tensor([names[graph.receivers[j].node] for j in r.tolist()], dtype=torch.long)
    isrc = torch.tensor([names[a] for a, _ in graph.internal], dtype=torch.long)
    idst = torch.tensor([names[b] for _, b in graph.internal], dtype=torch.long)
    all_src, all_dst = torch.cat([src, isrc]), torch.cat([dst, idst])
    # nodes are in topological order: one pass each way
    incoming = [[] for _ in range(N)]
    outgoing = [[] for _ in range(N)]
    for a, b in zip(all_src.tolist(), all_dst.tolist()):
        incoming[b].append(a)
        outgoing[a].append(b)
    fwd = [False] * N
    fwd[names["input"]] = True
    for n in range(N):
        fwd[n] = fwd[n] or any(fwd[a] for a in incoming[n])
    bwd = [False] * N
    bwd[names["logits"]] = True
    for n in reversed(range(N)):
        bwd[n] = bwd[n] or any(bwd[b] for b in outgoing[n])
    fwd_t, bwd_t = torch.tensor(fwd), torch.tensor(bwd)
    keep = fwd_t[src] & bwd_t[dst] if src.numel() else torch.zeros(0, dtype=torch.bool)
    out = torch.zeros_like(mask)
    out[s[keep], r[keep]] = True
    return out


def edge_entropy(matrix: torch.Tensor, mask: torch.Tensor) -> float:
    """Shannon entropy (nats) of the circuit's |scores| normalised to a distribution."""
    w = matrix[mask].abs().double()
    if w.numel() == 0 or float(w.sum()) == 0.0:
        return 0.0
    p = w / w.sum()
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def evaluate(lm, prepared: list[Prepared], graph: Graph, circuits: dict[str, torch.Tensor], *,
             batch_size: int = 16, store: torch.dtype = torch.float32, lean: bool = False) -> dict:
    """Faithfulness and Hit@10 of each circuit (name -> [S, R] bool mask), plus the full model's and
    the corrupted run's. Also per-fact metrics under ``per_fact``. ``store``: the dtype the corrupted
    and current senders are kept in (see ``attribute``); ``lean``: one sender buffer instead of two,
    the corrupted forward rerun before every circuit's patched pass (which subtracts its senders from
    it: ``GraphRunner.forward(subtract=True)``)."""
    if not prepared:
        raise WorkbenchError("no facts to evaluate")
    S, R, P, d = graph.n_senders, graph.n_receivers, len(graph.stages), graph.d_model
    bs = batches(prepared, batch_size, pad_id(lm.tokenizer), lm.device)
    n = len(prepared)
    metric = {k: torch.zeros(n, dtype=torch.float64) for k in ["full", "corrupted", *circuits]}
    rank = {k: torch.zeros(n, dtype=torch.long) for k in metric}  # the answer's rank (0: the top logit)
    with GraphRunner(lm.model, lm.adapter, graph) as runner:
        means = sender_means(runner, bs, S, d) if any(p.corrupted_ids is None for p in prepared) else None
        for b in bs:
            idx = torch.tensor(b.index)
            mean_resid = mean_residuals(runner, b, S, P, d, means, store)
            logits = last_logits(lm, runner.forward(b.ids), b.last)
            fill_runner_up(prepared, b.index, logits)
            b.corrupted_answer = torch.tensor([prepared[j].corrupted_answer_id for j in b.index], device=lm.device)
            _record(metric, rank, "full", idx, logits, b)
            corr_acts, corr_resid, corr_hidden = corrupted_run(runner, b, S, P, d, means, mean_resid,
                                                               want_resid=True, dtype=store)
            cur = None if lean else torch.zeros_like(corr_acts)
            state = {"fresh": True}  # lean: whether corr_acts still holds the corrupted senders

            def patched(mask, b=b, mean_resid=mean_resid, cur=cur, corr_acts=corr_acts, corr_resid=corr_resid):
                if not lean:
                    return runner.forward(b.ids, mode="patch", acts=cur, patch=Patch(mask, corr_acts, corr_resid))
                if not state["fresh"]:  # a patched pass turned them into differences: rerun the corrupted forward
                    corrupted_run(runner, b, S, P, d, means, mean_resid, want_resid=True, out=(corr_acts, corr_resid))
                state["fresh"] = False
                return runner.forward(b.ids, mode="patch", acts=corr_acts, subtract=True,
                                      patch=Patch(mask, None, corr_resid))

            if bool(b.mean.any()) or corr_hidden is None:
                # mean-baseline rows: the corrupted run is the empty circuit
                empty = last_logits(lm, patched(torch.zeros(S, R, dtype=torch.bool)), b.last)
                corr_logits = empty if corr_hidden is None else torch.where(
                    b.mean[:, None], empty, last_logits(lm, corr_hidden, b.last))
            else:
                corr_logits = last_logits(lm, corr_hidden, b.last)
            _record(metric, rank, "corrupted", idx, corr_logits, b)
            for name, mask in circuits.items():
                _record(metric, rank, name, idx, last_logits(lm, patched(mask), b.last), b)
            del corr_acts, corr_resid, cur, mean_resid, patched
    full, corr = float(metric["full"].sum()), float(metric["corrupted"].sum())
    hit = {k: float((r < 10).double().mean()) for k, r in rank.items()}
    out = {"n_facts": n, "metric_full": full / n, "metric_corrupted": corr / n,
           "hit_at_10_full": hit["full"], "hit_at_1_full": float((rank["full"] == 0).double().mean()),
           "hit_at_10_corrupted": hit["corrupted"], "circuits": {}}
    for name in circuits:
        m = float(metric[name].sum())
        out["circuits"][name] = {
            "n_edges": int(circuits[name].sum()),
            "metric": m / n,
            "faithfulness": (m - corr) / (full - corr) if full != corr else math.nan,
            "hit_at_10": hit[name],
        }
    out["gap_z"] = gap_z(metric["full"] - metric["corrupted"])
    out["per_fact"] = {**{f"metric_{k}": metric[k].tolist() for k in metric},
                       **{f"rank_{k}": rank[k].tolist() for k in rank}}
    return out


UNSTABLE_GAP_Z = 2.0  # below this, the facts do not agree on the corruption's effect (see gap_z)


def gap_caveat(gz) -> str | None:
    """Why a circuit's faithfulness figures are noise, from its ``gap_z`` (None: they are not; the report and the
    app's Circuits page say it beside the figures, as ``workbench circuit`` warns)."""
    if not isinstance(gz, (int, float)) or (gz == gz and gz >= UNSTABLE_GAP_Z):
        return None
    return ("one fact (or two swapped with each other, whose gaps are one) gives no spread to judge the corruption's "
            "gap by." if gz != gz else
            f"the corruption moves the answer's logit difference by less than twice its standard error over the facts "
            f"(gap_z {gz:.2f}), and faithfulness is a ratio over that gap.")


def gap_z(gaps: torch.Tensor) -> float:
    """How firmly the facts agree that the corruption moves the metric: the mean of the per-fact gaps (full minus
    corrupted logit difference) over its standard error. Faithfulness is a ratio over the summed gap; under
    ``UNSTABLE_GAP_Z`` the gap is within the facts' own spread of zero and the ratio is noise (values far above 1 or
    below 0 from a circuit of a few edges).

    Over the distinct gaps (equal to 1e-5 of the largest): two facts swapped with each other (A's corrupted prompt is
    B's and B's is A's, as a relation of two facts always is) have the same gap by construction, and counting it twice
    made a spread of rounding noise (gap_z 1e7, or inf). NaN where fewer than two distinct gaps remain (one fact, a
    pair swapped with each other, a fact repeated)."""
    g = gaps.double().flatten()
    if g.numel() < 2:
        return math.nan
    scale = float(g.abs().max())
    if scale > 0:  # one gap of each value (the first), in the facts' order
        first = np.unique(np.round(g.cpu().numpy() / scale * 1e5), return_index=True)[1]
        g = g[torch.from_numpy(np.sort(first))]
    n = g.numel()
    if n < 2:
        return math.nan
    sd, mean = float(g.std()), float(g.mean())
    return abs(mean) / (sd / math.sqrt(n)) if sd > 0 else (math.inf if mean else 0.0)


def _record(metric, rank, key, idx, logits, b) -> None:
    """A run's logit differences and the answer's rank (how many logits exceed its own; Hit@10: rank < 10)."""
    metric[key][idx] = metric_values("logit_diff", logits, b).double().cpu()
    answer = logits.gather(-1, b.answer[:, None])
    rank[key][idx] = (logits > answer).sum(-1).cpu()
