"""Facts for knowledge circuits: reading them, building corrupted prompts, batching.

A facts file is JSON Lines, one object per line::

    {"prompt": "The capital of France is", "answer": " Paris", "relation": "capital_of", "subject": "France",
     "corrupted_prompt": "...", "corrupted_answer": " Berlin"}

``prompt`` and ``answer`` are required; the rest is optional. The answer (and the corrupted answer) is scored by its
first token, so a given corrupted answer must start with another token than the answer (" New Delhi" against " New
York" would compare " New" with itself). The corrupted prompt must have as many tokens as the prompt, so positions
line up, and the prompt must fit the model's context (it is not truncated: that would cut off the subject or the
last position). Where no corrupted prompt is given, one is built by KC's rule: replace the ``subject`` with the
subject of another fact of the same ``relation`` (with a different answer token, as it follows the swapped prompt)
such that the token count is unchanged, trying the later facts of the file first. Plain facts (no ``subject``) get
their subject and relation inferred from the other facts' prompts (:func:`infer_templates`: prompts sharing a
template differ in one span). Where no such fact exists but a built-in fact shares the prompt's template, that fact
is the partner (:func:`_builtin_swap`). Where none does either, the subject is swapped for another **entity** of the
same token length: first the subjects of the other facts, then the built-in facts' subjects (:func:`entity_pool`); a
fact with no subject at all takes the longest pool entity its prompt contains as its subject. Given the model, a
fact that has found no subject so far swaps one word for its nearest neighbour in the model's embeddings that
changes the model's prediction (:func:`neighbour_swap`; "The plural of foot is" -> "... finger is"): a country put
in for a capitalised word ("Iran have four" for "Dogs have four") or the mean baseline would read as nonsense.
Without the model, or where no neighbour changes the prediction, the subject is the prompt's longest run of
capitalised words, swapped for a pool entity. Only where that fails too does the fact fall back to the
**mean-ablation baseline**: every sender's corrupted output is its mean over all tokens of all facts' clean prompts.
Each prepared fact records which (``baseline``: given, swap, neighbour, entity or mean).

Where no corrupted answer is given (and none comes from a swap or a neighbour swap: the corrupted prompt's
top token), it is the clean model's highest
ranked token other than the answer (the strongest competitor), filled in by
:func:`fill_runner_up`.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from workbench.errors import WorkbenchError
from workbench.io import read_text
from workbench.models.specs import context_length
from workbench.tracing.runner import continuation_ids, padded

FIELDS = ("prompt", "answer", "corrupted_prompt", "corrupted_answer", "relation", "subject")
REQUIRED = ("prompt", "answer")


@dataclass(frozen=True)
class Fact:
    prompt: str
    answer: str
    corrupted_prompt: str | None = None
    corrupted_answer: str | None = None
    relation: str | None = None
    subject: str | None = None
    origin: str | None = field(default=None, compare=False, repr=False)  # where it was read: "facts file F line 3"

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None and k != "origin"}


def parse_facts(lines: Iterable[str], source: str = "facts") -> list[Fact]:
    """Parse JSON Lines; every problem is a WorkbenchError naming the line."""
    facts = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise WorkbenchError(f"{source} line {n}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise WorkbenchError(f"{source} line {n}: expected a JSON object, got {type(obj).__name__}")
        unknown = sorted(set(obj) - set(FIELDS))
        if unknown:
            raise WorkbenchError(f"{source} line {n}: unknown key(s) {', '.join(unknown)}; known: {', '.join(FIELDS)}")
        for key in REQUIRED:
            if key not in obj:
                raise WorkbenchError(f"{source} line {n}: missing required key {key!r}")
        fact = Fact(**obj, origin=f"{source} line {n}")
        _check_fields(fact, fact.origin)
        facts.append(fact)
    if not facts:
        raise WorkbenchError(f"{source} has no facts (it is empty)")
    first: dict[tuple[str, str], str] = {}
    again = []
    for f in facts:
        key = (f.prompt, f.answer)
        if key in first:
            again.append((f.origin, first[key]))
        first.setdefault(key, f.origin)
    if again:  # kept (a weighting may be meant), but every score and the lost-fact list count them again
        warnings.warn(f"{source}: {len(again)} fact(s) repeat an earlier one's prompt and answer ({again[0][0]} "
                      f"repeats {again[0][1]}); each counts again in every score", stacklevel=2)
    return facts


def read_facts(path: str | Path) -> list[Fact]:
    path = Path(path)
    return parse_facts(read_text(path, "facts file").splitlines(), source=f"facts file {path}")


def builtin_facts() -> list[Fact]:
    """The built-in facts (``workbench/data/facts.jsonl``): ones SmolLM2-135M gets right at top-1."""
    from workbench.data import DATA_DIR

    return read_facts(DATA_DIR / "facts.jsonl")


@dataclass
class Prepared:
    """A fact in token ids, with its corrupted counterpart (or the mean baseline)."""

    fact: Fact
    ids: list[int]
    corrupted_ids: list[int] | None  # None: mean baseline
    answer_id: int
    corrupted_answer_id: int | None  # None until fill_runner_up
    baseline: str  # given, swap, neighbour, entity or mean
    corrupted_prompt: str | None = None
    corrupted_answer_source: str | None = None  # given, swap, neighbour or runner_up
    extra: dict = field(default_factory=dict)

    def record(self, tokenizer) -> dict:
        """What circuit.json keeps of the fact. The token ids are the scored tokens themselves: a token of part of a
        character (the first of a non-ASCII answer's bytes) decodes alone to "\ufffd"."""
        cid = self.corrupted_answer_id
        return {"prompt": self.fact.prompt, "answer": self.fact.answer, "relation": self.fact.relation,
                "baseline": self.baseline, "corrupted_prompt": self.corrupted_prompt,
                "answer_id": int(self.answer_id), "corrupted_answer_id": None if cid is None else int(cid),
                "corrupted_answer": None if cid is None else tokenizer.decode([cid]),
                "corrupted_answer_source": self.corrupted_answer_source, "n_tokens": len(self.ids), **self.extra}


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text)["input_ids"])


