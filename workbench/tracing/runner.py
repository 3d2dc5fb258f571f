"""Run prompts through a model with a capture plan: tokenise, batch, pad, reduce.

Global token indices follow prompt order (prompt 0's tokens first), not batch order, so results do
not depend on batch size or on which prompts share a batch. Each prompt is tokenised on its own with the
tokenizer's default special tokens and right-padded; padding never reaches a reducer. By default prompts
of similar length share a batch (:func:`batch_members`), so less of each forward is padding.
"""

from __future__ import annotations

import contextlib
import numbers
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from workbench.args import COUNT, Number
from workbench.data import check_prompts
from workbench.errors import WorkbenchError, few
from workbench.models.specs import LoadedModel
from workbench.distributed import Shard
from workbench.tracing import state
from workbench.tracing.capture import Capture
from workbench.tracing.dump import DumpWriter
from workbench.tracing.reducers import AbsMax, ExpertAbsMax, ExpertCounts, LogHistogram, Moments, Reducer
from workbench.tracing.sites import Component, Site, validate
from workbench.tracing.state import Checkpoint

ReducerFactory = Callable[[Site], Reducer | None]  # None: the reducer does not apply to that site


def check_number(name: str, value, number: Number = COUNT):
    """``value`` of API argument ``name`` within ``number``'s range (the CLI flags' :class:`~workbench.args.Number`),
    else a one-line error naming it: a notebook's ``batch_size=2.5`` is refused as ``--batch-size 2.5`` is."""
    kind = numbers.Integral if number.kind is int else numbers.Real
    if not isinstance(value, kind) or isinstance(value, bool) or not number.allows(value):
        raise WorkbenchError(f"{name} must be {number.describe()}, got {value!r}")
    return number.kind(value)


def reducer_factory(kind: str, lm: LoadedModel) -> ReducerFactory:
    """A factory for reducer ``kind`` (absmax, moments, log_histogram, expert_counts)."""
    if kind == "expert_counts":
        infos = lm.layer_infos()

        def make(site: Site) -> Reducer | None:  # None: not for this site (trace applies it to the router sites)
            if site.component is not Component.ROUTER:
                return None
            return ExpertCounts(num_experts=infos[site.layer].num_experts)

        return make
    simple = {"absmax": AbsMax, "moments": Moments, "log_histogram": LogHistogram}
    if kind not in simple:
        raise WorkbenchError(f"unknown reducer {kind!r}; known: {', '.join([*simple, 'expert_counts'])}")
    return lambda site: simple[kind]()


