"""How close is ``smollm2-moe`` to SmolLM2? Perplexity and facts, dense vs MoE at each top-k, one run.

    python bench/smollm2_moe_quality.py [--top-k 2,4,8,12,16]

Held-out text: the 380 built-in prompts (``workbench/data/prompts.txt``), token-level perplexity; the
MoEfication script never saw them (it trains on SmolLM2's samples and Python's standard library).
Facts: of the built-in facts SmolLM2 answers right at top-1 (first answer token is the argmax), the
share the MoE still answers right. Cloze: accuracy on the built-in 4-way cloze items.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_cli import run  # noqa: E402
from workbench.args import COUNT, NumberList, Parser  # noqa: E402
from circuits.facts import builtin_facts  # noqa: E402
from workbench.data import default_prompts  # noqa: E402
from workbench.metrics import _batches, cloze_accuracy, default_cloze  # noqa: E402
from workbench.models import moefy  # noqa: E402
from workbench.models.specs import LoadedModel, load  # noqa: E402


@torch.no_grad()
def perplexity(lm, texts) -> float:
    nll, n = 0.0, 0
    for _, ids, mask in _batches(lm, texts, 16):
        lp = torch.log_softmax(lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float(), -1)
        tok_lp = lp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
        m = mask[:, 1:].bool()
        nll -= float(tok_lp[m].sum())
        n += int(m.sum())
    return math.exp(nll / n)


@torch.no_grad()
def fact_hits(lm, facts) -> list[bool]:
    hits = []
    for f in facts:
        ids = torch.tensor([lm.tokenizer(f.prompt)["input_ids"]])
        answer = lm.tokenizer(f.prompt + f.answer)["input_ids"][ids.shape[1]]
        hits.append(int(lm.model(input_ids=ids, use_cache=False).logits[0, -1].argmax()) == answer)
    return hits


def main() -> None:
    ap = Parser(description=__doc__.splitlines()[0])
    ap.add_argument("--top-k", type=NumberList(COUNT), default="2,4,8,12,16",
                    help="comma-separated top-k values, each 1 to the experts of smollm2-moe")
    args = ap.parse_args()
    meta = moefy.read_parts()[1]
    if max(args.top_k) > meta["experts"]:
        ap.error(f"argument --top-k: each must be at most {meta['experts']}, the experts of smollm2-moe; "
                 f"got {max(args.top_k)}")
    torch.manual_seed(0)
    dense = load("smollm2-135m")
    texts, facts, cloze = default_prompts(), builtin_facts(), default_cloze()
    t0 = time.time()
    base_ppl, base_hits = perplexity(dense, texts), fact_hits(dense, facts)
    base_cloze = sum(cloze_accuracy(dense, cloze)) / len(cloze)
    right = [i for i, h in enumerate(base_hits) if h]
    n = (dense.config.intermediate_size - meta["shared"]) // meta["experts"]
    print(f"held-out text: {len(texts)} prompts; facts SmolLM2 gets right at top-1: {len(right)}/{len(facts)}; "
          f"cloze items: {len(cloze)}  (dense pass {time.time() - t0:.0f} s)")
    print(f"{'model':<18} {'active neurons':>14} {'perplexity':>10} {'x dense':>8} {'facts kept':>10} {'cloze':>6}")
    print(f"{'smollm2-135m':<18} {'1536 (100%)':>14} {base_ppl:>10.2f} {1.0:>8.2f} {'100%':>10} {base_cloze:>6.2f}")
    for k in args.top_k:
        moe = LoadedModel(moefy.assemble(dense.model, k), dense.tokenizer, dense.adapter, f"smollm2-moe:top{k}")
        ppl = perplexity(moe, texts)
        hits = fact_hits(moe, [facts[i] for i in right])
        acc = sum(cloze_accuracy(moe, cloze)) / len(cloze)
        active = meta["shared"] + k * n
        print(f"{'smollm2-moe:top' + str(k):<18} {f'{active} ({100 * active / 1536:.0f}%)':>14} {ppl:>10.2f} "
              f"{ppl / base_ppl:>8.2f} {100 * sum(hits) / len(hits):>9.0f}% {acc:>6.2f}", flush=True)


if __name__ == "__main__":
    run(main)