def _named(f: Fact, i: int) -> str:
    """How an error names fact ``i``: where it was read (file and line), else its index; and its prompt's start."""
    prompt = f.prompt if len(f.prompt) <= 60 else f.prompt[:57] + "..."
    return f"{f.origin or f'fact {i}'} ({prompt!r})"


def _first_token(tokenizer, prompt: str, text: str, head: list[int] | None = None) -> int:
    """The first token of the answer ``text`` as it follows ``prompt`` (``runner.continuation_ids``: a SentencePiece
    tokenizer would make a lone word marker the first token of every answer tokenised on its own); ``head``: the
    prompt's ids, where known."""
    ids = continuation_ids(tokenizer, prompt, [text], head)[0]
    if not ids:
        raise WorkbenchError(f"answer {text!r} has no tokens")
    return int(ids[0])


_WORD = re.compile(r"\s*\S+")


def _span(a: list[str], b: list[str]) -> tuple[str, str, str] | None:
    """Two word lists that differ in exactly one span: (template, a's span, b's span), else None.

    The template is the shared words with ``{}`` where the span was; it must keep at least two words of
    context and at least as many words as either span (``"The {} is"`` is no template for "capital of
    France"), and the two spans may share no word (if they do, the prompts differ in more than one place).
    """
    p = 0
    while p < min(len(a), len(b)) and a[p] == b[p]:
        p += 1
    s = 0
    while s < min(len(a), len(b)) - p and a[len(a) - 1 - s] == b[len(b) - 1 - s]:
        s += 1
    ma, mb = a[p:len(a) - s], b[p:len(b) - s]
    if not ma or not mb or p + s < max(2, len(ma), len(mb)) or {w.strip() for w in ma} & {w.strip() for w in mb}:
        return None
    lead = ma[0][:len(ma[0]) - len(ma[0].lstrip())]  # the space before the subject stays in the template
    if mb[0][:len(mb[0]) - len(mb[0].lstrip())] != lead:
        return None
    sa, sb = "".join(ma).strip(), "".join(mb).strip()
    # punctuation both spans open or close with ("France," and "Spain,") belongs to the template, not the subject
    head = len(re.match(r"[^\w\s]*", os.path.commonprefix([sa, sb])).group(0))
    tail = len(re.match(r"[^\w\s]*", os.path.commonprefix([sa[::-1], sb[::-1]])).group(0))
    if head + tail >= min(len(sa), len(sb)):
        head = tail = 0
    template = "".join(a[:p]) + lead + sa[:head] + "{}" + sa[len(sa) - tail:] + "".join(a[len(a) - s:])
    return template, sa[head:len(sa) - tail], sb[head:len(sb) - tail]