@dataclass
class TraceResult:
    reducers: dict[Site, dict[str, Reducer]]
    prompts: list[str]
    token_prompt: torch.Tensor  # [N] prompt index of each global token
    token_position: torch.Tensor  # [N] position within its prompt
    token_ids: torch.Tensor  # [N] vocabulary id
    seconds: float = 0.0
    dump_dir: Path | None = None
    meta: dict = field(default_factory=dict)

    def __getitem__(self, site: Site) -> dict[str, Reducer]:
        return self.reducers[site]

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.numel())

    def locate(self, token: int) -> dict:
        """Prompt index, position and token id of a global token index (-1 gives Nones)."""
        if token < 0:
            return {"prompt_index": None, "position": None, "token_id": None}
        return {"prompt_index": int(self.token_prompt[token]), "position": int(self.token_position[token]),
                "token_id": int(self.token_ids[token])}

    def merge(self, other: "TraceResult") -> "TraceResult":
        """Add another run over further prompts (e.g. the next shard of a corpus), traced with the same model, sites
        and reducers: the result is one trace of this run's prompts followed by ``other``'s (bit-equal for absmax,
        histograms and counts; moments to rounding). ``other``'s tokens are numbered after this run's: its reducers'
        global token indices (:attr:`Reducer.token_fields`) move up by this run's token count, on copies made as a
        distributed run's rank states are (:func:`workbench.tracing.state.fresh`); ``other`` is not changed.
        Returns ``self``. Runs with a dump are refused (each dump holds its own run's rows)."""
        if not isinstance(other, TraceResult):
            raise WorkbenchError(f"can only merge a TraceResult into a TraceResult, not {type(other).__name__}")
        if other is self:
            raise WorkbenchError("cannot merge a trace result into itself (its prompts would count twice)")
        if self.dump_dir is not None or other.dump_dir is not None:
            raise WorkbenchError("cannot merge traces with a dump (each dump holds its own run's rows): read the "
                                 "dumps separately")
        if self.meta.get("spec") != other.meta.get("spec"):
            raise WorkbenchError(f"cannot merge a trace of {other.meta.get('spec')} into one of "
                                 f"{self.meta.get('spec')}")
        for a, b, what in ((self, other, "the other"), (other, self, "this")):
            missing = [s for s in a.reducers if s not in b.reducers]
            if missing:
                raise WorkbenchError(f"cannot merge traces of different sites: {what} one lacks site {missing[0]} "
                                     "(merge runs over the same sites and reducers)")
        for site, reds in self.reducers.items():
            if set(reds) != set(other.reducers[site]):
                raise WorkbenchError(f"cannot merge traces with different reducers: site {site} has "
                                     f"{sorted(reds) or 'none'} here, {sorted(other.reducers[site]) or 'none'} there")
        offset = self.num_tokens
        for site, reds in other.reducers.items():
            for kind, r in reds.items():
                if not hasattr(r, "state_dict"):
                    raise WorkbenchError(f"cannot merge reducer {kind} of site {site}: it has no state_dict to copy")
                self.reducers[site][kind].merge(state.fresh(r).load_state_dict(r.state_dict()).shift_tokens(offset))
        self.token_prompt = torch.cat([self.token_prompt, other.token_prompt + len(self.prompts)])
        self.token_position = torch.cat([self.token_position, other.token_position])
        self.token_ids = torch.cat([self.token_ids, other.token_ids])
        self.prompts = [*self.prompts, *other.prompts]
        self.seconds += other.seconds
        self.meta.update(num_prompts=len(self.prompts), num_tokens=self.num_tokens)
        if "positions" in self.meta and "positions" in other.meta:
            self.meta["positions"] += other.meta["positions"]
        return self


@contextlib.contextmanager
def _installed(meters, lm: LoadedModel):
    try:
        for m in meters:
            m.install(lm.model, lm.adapter)
        yield
    finally:
        for m in meters:
            m.remove()


def _run_streamed(streamer, batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], cap: Capture,
                  meters: Sequence, bar) -> None:
    """Layer streaming: embed every batch, then run all of them through one decoder layer at a time."""
    device = streamer.device
    hidden = streamer.embed([ids for _, ids, _ in batches])

    def before(k: int) -> None:
        grid = batches[k][0].to(device)
        cap.begin_batch(grid)
        for m in meters:
            m.begin_batch(grid)

    streamer.run_layers(hidden, [mask for _, _, mask in batches], before,
                        progress=lambda layer, k: bar.update(int(batches[k][2].sum())))


def _given_ids(lm: LoadedModel, flat: list) -> torch.Tensor:
    """A caller's token ids (``trace(tokenized=...)``) as an int64 tensor, each an integer inside the model's embedding:
    an id past it failed inside torch ("index out of range"), and a float one would have been truncated. Checked on
    the tensor (a per-id isinstance loop cost 4 ms per 10k tokens of the profile, which passes its own ids); the ids
    are looked through one by one only to name the bad one."""
    rows = lm.model.get_input_embeddings().weight.shape[0]
    try:
        ids = torch.tensor(flat) if flat else torch.zeros(0, dtype=torch.int64)
    except (TypeError, ValueError, RuntimeError, OverflowError):  # a str, None, or an int past int64
        ids = None
    if ids is None or ids.dtype != torch.int64 or (ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= rows)):
        bad = next(t for t in flat if isinstance(t, bool) or not isinstance(t, numbers.Integral) or not 0 <= t < rows)
        raise WorkbenchError(f"tokenized holds token id {bad!r}, outside the model's embedding (ids 0..{rows - 1})")
    return ids


