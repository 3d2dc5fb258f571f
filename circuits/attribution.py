"""Edge attribution patching: EAP (Syed et al.) and EAP-IG (Hanna et al.), batched over facts, in fp32.

``score(u -> v) = sum over facts and positions of (act_corrupted_u - act_clean_u) . dM/d(input_v)``,
averaged over facts, where ``input_v`` is receiver v's own copy of the residual stream (before its
norm) and M the metric at each fact's last position. EAP takes the gradient on the clean run;
EAP-IG averages it over ``steps`` runs whose input embeddings are interpolated from the corrupted
to the clean prompt (midpoints ``alpha = (k - 1/2) / steps``, see :func:`ig_alphas`).

All scores come from per-sender deltas ``[S, B*T*d]`` and per-receiver gradients ``[R, B*T*d]``:
one matrix product per stage (the receivers reading the residual stream at one point), never a loop
over edges. A run costs a corrupted and a clean forward plus ``steps`` forward+backward passes per
batch (EAP: a corrupted forward and one clean forward+backward); backward computes activation
gradients only (parameters are frozen).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from workbench.circuits.facts import Batch, Prepared, batches, fill_runner_up, pad_id
from workbench.circuits.graph import Graph, build_graph
from workbench.circuits.runner import GraphRunner
from workbench.errors import WorkbenchError

METHODS = ("eap-ig", "eap")
METRICS = ("logit_diff", "logprob", "prob", "kl")


@dataclass
class Scores:
    """Edge scores ``matrix [S, R]`` (zero where (sender, receiver) is no edge)."""

    graph: Graph
    matrix: torch.Tensor
    method: str
    metric: str
    steps: int
    n_facts: int
    seconds: float
    facts: list[dict] = field(default_factory=list)

    def edges(self) -> torch.Tensor:
        """Scores of every edge in the graph's canonical order."""
        return self.matrix[self.graph.valid()]


def ig_alphas(steps: int) -> list[float]:
    """Interpolation points of EAP-IG: the midpoint rule on [0, 1], ``(k - 1/2) / steps``.

    The path integral of the gradient from the corrupted to the clean input is approximated by its
    midpoint Riemann sum (second-order accurate; the reference code uses a one-sided sum). On SmolLM2
    and 32 capital facts, 5 midpoint steps gave a top-1 % circuit faithfulness of 0.92-0.93 against
    0.86-0.87 with ``k / steps``.
    """
    return [(k - 0.5) / steps for k in range(1, steps + 1)]