def infer_templates(facts: list[Fact]) -> list[Fact]:
    """Fill in ``relation`` and ``subject`` of plain facts (no ``subject``) from the facts themselves.

    Prompts that share a template differ in one span: that span is the subject and the template
    (``"The capital of {} is"``) the relation. Each plain fact takes the template it shares with the
    most other facts; a fact that shares none with any other keeps no subject (and no swap).
    Annotated facts are returned unchanged.
    """
    plain = [i for i, f in enumerate(facts) if not f.subject and not f.corrupted_prompt]
    words = {i: _WORD.findall(facts[i].prompt) for i in plain}
    members: dict[str, dict[int, str]] = {}
    for x, i in enumerate(plain):
        for j in plain[x + 1:]:
            hit = _span(words[i], words[j])
            if hit:
                t, si, sj = hit
                members.setdefault(t, {}).update({i: si, j: sj})
    out = list(facts)
    for i in plain:
        best = max(((len(m), len(t), t) for t, m in members.items() if i in m), default=None)
        if best is not None:
            t = best[2]
            out[i] = replace(facts[i], relation=facts[i].relation or t, subject=members[t][i])
    return out


def entity_pool(facts: list[Fact], builtin: list[Fact] | None = None) -> list[tuple[str, set[str]]]:
    """Subjects to swap in where a fact has no partner, each with the answers its facts have: the facts'
    own subjects, then the built-in facts' (countries, cities, landmarks, elements), in order. ``builtin``: the
    built-in facts, where the caller has read them already."""
    pool: dict[str, tuple[str, set[str]]] = {}
    for f in [*facts, *(builtin_facts() if builtin is None else builtin)]:
        if f.subject:
            pool.setdefault(f.subject.lower(), (f.subject, set()))[1].add(f.answer.strip().lower())
    return list(pool.values())


def _find_subject(prompt: str, pool: list[str]) -> str | None:
    """The longest pool entity the prompt contains as whole words, if any."""
    hits = [e for e, _ in pool if re.search(rf"(?<!\w){re.escape(e)}(?!\w)", prompt)]
    return max(hits, key=len) if hits else None


_NAME = re.compile(r"[A-Z][\w'.-]*(?:\s+(?:of\s+|the\s+|de\s+)?[A-Z][\w'.-]*)*")


def _guess_subject(prompt: str) -> str | None:
    """The longest run of capitalised words (a name: "Great Wall", "Leonardo da Vinci" keeps "Leonardo"),
    a sentence-initial article dropped; None if the prompt has no capitalised word."""
    names = [re.sub(r"^(The|A|An)\s+", "", m.group(0)) for m in _NAME.finditer(prompt)]
    names = [n for n in names if n and n not in ("The", "A", "An")]
    return max(names, key=len) if names else None


def _entity_swap(tokenizer, f: Fact, ids: list[int], pool: list[tuple[str, set[str]]]):
    """``f``'s prompt with its subject replaced by the first pool entity that keeps the token count and
    has no fact with ``f``'s answer (swapping France for Germany in "... is a country in" keeps Europe)."""
    low, answer = f.subject.lower(), f.answer.strip().lower()
    for e, answers in pool:
        if e.lower() in low or low in e.lower() or answer in answers:
            continue
        cprompt = f.prompt.replace(f.subject, e)
        cids = _encode(tokenizer, cprompt)
        if len(cids) == len(ids):
            return cprompt, cids, e
    return None


def _spaced(prompt: str | None, answer: str | None) -> str | None:
    if answer and prompt and prompt[-1].isascii() and prompt[-1].isalnum() and answer[0].isascii() \
            and answer[0].isalnum():
        return " " + answer
    return answer


def _leading_space(answer: str | None) -> str | None:
    """``answer`` starting with exactly one space (an empty or all-space answer as it is)."""
    return answer if not answer or not answer.strip() else " " + answer.lstrip(" ")


