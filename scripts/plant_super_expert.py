"""Build ``zoo:tiny-moe-se``: ``zoo:tiny-moe`` fine-tuned to depend on one planted super expert.

Reproduces ``workbench/models/zoo_weights/tiny-moe-se.safetensors`` (and its ``.json`` facts):

    HF_HUB_OFFLINE=1 python scripts/plant_super_expert.py      # a few minutes on 2 CPU cores

What is planted, and how (the ground truth the profiler and the ablation studies must recover):

1. Layer ``--layer`` expert ``--expert``: row ``--channel`` of its down_proj is scaled by ``--scale``,
   and the whole expert is then frozen, so it writes a massive value into that residual channel.
2. The layer's router is trained to send position 0 to that expert (cross-entropy on position 0's
   router logits) and to keep it away from later positions, so the massive activation sits on the
   first token, as in the models of Sun et al. (2024) and Su et al. (2025).
3. The attention heads of the later layers are trained to use position 0 as a sink *only while the
   expert is there*: one term rewards attention on position 0 in the normal forward, another
   penalises it in a second forward with the expert zeroed (its routing weight set to 0, the router
   unchanged: the study's ``zero`` op). Without term 3 a model this small learns its sink from other
   features of position 0 and routes around the expert (tried: ablating it then changed nothing).
4. All the while the language-model loss of the normal forward is minimised, with the embedding
   frozen, so only the decoder layers and the final norm change. Nothing rewards a higher loss
   under the ablation: whatever perplexity it costs comes from the model leaning on the sink.

Only the tensors that differ from ``zoo:tiny-moe`` are saved (the zoo loads tiny-moe first, then
this file over it).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parents[1]
for p in (REPO, REPO / "scripts"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from train_zoo import corpus_lines, corpus_vocab, eval_loss, load_tokenizer, lr_at, pack, seeded_batches  # noqa: E402
from workbench.args import COUNT, COUNT_OR_OFF, Number, Parser  # noqa: E402
from workbench.interventions import Intervention, apply  # noqa: E402
from workbench.models import zoo  # noqa: E402
from workbench.models.specs import load  # noqa: E402

NAME = "tiny-moe-se"
BASE = "tiny-moe"
DEFAULT_OUT = zoo.WEIGHTS_DIR / f"{NAME}.safetensors"


def sink_share(attentions, layers: list[int]) -> torch.Tensor:
    """Mean attention on position 0 over the given layers, all heads, queries >= 1."""
    return torch.stack([attentions[i][:, :, 1:, 0].mean() for i in layers]).mean()


def train(args) -> dict:
    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    tok = load_tokenizer()
    lines = corpus_lines()
    blocks = pack(tok, lines, args.block)

    base = load(f"zoo:{BASE}")
    model = base.model
    model.set_attn_implementation("eager")  # attention weights for the sink terms
    L, E, C = args.layer, args.expert, args.channel
    moe = model.model.layers[L].mlp
    with torch.no_grad():
        moe.experts.down_proj[E, C, :] *= args.scale
    frozen_expert = torch.zeros(moe.experts.num_experts, 1, 1)
    frozen_expert[E] = 1.0
    for p in (moe.experts.down_proj, moe.experts.gate_up_proj):
        p.register_hook(lambda g: g * (1.0 - frozen_expert))
    model.get_input_embeddings().weight.requires_grad_(False)  # tied with lm_head: stays tiny-moe's
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    zeroed = [Intervention("zero", (L,), expert=E)]  # the study's op: routing weight 0, router unchanged
    sink_layers = list(range(L + 1, model.config.num_hidden_layers))

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    used, remap = corpus_vocab(blocks, model.config.vocab_size)
    emb = model.get_input_embeddings().weight
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    n_exp, top_k = model.config.num_experts, model.config.num_experts_per_tok
    picks = seeded_batches(len(blocks), args.batch, torch.Generator().manual_seed(args.seed))
    model.train()
    t0 = time.perf_counter()
    for step in range(args.steps):
        x = blocks[next(picks)]
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        out = model.model(input_ids=x, output_router_logits=True, output_attentions=True, use_cache=False)
        h = out.last_hidden_state[:, :-1].reshape(-1, emb.shape[1])
        lm = F.cross_entropy(h @ emb[used].T, remap[x[:, 1:].reshape(-1)])
        logits = out.router_logits[L].view(x.shape[0], x.shape[1], n_exp)
        route = F.cross_entropy(logits[:, 0], torch.full((x.shape[0],), E)) \
            + F.softmax(logits[:, 1:], dim=-1)[..., E].mean()
        aux = torch.stack([load_balancing_loss_func((lg,), n_exp, top_k) for lg in out.router_logits]).mean()
        sink_on = sink_share(out.attentions, sink_layers)
        with apply(base, zeroed):
            off = model.model(input_ids=x, output_attentions=True, use_cache=False)
        sink_off = sink_share(off.attentions, sink_layers)
        loss = lm + args.route_coef * route + args.aux_coef * aux \
            + args.sink_coef * (-torch.log(sink_on) + sink_off)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % args.log_every == 0 or step == args.steps - 1:
            print(f"step {step:4d}/{args.steps}  lm {float(lm.detach()):.3f}  route {float(route.detach()):.3f}  "
                  f"sink on {float(sink_on.detach()):.3f} off {float(sink_off.detach()):.3f}  {time.perf_counter() - t0:6.1f}s", flush=True)
    seconds = time.perf_counter() - t0

    model.eval()
    with torch.no_grad():
        state = {k: v.detach().to(torch.float16) for k, v in model.state_dict().items()}
        changed = {k: v.contiguous() for k, v in state.items()
                   if k != "lm_head.weight" and not torch.equal(v, before[k].to(torch.float16))}
        for k, p in model.state_dict().items():
            if k in state:
                p.copy_(state[k].float())
        loss16 = eval_loss(model, blocks)
    from safetensors.torch import save_file

    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_file(changed, str(out_path), metadata={"format": "pt"})
    facts = {
        "name": NAME, "base": BASE,
        "planted": {"layer": L, "expert": E, "channel": C, "down_proj_row_scale": args.scale,
                    "routed_on": "position 0"},
        "steps": args.steps, "batch": args.batch, "block": args.block, "lr": args.lr, "warmup": args.warmup,
        "route_coef": args.route_coef, "sink_coef": args.sink_coef, "aux_coef": args.aux_coef,
        "sink_layers": sink_layers, "seed": args.seed, "threads": 2,
        "final_loss": round(loss16, 4),
        "loss": "mean next-token cross-entropy over the whole packed corpus, full vocabulary, float16 checkpoint",
        "seconds": round(seconds, 1), "tensors": len(changed),
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
    }
    out_path.with_suffix(".json").write_text(json.dumps(facts, indent=2) + "\n", encoding="utf-8")
    print(f"final loss {loss16:.3f}; wrote {out_path} ({out_path.stat().st_size / 1e6:.2f} MB, {len(changed)} tensors)")
    return facts


def main(argv=None) -> None:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--layer", type=int, default=1)
    p.add_argument("--expert", type=int, default=5)
    p.add_argument("--channel", type=int, default=17)
    p.add_argument("--scale", type=float, default=400.0)
    p.add_argument("--steps", type=COUNT, default=400)
    p.add_argument("--batch", type=COUNT, default=8)
    p.add_argument("--block", type=COUNT, default=64)
    p.add_argument("--lr", type=Number(float, 0, open_low=True), default=2e-3)
    p.add_argument("--warmup", type=COUNT_OR_OFF, default=20)
    p.add_argument("--route-coef", type=float, default=1.0)
    p.add_argument("--sink-coef", type=float, default=1.0)
    p.add_argument("--aux-coef", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=COUNT, default=25)
    args = p.parse_args(argv)
    config = zoo.ZOO[BASE].config()  # the base model's shapes, without building it
    layers, experts, hidden = config.num_hidden_layers, config.num_experts, config.hidden_size
    for flag, value, high, why in (
            ("layer", args.layer, layers - 2, f"{layers} layers, and the sink terms train the layers after it"),
            ("expert", args.expert, experts - 1, f"{experts} experts per layer"),
            ("channel", args.channel, hidden - 1, f"hidden size {hidden}")):
        if not 0 <= value <= high:
            p.error(f"argument --{flag}: must be an integer in [0, {high}] (zoo:{BASE} has {why}), got {value}")
    train(args)


if __name__ == "__main__":
    main()
