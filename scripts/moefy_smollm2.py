"""Rebuild ``workbench/models/zoo_weights/smollm2-moe-parts.safetensors``: MoEfy SmolLM2-135M.

What ``smollm2-moe`` is made of (``workbench/models/moefy.py`` assembles the checkpoint from it):

1. **Training text** (never the evaluation text): SmolLM2's own samples from 16 generic openings
   (4 seeds each, 200 new tokens, top-p 0.95) plus the first 3,000 characters of 60 modules of
   Python's standard library. The built-in prompts, facts and cloze items are not used.
2. **Activations**: every layer's MLP input over that text (~25k tokens).
3. **Partition** per layer: the ``--shared`` neurons with the largest mean contribution
   ``|silu(g.x) * (u.x)| * ||down column||`` become the shared expert; the rest are split into
   ``--experts`` equal clusters by balanced k-means on their contribution patterns over 6,000
   sampled tokens (co-activation clustering, MoEfication's "MLP split").
4. **Router** per layer: ridge regression from the MLP input to each cluster's output norm on the
   token, then a temperature (the logits' scale) chosen per layer from a grid to minimise the MoE
   block's error against the dense MLP at the default top-k.
5. **Distillation** (``--distill-steps``, 0 to skip): low-rank corrections (rank ``--distill-rank``) to
   every layer's gate, up and down projections, trained so that the MoE (routed exactly as the
   assembled Qwen2-MoE routes: renormalised top-k softmax, ``down_proj`` times k) matches SmolLM2's
   next-token distributions (KL) on the training text, with top-k cycling through 8, 10, 12 and 14.
   The partition and routers stay fixed; the corrections are sliced into the experts on assembly.

Deterministic for a fixed seed on one machine (sampling and BLAS may differ across CPUs). On 2 cores:
sampling ~6 minutes, activations ~1.5, the per-layer fits 6.5, distillation ~4 s a step; the text and
activations are cached in ``$WORKBENCH_CACHE/moefy-build``. The defaults are the settings of the
committed parts. ``--distill-only`` keeps the committed partition and routers and redoes step 5.

    python scripts/moefy_smollm2.py [--experts 16] [--shared 512] [--top-k 8] [--seed 0]
                                    [--distill-steps 400] [--distill-rank 16] [--distill-only]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workbench.args import COUNT, COUNT_OR_OFF, Parser  # noqa: E402
from workbench.models import gguf, moefy  # noqa: E402

OPENINGS = ["Once upon a time", "The history of", "In this article we", "Scientists have found", "Dear friend,",
            "The best way to", "def ", "import numpy as np\n", "Q: What is", "Yesterday I went", "The economy of",
            "Here is a recipe for", "Chapter 1\n\n", "In mathematics,", "The following code", "My favourite"]
TEMPERATURES = [1e-3, 1e-2, 0.03, 0.1, 0.3]  # router logit scale, in units of the logits' std
# top-k the committed parts' temperatures were fitted at (not the model's default top-k, which came later
# from the quality sweep); at top-8 the fit picked the smallest temperature in 27 of 30 layers
FIT_TOP_K = 8
DISTILL_TOP_K = (8, 10, 12, 14)  # the top-k of each distillation step, cycled


def training_text(model, tok) -> list[str]:
    import glob
    import sysconfig

    texts = []
    tok.padding_side = "left"
    for i in range(0, len(OPENINGS), 8):
        enc = tok(OPENINGS[i:i + 8], return_tensors="pt", padding=True)
        for rep in range(4):
            torch.manual_seed(rep * 100 + i)
            out = model.generate(**enc, do_sample=True, temperature=1.0, top_p=0.95, max_new_tokens=200,
                                 pad_token_id=tok.pad_token_id)
            texts += tok.batch_decode(out, skip_special_tokens=True)
    stdlib = sorted(glob.glob(str(Path(sysconfig.get_paths()["stdlib"]) / "*.py")))[:60]
    texts += [Path(f).read_text(errors="replace")[:3000] for f in stdlib]
    return texts


@torch.no_grad()
def mlp_inputs(model, tok, texts: list[str]) -> torch.Tensor:
    """[layers, tokens, hidden] float16: every layer's MLP input over the training text."""
    xs = [[] for _ in model.model.layers]
    hooks = [layer.mlp.register_forward_pre_hook(lambda mod, a, i=i: xs[i].append(a[0].reshape(-1, a[0].shape[-1]).half()))
             for i, layer in enumerate(model.model.layers)]
    for t in texts:
        model(tok(t, return_tensors="pt", truncation=True, max_length=256).input_ids)
    for h in hooks:
        h.remove()
    return torch.stack([torch.cat(x) for x in xs])