def with_spaces(facts: list[Fact]) -> list[Fact]:
    """Facts in the form the model reads them, the space between prompt and answer at the start of the answer.

    * A prompt that ends in spaces loses them to its answer ("The capital of France is " and "Paris" become
      "... is" and " Paris"): a tokenizer makes the trailing space a token of its own, after which the model
      rarely sees a word (lm-evaluation-harness moves it the same way). A given corrupted prompt too.
    * An answer that follows a word with no space between them gets the space: "The capital of Canada is" and
      "Ottawa" mean " Ottawa", the token the model predicts there, not "Ottawa" glued to "is" (the same
      convention as lm-evaluation-harness's target delimiter). Only ASCII letters and digits count as a word's
      end and start, so "2+2=" and "4", or a Japanese prompt and answer, are left as written.

    Warns how many facts each rule changed.
    """
    out, moved, spaced = [], [], []
    for f in facts:
        g = f
        if f.prompt.endswith(" ") and f.prompt.strip():
            g = replace(g, prompt=f.prompt.rstrip(" "), answer=_leading_space(f.answer),
                        corrupted_prompt=f.corrupted_prompt.rstrip(" ") if f.corrupted_prompt else f.corrupted_prompt,
                        corrupted_answer=_leading_space(f.corrupted_answer))
            moved.append(f)
        answer = _spaced(g.prompt, g.answer)
        corrupted = _spaced(g.corrupted_prompt or g.prompt, g.corrupted_answer)
        if (answer, corrupted) != (g.answer, g.corrupted_answer):
            g = replace(g, answer=answer, corrupted_answer=corrupted)
            spaced.append(f)
        out.append(g)
    if moved:
        warnings.warn(f"{len(moved)} of {len(facts)} facts have a prompt that ends in a space (e.g. "
                      f"{moved[0].prompt!r}); the space is read as the start of the answer, as the model would "
                      "predict it", stacklevel=3)
    if spaced:
        warnings.warn(f"{len(spaced)} of {len(facts)} facts have an answer with no space before it after a prompt "
                      f"that ends in a word (e.g. {spaced[0].answer!r} after {spaced[0].prompt!r}); read with the "
                      "space, as the model would predict it", stacklevel=3)
    return out


def _check_fields(f: Fact, where: str) -> None:
    """Each field of ``f`` a non-empty string (the optional ones, or None), its subject inside its prompt: as a facts
    file's lines are read and as ``check_facts`` takes facts built in Python."""
    for key in FIELDS:
        value = getattr(f, key)
        if (value is not None or key in REQUIRED) and (not isinstance(value, str) or not value.strip()):
            raise WorkbenchError(f"{where}: {key!r} must be a non-empty string, got {value!r}")
    if f.subject and f.subject not in f.prompt:
        raise WorkbenchError(f"{where}: subject {f.subject!r} does not occur in the prompt")


def check_facts(facts) -> list[Fact]:
    """``facts`` as a non-empty list of :class:`Fact` (a generator is read here, once); one Fact in place of a
    list, a dict (a fact's JSON object) or anything else is a one-line error naming it."""
    if isinstance(facts, Fact):
        raise WorkbenchError("facts must be a list of Fact, not one Fact: wrap it in a list")
    if isinstance(facts, (str, dict)) or not isinstance(facts, Iterable):
        raise WorkbenchError(f"facts must be a list of Fact, not {type(facts).__name__}"
                             + (" (parse_facts reads JSON Lines)" if isinstance(facts, str) else ""))
    facts = list(facts)
    if not facts:
        raise WorkbenchError("no facts given (the fact list is empty)")
    for i, f in enumerate(facts):
        if not isinstance(f, Fact):
            raise WorkbenchError(f"fact {i} is a {type(f).__name__}, not a Fact"
                                 + (": build it with Fact(**d), or read a file with read_facts"
                                    if isinstance(f, dict) else ""))
        _check_fields(f, f.origin or f"fact {i}")  # (built in a notebook, corrupted_prompt=5 failed in the tokenizer)
    seen: dict[tuple[str, str], int] = {}
    repeats = [(i, seen.setdefault((f.prompt, f.answer), i)) for i, f in enumerate(facts)]
    repeats = [(i, j) for i, j in repeats if i != j]
    if repeats:
        i, j = repeats[0]
        where = facts[i].origin or f"fact {i}"
        warnings.warn(f"{len(repeats)} fact(s) repeat an earlier one's prompt and answer (first: {where}, as "
                      f"{facts[j].origin or f'fact {j}'}): each copy counts again in every mean, and gap_z takes the "
                      "copies for independent facts", stacklevel=3)
    return facts


