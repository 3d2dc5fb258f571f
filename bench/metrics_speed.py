"""The study metrics (workbench/metrics.py, workbench/tasks.py) against the plain loops they replace, side by side.

Each round times, on the same model and inputs, the batched way the workbench runs a metric and the way one
would write it with a model and a loop (and the way the workbench ran it before): multiple choice with one full
forward of prompt + option per option, greedy generation one prompt at a time, per-text metrics one text at a
time. It also prints the largest difference between the two results (log-probabilities, or how many
generations differ), so a speed-up that changed an answer shows.

    .venv/bin/python bench/metrics_speed.py smollm2-135m --repeat 3
    .venv/bin/python bench/metrics_speed.py zoo:qwen3-moe --repeat 5
"""

from __future__ import annotations

import statistics
import time

from bench_cli import run
from workbench.args import COUNT, Parser


def main() -> None:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default="smollm2-135m")
    p.add_argument("--repeat", type=COUNT, default=3)
    p.add_argument("--threads", type=COUNT, default=2)
    p.add_argument("--batch", type=COUNT, default=8)
    p.add_argument("--texts", type=COUNT, default=48, help="built-in texts for the per-text metrics")
    p.add_argument("--new-tokens", type=COUNT, default=20)
    args = p.parse_args()

    import torch

    from workbench import metrics as M
    from workbench import tasks as T
    from workbench.data import default_prompts
    from workbench.models.specs import load

    torch.set_num_threads(args.threads)
    lm = load(args.model)
    tok = lm.tokenizer
    cloze = M.default_cloze()
    tasks = {name: T.items(name) for name in ("override", "label_copy", "recall")}
    texts = default_prompts()[:args.texts]
    gen_prompts = default_prompts()[args.texts:args.texts + 12]

    @torch.no_grad()
    def per_option(items) -> list[list[float]]:
        out = []
        for c in items:
            prompt = tok(c.prompt)["input_ids"]
            sums = []
            for opt in c.options:
                o = tok(opt, add_special_tokens=False)["input_ids"]
                logits = lm.model(input_ids=torch.tensor([prompt + o], device=lm.device)).logits[0]
                lp = torch.log_softmax(logits.float(), -1)
                sums.append(float(sum(lp[len(prompt) + i - 1, t] for i, t in enumerate(o))))
            out.append(sums)
        return out

    @torch.no_grad()
    def one_by_one(prompts) -> list[str]:
        out = []
        for q in prompts:
            ids = tok(q, return_tensors="pt").input_ids.to(lm.device)
            g = lm.model.generate(ids, max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
            out.append(tok.decode(g[0, ids.shape[1]:], skip_special_tokens=True))
        return out

    want = {"perplexity", "massive", "kl"}
    cases = {f"choice: {name} ({len(items)} items)": (lambda items=items: per_option(items),
                                                      lambda items=items: T.option_logprobs(lm, items, args.batch))
             for name, items in [("cloze", cloze), *tasks.items()]}
    cases[f"generations ({len(gen_prompts)} prompts, {args.new_tokens} tokens)"] = (
        lambda: one_by_one(gen_prompts), lambda: M.generations(lm, gen_prompts, args.new_tokens, args.batch))
    cases[f"per-text metrics ({len(texts)} texts)"] = (
        lambda: [M.text_metrics(lm, [t], want, batch_size=1)[0]["perplexity"][0] for t in texts],
        lambda: M.text_metrics(lm, texts, want, batch_size=args.batch)[0]["perplexity"])

    print(f"{args.model}, {args.threads} threads, batches of {args.batch}, median of {args.repeat} interleaved rounds")
    print(f"{'metric':44s} {'loop s':>8s} {'batched s':>9s} {'ratio':>6s}  agreement")
    for name, (loop, batched) in cases.items():
        a, b = loop(), batched()  # warm, and the results compared
        times = {"loop": [], "batched": []}
        for r in range(args.repeat):
            order = (("loop", loop), ("batched", batched))
            for key, fn in order if r % 2 == 0 else order[::-1]:
                t = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - t)
        if isinstance(a[0], str):
            agree = f"{sum(x != y for x, y in zip(a, b))} of {len(a)} texts differ"
        elif isinstance(a[0], list):
            agree = f"max |log-prob diff| {max(abs(x - y) for u, v in zip(a, b) for x, y in zip(u, v)):.1e}, " \
                    f"{sum(u.index(max(u)) != v.index(max(v)) for u, v in zip(a, b))} answers differ"
        else:
            agree = f"max relative perplexity diff {max(abs(x - y) / abs(x) for x, y in zip(a, b) if x == x):.1e}"
        lo, ba = statistics.median(times["loop"]), statistics.median(times["batched"])
        print(f"{name:44s} {lo:8.2f} {ba:9.2f} {lo / ba:5.1f}x  {agree}", flush=True)


if __name__ == "__main__":
    run(main)
