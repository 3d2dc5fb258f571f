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
each option continues from it.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Sequence

import torch

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


@torch.no_grad()
def choice_scores(lm, choices: Sequence[Choice]) -> list[float]:
    """1.0 where the right option has the highest summed log-probability, else 0.0 (one per item)."""
    scores = []
    for c in choices:
        ids = lm.tokenizer(c.prompt, return_tensors="pt").input_ids.to(lm.device)
        out = lm.model(input_ids=ids, use_cache=True)
        cache = out.past_key_values
        first = torch.log_softmax(out.logits[0, -1].float(), -1)
        best, best_i = -math.inf, -1
        for i, opt in enumerate(c.options):
            o = lm.tokenizer(opt, add_special_tokens=False).input_ids
            s = float(first[o[0]])
            if len(o) > 1:
                more = lm.model(input_ids=torch.tensor([o[:-1]], device=lm.device), past_key_values=cache, use_cache=True)
                lp = torch.log_softmax(more.logits[0].float(), -1)
                s += float(lp[torch.arange(len(o) - 1, device=lp.device), torch.tensor(o[1:], device=lp.device)].sum())
                cache.crop(-(len(o) - 1))  # back to the prompt alone
            if s > best:
                best, best_i = s, i
        scores.append(1.0 if best_i == c.answer else 0.0)
    return scores