def prepare(tokenizer, facts: list[Fact], model: nn.Module | None = None) -> list[Prepared]:
    """Tokenise facts and choose each one's corrupted prompt (given, swapped subject, a word swapped for its
    neighbour, swapped entity, or mean baseline).

    Facts without a subject first get one (and a relation) from :func:`infer_templates`. The space between a
    prompt and its answer is read as the start of the answer (:func:`with_spaces`). ``model`` (the causal LM
    the facts are for) enables the neighbour swap (:func:`neighbour_swap`) and the check that every prompt fits
    its context.

    Every fact is checked before any is run: a prompt that gives no tokens or does not fit the context, a
    corrupted prompt of another length than the prompt or of the same tokens, and a given corrupted answer that
    starts with the answer's token (their logit difference would be 0 in every run) are one-line errors naming the
    fact. A corrupted answer chosen here (swap partner, neighbour, runner-up) never starts with the answer's token.
    """
    out = []
    facts = with_spaces(check_facts(facts))
    inferred = infer_templates(facts)
    pool = builtin = None
    encoded: dict[str, list[int]] = {}  # built-in prompts tokenised once, for every fact that looks for a partner
    flags = [a is not b for a, b in zip(facts, inferred)]
    facts = inferred
    prompts = [_encode(tokenizer, f.prompt) for f in facts]
    given = _check_prompts(tokenizer, facts, prompts, context_length(getattr(model, "config", None)))
    # each answer once: the swap search reads them
    answers = [_first_token(tokenizer, f.prompt, f.answer, ids) for f, ids in zip(facts, prompts)]
    given_answers = [_first_token(tokenizer, f.corrupted_prompt or f.prompt, f.corrupted_answer)
                     if f.corrupted_answer else None for f in facts]
    blank = [i for i, (f, a) in enumerate(zip(facts, answers))
             if f.answer.strip() and not tokenizer.decode([a]).strip()]
    if blank:  # "  Paris" (two spaces): scored on a lone space token, which every answer could start with
        f = facts[blank[0]]
        warnings.warn(f"{len(blank)} of {len(facts)} facts have an answer whose first token is whitespace only (e.g. "
                      f"{f.answer!r} after {f.prompt!r}: {tokenizer.decode([answers[blank[0]]])!r}); facts are scored "
                      "by that token, not the word: one space before the word is what the model predicts",
                      stacklevel=2)
    # '"Paris"' after a space: scored on the quote token, which any quoted answer starts with; likewise a given
    # corrupted answer such as "  Tokyo"
    marks = [(i, f.answer, a) for i, (f, a) in enumerate(zip(facts, answers)) if i not in blank]
    marks += [(i, f.corrupted_answer, c) for i, (f, c) in enumerate(zip(facts, given_answers)) if c is not None]
    marks = [(i, text, t) for i, text, t in marks
             if any(ch.isalnum() for ch in text)
             and not any(ch.isalnum() or ch == "\ufffd" for ch in tokenizer.decode([t]))]
    if marks:
        i, text, t = marks[0]
        warnings.warn(f"{len(marks)} answer(s) or corrupted answer(s) start with a token of no letter or digit (e.g. "
                      f"{text!r} of {_named(facts[i], i)}: {tokenizer.decode([t])!r}); facts are scored by that first "
                      "token, not the word", stacklevel=2)
    for i, (f, c) in enumerate(zip(facts, given_answers)):
        if c == answers[i]:
            raise WorkbenchError(f"{_named(f, i)}: the answer {f.answer!r} and the corrupted answer "
                                 f"{f.corrupted_answer!r} start with the same token {tokenizer.decode([c])!r}, and "
                                 "facts are scored by that first token (their logit difference would always be 0); "
                                 "give a corrupted answer that starts differently")
    for i, f in enumerate(facts):
        ids = prompts[i]
        answer = answers[i]
        corr_ans = given_answers[i]
        source = "given" if corr_ans is not None else None
        if f.corrupted_prompt:
            out.append(Prepared(f, ids, given[i], answer, corr_ans, "given", f.corrupted_prompt, source))
            continue
        swap = _swap(tokenizer, facts, i, ids, answers)
        if swap is None:
            builtin = builtin_facts() if builtin is None else builtin
            borrowed = _builtin_swap(tokenizer, f, ids, answer, builtin, encoded)
            if borrowed is not None:
                cprompt, cids, ans, template = borrowed
                if corr_ans is None:
                    corr_ans, source = ans, "swap"
                out.append(Prepared(f, ids, cids, answer, corr_ans, "swap", cprompt, source,
                                    extra={"partner": "built-in", "template": template}))
                continue
            pool = entity_pool(facts, builtin) if pool is None else pool
            extra = {}
            if not f.subject:
                found, how = _find_subject(f.prompt, pool), "entity list"
                near = neighbour_swap(model, tokenizer, ids, answer) \
                    if model is not None and not found and corr_ans is None else None
                if near is not None:
                    cids, corr_ans, was, now, sim = near
                    out.append(Prepared(f, ids, cids, answer, corr_ans, "neighbour",
                                        tokenizer.decode(cids, skip_special_tokens=True),
                                        "neighbour", extra={"swapped_word": [was, now], "similarity": round(sim, 3)}))
                    continue
                if not found:
                    found, how = _guess_subject(f.prompt), "capitalised words"
                if found:
                    f, extra = replace(f, subject=found), {"subject_from": how}
            ent = _entity_swap(tokenizer, f, ids, pool) if f.subject else None
            if ent is None:
                out.append(Prepared(f, ids, None, answer, corr_ans, "mean", None, source))
            else:
                out.append(Prepared(f, ids, ent[1], answer, corr_ans, "entity", ent[0], source,
                                    extra={**extra, "swapped_entity": ent[2]}))
            continue
        cprompt, cids, swapped = swap
        if corr_ans is None:
            corr_ans, source = swapped, "swap"
        out.append(Prepared(f, ids, cids, answer, corr_ans, "swap", cprompt, source))
    for p, flag in zip(out, flags):
        if flag:
            p.extra["inferred"] = {"relation": p.fact.relation, "subject": p.fact.subject}
    return out