def tokenize(lm: LoadedModel, prompts: Sequence[str], max_tokens: int | None = None) -> list[list[int]]:
    prompts = check_prompts(prompts)
    if max_tokens is not None:
        max_tokens = check_number("max_tokens", max_tokens)
    limit = lm.context_length
    cap = min(x for x in (max_tokens, limit) if x) if (max_tokens or limit) else None
    out, truncated = [], 0
    encoded = [ids for b in range(0, len(prompts), 1024) for ids in lm.tokenizer(list(prompts[b:b + 1024]))["input_ids"]]
    for i, ids in enumerate(encoded):  # each prompt tokenised on its own (a list call encodes them independently)
        if not ids:
            raise WorkbenchError(f"prompt {i} gives no tokens with this tokenizer")
        if cap and len(ids) > cap:
            ids, truncated = ids[:cap], truncated + 1
        out.append(ids)
    if truncated:
        warnings.warn(f"{truncated} prompt(s) longer than {cap} tokens were truncated", stacklevel=2)
    return out


def continuation_ids(tokenizer, prompt: str, texts: Sequence[str],
                     head: Sequence[int] | None = None) -> list[list[int]]:
    """Each of ``texts`` in token ids as it follows ``prompt`` (an answer, an option): the tokens of
    ``prompt + text`` after those of ``prompt``.

    Tokenised on its own, a text can differ from the same text in context. SentencePiece tokenizers that
    prepend a word marker (Llama-2's, Mistral's and Mixtral's) turn " Paris" alone into ``['▁', '▁Paris']``,
    and ``'▁'`` is the first token of every answer with a leading space. Where the prompt's tokens are not a
    prefix of the whole's (a merge across the boundary, a tokenizer that appends a token), or the text adds
    no token after them, the text is tokenised on its own. ``head``: the prompt's token ids, where the caller
    has them already.
    """
    head = list(tokenizer(prompt)["input_ids"] if head is None else head)
    wholes = tokenizer([prompt + t for t in texts])["input_ids"] if texts else []
    out = []
    for text, whole in zip(texts, wholes):
        whole = list(whole)
        if len(whole) > len(head) and whole[:len(head)] == head:
            out.append(whole[len(head):])
        else:
            out.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return out


# Prompts are grouped by length within windows of this many batches: nearly all of a global sort's saving in
# padding, while batches stay near their prompts' place in the corpus (ranks get similar work, progress and
# checkpoints move through the corpus in order).
LENGTH_WINDOW = 64


