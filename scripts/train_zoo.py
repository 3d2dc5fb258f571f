"""Train the ``zoo:tiny-moe`` checkpoint on the built-in corpus.

Reproduces ``workbench/models/zoo_weights/tiny-moe.safetensors`` (and its ``tiny-moe.json`` facts):

    HF_HUB_OFFLINE=1 python scripts/train_zoo.py            # ~2.5 minutes on 2 CPU cores

``--series-dir DIR --save-every N [--save-at 10,25]`` also saves checkpoints along the way (the
``zoo:tiny-moe@STEP`` series that ``workbench routing`` compares is built so on first use).

The untrained model is built exactly as ``zoo.build("tiny-moe")`` builds it (same config, same
seed), then trained with AdamW on ``workbench/data/prompts.txt`` (one text per line, each followed
by the EOS token, packed into fixed-length blocks that each start at a line, visited in a seeded
order) with the router load-balancing auxiliary loss (per layer) so that all experts get used. To
stay fast on a CPU the softmax runs over the corpus's own token ids, plus the full vocabulary at a
few positions per step; the reported losses are over the full vocabulary. Only the needed tensors are
saved, in float16; ``lm_head.weight`` is left out because it is tied to the embedding.

After training it reloads the checkpoint (through ``workbench.models.specs.load("zoo:tiny-moe")``
when writing to the default path), prints a few greedy generations and the per-expert routing load.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Idle OpenMP threads sleep instead of spinning: with 2 threads on 2 cores, any other busy process
# otherwise makes each op wait out a scheduler slice (steps 20-40x slower). Must precede `import torch`.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from workbench.args import COUNT, COUNT_OR_OFF, Number, NumberList, Parser  # noqa: E402
from workbench.models import zoo  # noqa: E402

NAME = "tiny-moe"
CORPUS = REPO / "workbench" / "data" / "prompts.txt"
DEFAULT_OUT = zoo.WEIGHTS_DIR / f"{NAME}.safetensors"
PROMPTS = ["The capital of France is", "Once upon a time, a fox", "Bees collect nectar from"]


def build_untrained():
    """The model exactly as ``zoo.build`` makes it before loading weights (fp32, seeded)."""
    return zoo.init_model(zoo.ZOO[NAME])


def load_tokenizer():
    from transformers import AutoTokenizer

    from workbench.models.gguf import tokenizer_dir

    return AutoTokenizer.from_pretrained(tokenizer_dir())


def corpus_lines() -> list[str]:
    return [line.strip() for line in CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()]


def pack(tok, lines: list[str], block: int) -> torch.Tensor:
    """Tokenize each line and append EOS; concatenate; cut ``block``-long rows, one starting at each line.

    Every line thus opens a row once (as a prompt does at position 0) and is also seen after the
    lines before it; rows running past the end wrap around to the start of the corpus.
    """
    ids: list[int] = []
    starts: list[int] = []
    for line in lines:
        starts.append(len(ids))
        ids += tok(line, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    flat = torch.tensor(ids + ids[:block], dtype=torch.long)
    return torch.stack([flat[s:s + block] for s in starts])


def seeded_batches(n_blocks: int, batch: int, gen: torch.Generator):
    """Block indices, ``batch`` at a time, over deterministic epochs (a seeded permutation each)."""
    order: list[int] = []
    while True:
        if len(order) < batch:
            order += torch.randperm(n_blocks, generator=gen).tolist()
        idx, order = order[:batch], order[batch:]
        yield idx


def corpus_vocab(blocks: torch.Tensor, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The token ids occurring in ``blocks`` and a map from every id to its place among them (-1: absent).

    The output softmax over all 49152 tokens costs more than the rest of the model on a CPU, so the
    training loss is the cross-entropy over these ids only (the others never appear as inputs or targets).
    """
    used = torch.unique(blocks)
    remap = torch.full((vocab_size,), -1, dtype=torch.long)
    remap[used] = torch.arange(len(used))
    return used, remap


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(args) -> dict:
    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    tok = load_tokenizer()
    lines = corpus_lines()
    blocks = pack(tok, lines, args.block)
    n_tokens = sum(len(tok(line, add_special_tokens=False)["input_ids"]) + 1 for line in lines)
    print(f"corpus: {len(lines)} lines, {n_tokens} tokens; {len(blocks)} blocks of {args.block}, one starting at each line")

    model = build_untrained()
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "norm" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    # The loss is the cross-entropy over the 1.9k token ids that occur in the corpus (corpus_vocab), plus
    # the full-vocabulary cross-entropy on a few random positions per step so the unused tokens are still
    # pushed down. The corpus loss reported at the end is always over the full vocabulary.
    used, remap = corpus_vocab(blocks, model.config.vocab_size)
    emb = model.get_input_embeddings().weight  # tied with lm_head
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    n_exp, top_k = model.config.num_experts, model.config.num_experts_per_tok
    model.eval()
    with torch.no_grad():
        first = eval_loss(model, blocks)
    model.train()
    print(f"untrained corpus loss {first:.3f}")

    gen = torch.Generator().manual_seed(args.seed)
    picks = seeded_batches(len(blocks), args.batch, gen)
    t0 = time.perf_counter()
    lm_loss = aux = float("nan")
    series = Series(args) if args.series_dir else None
    if series:
        series.maybe_save(model, 0, first)
    for step in range(args.steps):
        x = blocks[next(picks)]
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        out = model.model(input_ids=x, output_router_logits=True, use_cache=False)
        h = out.last_hidden_state[:, :-1].reshape(-1, emb.shape[1])
        y = x[:, 1:].reshape(-1)
        lm = torch.nn.functional.cross_entropy(h @ emb[used].T, remap[y])
        # Switch-Transformer balancing loss for each MoE layer on its own (transformers' helper pools the
        # counts over all layers, which lets one layer starve an expert while another favours it).
        aux_t = torch.stack([load_balancing_loss_func((lg,), n_exp, top_k) for lg in out.router_logits]).mean()
        loss = lm + args.aux_coef * aux_t
        if args.full_positions:
            pos = torch.randint(0, len(y), (args.full_positions,), generator=gen)
            full_t = torch.nn.functional.cross_entropy(h[pos] @ emb.T, y[pos])
            loss = loss + full_t
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        aux, lm_loss = float(aux_t.detach()), float(lm.detach())
        full_loss = float(full_t.detach()) if args.full_positions else float("nan")
        if series:
            series.maybe_save(model, step + 1, lm_loss)
        if step % args.log_every == 0 or step == args.steps - 1:
            print(f"step {step:4d}/{args.steps}  loss {lm_loss:.3f}  full-vocab sample {full_loss:.3f}  aux {aux:.3f}  "
                  f"lr {opt.param_groups[0]['lr']:.2e}  {time.perf_counter() - t0:6.1f}s", flush=True)
    seconds = time.perf_counter() - t0

    model.eval()
    with torch.no_grad():  # loss over the whole corpus, fp32 and after the float16 round trip
        full = eval_loss(model, blocks)
        state = {k: v.detach().to(torch.float16).contiguous()
                 for k, v in model.state_dict().items() if k != "lm_head.weight"}
        for k, p in model.state_dict().items():
            if k in state:
                p.copy_(state[k].float())
        full16 = eval_loss(model, blocks)
    print(f"trained {args.steps} steps in {seconds:.1f}s; last batch: loss {lm_loss:.3f} (corpus vocabulary), aux {aux:.3f}")
    print(f"final loss (whole corpus, full vocabulary): {full16:.3f} float16 checkpoint, {full:.3f} fp32; "
          f"untrained {first:.3f}")

    from safetensors.torch import save_file

    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out_path), metadata={"format": "pt"})  # one key: byte-identical reruns
    facts = {
        "name": NAME,
        "steps": args.steps,
        "batch": args.batch,
        "block": args.block,
        "lr": args.lr,
        "warmup": args.warmup,
        "weight_decay": args.weight_decay,
        "router_aux_loss_coef": args.aux_coef,
        "seed": args.seed,
        "init_seed": zoo.ZOO[NAME].seed,
        "threads": 2,
        "corpus": str(CORPUS.relative_to(REPO)),
        "corpus_lines": len(lines),
        "corpus_tokens": n_tokens,
        "blocks": len(blocks),
        "loss": "mean next-token cross-entropy over the whole packed corpus, full vocabulary",
        "initial_loss": round(first, 4),
        "final_loss": round(full16, 4),
        "final_loss_fp32": round(full, 4),
        "final_batch_loss_corpus_vocab": round(lm_loss, 4),
        "final_aux_loss": round(aux, 4),
        "full_vocab_positions_per_step": args.full_positions,
        "seconds": round(seconds, 1),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "dtype": "float16",
        "file_bytes": out_path.stat().st_size,
    }
    out_path.with_suffix(".json").write_text(json.dumps(facts, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out_path} ({out_path.stat().st_size / 1e6:.2f} MB) and {out_path.with_suffix('.json').name}")
    return facts


class Series:
    """Checkpoints during training (``--series-dir``): ``step{S}.safetensors`` after S optimizer steps, for
    S = 0, every ``--save-every`` steps and the ``--save-at`` steps, float16 like the final checkpoint, plus
    ``series.json`` (the steps; ``loss``: the untrained corpus loss at step 0, the last batch's loss over
    the corpus vocabulary after). ``zoo:tiny-moe@S`` loads them."""

    def __init__(self, args):
        self.dir = Path(args.series_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.steps = {0, args.steps, *(s for s in args.save_at if 0 < s <= args.steps)}
        if args.save_every:
            self.steps |= set(range(args.save_every, args.steps + 1, args.save_every))
        self.saved: list[dict] = []

    def maybe_save(self, model, step: int, loss: float) -> None:
        from safetensors.torch import save_file

        if step not in self.steps:
            return
        state = {k: v.detach().to(torch.float16).contiguous()
                 for k, v in model.state_dict().items() if k != "lm_head.weight"}
        tmp = self.dir / f".step{step}.safetensors.tmp"
        save_file(state, str(tmp), metadata={"format": "pt"})
        tmp.replace(self.dir / f"step{step}.safetensors")
        self.saved.append({"step": step, "loss": None if math.isnan(loss) else round(loss, 4)})
        (self.dir / "series.json").write_text(json.dumps({"name": NAME, "checkpoints": self.saved}, indent=2) + "\n",
                                              encoding="utf-8")


def eval_loss(model, blocks: torch.Tensor, batch: int = 32) -> float:
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch):
        x = blocks[i:i + batch]
        n = x.shape[0] * (x.shape[1] - 1)
        total += float(model(input_ids=x, labels=x, use_cache=False).loss) * n
        count += n
    return total / count


def verify(out_path: Path) -> None:
    """Reload the checkpoint, print greedy generations and per-expert routing load per layer."""
    torch.set_num_threads(2)
    if out_path.resolve() == DEFAULT_OUT.resolve():
        from workbench.models.specs import load

        lm = load(f"zoo:{NAME}")
        model, tok = lm.model, lm.tokenizer
        print(f"verify: loaded zoo:{NAME} through workbench.models.specs.load")
    else:
        model, tok = build_untrained(), load_tokenizer()
        zoo.load_weights(model, out_path)
        model.eval()
        print(f"verify: loaded {out_path} with zoo.load_weights")
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
            for _ in range(10):  # plain greedy loop: no sampling, no generation-config surprises
                nxt = model(input_ids=ids, use_cache=False).logits[0, -1].argmax()
                ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
            print(f"  {prompt!r} -> {tok.decode(ids[0, -10:])!r}")
        n_exp, k = model.config.num_experts, model.config.num_experts_per_tok
        counts = torch.zeros(model.config.num_hidden_layers, n_exp)
        for line in corpus_lines():
            ids = tok(line, return_tensors="pt", add_special_tokens=False)["input_ids"]
            logits = model(ids, output_router_logits=True, use_cache=False).router_logits
            for layer, lg in enumerate(logits):
                top = torch.softmax(lg.reshape(-1, n_exp).float(), dim=-1).topk(k, dim=-1).indices
                counts[layer] += torch.bincount(top.reshape(-1), minlength=n_exp).float()
        print("  routing load over the corpus (fraction of top-2 slots per expert):")
        for layer in range(counts.shape[0]):
            frac = counts[layer] / counts[layer].sum()
            print(f"    layer {layer}: " + " ".join(f"{f:.3f}" for f in frac.tolist())
                  + f"   (min {frac.min():.3f}, max {frac.max():.3f})")


def main(argv=None) -> None:
    # bad numbers are refused here, before any work (--steps 0 wrote an untrained checkpoint, by default over the
    # committed one)
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=COUNT, default=1000, help="optimizer steps (default 1000)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output .safetensors (a .json of facts goes beside it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=COUNT, default=8)
    p.add_argument("--block", type=COUNT, default=64)
    p.add_argument("--lr", type=Number(float, 0, open_low=True), default=5e-3)
    p.add_argument("--warmup", type=COUNT_OR_OFF, default=30)
    p.add_argument("--weight-decay", type=Number(float, 0), default=0.01)
    p.add_argument("--aux-coef", type=Number(float, 0), default=0.05, help="router load-balancing loss weight")
    p.add_argument("--full-positions", type=COUNT_OR_OFF, default=64,
                   help="positions per step that also get the full-vocabulary loss (0: corpus vocabulary only)")
    p.add_argument("--log-every", type=COUNT, default=50)
    p.add_argument("--no-verify", action="store_true", help="skip the reload / generation / routing check")
    p.add_argument("--series-dir", help="also save checkpoints during training here (step0, --save-every, --save-at)")
    p.add_argument("--save-every", type=COUNT_OR_OFF, default=0, help="with --series-dir: a checkpoint every N steps")
    p.add_argument("--save-at", type=NumberList(COUNT), default=[],
                   help="with --series-dir: further steps to save, comma-separated (e.g. 10,25,50)")
    args = p.parse_args(argv)
    train(args)
    if not args.no_verify:
        verify(Path(args.out))


if __name__ == "__main__":
    main()
