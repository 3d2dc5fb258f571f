"""Router statistics across layers: load, entropy, margin, co-activation, top-1 change rate, local consistency."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from workbench.kernels import cpu
from workbench.tracing.reducers import Payload, Reducer


def top1(p: Payload) -> torch.Tensor:
    """The highest-scored chosen expert per token (chosen slots need not be sorted, e.g. DeepSeek)."""
    scores = p.values.gather(1, p.topk.to(torch.int64))
    return p.topk.gather(1, scores.argmax(1, keepdim=True)).squeeze(1).to(torch.int64)


def score_order(p: Payload) -> torch.Tensor:
    """A router payload's chosen experts, highest score first ([n, k] int64; ties keep slot order)."""
    chosen = p.topk.to(torch.int64)
    scores = p.values.detach().float().gather(1, chosen)
    if chosen.shape[1] < 2 or bool((scores[:, :-1] >= scores[:, 1:]).all()):  # the router's top-k comes sorted
        return chosen  # (what the stable sort would return)
    return chosen.gather(1, torch.argsort(scores, dim=1, descending=True, stable=True))


class ChangeRate:
    """Share of tokens whose top-1 expert index differs between adjacent MoE layers.

    Router sites fire in layer order within a forward; we keep a layer's top-1 of a batch (tokens x 1
    integers) until the next MoE layer has seen the same batch, so memory does not grow with the
    corpus. Batches are matched by their token indices, so the count is the same whether the run goes
    batch by batch (all layers) or layer by layer (all batches, as in layer streaming).
    """

    def __init__(self, layers: list[int]):
        self.layers = sorted(layers)
        self.changed = {l: 0 for l in self.layers[1:]}
        self.total = {l: 0 for l in self.layers[1:]}
        self._last: dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {l: {} for l in self.layers}

    def sink(self, layer: int):
        tracker = self

        class _Sink:
            coalesce = True  # several batches at once: matched between layers by their first token all the same

            def update(self, p: Payload) -> None:
                tracker._update(layer, p)

        return _Sink()

    def _update(self, layer: int, p: Payload) -> None:
        tokens, t1 = p.tokens.cpu(), top1(p).cpu()
        if tokens.numel() == 0:
            return
        key = int(tokens[0])  # a batch's first token index identifies it (indices are unique over a run)
        i = self.layers.index(layer)
        if i > 0:
            prev = self._last[self.layers[i - 1]].pop(key, None)
            if prev is not None and torch.equal(prev[0], tokens):
                self.changed[layer] += int((prev[1] != t1).sum())
                self.total[layer] += int(t1.numel())
        if i < len(self.layers) - 1:
            self._last[layer][key] = (tokens, t1)

    def merge(self, other: "ChangeRate") -> "ChangeRate":
        for l in self.changed:
            self.changed[l] += other.changed[l]
            self.total[l] += other.total[l]
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Counts per layer pair (the pending top-1 of an unfinished batch is not state: runs resume at batches)."""
        return {"changed": torch.tensor([self.changed[l] for l in self.layers[1:]], dtype=torch.int64),
                "total": torch.tensor([self.total[l] for l in self.layers[1:]], dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> "ChangeRate":
        for name in ("changed", "total"):
            if name in state:
                v = state[name].tolist()
                if len(v) != len(self.layers[1:]):  # layer pairs: none for a dense model or a single MoE layer
                    raise ValueError(f"ChangeRate state {name!r} has {len(v)} layers, expected {len(self.layers[1:])}")
                setattr(self, name, dict(zip(self.layers[1:], v)))
        return self

    def empty(self) -> "ChangeRate":
        return ChangeRate(self.layers)

    def result(self) -> dict[int, float]:
        return {l: self.changed[l] / self.total[l] if self.total[l] else float("nan") for l in self.changed}


SEGMENTS = (4, 16, 64)  # the segment lengths m of Liang et al. (their config also has 256)
CACHE_RATIOS = (1, 2, 4)  # cache sizes as multiples of k


def window_counts(top, first, lengths, num_experts: int, segments: tuple[int, ...] = SEGMENTS):
    """The counts :class:`LocalConsistency` keeps, per segment length m, from two compiled loops (:func:`_kernel`):

    * SRP ``[len(segments), max(segments) + 1]``: (window, expert) pairs by the number of the window's rows that
      chose the expert, over every full window of m consecutive rows of each prompt (:func:`_srp_windows`);
    * SCH ``[len(segments), E + 1]``: requests by their rank in the SCH stack, each (m, prompt) one stack, simulated
      request by request (:func:`_sch_stacks`).

    ``top`` [N, k]: each row's experts in score order, prompts back to back from rows ``first`` on for ``lengths``
    rows."""
    top, first, lengths = (np.ascontiguousarray(a, dtype=np.int64) for a in (top, first, lengths))
    seg = np.ascontiguousarray(segments, dtype=np.int64)
    srp = np.zeros((len(segments), max(segments) + 1), dtype=np.int64)
    sch = np.zeros((len(segments), num_experts + 1), dtype=np.int64)
    if top.size and (top.min() < 0 or top.max() >= num_experts):  # (the compiled loops do not check their indices)
        raise ValueError(f"expert indices {int(top.min())}..{int(top.max())} outside 0..{num_experts - 1} "
                         f"({num_experts} experts)")
    if len(lengths):
        _kernel(_srp_windows)(top, first, lengths, num_experts, seg, srp)
        _kernel(_sch_stacks)(top, first, lengths, num_experts, seg, sch)
    return srp, sch


def _sch_stacks(top, first, lengths, num_experts, segments, out):
    """The SCH stacks (compiled by :func:`_kernel`; plain Python runs it too, slowly). Mattson's stack
    update for priority replacement: the requested expert goes to the top and the one pushed down from above meets
    each slot down to the request's old depth (or the stack's end), where the lower-priority of the two goes on
    down. Priority: uses by the look-ahead's tokens [t, t + m) not yet served, then the time of the last use, both
    higher is better; the last use breaks every tie (used experts have distinct times)."""
    e, k = num_experts, top.shape[1]
    stack = np.empty(e, np.int64)  # experts, top first
    depth = np.empty(e, np.int64)  # each expert's slot; -1: not used yet in this prompt
    ahead = np.empty(e, np.int64)
    last = np.empty(e, np.int64)
    for j in range(segments.shape[0]):
        m = segments[j]
        for p in range(lengths.shape[0]):
            f, n = first[p], lengths[p]
            depth[:] = -1
            ahead[:] = 0
            last[:] = 0
            size = 0
            for t in range(min(m, n)):
                for s in range(k):
                    ahead[top[f + t, s]] += 1
            for t in range(n):
                fresh = 0  # the token's requests, judged against the stack before it: unseen experts after the seen
                for s in range(k):
                    x = top[f + t, s]
                    if depth[x] >= 0:
                        out[j, depth[x]] += 1
                    else:
                        out[j, min(size + fresh, e)] += 1  # (past E only where a row repeats an expert)
                        fresh += 1
                for s in range(k):
                    x = top[f + t, s]
                    d = depth[x] if depth[x] >= 0 else size
                    if d > 0:
                        carry = stack[0]
                        for i in range(1, d):
                            y = stack[i]
                            if ahead[y] < ahead[carry] or (ahead[y] == ahead[carry] and last[y] < last[carry]):
                                stack[i] = carry  # the slot keeps the higher priority; the lower goes on down
                                depth[carry] = i
                                carry = y
                        stack[d] = carry
                        depth[carry] = d
                    if d == size:
                        size += 1
                    stack[0] = x
                    depth[x] = 0
                    ahead[x] -= 1
                    last[x] = t * k + s + 1
                if t + m < n:
                    for s in range(k):
                        ahead[top[f + t + m, s]] += 1


def _srp_windows(top, first, lengths, num_experts, segments, out):
    """The SRP windows (compiled by :func:`_kernel`; plain Python runs it too, slowly): each window of m rows slides
    one row at a time, keeping how many of its rows chose each expert (a row naming an expert twice counts once) and
    how many experts have each count, which every full window adds to ``out[j]``."""
    e, k = num_experts, top.shape[1]
    uses = np.zeros(e, np.int64)  # rows of the window that chose each expert
    level = np.zeros(segments.max() + 1, np.int64)  # experts by their count
    stamp = np.full(e, -1, np.int64)  # the last (row, add or drop) that counted each expert: a row's repeats skip
    mark = 0
    for j in range(segments.shape[0]):
        m = segments[j]
        for p in range(lengths.shape[0]):
            f, n = first[p], lengths[p]
            if n < m:
                continue
            uses[:] = 0
            level[:] = 0
            level[0] = e
            for t in range(n):
                for step in range(2):  # add row t, then (once the window is past m rows) drop row t - m
                    r, d = (t, 1) if step == 0 else (t - m, -1)
                    if r < 0:
                        continue
                    mark += 1
                    for s in range(k):
                        x = top[f + r, s]
                        if stamp[x] != mark:
                            stamp[x] = mark
                            level[uses[x]] -= 1
                            uses[x] += d
                            level[uses[x]] += 1
                if t >= m - 1:  # the window [t - m + 1, t] is full
                    for c in range(m + 1):
                        out[j, c] += level[c]


_SIGNATURE = "void(int64[:, ::1], int64[::1], int64[::1], int64, int64[::1], int64[:, ::1])"  # both loops'


def _kernel(fn):
    """``fn`` (one of the two loops) compiled by numba for :data:`_SIGNATURE` (:func:`workbench.kernels.cpu.compiled`:
    once per process, from numba's on-disk cache after the first time on a machine)."""
    return cpu.compiled(fn, _SIGNATURE)


def load_kernels() -> None:
    """Compile, or load from numba's cache, both loops here and the reducers' (``workbench.kernels.cpu``) now: call
    it early to take that out of a timing."""
    _kernel(_sch_stacks)
    _kernel(_srp_windows)
    cpu.load()


@dataclass
class LocalConsistency(Reducer):
    """Local routing consistency (Liang et al. 2025, "Not All Models Suit Expert Offloading: On Local
    Routing Consistency of MoE Models", code ljcleo/moe-lrc ``src/30_srp_calc.py``, ``src/41_sch_calc.py``).

    Per segment length m, over every window of m consecutive tokens of a prompt (sliding, as their code):

    * **SRP** (segment routing best performance): predict, for all tokens of a window, the experts that
      serve at least c of its m tokens; F1 of that prediction against the tokens' top-k sets, pooled
      over windows, maximised over c = 0..m. Kept as ``srp_hist[m][c]``: (window, expert) pairs whose
      expert serves exactly c of the window's tokens, from which every c's F1 follows.
    * **SCH** (segment cache best hit rate): a cache of C experts loaded on demand (an expert enters only when a
      token asks for it) that, to make room, evicts the cached expert used by the fewest of the next m tokens
      (this one included), then the least recently used; the hit rate of its requests, for every C at once. A
      token's k requests are judged against the cache as it was before the token, then served in score order.
      This is their ``calc_fsf``: an LRU-like stack (Mattson et al. 1970) in which the requested expert goes to
      the top and each lower slot keeps the higher-priority one of what it held and what was pushed down. An
      expert not used before in the prompt ranks after the used ones, as in their code. Kept as
      ``sch_hist[m][r]``: requests whose expert ranked r; SCH at C = share of requests with rank < C. (Until
      2026-12-07 the used experts were re-sorted by that priority before every token, a cache that could load an
      expert nobody asked for yet: up to 0.27 above their code's hit rates on held-out tiny models.)

    Needs each row's prompt: ``starts`` holds the global index of every prompt's first token, and a
    payload must carry whole prompts (a batch does). State is counts: merge adds them.
    """

    kind: ClassVar[str] = "local_consistency"
    num_experts: int = 0
    top_k: int = 1
    starts: torch.Tensor | None = None  # [P] int64, increasing
    srp_hist: torch.Tensor | None = None  # [len(SEGMENTS), max(SEGMENTS) + 1] int64
    sch_hist: torch.Tensor | None = None  # [len(SEGMENTS), E + 1] int64

    def __post_init__(self):
        if self.starts is None:
            self.starts = torch.zeros(1, dtype=torch.int64)
        if self.srp_hist is None:
            self.srp_hist = torch.zeros(len(SEGMENTS), max(SEGMENTS) + 1, dtype=torch.int64)
            self.sch_hist = torch.zeros(len(SEGMENTS), self.num_experts + 1, dtype=torch.int64)

    def update(self, p: Payload) -> None:
        if p.topk is None:
            raise ValueError("LocalConsistency needs a router site (payload without top-k indices)")
        if not p.tokens.numel():
            return
        tokens, top = p.tokens.cpu(), score_order(p).cpu()
        if not p.increasing():
            order = torch.argsort(tokens)
            tokens, top = tokens[order], top[order]
        # (numpy: a handful of small ops, each several times cheaper than torch's)
        tokens, starts = tokens.numpy(), self.starts.numpy()
        prompt = np.searchsorted(starts, tokens, side="right") - 1
        first = np.flatnonzero(np.diff(prompt, prepend=-1))  # each prompt's first row
        lengths = np.diff(first, append=tokens.size)
        if (tokens - starts[prompt] != np.arange(tokens.size) - np.repeat(first, lengths)).any():
            raise ValueError("LocalConsistency needs whole prompts in each payload")
        # Rows stay flat (prompts back to back, no padding): windows and look-aheads stop at each prompt's end.
        srp, sch = window_counts(top.numpy(), first, lengths, self.num_experts)
        self.srp_hist += torch.from_numpy(srp)
        self.sch_hist += torch.from_numpy(sch)

    def merge(self, other: "LocalConsistency") -> "LocalConsistency":
        self._check_same(other)
        if other.num_experts != self.num_experts:
            raise ValueError(f"cannot merge LocalConsistency over {other.num_experts} experts into {self.num_experts}")
        self.srp_hist += other.srp_hist
        self.sch_hist += other.sch_hist
        return self

    def result(self) -> dict:
        srp, sch = {}, {}
        for j, m in enumerate(SEGMENTS):
            h = self.srp_hist[j, : m + 1].to(torch.float64)
            c = torch.arange(m + 1, dtype=torch.float64)
            matches = (h * c).flip(0).cumsum(0).flip(0)
            preds = h.flip(0).cumsum(0).flip(0) * m
            f1 = 2 * matches / (preds + matches[0]).clamp(min=1)
            srp[str(m)] = {"f1": float(f1.max()) if float(h.sum()) else math.nan,
                           "threshold": int(f1.argmax()) / m if float(h.sum()) else math.nan,
                           "windows": int(h.sum()) // max(self.num_experts, 1)}
            s = self.sch_hist[j].to(torch.float64)
            total = float(s.sum())
            hits = s.cumsum(0)
            sch[str(m)] = {f"cache_{r}k": float(hits[min(r * self.top_k, self.num_experts) - 1]) / total if total
                           else math.nan for r in CACHE_RATIOS}
        return {"srp": srp, "sch": sch}


VOCAB_MIN_COUNT = 10  # token ids seen fewer times are left out (the 10; moe-lrc's config has vocab_min_freq 20)


@dataclass
class VocabSpecialization(Reducer):
    """Vocabulary specialization of a MoE layer (OLMoE sec. 5.3; moe-lrc ``src/20_vocab_calc.py``).

    For each token id seen at least ``VOCAB_MIN_COUNT`` times, the share of its occurrences routed to its
    most frequent top-1 expert, averaged over those ids (1.0: every id always goes to one expert; 1/E:
    no preference). Counted by the **input** token at the router, by the **next** token of the text (the
    token the model is trained to predict there; moe-lrc's "out"; the last token of a prompt has none)
    and, when a :class:`Predictions` meter watches it, by the model's **predicted** token.

    State: (token id x E + expert) keys with their counts, sparse (at most one entry per distinct
    pair seen). Needs ``token_ids`` [N] (every global token's id) and ``starts`` (each prompt's first
    global token) to find the next token. An update only appends its keys; they are folded into the sorted
    state (one ``unique`` over state and pending keys) once they outnumber it (at least ``PENDING_MIN``), and
    before the state is read, so an update costs its own size, not the state's (which grows with the
    corpus: 300k pairs after 800k tokens of random top-8-of-64 routing, where re-sorting it on every update
    took 12 ms per layer and batch).
    """

    PENDING_MIN: ClassVar[int] = 1 << 16

    kind: ClassVar[str] = "vocab_specialization"
    num_experts: int = 0
    token_ids: torch.Tensor | None = None  # [N] int64
    starts: torch.Tensor | None = None  # [P] int64
    in_keys: torch.Tensor | None = None
    in_counts: torch.Tensor | None = None
    next_keys: torch.Tensor | None = None
    next_counts: torch.Tensor | None = None
    pred_keys: torch.Tensor | None = None  # by the model's predicted token (with a Predictions meter)
    pred_counts: torch.Tensor | None = None

    def __post_init__(self):
        for name in ("token_ids", "starts", "in_keys", "in_counts", "next_keys", "next_counts", "pred_keys",
                     "pred_counts"):
            if getattr(self, name) is None:
                setattr(self, name, torch.zeros(0, dtype=torch.int64))
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # this batch's (tokens, top-1), until predicted
        self.predicted = False  # set by Predictions.watch
        self._new: dict[str, list[torch.Tensor]] = {"in": [], "next": []}  # keys not folded into the state yet
        self._new_count = 0

    def _fold(self) -> None:
        """Fold the pending keys into the sorted state (the same state whenever this happens: counts add)."""
        if not self._new_count:
            return
        for name, keys in self._new.items():
            if keys:
                have_k, have_c = getattr(self, f"{name}_keys"), getattr(self, f"{name}_counts")
                k, c = self._add(have_k, have_c, torch.cat(keys))
                setattr(self, f"{name}_keys", k)
                setattr(self, f"{name}_counts", c)
                keys.clear()
        self._new_count = 0

    def _append(self, name: str, keys: torch.Tensor) -> None:
        self._new[name].append(keys)
        self._new_count += keys.numel()
        if self._new_count >= max(self.PENDING_MIN, self.in_keys.numel() + self.next_keys.numel()):
            self._fold()

    def state_dict(self) -> dict[str, torch.Tensor]:
        self._fold()
        return super().state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> "VocabSpecialization":
        self._new, self._new_count = {"in": [], "next": []}, 0
        return super().load_state_dict(state)

    @property
    def coalesce(self) -> bool:  # type: ignore[override]
        """Predicted tokens arrive after each batch and are matched to that batch's update: no coalescing."""
        return not self.predicted

    def predictions(self, tokens: torch.Tensor, pred: torch.Tensor) -> None:
        """The model's predicted next token at global ``tokens`` (Predictions calls this after each batch)."""
        for t, first in self._pending:
            where = torch.searchsorted(tokens, t)
            ok = (where < tokens.numel()) & (tokens[where.clamp(max=max(tokens.numel() - 1, 0))] == t)
            self.pred_keys, self.pred_counts = self._add(self.pred_keys, self.pred_counts,
                                                         pred[where[ok]] * self.num_experts + first[ok])
        self._pending.clear()

    @staticmethod
    def _add(keys: torch.Tensor, counts: torch.Tensor, new: torch.Tensor, weight: torch.Tensor | None = None):
        allk = torch.cat([keys, new])
        allc = torch.cat([counts, torch.ones_like(new) if weight is None else weight])
        uniq, inv = torch.unique(allk, return_inverse=True)
        return uniq, torch.zeros_like(uniq).index_add_(0, inv, allc)

    def update(self, p: Payload) -> None:
        if p.topk is None:
            raise ValueError("VocabSpecialization needs a router site (payload without top-k indices)")
        if not p.tokens.numel():
            return
        tokens = p.tokens.cpu()
        first = top1(p).cpu()
        e = self.num_experts
        self._append("in", self.token_ids[tokens] * e + first)
        nxt = tokens + 1
        last = torch.searchsorted(self.starts, nxt, right=True) - 1 != torch.searchsorted(self.starts, tokens, right=True) - 1
        ok = (nxt < self.token_ids.numel()) & ~last
        if bool(ok.any()):
            self._append("next", self.token_ids[nxt[ok]] * e + first[ok])
        if self.predicted:
            self._pending.append((tokens, first))

    def merge(self, other: "VocabSpecialization") -> "VocabSpecialization":
        self._check_same(other)
        if other.num_experts != self.num_experts:
            raise ValueError(f"cannot merge VocabSpecialization over {other.num_experts} experts into {self.num_experts}")
        self._fold()
        other._fold()
        self.in_keys, self.in_counts = self._add(self.in_keys, self.in_counts, other.in_keys, other.in_counts)
        self.next_keys, self.next_counts = self._add(self.next_keys, self.next_counts, other.next_keys, other.next_counts)
        self.pred_keys, self.pred_counts = self._add(self.pred_keys, self.pred_counts, other.pred_keys, other.pred_counts)
        return self

    def _score(self, keys: torch.Tensor, counts: torch.Tensor) -> dict:
        e = max(self.num_experts, 1)
        ids = keys // e
        uid, inv = torch.unique(ids, return_inverse=True)
        total = torch.zeros_like(uid).index_add_(0, inv, counts)
        best = torch.zeros_like(uid).scatter_reduce_(0, inv, counts, "amax")
        keep = total >= VOCAB_MIN_COUNT
        share = best[keep].to(torch.float64) / total[keep]
        return {"specialization": float(share.mean()) if int(keep.sum()) else math.nan,
                "token_ids": int(keep.sum()), "tokens": int(total[keep].sum()), "uniform": 1.0 / e}

    def result(self) -> dict:
        self._fold()
        out = {"input": self._score(self.in_keys, self.in_counts), "next": self._score(self.next_keys, self.next_counts)}
        if self.predicted or self.pred_keys.numel():
            out["predicted"] = self._score(self.pred_keys, self.pred_counts)
        return {"vocab_specialization": out}


class Predictions:
    """A meter that reads the model's predicted next token (argmax of the LM head on the decoder's last
    hidden state) after each batch and hands it to the watching VocabSpecialization reducers.

    The profile otherwise skips the LM head; this adds one [tokens, d] x [d, vocab] product per batch, in
    chunks of 1,024 tokens. The argmax ignores logit scaling and soft-capping (both keep the order).
    """

    def __init__(self, lm):
        self.lm = lm
        self.watchers: list[VocabSpecialization] = []
        self._handle = None
        self._grid = None

    def watch(self, r: VocabSpecialization) -> VocabSpecialization:
        r.predicted = True
        self.watchers.append(r)
        return r

    def install(self, model, adapter) -> None:
        self._handle = adapter.body(model).register_forward_hook(self._hook)

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def begin_batch(self, grid: torch.Tensor) -> None:
        self._grid = grid

    def _hook(self, module, args, output) -> None:
        h = output[0] if isinstance(output, tuple) else getattr(output, "last_hidden_state", output)
        ok = self._grid >= 0
        tokens = self._grid[ok]
        rows = h[ok]
        head = self.lm.model.get_output_embeddings()
        pred = torch.cat([head(rows[i:i + 1024]).argmax(-1) for i in range(0, rows.shape[0], 1024)]) \
            if rows.shape[0] else torch.zeros(0, dtype=torch.int64)
        order = torch.argsort(tokens)
        tokens, pred = tokens[order].cpu(), pred[order].cpu()
        for r in self.watchers:
            r.predictions(tokens, pred)