def batch_members(lengths: torch.Tensor, batch_size: int, by_length: bool = True,
                  window: int = LENGTH_WINDOW) -> list[torch.Tensor]:
    """The prompt indices of each batch, each batch's in increasing order.

    ``by_length``: within every window of ``window`` batches' worth of prompts, the prompts are sorted by
    length (stable: equal lengths keep their order, so prompts of one length give the plain batches) and cut
    into batches, shortest first. Otherwise batch ``b`` holds prompts ``b * batch_size`` onwards. Either way
    there are ``ceil(len(lengths) / batch_size)`` batches.
    """
    n = lengths.numel()
    if not by_length:
        return [torch.arange(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    out = []
    span = window * batch_size
    for w in range(0, n, span):
        idx = torch.arange(w, min(w + span, n))
        idx = idx[torch.argsort(lengths[idx], stable=True)]
        out += [idx[s:s + batch_size].sort().values for s in range(0, idx.numel(), batch_size)]
    return out


def pad_token(tokenizer) -> int:
    """The id that fills padded positions (masked, never read): the tokenizer's pad token, else 0."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def padded(seqs: Sequence[Sequence[int]], pad: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists as one ``[B, T]`` batch and its attention mask, padded with ``pad`` on the right (or on the
    left, as generation wants: every row's last token in the last column)."""
    width = max(len(x) for x in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.int64)
    mask = torch.zeros((len(seqs), width), dtype=torch.int64)
    for r, x in enumerate(seqs):
        cols = slice(width - len(x), width) if left else slice(0, len(x))
        ids[r, cols] = torch.tensor(x, dtype=torch.int64)
        mask[r, cols] = 1
    return ids, mask


def _group_experts(lm: LoadedModel, sites: list[Site], factories: dict, extra: dict, dump, table: dict,
                   sinks: dict) -> dict[Site, list[Site]]:
    """Every routed expert of a MoE layer reduced by ``absmax`` alone: one grouped site per layer with an
    :class:`ExpertAbsMax` instead of one payload and one :class:`AbsMax` update per expert and batch (64
    of them per layer on an OLMoE-like model). ``table`` gets the grouped reducers (state, checkpoints and
    ranks see them) and ``sinks`` the grouped site in place of its experts'; ``trace`` splits the result
    back into each expert's AbsMax (equal to reducing the expert's rows alone, tested)."""
    if set(factories) != {"absmax"} or dump is not None:
        return {}
    by_layer: dict[int, list[Site]] = {}
    for s in sites:
        if s.component is Component.EXPERT and not extra.get(s):
            by_layer.setdefault(s.layer, []).append(s)
    infos = lm.layer_infos()
    out = {}
    for layer, members in by_layer.items():
        info = infos[layer]
        if info.kind != "moe" or len(members) != info.num_experts or Site(layer, Component.EXPERTS) in table:
            continue
        g = Site(layer, Component.EXPERTS)
        table[g] = {"absmax": ExpertAbsMax(num_experts=info.num_experts)}
        sinks[g] = [table[g]["absmax"]]
        for m in members:
            del sinks[m]
        out[g] = members
    return out


def _site_list(sites) -> list[Site]:
    """``sites`` as a list of distinct :class:`Site` (one Site, a string or None is a one-line error)."""
    if isinstance(sites, Site):
        raise WorkbenchError("sites must be a list of Site, not one Site: wrap it in a list")
    if isinstance(sites, str) or not isinstance(sites, Iterable):
        hint = " (Site.from_key reads a key such as 'L0.resid_post')" if isinstance(sites, str) else ""
        raise WorkbenchError(f"sites must be a list of Site, not {type(sites).__name__}{hint}")
    sites = list(dict.fromkeys(sites))
    odd = next((s for s in sites if not isinstance(s, Site)), None)
    if odd is not None:
        raise WorkbenchError(f"sites must be a list of Site, got {odd!r} among them"
                             + (" (Site.from_key reads a key such as 'L0.resid_post')" if isinstance(odd, str) else ""))
    if not sites:
        raise WorkbenchError("no capture sites selected")
    return sites


def trace(
    lm: LoadedModel,
    prompts: Sequence[str],
    sites: Iterable[Site],
    reducers: Sequence[str | ReducerFactory] = ("absmax",),
    *,
    batch_size: int = 8,
    max_tokens: int | None = None,
    dump_dir: str | Path | None = None,
    dump_shard_rows: int = 65536,
    progress: bool = True,
    sinks: dict[Site, list] | None = None,
    meters: Sequence = (),
    stateful: dict[str, object] | None = None,
    checkpoint: Checkpoint | None = None,
    shard: Shard | None = None,
    tokenized: list[list[int]] | None = None,
    by_length: bool = True,
) -> TraceResult:
    """Run ``prompts`` once, reducing every site with every reducer; optionally dump everything.

    ``sinks`` adds extra per-site consumers (anything with ``update(payload)``); ``meters`` are
    objects with ``install(model, adapter)``, ``begin_batch(grid)`` and ``remove()`` that hook the
    model themselves (e.g. the attention-sink meter). ``stateful`` names further objects whose state
    belongs to the run (``state_dict``/``load_state_dict``/``merge``), e.g. a tracker that several
    sinks share. ``tokenized`` is ``tokenize(lm, prompts, max_tokens)`` when the caller has it already.

    ``checkpoint`` saves the state of every reducer, sink and meter (see :mod:`workbench.tracing.state`)
    every ``checkpoint.every`` batches and resumes from a checkpoint of the same run. ``shard`` runs
    only this rank's contiguous block of batches (global token indices stay in prompt order) and
    merges every rank's state into rank 0's reducers, in rank order.

    ``by_length`` lets prompts of similar length share a batch (:func:`batch_members`): less padding, the
    same results up to the order of float sums. A dump keeps the plain batches, so its rows stay in
    token order.
    """
    prompts = check_prompts(prompts)  # a generator is read once, here (tokenize and the result read the list)
    sites = _site_list(sites)
    validate(lm.adapter, lm.model, sites)  # before anything below indexes the model's layers by a site
    batch_size = check_number("batch_size", batch_size)
    max_tokens = None if max_tokens is None else check_number("max_tokens", max_tokens)
    dump_shard_rows = check_number("dump_shard_rows", dump_shard_rows)
    if isinstance(reducers, str) or not isinstance(reducers, Iterable):
        raise WorkbenchError("reducers must be a list of reducer names or factories, not "
                             + ("one string: wrap it in a list" if isinstance(reducers, str)
                                else f"{type(reducers).__name__}"))
    reducers = list(reducers)
    odd = next((r for r in reducers if not isinstance(r, str) and not callable(r)), None)
    if odd is not None:
        raise WorkbenchError(f"reducers must be names or factories (site -> reducer), got {odd!r}")
    if not reducers and dump_dir is None and not any((sinks or {}).values()) and not meters:
        raise WorkbenchError("nothing to compute: no reducers, and no dump, sinks or meters (give reducers such as "
                             "['absmax'])")
    if tokenized is not None and len(tokenized) != len(prompts):
        raise WorkbenchError(f"tokenized holds {len(tokenized)} prompts' tokens for {len(prompts)} prompts")
    if sinks is not None and not isinstance(sinks, dict):
        raise WorkbenchError(f"sinks must be a dict of site -> list of sinks, not {type(sinks).__name__}")
    stray = [s for s in (sinks or {}) if s not in sites]
    if stray:  # (such a sink was never fed: 0 rows, unsaid)
        raise WorkbenchError(f"sinks given for {few(stray)}, "
                             "which are not among the traced sites: add them to sites")
    if not isinstance(by_length, bool):  # (a truthy "no" batched by length)
        raise WorkbenchError(f"by_length must be True or False, got {by_length!r}")
    if dump_dir is not None and (checkpoint is not None or (shard is not None and shard.world > 1)):
        raise WorkbenchError("--dump cannot be combined with checkpoints or several ranks")
    streamer = lm.meta.get("streamer")  # layer streaming (workbench.models.offload): all batches, one layer at a time
    if streamer is not None and dump_dir is not None:
        raise WorkbenchError("--offload layers does not combine with --dump (a streamed pass holds every batch of one "
                             "layer at a time, where a dump writes each batch's sites as it goes)")
    if streamer is not None and checkpoint is not None:
        raise WorkbenchError("--offload layers runs without checkpoints (a streamed pass has no batch cursor)")
    factories = {(r if isinstance(r, str) else getattr(r, "__name__", "custom")): (
        reducer_factory(r, lm) if isinstance(r, str) else r) for r in reducers}
    # each reducer at every site it applies to (a factory returns None for the others: expert_counts needs a router)
    table = {s: {k: r for k, f in factories.items() if (r := f(s)) is not None} for s in sites}
    unused = [k for k in factories if not any(k in t for t in table.values())]
    if unused:
        hint = ""
        if unused[0] == "expert_counts":  # a router site: there is none to add in a dense model or dense layers
            routed = {i for i, layer in enumerate(lm.adapter.decoder_layers(lm.model))
                      if lm.adapter.router(layer) is not None}
            hint = (" (it needs a router site: add --components router)" if routed & {s.layer for s in sites} else
                    " (it needs a router site, and the selected layers have none: dense layers)" if routed else
                    " (it needs a router site; the model is dense)")
        raise WorkbenchError(f"reducer {unused[0]} applies to none of the selected sites{hint}")
    ids = tokenized if tokenized is not None else tokenize(lm, prompts, max_tokens)
    flat = [t for x in ids for t in x]
    token_ids = torch.tensor(flat, dtype=torch.int64) if tokenized is None else _given_ids(lm, flat)
    lengths = torch.tensor([len(x) for x in ids])
    offsets = torch.cumsum(lengths, 0) - lengths
    token_prompt = torch.repeat_interleave(torch.arange(len(ids)), lengths)
    token_position = torch.arange(int(lengths.sum())) - torch.repeat_interleave(offsets, lengths)
    dump = DumpWriter(dump_dir, shard_rows=dump_shard_rows) if dump_dir is not None else None
    extra = sinks or {}
    sinks = {s: [*table[s].values(), *extra.get(s, []), *([dump.sink(s)] if dump else [])] for s in sites}
    grouped = _group_experts(lm, sites, factories, extra, dump, table, sinks)
    pad = pad_token(lm.tokenizer)
    device = lm.device
    in_batch = batch_members(lengths, batch_size, by_length and dump is None)  # the prompts of each batch
    order = torch.cat(in_batch) if in_batch else torch.zeros(0, dtype=torch.int64)  # every prompt, batch after batch
    # batches in prompt order: each batch's tokens follow the last one's (what coalesced payloads can rely on)
    in_order = bool((order[1:] > order[:-1]).all())
    sizes = torch.tensor([m.numel() for m in in_batch], dtype=torch.int64)
    which = torch.repeat_interleave(torch.arange(len(in_batch)), sizes)  # each member's batch
    per_batch = torch.zeros(len(in_batch), dtype=torch.int64).index_add_(0, which, lengths[order])  # tokens
    widths = torch.zeros(len(in_batch), dtype=torch.int64).scatter_reduce_(0, which, lengths[order], "amax")
    # each rank's block of batches, balanced by the positions its forwards compute
    mine = shard.batches((sizes * widths).tolist()) if shard is not None else range(len(in_batch))
    objs = state.collect(table, extra, meters, stateful) if (checkpoint is not None or shard is not None) else {}
    first = mine.start
    fp = None
    if checkpoint is not None:
        fp = state.fingerprint(spec=lm.spec, model=type(lm.model).__name__, weights=state.weights_signature(lm.model),
                               token_ids=token_ids, lengths=lengths,
                               batch_size=batch_size, objects=list(objs),
                               shard=shard and (shard.rank, shard.world, mine.start, mine.stop),
                               tag=checkpoint.tag, **({} if in_order else {"batches": order}))
        got = checkpoint.load(fp)
        if got is not None and mine.start <= got[0] <= mine.stop:
            first = got[0]
            state.load(objs, got[1])

    # numpy views for building batches: a handful of small ops per batch, each several times cheaper than torch's
    np_lengths, np_offsets, np_ids, np_widths = (x.numpy() for x in (lengths, offsets, token_ids, widths))
    np_members = [m.numpy() for m in in_batch]
    batch_tokens = per_batch.tolist()

    def batch(b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Batch ``b``: token grid (global index, -1 at padding), input ids and attention mask, [B, T] each."""
        chunk = np_members[b]
        cols = np.arange(np_widths[b])
        real = cols[None, :] < np_lengths[chunk][:, None]  # [B, T], right padding
        grid = np.where(real, np_offsets[chunk][:, None] + cols[None, :], -1)
        ids = np.where(real, np_ids[np.maximum(grid, 0)], pad)
        return torch.from_numpy(grid), torch.from_numpy(ids), torch.from_numpy(real.astype(np.int64))

    start = time.perf_counter()
    repeat = len(lm.layer_infos()) if streamer is not None else 1  # streamed: each token passes once per layer
    bar = tqdm(total=int(per_batch[mine.start:mine.stop].sum()) * repeat, initial=int(per_batch[mine.start:first].sum()),
               unit="tok", desc=f"trace {lm.spec}", disable=not progress, file=sys.stderr, leave=False)
    body = lm.adapter.body(lm.model)  # no statistic needs the logits: the LM head is skipped
    # Small payloads are coalesced over batches (not when streaming layers: there each layer sees every
    # batch before the next layer, and the layer-paired ChangeRate needs the same split in every layer).
    # inference mode: every op of the forward and of the reducers is cheaper than under no_grad (~10 % of the
    # profile pass on the tiny zoo, bench/profile_overhead.py); the state it leaves is made normal below
    with torch.inference_mode(), \
            Capture(lm.model, lm.adapter, sinks, coalesce=streamer is None, in_order=in_order) as cap, \
            _installed(meters, lm):
        if streamer is not None:
            _run_streamed(streamer, [batch(b) for b in range(first, mine.stop)], cap, meters, bar)
        else:
            for b in range(first, mine.stop):
                grid, input_ids, mask = batch(b)
                grid = grid.to(device)
                cap.begin_batch(grid)
                for m in meters:
                    m.begin_batch(grid)
                body(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False)
                bar.update(batch_tokens[b])
                if checkpoint is not None and (b + 1 - mine.start) % checkpoint.every == 0 and b + 1 < mine.stop:
                    cap.flush()
                    checkpoint.save(b + 1, fp, state.flatten(objs))
    bar.close()
    state.outside_inference([*(r for reds in table.values() for r in reds.values()),
                             *(s for v in extra.values() for s in v), *meters, *(stateful or {}).values()], lm.model)
    positions = int((sizes * widths)[mine.start:mine.stop].sum())  # this rank's forwards computed, padding included
    resumed = first if first != mine.start else None
    ranks = None
    if shard is not None and shard.world > 1:  # every rank's state, merged into rank 0's objects in rank order
        ranks = shard.combine(objs, {"rank": shard.rank, "batches": [mine.start, mine.stop], "positions": positions,
                                     "resumed_at_batch": resumed})
    for g, members in grouped.items():  # each expert's AbsMax, from its layer's grouped reduction
        for site in members:
            table[site]["absmax"] = table[g]["absmax"].expert(site.expert)
        del table[g]
    seconds = time.perf_counter() - start
    meta = {"spec": lm.spec, "dtype": lm.dtype_name, "num_prompts": len(ids),
            "num_tokens": int(lengths.sum()), "batch_size": batch_size,
            # the rule asked for and applied (a dump keeps the given order), even where it changes nothing
            "batch_order": "length" if by_length and dump is None else "given",
            # what the forwards computed, padding included (every rank's, on rank 0 of a data-parallel run)
            "positions": sum(r["positions"] for r in ranks) if ranks else positions}
    if checkpoint is not None or shard is not None:
        meta.update(batches=[mine.start, mine.stop], resumed_at_batch=resumed)
    if ranks:  # rank 0's own batches above; each rank's here
        meta["ranks"] = ranks
    if dump:
        dump.close(token_prompt, token_position, meta)
    return TraceResult(table, list(prompts), token_prompt, token_position, token_ids, seconds,
                       Path(dump_dir) if dump_dir else None, meta)