def last_logits(lm, hidden: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """Logits at each row's last real position ``[B, V]`` (the LM head runs on those rows only)."""
    h = hidden[torch.arange(hidden.shape[0]), last]
    return lm.adapter.lm_head(lm.model)(h).float()


def metric_values(kind: str, logits: torch.Tensor, batch: Batch, clean_logprobs: torch.Tensor | None = None) -> torch.Tensor:
    """Per-fact metric ``[B]``: logit difference answer - corrupted answer, log-probability or
    probability of the answer, or minus the KL divergence from the clean distribution."""
    rows = torch.arange(logits.shape[0])
    if kind == "logit_diff":
        return logits[rows, batch.answer] - logits[rows, batch.corrupted_answer]
    logp = torch.log_softmax(logits, dim=-1)
    if kind == "logprob":
        return logp[rows, batch.answer]
    if kind == "prob":
        return logp[rows, batch.answer].exp()
    if kind == "kl":
        if clean_logprobs is None:
            raise ValueError("the kl metric needs the clean log-probabilities")
        return -(clean_logprobs.exp() * (clean_logprobs - logp)).sum(-1)
    raise WorkbenchError(f"unknown metric {kind!r}; known: {', '.join(METRICS)}")


def sender_means(runner: GraphRunner, bs: list[Batch], S: int, d: int) -> torch.Tensor:
    """Mean output ``[S, d]`` of every sender over all real tokens of the clean prompts."""
    total, count = torch.zeros(S, d, dtype=torch.float64), 0
    for b in bs:
        acts = torch.zeros(S, *b.ids.shape, d)
        runner.forward(b.ids, acts=acts)
        total += acts[:, b.valid].sum(1, dtype=torch.float64)
        count += int(b.valid.sum())
    return (total / max(count, 1)).float()


def corrupted_run(runner: GraphRunner, b: Batch, S: int, P: int, d: int, means: torch.Tensor | None,
                  clean_acts: torch.Tensor | None = None, clean_resid: torch.Tensor | None = None,
                  want_resid: bool = False):
    """The corrupted run's senders ``[S, B, T, d]`` (and residuals ``[P, B, T, d]``) and last hidden.

    Mean-baseline rows get the sender means; their residual at stage p is the clean residual plus
    ``sum over upstream senders (mean - clean)`` (so constant terms such as biases stay as they are).
    """
    B, T = b.ids.shape
    acts = torch.zeros(S, B, T, d)
    resid = torch.zeros(P, B, T, d) if want_resid else None
    hidden = None
    if not bool(b.mean.all()):
        hidden = runner.forward(b.corrupted_ids, acts=acts, resid=resid)
    if bool(b.mean.any()):
        if means is None:
            raise RuntimeError("mean-baseline facts need sender means")
        m = b.mean
        acts[:, m] = means[:, None, None, :]
        if want_resid:
            cum = torch.cumsum(means[:, None, None, :] - clean_acts[:, m], dim=0)  # [S, Bm, T, d]
            for st in runner.graph.stages:
                resid[st.index, m] = clean_resid[st.index, m] + cum[st.n_up - 1]
    return acts, resid, hidden


def attribute(lm, prepared: list[Prepared], *, method: str = "eap-ig", steps: int = 5, metric: str = "logit_diff",
              batch_size: int = 16, graph: Graph | None = None, progress: bool = False) -> Scores:
    """Score every edge of ``graph`` (default: the model's full graph) on the prepared facts."""
    if method not in METHODS:
        raise WorkbenchError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    if metric not in METRICS:
        raise WorkbenchError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")
    if method == "eap-ig" and steps < 1:
        raise WorkbenchError(f"--steps must be >= 1, got {steps}")
    if not prepared:
        raise WorkbenchError("no facts to attribute")
    t0 = time.perf_counter()
    model = lm.model
    graph = graph or build_graph(model, lm.adapter)
    S, R, P, d = graph.n_senders, graph.n_receivers, len(graph.stages), graph.d_model
    dtype = next(model.parameters()).dtype
    if dtype != torch.float32:
        raise WorkbenchError(f"circuits run in fp32; the model is {dtype} (load it with dtype=float32)")
    scores = torch.zeros(S, R, dtype=torch.float32)
    bs = batches(prepared, batch_size, pad_id(lm.tokenizer))
    n_steps = steps if method == "eap-ig" else 1
    with GraphRunner(model, lm.adapter, graph) as runner:
        needs_clean = metric == "kl" or any(p.corrupted_answer_id is None for p in prepared)
        means = sender_means(runner, bs, S, d) if any(p.corrupted_ids is None for p in prepared) else None
        for i, b in enumerate(bs):
            clean_logp = None
            if needs_clean:
                with torch.no_grad():
                    logits = last_logits(lm, runner.forward(b.ids), b.last)
                fill_runner_up(prepared, b.index, logits)
                b.corrupted_answer = torch.tensor([prepared[j].corrupted_answer_id for j in b.index])
                clean_logp = torch.log_softmax(logits, -1)
            corr_acts, _, _ = corrupted_run(runner, b, S, P, d, means)
            B, T = b.ids.shape
            grads = torch.zeros(R, B, T, d)
            clean_acts = torch.zeros(S, B, T, d)
            e_clean = lm.adapter.embedding(model)(b.ids).detach()
            e_corr = corr_acts[0]
            alphas = ig_alphas(n_steps) if method == "eap-ig" else [1.0]
            if 1.0 not in alphas:
                runner.forward(b.ids, acts=clean_acts)
            for a in alphas:
                emb = e_clean if a == 1.0 else e_corr + a * (e_clean - e_corr)
                hidden = runner.forward(b.ids, mode="grad", grads=grads, embed=emb,
                                        acts=clean_acts if a == 1.0 else None)
                metric_values(metric, last_logits(lm, hidden, b.last), b, clean_logp).sum().backward()
            if n_steps > 1:
                grads /= n_steps
            delta = corr_acts.sub_(clean_acts).view(S, -1)  # corrupted - clean
            grads = grads.view(R, -1)
            for st in graph.stages:
                scores[:st.n_up, st.start:st.stop] += delta[:st.n_up] @ grads[st.start:st.stop].T
            if progress:
                print(f"  batch {i + 1}/{len(bs)}: {len(b.index)} facts, {T} tokens, "
                      f"{time.perf_counter() - t0:.1f} s", flush=True)
    scores /= len(prepared)
    return Scores(graph, scores, method, metric, n_steps, len(prepared), time.perf_counter() - t0,
                  [p.record(lm.tokenizer) for p in prepared])
