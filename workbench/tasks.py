"""Built-in tasks that read the context, and one that recalls stored facts, for ablation studies.

Jin et al. 2025 find that disrupting the massive values of Q and K breaks tasks that read the context
far more than recall of stored knowledge. A 135M model cannot do their GSM8K or IMDB, so these are
tasks it can, every item a multiple choice scored by log-probability (the option the model gives the
highest summed log-probability wins; 1 or 0 per item, so studies report accuracy with an interval):

* ``passkey``: a 5-digit key hidden in filler text of about 256, 512 and 1,000 tokens (the passkey
  retrieval test of Mohtashami & Jaggi 2023), against 3 other random keys;
* ``override``: a built-in fact restated with a false answer in the context ("In this story, the
  capital of France is Rome. ... The capital of France is"): the context's answer against the true
  one and 2 others of the relation;
* ``label_copy``: few-shot copying of arbitrary labels ("apple: 42, chair: 17 ... chair:");
* ``recall``: the built-in facts (``workbench/data/facts.jsonl``, answered right at top-1 by
  SmolLM2-135M) against 3 other answers of the same relation: parametric knowledge, no context help.

Items are generated from fixed seeds, so every condition and run sees the same ones. The prompt runs
once (its KV cache kept, so an intervention on the prompt's forward is what the options see), then
each option continues from it (:func:`option_logprobs`: prompts of similar length batched, and all their
options in one more forward).
"""

from __future__ import annotations

import copy
import math
import random
from dataclasses import dataclass
from typing import Sequence

import torch

from workbench.errors import WorkbenchError
from workbench.tracing.runner import continuation_ids, pad_token, padded

CONTEXT_TASKS = ("passkey", "override", "label_copy")
TASKS = CONTEXT_TASKS + ("recall",)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
WORDS = ("apple", "chair", "river", "mouse", "candle", "garden", "pencil", "window", "bottle", "forest", "ladder",
         "button", "castle", "rocket", "violin", "tunnel")
# Two-digit labels: the model has no prior for which goes with a word (with colours SmolLM2-135M answers its
# favourite colour, 0.17 accuracy; with these it copies, 0.79).
LABELS = ("17", "42", "63", "85", "29", "51", "74", "96")


@dataclass(frozen=True)
class Choice:
    prompt: str
    options: tuple[str, ...]
    answer: int  # index of the right option
    task: str


def _shuffled(right: str, wrong: Sequence[str], rng: random.Random, task: str, prompt: str) -> Choice:
    options = [right, *wrong]
    rng.shuffle(options)
    return Choice(prompt, tuple(options), options.index(right), task)


def passkey_items(n: int = 12, seed: int = 0, lengths: Sequence[int] = (256, 512, 1000)) -> list[Choice]:
    """``n`` passkey prompts, cycling through ``lengths`` (approximate tokens; the filler is ~22 tokens)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        reps = max(1, lengths[i % len(lengths)] // 22)
        before = rng.randint(0, reps)
        key = rng.randint(10000, 99999)
        wrong = set()
        while len(wrong) < 3:
            w = rng.randint(10000, 99999)
            if w != key:
                wrong.add(w)
        prompt = ("There is an important piece of information hidden inside a lot of irrelevant text. Find it and "
                  "memorize it. I will quiz you about it. " + FILLER * before
                  + f"The pass key is {key}. Remember it. {key} is the pass key. " + FILLER * (reps - before)
                  + "What is the pass key? The pass key is")
        out.append(_shuffled(f" {key}", [f" {w}" for w in sorted(wrong)], rng, "passkey", prompt))
    return out


def _facts():
    from workbench.circuits.facts import builtin_facts

    by_relation: dict[str, list] = {}
    for f in builtin_facts():
        by_relation.setdefault(f.relation or "", []).append(f)
    return by_relation


def _others(facts, fact, rng: random.Random, k: int, exclude: set[str] = frozenset()) -> list[str]:
    pool = sorted({f.answer for f in facts} - {fact.answer} - set(exclude))
    return rng.sample(pool, k)


def _sampled_facts(n: int, rng: random.Random):
    """``n`` built-in facts of relations with at least 5 (so 3 other answers exist), and the facts by relation."""
    by_relation = _facts()
    facts = [f for fs in by_relation.values() if len(fs) >= 5 for f in fs]
    return rng.sample(facts, min(n, len(facts))), by_relation


def override_items(n: int = 24, seed: int = 0) -> list[Choice]:
    """Facts restated with a false answer of the same relation; the context's answer is the right option."""
    rng = random.Random(seed)
    chosen, by_relation = _sampled_facts(n, rng)
    out = []
    for fact in chosen:
        pool = by_relation[fact.relation or ""]
        fake = _others(pool, fact, rng, 1)[0]
        lower = fact.prompt[0].lower() + fact.prompt[1:]
        prompt = f"In this story, {lower}{fake}. Everyone in the story knows that {lower}{fake}. {fact.prompt}"
        out.append(_shuffled(fake, [fact.answer, *_others(pool, fact, rng, 2, {fake})], rng, "override", prompt))
    return out