def balanced_kmeans(feat: torch.Tensor, k: int, seed: int, iters: int = 30) -> torch.Tensor:
    """Cosine k-means with every cluster exactly ``len(feat) // k`` members (greedy capacity assignment)."""
    n = feat.shape[0] // k
    g = torch.Generator().manual_seed(seed)
    cent = feat[torch.randperm(feat.shape[0], generator=g)[:k]].clone()
    assign = torch.zeros(feat.shape[0], dtype=torch.long)
    for _ in range(iters):
        order = torch.argsort((feat @ cent.T).flatten(), descending=True, stable=True).tolist()
        al, count = [-1] * feat.shape[0], [0] * k
        for o in order:
            j, e = divmod(o, k)
            if al[j] < 0 and count[e] < n:
                al[j] = e
                count[e] += 1
        assign = torch.tensor(al)
        new = torch.stack([F.normalize(feat[assign == e].mean(0), dim=0) for e in range(k)])
        if torch.equal(new, cent):
            break
        cent = new
    return assign


def moe_error(h, d, shared, idx, logits, top_k) -> float:
    """Relative error of the MoE block (renormalised softmax weights times k) against the dense MLP."""
    y = h @ d.T
    out = h[:, shared] @ d[:, shared].T
    w, sel = torch.softmax(logits, -1).topk(top_k, -1)
    w = w / w.sum(-1, keepdim=True) * top_k
    for e, j in enumerate(idx):
        tok, slot = torch.where(sel == e)
        out.index_add_(0, tok, (h[tok][:, j] @ d[:, j].T) * w[tok, slot, None])
    return ((out - y).norm() / y.norm()).item()


@torch.no_grad()
def fit_layer(x: torch.Tensor, mlp, experts: int, shared_n: int, top_k: int, seed: int):
    g, u, d = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
    h = F.silu(x @ g.T) * (x @ u.T)
    contrib = h.abs() * d.norm(dim=0)
    shared = torch.argsort(contrib.mean(0), descending=True, stable=True)[:shared_n]
    mask = torch.ones(h.shape[1], dtype=torch.bool)
    mask[shared] = False
    rest = torch.nonzero(mask).flatten()
    sub = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:6000]
    assign = balanced_kmeans(F.normalize(contrib[sub][:, rest].T, dim=1), experts, seed)
    idx = [rest[assign == e] for e in range(experts)]
    target = torch.stack([(h[:, j] @ d[:, j].T).norm(dim=1) for j in idx], 1)
    ridge = 1e-2 * x.shape[0] / x.shape[1]
    w = torch.linalg.solve(x.T @ x + ridge * torch.eye(x.shape[1]), x.T @ target).T
    w = w / (x @ w.T).std()
    errs = {t: moe_error(h, d, shared, idx, x @ (w * t).T, top_k) for t in TEMPERATURES}
    best = min(errs, key=errs.get)
    return torch.cat([shared] + idx), w * best, best, errs[best]


