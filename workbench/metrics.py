"""Per-prompt metrics for ablation studies: each returns one value per prompt, so conditions get a
mean and a confidence interval over prompts (and seeds).

* ``perplexity``: exp of the mean next-token negative log-likelihood of each text;
* ``accuracy``: multiple-choice cloze (built-in capitals and arithmetic): the option with the highest
  summed log-probability wins; 1 or 0 per item;
* ``sink``: mean share of attention on position 0 (layers x heads x queries >= 1) per text;
* ``massive``: the largest |residual| at any decoder layer's output per text;
* ``kl``: mean over positions of KL(baseline || condition) of the next-token distribution;
* ``generations``: greedy continuations of a few prompts (text, no statistic);
* ``passkey``, ``override``, ``label_copy`` (tasks that read the context) and ``recall`` (stored facts):
  built-in multiple-choice items scored by log-probability, 1 or 0 per item (:mod:`workbench.tasks`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Sequence

import torch
import torch.nn.functional as F

from workbench.data import DATA_DIR
from workbench.errors import WorkbenchError
from workbench.tasks import choice_scores
from workbench.tracing.runner import batch_members, pad_token, padded

METRICS = ("perplexity", "accuracy", "sink", "massive", "kl", "generations", "passkey", "override", "label_copy",
           "recall")
SHARE_METRICS = ("accuracy", "passkey", "override", "label_copy", "recall")  # 1 or 0 per item: Wilson intervals
# what a metric's value can be, per text: its interval is cut to it (a t interval of perplexities that vary a lot
# reaches below 1, one of KLs near 0 below 0)
METRIC_RANGE = {"perplexity": (1.0, math.inf), "sink": (0.0, 1.0), "massive": (0.0, math.inf), "kl": (0.0, math.inf)}
DEFAULT_METRICS = METRICS[:6]  # the task metrics are asked for by name (they cost more: passkey reads 1,000 tokens)


@dataclass(frozen=True)
class ClozeItem:
    prompt: str
    options: tuple[str, ...]
    answer: int
    task: str = ""


def default_cloze() -> list[ClozeItem]:
    items = []
    for line in (DATA_DIR / "cloze.jsonl").read_text().splitlines():
        d = json.loads(line)
        items.append(ClozeItem(d["prompt"], tuple(d["options"]), int(d["answer"]), d.get("task", "")))
    return items


def token_ids(lm, texts: Sequence[str], what: str = "text", room: int = 0) -> tuple[list[list[int]], int]:
    """Each text's token ids, cut to the model's context less ``room`` positions (the tokens generated after it),
    and how many were cut (the caller warns: a study does, once). A text that tokenizes to nothing is refused,
    named as ``what``."""
    ids = [lm.tokenizer(t)["input_ids"] for t in texts]
    for i, x in enumerate(ids):
        if not x:
            raise WorkbenchError(f"{what} {i} ({texts[i]!r}) tokenizes to nothing")
    limit = lm.context_length
    if limit is None:
        return ids, 0
    if limit - room < 1:
        raise WorkbenchError(f"{room} new tokens leave no room for a {what} in the model's context of {limit} "
                             "positions")
    return [x[: limit - room] for x in ids], sum(len(x) > limit - room for x in ids)


def _batches(lm, texts: Sequence[str], size: int, pad: int | None = None, left: bool = False, what: str = "text",
             room: int = 0):
    """Texts of similar length batched together (:func:`~workbench.tracing.runner.batch_members`: less padding):
    each batch's text indices, its input ids and attention mask, padded with ``pad`` (default: the tokenizer's pad
    id, else 0) on the right, or on the ``left``; the texts cut to the model's context less ``room``
    (:func:`token_ids`)."""
    ids, _ = token_ids(lm, texts, what, room)
    if pad is None:
        pad = pad_token(lm.tokenizer)
    for members in batch_members(torch.tensor([len(x) for x in ids], dtype=torch.int64), size):
        rows = members.tolist()
        input_ids, mask = padded([ids[i] for i in rows], pad, left=left)
        yield rows, input_ids.to(lm.device), mask.to(lm.device)


@torch.no_grad()
def text_metrics(lm, texts: Sequence[str], want: set[str], baseline_logprobs: list | None = None,
                 batch_size: int = 8, applied=None) -> tuple[dict[str, list[float]], list[torch.Tensor]]:
    """Per-text perplexity / sink / massive / kl in one pass; also returns per-text log-probs (for KL), in the
    texts' order (they run in batches of similar length). A text longer than the model's context is cut to it."""
    n = len(texts)
    out: dict[str, list[float]] = {k: [math.nan] * n for k in ("perplexity", "sink", "massive", "kl") if k in want}
    keep = "kl" in want  # a baseline keeps its log-probs only for a study that asks for kl (texts x tokens x vocab)
    logprobs: list = [None] * n if keep else []
    need_att = "sink" in want
    peaks: list[torch.Tensor] = []  # per decoder layer of the current batch: max |residual| per prompt

    def keep_peak(mod, args, output):
        hs = output[0] if isinstance(output, tuple) else output
        peaks.append(hs.detach().abs().amax(-1))  # [B, T]; read after any intervention hook on the layer

    layers = lm.adapter.decoder_layers(lm.model)
    # the layers whose "attentions" are softmax probabilities: MiniMax's lightning layers hand out a [B, H, T, T]
    # tensor of another kind (rows summing to ~0.03), which halved the sink share averaged in
    softmax = [i for i, layer in enumerate(layers) if lm.adapter.has_attention(layer)]
    handles = [layer.register_forward_hook(keep_peak) for layer in layers] if "massive" in want else []
    try:
        for rows, input_ids, mask in _batches(lm, texts, batch_size):
            if applied is not None:  # number the texts, for prompt-scoped interventions
                applied.set_prompts(rows)
            peaks.clear()
            res = lm.model(input_ids=input_ids, attention_mask=mask, use_cache=False, output_attentions=need_att)
            att = res.attentions
            if att is not None and len(att) == len(layers):
                att = [att[i] for i in softmax]
            _collect(out, logprobs if keep else None, rows, input_ids, mask, res.logits, att, peaks)
    finally:
        for h in handles:
            h.remove()
        if applied is not None:
            applied.set_prompts(None)
    if "kl" in out:
        out["kl"] = []
        if baseline_logprobs is not None:
            for base, cond in zip(baseline_logprobs, logprobs):
                # per position >= 0 (a KL is; an unchanged distribution gave -5e-8 from rounding)
                kl = F.kl_div(cond, base, log_target=True, reduction="none").sum(-1).clamp_min(0)
                out["kl"].append(float(kl.mean()))
    return out, logprobs


def _collect(out, logprobs, rows, input_ids, mask, logits, attentions, layer_peaks) -> None:
    lp = torch.log_softmax(logits.float(), -1)
    for r, i in enumerate(rows):
        n = int(mask[r].sum())
        if "perplexity" in out:
            nll = -lp[r, : n - 1].gather(1, input_ids[r, 1:n, None]).mean() if n > 1 else torch.tensor(math.nan)
            out["perplexity"][i] = float(torch.exp(nll))
        if "sink" in out:
            shares = [a[r, :, 1:n, 0].double().mean() for a in attentions if a is not None] if n > 1 else []
            out["sink"][i] = float(torch.stack(shares).mean()) if shares else math.nan
        if "massive" in out:
            out["massive"][i] = float(max(p[r, :n].max() for p in layer_peaks))
        if logprobs is not None:
            logprobs[i] = lp[r, :n].cpu()


def cloze_accuracy(lm, items: Sequence[ClozeItem], batch_size: int = 8) -> list[float]:
    """1 or 0 per item: whether the right option has the highest summed log-probability after the prompt
    (:func:`workbench.tasks.choice_scores`: each prompt runs once, its options continue from its KV cache)."""
    return choice_scores(lm, items, batch_size)


@torch.no_grad()
def generations(lm, prompts: Sequence[str], max_new_tokens: int = 20, batch_size: int = 8) -> list[str]:
    """Greedy continuations, in the prompts' order. Prompts of similar length are generated together, padded on
    the left (each token at the position it has alone; a scoped intervention counts positions among real tokens),
    so a continuation is the prompt's own up to float error in the batched matmuls: on a near-tie between the top
    two tokens (below ~1e-5 of a logit) a batch may take the other one. A prompt is cut to leave room for the new
    tokens in the model's context."""
    tok = lm.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out: list[str] = [""] * len(prompts)
    for rows, input_ids, mask in _batches(lm, prompts, batch_size, pad if pad is not None else 0, left=True,
                                          what="generation prompt", room=max_new_tokens):
        gen = lm.model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                do_sample=False, pad_token_id=pad)
        for r, i in enumerate(rows):
            out[i] = tok.decode(gen[r, input_ids.shape[1]:], skip_special_tokens=True)
    return out