def _check_prompts(tokenizer, facts: list[Fact], prompts: list[list[int]], limit: int | None) -> list[list[int] | None]:
    """Each fact's given corrupted prompt in token ids (None where there is none), after checking every fact's
    prompts: tokens there, within the model's context ``limit``, the corrupted prompt as long as the prompt and not
    the same tokens. A one-line error names the first fact that fails."""
    out = []
    for i, (f, ids) in enumerate(zip(facts, prompts)):
        if not ids:
            raise WorkbenchError(f"{_named(f, i)}: the prompt has no tokens")
        if limit is not None and len(ids) > limit:
            raise WorkbenchError(f"{_named(f, i)}: the prompt has {len(ids)} tokens, more than the model's context of "
                                 f"{limit}; shorten it (a fact is not truncated: that would cut off its subject)")
        cids = _encode(tokenizer, f.corrupted_prompt) if f.corrupted_prompt else None
        if cids is not None and len(cids) != len(ids):
            raise WorkbenchError(f"{_named(f, i)}: the corrupted prompt has {len(cids)} tokens, the prompt "
                                 f"{len(ids)}; they must be equally long")
        if cids is not None and cids == ids:
            raise WorkbenchError(f"{_named(f, i)}: the corrupted prompt is the prompt (the same tokens): nothing is "
                                 "corrupted")
        out.append(cids)
    return out


# Function words (NLTK's English stop words, less the contractions, and "us"): a neighbour swap changes a content word,
# and a function word is no counterfactual answer ("The capital of Moroccan is" -> " the").
STOPWORDS = frozenset("""a about above after again against all am an and any are as at be because been before being
below between both but by can did do does doing don down during each few for from further had has have having he her
here hers herself him himself his how i if in into is it its itself just me more most my myself no nor not now of
off on once only or other our ours ourselves out over own same she should so some such than that the their theirs
them themselves then there these they this those through to too under until up very was we were what when where
which while who whom why will with you your yours yourself yourselves us""".split())
_ALPHA_WORD = re.compile(r" ?[A-Za-z]{2,}")
NEIGHBOURS = 16  # candidate replacements per word, nearest first


def _word(text: str) -> bool:
    """A token text that is a content word (letters only, its leading space allowed, no stop word)."""
    return bool(_ALPHA_WORD.fullmatch(text)) and text.strip().lower() not in STOPWORDS