def _moe_mlp(mlp, perm: torch.Tensor, router: torch.Tensor, lora: dict, experts: int, shared: int, state: dict):
    """A forward for SmolLM2's MLP computing what the assembled Qwen2-MoE block computes (with ``lora``'s
    corrections) while ``state["moe"]``, and the dense MLP otherwise (the teacher)."""
    cluster = torch.full((perm.numel(),), experts, dtype=torch.long)  # shared neurons: column ``experts``
    n = (perm.numel() - shared) // experts
    for e in range(experts):
        cluster[perm[shared + e * n: shared + (e + 1) * n]] = e

    def forward(x):
        g, u, d = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
        if not state["moe"]:
            return (F.silu(x @ g.T) * (x @ u.T)) @ d.T
        k = state["k"]
        w, sel = torch.softmax(x @ router.T, -1).topk(k, -1)
        scale = torch.zeros(*x.shape[:-1], experts + 1, dtype=x.dtype)
        scale[..., experts] = 1.0  # the shared expert: sigmoid(0) * 2
        scale = scale.scatter(-1, sel, w / w.sum(-1, keepdim=True) * k)  # renormalised weights, down_proj x k
        h = F.silu(x @ g.T + (x @ lora["gate_b"].T) @ lora["gate_a"].T) * (x @ u.T + (x @ lora["up_b"].T) @ lora["up_a"].T)
        h = h * scale[..., cluster]
        return h @ d.T + (h @ lora["down_b"].T) @ lora["down_a"].T
    return forward