def label_copy_items(n: int = 24, seed: int = 0, shots: int = 4) -> list[Choice]:
    """``shots`` word: label lines, then one of the words again; its label is the right option."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words, labels = rng.sample(WORDS, shots), rng.sample(LABELS, shots)
        i = rng.randrange(shots)
        prompt = "".join(f"{w}: {lab}\n" for w, lab in zip(words, labels)) + f"{words[i]}:"
        out.append(_shuffled(f" {labels[i]}", [f" {lab}" for j, lab in enumerate(labels) if j != i], rng,
                             "label_copy", prompt))
    return out


def recall_items(n: int = 24, seed: int = 0) -> list[Choice]:
    """Built-in facts against 3 other answers of the same relation."""
    rng = random.Random(seed)
    chosen, by_relation = _sampled_facts(n, rng)
    out = []
    for fact in chosen:
        out.append(_shuffled(fact.answer, _others(by_relation[fact.relation or ""], fact, rng, 3), rng, "recall",
                             fact.prompt))
    return out


def items(task: str, seed: int = 0) -> list[Choice]:
    return {"passkey": passkey_items, "override": override_items, "label_copy": label_copy_items,
            "recall": recall_items}[task](seed=seed)


def choice_scores(lm, choices: Sequence[Choice], batch_size: int = 8) -> list[float]:
    """1.0 where the right option has the highest summed log-probability, else 0.0 (one per item; a tie goes to
    the first of the tied options). NaN where an option's log-probability is NaN (the model's outputs are not
    finite): no option wins there (``max`` over NaN returned the first option, counted right 1 time in 4)."""
    out = []
    for c, sums in zip(choices, option_logprobs(lm, choices, batch_size)):
        out.append(math.nan if any(x != x for x in sums) else 1.0 if sums.index(max(sums)) == c.answer else 0.0)
    return out


# Logits held at once by option_logprobs, in elements (float32: 256 MB; SmolLM2's vocabulary is 49,152 wide).
LOGIT_ELEMENTS = 1 << 26
PROMPT_TOKENS = 4096  # padded prompt tokens per forward


def tokenized(lm, choices: Sequence) -> tuple[list[list[int]], list[list[list[int]]], int]:
    """Each item's prompt and options in token ids, and how many prompts were cut to the model's context (the caller
    warns: a study does, once). A cut prompt keeps its leading special tokens (a BOS) and its last tokens, which the
    options continue, leaving room for the longest option of all items (a batch pads its options to that)."""
    tok = lm.tokenizer
    prompts = [tok(c.prompt)["input_ids"] for c in choices]
    options = [continuation_ids(tok, c.prompt, c.options, head=p) for c, p in zip(choices, prompts)]
    for i, (c, p, opts) in enumerate(zip(choices, prompts, options)):
        if not p:
            raise WorkbenchError(f"choice item {i}: its prompt {c.prompt!r} tokenizes to nothing")
        if not opts:
            raise WorkbenchError(f"choice item {i}: no options")
        for o, ids in zip(c.options, opts):
            if not ids:
                raise WorkbenchError(f"choice item {i}: option {o!r} tokenizes to nothing")
    limit = lm.context_length
    if limit is None or not choices:
        return prompts, options, 0
    keep = limit - (max(len(o) for opts in options for o in opts) - 1)  # an option's last token is not fed
    special, cut = set(tok.all_special_ids), 0
    for i, p in enumerate(prompts):
        if len(p) <= keep:
            continue
        head = next((j for j, t in enumerate(p) if t not in special), len(p))
        if keep - head < 1:
            raise WorkbenchError(f"choice item {i}: the longest option ({limit - keep + 1} tokens) leaves no room "
                                 f"for its prompt in the model's context of {limit} positions")
        prompts[i], cut = p[:head] + p[len(p) - (keep - head):], cut + 1
    return prompts, options, cut


@torch.no_grad()
def option_logprobs(lm, choices: Sequence, batch_size: int = 8) -> list[list[float]]:
    """Each option's summed log-probability after its item's prompt (``choices``: anything with ``prompt`` and
    ``options``), the option in the tokens it has after the prompt (:func:`~workbench.tracing.runner.continuation_ids`).

    Every prompt runs once and keeps its KV cache, so an intervention on the prompt's forward is what the options
    see; every option then continues from it. Prompts of similar length run together (up to ``batch_size``,
    right-padded); the options of a batch's prompts run together in one more forward, each after its own
    prompt's cache, at the positions it would have without the padding. A model whose cache rows cannot be picked
    that way (sliding-window layers, recurrent or linear-attention states: :func:`_selectable`) runs one prompt at
    a time, each option from a copy of its cache. Equal to scoring each prompt and option alone up to the float
    differences of batched matmuls (``tests/test_tasks.py``, every kind of cache). A prompt longer than the model's
    context allows is cut from the front (:func:`tokenized`).
    """
    if batch_size < 1:
        raise WorkbenchError("batch size must be at least 1")
    prompts, options, _ = tokenized(lm, choices)
    vocab = int(lm.model.get_output_embeddings().weight.shape[0])
    out: list[list[float]] = [[] for _ in choices]
    order = sorted(range(len(choices)), key=lambda i: len(prompts[i]))
    i = 0
    while i < len(order):
        batch = [order[i]]
        while i + len(batch) < len(order) and len(batch) < batch_size:
            nxt = order[i + len(batch)]
            rows = len(batch) + 1
            width = len(prompts[nxt])  # the longest so far (sorted by length)
            opts = sum(len(options[j]) for j in [*batch, nxt])
            longest = max(len(o) for j in [*batch, nxt] for o in options[j])
            if rows * width > PROMPT_TOKENS or max(rows, opts * longest) * vocab > LOGIT_ELEMENTS:
                break
            batch.append(nxt)
        got = _score_batch(lm, [prompts[j] for j in batch], [options[j] for j in batch])
        if got is None:  # a cache whose rows cannot be picked (sliding windows, recurrent states): one prompt a time
            batch_size = 1
            continue
        for j, sums in zip(batch, got):
            out[j] = sums
        i += len(batch)
    return out


def _selectable(cache) -> bool:
    """Whether ``cache`` is plain key/value rows for every token (rows can be picked and repeated per option, and
    padding between a prompt and its options is only masked): not a sliding window's or a recurrent state's."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    return type(cache) is DynamicCache and all(type(layer) is DynamicLayer for layer in cache.layers)