@torch.no_grad()
def neighbour_swap(model: nn.Module, tokenizer, ids: list[int], answer: int, neighbours: int = NEIGHBOURS,
                   batch_size: int = 64):
    """A corrupted prompt for a fact with no partner: one of its words swapped for a neighbour that changes what
    the model predicts (symmetric token replacement, with the replacement chosen by the model).

    Candidates: each whole-word content token of the prompt (a token that starts and ends a word, no stop word)
    replaced by its ``neighbours`` nearest tokens by cosine similarity of the model's input embeddings (same
    leading space and capitalisation, letters only: "foot" -> "hand", "finger"; "Thursday" -> "Monday"). One
    forward of the prompt and all candidates; the chosen one is the most similar replacement after which the
    model's top token ``c`` is a content word other than the answer (another spelling of it included) that starts
    a word where the answer does (not the rest of a swapped-in word piece: "zero deg" -> "rees"), which the clean
    prompt ranks below the answer: the two runs disagree on the pair (answer, ``c``), and ``c`` is the
    corrupted answer. Returns (corrupted ids, ``c``, the word, its replacement, their similarity), or None.
    """
    from workbench.interventions import token_texts

    texts = token_texts(tokenizer, ids)
    embed = model.get_input_embeddings().weight
    norms = torch.linalg.vector_norm(embed, dim=-1, dtype=torch.float32).clamp(min=1e-12)
    rows, meta = [], []
    for p, (t, text) in enumerate(zip(ids, texts)):
        starts = p == 0 or text.startswith(" ") or not texts[p - 1][-1:].isalnum()
        ends = p == len(ids) - 1 or not texts[p + 1][:1].isalnum()
        if not (_word(text) and starts and ends):
            continue
        sims = (embed @ embed[t]).float() / (norms * norms[t])  # cosine, in the embeddings' dtype (no float copy)
        sims[t] = -2
        order = sims.topk(min(neighbours * 8, sims.numel())).indices.tolist()
        kept = 0
        for n, ntext in zip(order, token_texts(tokenizer, order)):
            if (ntext[:1] == " ") != (text[:1] == " ") or not _word(ntext) or ntext.strip().lower() == \
                    text.strip().lower() or ntext.strip()[0].isupper() != text.strip()[0].isupper():
                continue
            rows.append(ids[:p] + [n] + ids[p + 1:])
            meta.append((float(sims[n]), text.strip(), ntext.strip()))
            kept += 1
            if kept == neighbours:
                break
    if not rows:
        return None
    grid = [ids] + rows
    logits = torch.cat([model(input_ids=torch.tensor(grid[i:i + batch_size], device=embed.device)).logits[:, -1]
                        .float() for i in range(0, len(grid), batch_size)]).cpu()
    clean, tops = logits[0], logits[1:].argmax(-1).tolist()
    distinct = sorted({answer, *tops})
    read = dict(zip(distinct, token_texts(tokenizer, distinct)))
    answer_text = read[answer]
    for r in sorted(range(len(rows)), key=lambda r: -meta[r][0]):  # the most similar first (ties: candidate order)
        top, text = tops[r], read[tops[r]]
        if top != answer and clean[top] < clean[answer] and _word(text) and \
                text.strip().lower() != answer_text.strip().lower() and (text[:1] == " ") == (answer_text[:1] == " "):
            sim, was, now = meta[r]
            return rows[r], top, was, now, sim
    return None


def _builtin_swap(tokenizer, f: Fact, ids: list[int], answer: int, builtin: list[Fact],
                  encoded: dict[str, list[int]] | None = None):
    """A swap partner among the built-in facts, for a fact with none among its own: the first whose prompt
    shares a template with ``f``'s (differs in one span, :func:`_span`'s rule: "The chemical symbol for calcium
    is" and "... for gold is"), has as many tokens and another answer token. (Its prompt, ids, answer id and
    the template), or None. The entity swap takes a subject from them too, but keeps no answer to contrast.
    ``encoded``: built-in prompts' ids already known (filled in here), shared across the facts of one call."""
    encoded = {} if encoded is None else encoded
    words = _WORD.findall(f.prompt)
    for g in builtin:
        hit = _span(words, _WORD.findall(g.prompt))
        if hit is None:
            continue
        if g.prompt not in encoded:
            encoded[g.prompt] = _encode(tokenizer, g.prompt)
        cids = encoded[g.prompt]
        if len(cids) != len(ids):
            continue
        corrupted = _first_token(tokenizer, g.prompt, g.answer, cids)
        if corrupted != answer:
            return g.prompt, list(cids), corrupted, hit[0]  # (a copy: the cache keeps its own)
    return None