def distill(model, tok, texts: list[str], perms, routers, experts: int, shared: int, *, steps: int, rank: int,
            lr: float = 1e-3, seed: int = 0, batch: int = 8, seq: int = 128, top_ks: tuple[int, ...] = DISTILL_TOP_K,
            log=print) -> dict[str, torch.Tensor]:
    """Step 5: the low-rank corrections ``lora.{gate,up,down}_{a,b}`` [layers, ...] (float16)."""
    g = torch.Generator().manual_seed(seed)
    hidden, neurons = model.config.hidden_size, model.config.intermediate_size
    shapes = {"gate_a": (neurons, rank), "gate_b": (rank, hidden), "up_a": (neurons, rank), "up_b": (rank, hidden),
              "down_a": (hidden, rank), "down_b": (rank, neurons)}
    loras = [{k: torch.nn.Parameter(torch.zeros(sh) if k.endswith("_a") else torch.randn(sh, generator=g) * 0.01)
              for k, sh in shapes.items()} for _ in model.model.layers]
    state = {"moe": False, "k": top_ks[0]}
    saved = [layer.mlp.__dict__.get("forward") for layer in model.model.layers]
    for p in model.parameters():
        p.requires_grad_(False)
    for i, layer in enumerate(model.model.layers):
        layer.mlp.forward = _moe_mlp(layer.mlp, perms[i].long(), routers[i].float(), loras[i], experts, shared, state)
    ids = [tok(t).input_ids for t in texts]
    chunks = [x[j:j + seq] for x in ids for j in range(0, len(x), seq)]
    chunks = [c for c in chunks if len(c) >= seq // 4]
    opt = torch.optim.Adam([p for lo in loras for p in lo.values()], lr=lr)
    t0 = time.time()
    try:
        for step in range(steps):
            pick = torch.randperm(len(chunks), generator=g)[:batch].tolist()
            n = min(len(chunks[i]) for i in pick)
            x = torch.tensor([chunks[i][:n] for i in pick])
            state["moe"] = False
            with torch.no_grad():
                teacher = torch.log_softmax(model(x).logits, -1)
            state.update(moe=True, k=top_ks[step % len(top_ks)])
            student = torch.log_softmax(model(x).logits, -1)
            loss = F.kl_div(student, teacher, log_target=True, reduction="sum") / (batch * n)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if (step + 1) % 25 == 0 or step == 0:
                log(f"distill step {step + 1}/{steps}: KL {loss.item():.4f} at top-{state['k']} ({time.time() - t0:.0f} s)")
    finally:
        for layer, fwd in zip(model.model.layers, saved):  # back to the class's forward (or a patch found there)
            del layer.mlp.forward
            if fwd is not None:
                layer.mlp.forward = fwd
    return {f"lora.{k}": torch.stack([lo[k].detach() for lo in loras]).half().contiguous() for k in shapes}


def main() -> None:
    ap = Parser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=COUNT, default=16)
    ap.add_argument("--shared", type=COUNT_OR_OFF, default=512, help="neurons in the shared expert")
    ap.add_argument("--top-k", type=COUNT, default=FIT_TOP_K, help="top-k the temperatures are fitted at")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--distill-steps", type=COUNT_OR_OFF, default=400, help="distillation steps (0: none)")
    ap.add_argument("--distill-rank", type=COUNT, default=16)
    ap.add_argument("--distill-only", action="store_true",
                    help="keep the committed partition and routers (--out's), redo only the distillation")
    ap.add_argument("--out", type=Path, default=moefy.PARTS)
    args = ap.parse_args()
    # refused before SmolLM2 loads (the types above refuse 0 or negative counts); whether --shared and --experts
    # divide its MLP is checked once it is loaded
    if not args.distill_only:  # (with --distill-only the experts are the committed parts')
        if args.top_k > args.experts:
            ap.error(f"--top-k {args.top_k} is more than the {args.experts} experts")
        if args.distill_steps and args.experts < max(DISTILL_TOP_K):
            ap.error(f"distillation cycles top-k through {', '.join(map(str, DISTILL_TOP_K))}: it needs at least "
                     f"{max(DISTILL_TOP_K)} experts, not {args.experts} (--distill-steps 0 skips it)")
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.manual_seed(args.seed)
    src = gguf.checkpoint_dir()
    model = LlamaForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(src)
    neurons = model.config.intermediate_size
    if not 0 <= args.shared < neurons or (neurons - args.shared) % args.experts:
        sys.exit(f"error: the {neurons} - {args.shared} shared neurons must divide into {args.experts} experts")
    cache = gguf.cache_root() / "moefy-build"
    cache.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if not (cache / "texts.json").is_file():
        (cache / "texts.json").write_text(json.dumps(training_text(model, tok)))
    texts = json.loads((cache / "texts.json").read_text())
    print(f"training text: {len(texts)} documents ({time.time() - t0:.0f} s)", flush=True)
    if args.distill_only:
        tensors, meta = moefy.read_parts(args.out)
        perms, routers = list(tensors["perm"]), list(tensors["router"])
        args.experts, args.shared = meta["experts"], meta["shared"]
    else:
        if not (cache / "mlp_inputs.pt").is_file():
            torch.save(mlp_inputs(model, tok, texts), cache / "mlp_inputs.pt")
        X = torch.load(cache / "mlp_inputs.pt")
        print(f"MLP inputs: {tuple(X.shape)} ({time.time() - t0:.0f} s)", flush=True)
        perms, routers, temps = [], [], []
        for i, layer in enumerate(model.model.layers):
            perm, router, temp, err = fit_layer(X[i].float(), layer.mlp, args.experts, args.shared, args.top_k, args.seed)
            perms.append(perm)
            routers.append(router)
            temps.append(temp)
            print(f"layer {i:2d}: temperature {temp:g}, block error {err:.3f} at top-{args.top_k} ({time.time() - t0:.0f} s)", flush=True)
        meta = {"experts": args.experts, "shared": args.shared, "top_k": args.top_k, "seed": args.seed,
                "temperatures": temps, "tokens": X.shape[1], "script": moefy.SCRIPT}
    out = {"perm": torch.stack(perms).to(torch.int32).contiguous(), "router": torch.stack(routers).float().contiguous()}
    meta.pop("distill", None)
    if args.distill_steps > 0:
        out.update(distill(model, tok, texts, perms, routers, args.experts, args.shared, steps=args.distill_steps,
                           rank=args.distill_rank, seed=args.seed, log=lambda m: print(m, flush=True)))
        meta["distill"] = {"steps": args.distill_steps, "rank": args.distill_rank, "lr": 1e-3, "batch": 8,
                           "seq": 128, "top_k": list(DISTILL_TOP_K), "seed": args.seed}
    from safetensors.torch import save_file

    tmp = args.out.with_suffix(".tmp")
    save_file(out, str(tmp), metadata={k: json.dumps(v) for k, v in meta.items()})
    tmp.replace(args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB) in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