def _score_batch(lm, prompts: list[list[int]], options: list[list[list[int]]]) -> list[list[float]] | None:
    """Each option's summed log-probability after its prompt; None where several prompts cannot share the batch
    (see :func:`_selectable`)."""
    device, pad = lm.device, pad_token(lm.tokenizer)
    lengths = [len(p) for p in prompts]
    ids, mask = padded(prompts, pad)
    B = ids.shape[0]
    last = sorted(set(n - 1 for n in lengths))  # the positions whose logits score the options' first tokens
    out = lm.model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=True,
                   logits_to_keep=torch.tensor(last, device=device))
    cache = out.past_key_values
    selectable = _selectable(cache)
    if B > 1 and not selectable:
        return None
    col = {n: c for c, n in enumerate(last)}
    first = out.logits[torch.arange(B), torch.tensor([col[n - 1] for n in lengths])].float().log_softmax(-1).cpu()
    sums = [[float(first[r, o[0]]) for o in opts] for r, opts in enumerate(options)]
    more = [(r, j) for r, opts in enumerate(options) for j, o in enumerate(opts) if len(o) > 1]
    if not more:
        return sums
    if not selectable:  # one prompt: each option continues from a copy of its cache
        for r, j in more:
            o = options[r][j]
            res = lm.model(input_ids=torch.tensor([o[:-1]], device=device), past_key_values=copy.deepcopy(cache),
                           use_cache=True)
            lp = res.logits[0].float().log_softmax(-1).cpu()
            sums[r][j] += float(lp[torch.arange(len(o) - 1), torch.tensor(o[1:])].sum())
        return sums
    # Every option with more tokens continues from its own prompt's cache: rows of the cache repeated, the
    # option's tokens after the prompt's (padding masked), at the positions they would have without the padding.
    x, option_mask = padded([options[r][j][:-1] for r, j in more], pad)
    rows = torch.tensor([r for r, _ in more])
    m = torch.cat([mask[rows], option_mask], dim=1)
    positions = torch.tensor(lengths)[rows, None] + torch.arange(x.shape[1])
    cache.batch_select_indices(rows.to(device))
    res = lm.model(input_ids=x.to(device), attention_mask=m.to(device), position_ids=positions.to(device),
                   past_key_values=cache, use_cache=True)
    lp = res.logits.float().log_softmax(-1).cpu()
    for k, (r, j) in enumerate(more):
        t = options[r][j][1:]
        sums[r][j] += float(lp[k, torch.arange(len(t)), torch.tensor(t)].sum())
    return sums