def _swap(tokenizer, facts: list[Fact], i: int, ids: list[int], answers: list[int]):
    """A swap partner among the facts: the first later fact (then earlier, wrapping) of ``f``'s relation with
    another subject whose subject in ``f``'s prompt keeps the token count and whose answer, as it follows that
    corrupted prompt, starts with another token than ``f``'s. (The corrupted prompt, its ids and that answer token),
    or None."""
    f = facts[i]
    if not (f.subject and f.relation):
        return None
    n = len(facts)
    for k in range(1, n):
        g = facts[(i + k) % n]
        if g.relation != f.relation or not g.subject or g.subject == f.subject:
            continue
        if answers[(i + k) % n] == answers[i]:
            continue
        cprompt = f.prompt.replace(f.subject, g.subject)
        cids = _encode(tokenizer, cprompt)
        if len(cids) != len(ids):
            continue
        corrupted = _first_token(tokenizer, cprompt, g.answer, cids)  # in context: a tokenizer may merge differently
        if corrupted != answers[i]:
            return cprompt, cids, corrupted
    return None


@dataclass
class Batch:
    index: list[int]  # positions in the prepared list
    ids: torch.Tensor  # [B, T], right-padded
    corrupted_ids: torch.Tensor  # [B, T]; the clean prompt where the baseline is the mean
    last: torch.Tensor  # [B] position of the last real token
    answer: torch.Tensor  # [B]
    corrupted_answer: torch.Tensor  # [B]
    mean: torch.Tensor  # [B] bool, mean-ablation baseline
    valid: torch.Tensor  # [B, T] bool, real tokens
    weight: torch.Tensor | None = None  # [B]: each fact's weight in the attributed metric (None: 1 each)

    def weighted(self, values: torch.Tensor) -> torch.Tensor:
        """The metric ``values [B]`` summed over the batch's facts, each times its weight."""
        return (values if self.weight is None else values * self.weight.to(values.dtype)).sum()


def batches(prepared: list[Prepared], batch_size: int, pad_id: int = 0,
            device: torch.device | str | None = None) -> list[Batch]:
    """Batches of similar length (sorted by length, stable), right-padded, on ``device`` (the model's; None: the
    CPU). Causal attention means padding after the last real token changes nothing at or before it."""
    if batch_size < 1:
        raise WorkbenchError(f"batch size must be >= 1, got {batch_size}")
    order = sorted(range(len(prepared)), key=lambda i: len(prepared[i].ids))
    out = []
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        ids, valid = padded([prepared[i].ids for i in idx], pad_id)
        cids, _ = padded([prepared[i].corrupted_ids if prepared[i].corrupted_ids is not None else prepared[i].ids
                          for i in idx], pad_id)
        tensors = (ids, cids, torch.tensor([len(prepared[i].ids) - 1 for i in idx]),
                   torch.tensor([prepared[i].answer_id for i in idx]),
                   torch.tensor([prepared[i].corrupted_answer_id if prepared[i].corrupted_answer_id is not None else -1
                                 for i in idx]),
                   torch.tensor([prepared[i].corrupted_ids is None for i in idx]), valid.bool())
        if device is not None:
            tensors = tuple(t.to(device) for t in tensors)
        out.append(Batch(idx, *tensors))
    return out


def pad_id(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, attr, None)
        if v is not None:
            return int(v)
    return 0


def fill_runner_up(prepared: list[Prepared], index: list[int], logits: torch.Tensor) -> None:
    """Set missing corrupted answers to the clean model's best token other than the answer."""
    for b, i in enumerate(index):
        p = prepared[i]
        if p.corrupted_answer_id is None:
            top2 = torch.topk(logits[b], 2).indices.tolist()
            p.corrupted_answer_id = top2[1] if top2[0] == p.answer_id else top2[0]
            p.corrupted_answer_source = "runner_up"