def t_quantile(p: float, df: int) -> float:
    """Student's t quantile: the t with P(T <= t) = ``p`` for ``df`` >= 1 degrees of freedom (0.5 < p < 1).

    Solved by bisection on the distribution's exact CDF, which for whole ``df`` is a finite sum in
    theta = atan(t / sqrt(df)) (Abramowitz & Stegun 26.7.3-4); past 300 degrees the Cornish-Fisher expansion
    in 1 / df (error below 1e-9 there)."""
    if not (0.5 < p < 1) or df < 1:
        raise ValueError(f"t_quantile needs 0.5 < p < 1 and df >= 1, got p={p}, df={df}")
    if df > 300:
        z = NormalDist().inv_cdf(p)
        g = [(z ** 3 + z) / 4, (5 * z ** 5 + 16 * z ** 3 + 3 * z) / 96,
             (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / 384,
             (79 * z ** 9 + 776 * z ** 7 + 1482 * z ** 5 - 1920 * z ** 3 - 945 * z) / 92160]
        return z + sum(c / df ** (i + 1) for i, c in enumerate(g))

    def inside(theta: float) -> float:  # P(|T| <= sqrt(df) tan(theta))
        c, term, total = math.cos(theta) ** 2, 1.0, 1.0
        if df % 2:
            for j in range(1, (df - 1) // 2):
                term *= c * (2 * j) / (2 * j + 1)
                total += term
            return 2 / math.pi * (theta + (math.sin(theta) * math.cos(theta) * total if df > 1 else 0.0))
        for j in range(1, df // 2):
            term *= c * (2 * j - 1) / (2 * j)
            total += term
        return math.sin(theta) * total

    lo, hi, want = 0.0, math.pi / 2, 2 * p - 1
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if inside(mid) < want else (lo, mid)
    return math.sqrt(df) * math.tan((lo + hi) / 2)


def mean_ci(values: Sequence[float], level: float = 0.95, share: bool = False,
            bounds: tuple[float, float] = (-math.inf, math.inf)) -> tuple[float, float, float, int]:
    """Mean and a ``level`` interval (95 %) over the finite values: Student's t interval (the mean +- t(n - 1)
    standard errors; at n = 2 t is 12.7, not the normal 1.96, which made small samples' intervals several times too
    narrow), or for a ``share`` (values 0 or 1 per item: accuracy, task scores) Wilson's score interval, which stays
    within [0, 1] and is not a point for n = 1. Which one is the metric's (:data:`SHARE_METRICS`), not the values':
    a KL of exact zeros is no share. ``bounds``: the values' range (:data:`METRIC_RANGE`); the t interval is cut
    to it, since the mean of values in it lies in it too."""
    if not 0 < level < 1:
        raise ValueError(f"level must be between 0 and 1, got {level}")
    v = torch.tensor([x for x in values if x == x and math.isfinite(x)], dtype=torch.float64)
    n = int(v.numel())
    if n == 0:
        return math.nan, math.nan, math.nan, 0
    m = float(v.mean())
    if share:
        if not bool(((v == 0) | (v == 1)).all()):
            raise ValueError("a share's values are 0 or 1")
        z = NormalDist().inv_cdf((1 + level) / 2)
        c, zz = 1 + z * z / n, z * z / n
        mid, half = (m + zz / 2) / c, z * math.sqrt(m * (1 - m) / n + zz / (4 * n)) / c
        return m, 0.0 if m == 0 else max(0.0, mid - half), 1.0 if m == 1 else min(1.0, mid + half), n  # exact ends
    if n == 1:
        return m, m, m, 1
    half = t_quantile((1 + level) / 2, n - 1) * float(v.std(unbiased=True)) / math.sqrt(n)
    return m, max(bounds[0], m - half), min(bounds[1], m + half), n
