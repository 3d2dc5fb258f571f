"""Adapters read from the module tree, for dense decoder families nobody declared.

Most transformers decoders keep the same parts under a handful of names: a ``ModuleList`` of
``num_hidden_layers`` blocks, each with an attention module, an MLP whose last projection writes
the MLP's output, and norms. :func:`infer_adapter` finds those parts on the loaded model and then
**verifies** them with one forward of a few tokens:

* the MLP's last projection (``down_proj``, ``fc2``, ``dense_4h_to_h``, ...) must output exactly
  what the MLP returns (else the per-"expert" statistics of a dense layer would mean something else);
* the norms are kept only if the layer is a plain pre-norm block: the input norm's output is what
  the attention reads and the post-attention norm's output is what the MLP reads, from the residual
  plus the attention output. Sandwich norms (Gemma 2/3), post-norm blocks (OLMo 2) and parallel
  blocks (GPT-NeoX, Phi, Cohere) keep no norm names here (the names mean something else there);
  circuits read every block's wiring from the tensors themselves (``circuits.blocks``).

MoE blocks are inferred where they follow transformers' 5.x contract (a router child returning
``(logits, weights, indices)`` from the hidden states alone, a fused experts child with ``gate_up_proj``
/ ``down_proj``, shared experts under a known name, optionally gated). Routing arithmetic (softmax or
sigmoid, renormalisation, correction biases, scaling) differs by family and cannot be read from the
tree, so it is **found and verified** (:func:`_verify_routing`): one forward of 12 tokens, with any
``e_score_correction_bias`` set to random values for it (a fresh model's zeros would let a rule that
ignores the bias pass), and the first of :data:`ROUTING_RULES` (with the config's
``routed_scaling_factor`` or 1) that reproduces every router's own indices and weights is the adapter's
rule, used wherever the workbench re-routes (``drop``, ``bias``). The same forward checks that each
block's output is its experts' weighted outputs, recomputed per expert as the capture does, plus its
shared experts'. Anything else (another router contract, a bias handed to the router, group-limited
choice, no matching rule, a block that adds something more) is refused in one line naming what did not
fit and pointing at a declared adapter (README, "Your own architecture"). ``workbench check MODEL`` runs
the full battery on any model, declared or inferred.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import nn

from workbench.adapters.base import Adapter
from workbench.errors import WorkbenchError

ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
MLP_NAMES = ("mlp", "feed_forward", "ffn")
DOWN_NAMES = ("down_proj", "fc2", "c_proj", "dense_4h_to_h", "w2", "fc_out", "wo")
INPUT_NORM_NAMES = ("input_layernorm", "ln_1", "attention_layernorm", "attention_norm", "norm1")
POST_NORM_NAMES = ("post_attention_layernorm", "ln_2", "feedforward_layernorm", "ffn_norm", "norm2")
EXPERT_NAMES = ("experts", "block_sparse_moe", "moe")
ROUTER_NAMES = ("gate", "router")
SHARED_NAMES = ("shared_experts", "shared_expert", "shared_mlp")
SHARED_GATE_NAMES = ("shared_expert_gate",)
# How router logits become the experts and their weights, tried in this order against the router's own output.
# "-bias": experts chosen by score + the router's ``e_score_correction_bias`` (DeepSeek-V3's auxiliary-loss-free
# balancing), weighted by the score alone.
ROUTING_RULES = ("softmax-topk", "softmax-topk-renorm", "topk-softmax", "sigmoid-topk", "sigmoid-topk-renorm",
                 "sigmoid-bias-topk", "sigmoid-bias-topk-renorm")


def route(rule: str, logits: torch.Tensor, k: int, scale: float = 1.0, exclude: torch.Tensor | None = None,
          bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The weights and indices of ``rule`` (one of :data:`ROUTING_RULES`) for ``logits [N, E]``, times ``scale``;
    ``exclude`` ([N, E] bool) removes experts from the choice (the rest renormalised as the rule does); ``bias``
    the correction bias of the ``-bias`` rules."""
    x = logits.float()
    if rule == "topk-softmax":
        if exclude is not None:
            x = x.masked_fill(exclude, float("-inf"))
        top, index = torch.topk(x, k, dim=-1)
        weights = torch.softmax(top, dim=-1)
    else:
        if exclude is not None and rule.startswith("softmax"):
            x = x.masked_fill(exclude, float("-inf"))
        scores = torch.softmax(x, dim=-1) if rule.startswith("softmax") else torch.sigmoid(x)
        choice = scores + bias.float() if "-bias" in rule else scores
        if exclude is not None:
            choice = choice.masked_fill(exclude, float("-inf"))
        index = torch.topk(choice, k, dim=-1).indices
        weights = scores.gather(-1, index)
        if rule.endswith("renorm"):
            weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights * scale, index


@dataclass(frozen=True)
class InferredMoeAdapter(Adapter):
    """An MoE adapter read from the module tree: transformers' fused experts and router contract, with the
    routing rule found by trying :data:`ROUTING_RULES` against what the router itself returned."""

    routing: str = "softmax-topk"
    routed_scale: float = 1.0
    fixed_top_k: int = 1

    def top_k(self, model: nn.Module) -> int:
        return self.fixed_top_k

    def select_experts(self, model, logits, router=None, exclude=None):
        bias = None
        if "-bias" in self.routing:
            if router is None:
                raise ValueError(f"{self.name}: routing by {self.routing} needs the router module (its correction bias)")
            bias = router.e_score_correction_bias
        return route(self.routing, logits, self.fixed_top_k, self.routed_scale, exclude, bias)


def _verify_routing(model: nn.Module, adapter: InferredMoeAdapter, mt: str) -> InferredMoeAdapter:
    """One forward: every MoE layer's router returns (logits, weights, indices) that one routing rule (and one
    scale) reproduces, and its block's output is the experts' output plus the shared experts' (gated where
    the block has a shared gate); the adapter with that rule, else a one-line error."""
    from workbench.tracing.capture import fused_expert_output

    layers = adapter.decoder_layers(model)
    seen: dict = {}
    handles = []

    def keep(key):
        def hook(mod, args, kwargs, out):
            seen[key] = (args, kwargs, out)
        return hook

    moe = [i for i, layer in enumerate(layers) if adapter.experts(layer) is not None]
    for i in moe:
        layer = layers[i]
        mlp = adapter.mlp(layer)
        handles.append(mlp.register_forward_hook(keep((i, "mlp")), with_kwargs=True))
        handles.append(adapter.router(layer).register_forward_hook(keep((i, "router")), with_kwargs=True))
        handles.append(adapter.experts(layer).register_forward_hook(keep((i, "experts")), with_kwargs=True))
        for j, sh in enumerate(adapter.shared_experts(layer)):
            handles.append(sh.register_forward_hook(keep((i, "shared", j)), with_kwargs=True))
        if adapter.shared_gate_name and getattr(mlp, adapter.shared_gate_name, None) is not None:
            handles.append(getattr(mlp, adapter.shared_gate_name).register_forward_hook(keep((i, "gate")), with_kwargs=True))
    vocab = int(getattr(model.config, "vocab_size", 2) or 2)
    ids = (torch.arange(12) * 37 + 5).remainder(vocab)[None].to(next(model.parameters()).device)
    # A correction bias (zeros in a fresh model) is set to random values for this forward, so that only a rule
    # that uses it can reproduce the router's choice; the model's own values are put back after.
    biases = {i: b for i in moe
              if isinstance(b := getattr(adapter.router(layers[i]), "e_score_correction_bias", None), torch.Tensor)}
    saved = {i: b.detach().clone() for i, b in biases.items()}
    gen = torch.Generator().manual_seed(0)
    perturbed = {i: (torch.randn(b.shape, generator=gen) * 0.05).to(b) for i, b in biases.items()}
    try:
        with torch.no_grad():
            for i, b in biases.items():
                b.copy_(perturbed[i])
            adapter.body(model)(input_ids=ids, use_cache=False)
    except Exception as e:
        raise WorkbenchError(f"unsupported architecture {mt!r}: a forward failed while verifying the MoE structure read "
                             f"from the modules ({type(e).__name__}: {e})") from None
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for i, b in biases.items():
                b.copy_(saved[i])

    def fail(what: str) -> WorkbenchError:
        return WorkbenchError(f"unsupported architecture {mt!r}: a mixture of experts the workbench cannot read from "
                              f"the module tree: {what}; it needs a declared adapter (README, 'Your own architecture')")

    outs = []
    for i in moe:
        args, kwargs, out = seen.get((i, "router"), ((), {}, None))
        if not (isinstance(out, tuple) and len(out) == 3 and all(isinstance(t, torch.Tensor) for t in out)):
            raise fail(f"layer {i}'s router does not return (logits, weights, indices) as transformers' MoE routers do")
        if len(args) + len(kwargs) != 1:  # e.g. a bias the block hands its router: the rule cannot see it
            raise fail(f"layer {i}'s router is called with more than the hidden states")
        if out[0].reshape(-1, out[0].shape[-1]).shape[0] != ids.numel():
            raise fail(f"layer {i}'s router sees {out[0].reshape(-1, out[0].shape[-1]).shape[0]} rows for "
                       f"{ids.numel()} tokens")
        outs.append(out)
    k = int(outs[0][2].shape[-1])

    def matches(rule: str, scale: float) -> bool:
        for i, (logits, weights, index) in zip(moe, outs):
            if "-bias" in rule and i not in perturbed:
                return False
            w, idx = route(rule, logits.reshape(-1, logits.shape[-1]), k, scale, bias=perturbed.get(i))
            order, mine = index.reshape(idx.shape).sort(-1), idx.sort(-1)
            if not torch.equal(order.values, mine.values):
                return False
            theirs = weights.reshape(w.shape).float().gather(-1, order.indices)
            if not torch.allclose(theirs, w.gather(-1, mine.indices), rtol=1e-3, atol=1e-6):
                return False
        return True

    scale = float(getattr(model.config, "routed_scaling_factor", 1.0) or 1.0)
    rule = next((r for r in ROUTING_RULES if matches(r, scale)), None)
    if rule is None and scale != 1.0:
        scale, rule = 1.0, next((r for r in ROUTING_RULES if matches(r, 1.0)), None)
    if rule is None:
        raise fail(f"no known routing rule ({', '.join(ROUTING_RULES)}) reproduces the router's own choice and weights "
                   "(biases, groups or another scoring)")
    adapter = replace(adapter, routing=rule, routed_scale=scale, fixed_top_k=k)
    for i in moe:  # the block's output: the experts' (recomputed per expert, as the capture does) plus the shared ones
        layer = layers[i]
        experts = adapter.experts(layer)
        args, kwargs, out = seen[(i, "experts")]
        hidden = args[0] if args else kwargs["hidden_states"]
        index = args[1] if len(args) > 1 else kwargs["top_k_index"]
        weights = args[2] if len(args) > 2 else kwargs["top_k_weights"]
        try:
            with torch.no_grad():
                rebuilt = torch.zeros_like(out, dtype=torch.float32)
                for e in index.unique().tolist():
                    rows, slot = (index == e).nonzero(as_tuple=True)
                    rebuilt.index_add_(0, rows, fused_expert_output(experts, hidden[rows], e).float()
                                       * weights[rows, slot, None].float())
        except (RuntimeError, IndexError, AttributeError) as e:  # shapes or weights other than the contract's
            raise fail(f"layer {i}'s experts could not be recomputed one by one ({type(e).__name__}: {e})") from None
        block = seen[(i, "mlp")][2]
        block = (block[0] if isinstance(block, tuple) else block).reshape(-1, out.shape[-1]).float()
        total = rebuilt
        for j, _ in enumerate(adapter.shared_experts(layer)):
            sh = seen[(i, "shared", j)][2].reshape(-1, out.shape[-1]).float()
            if (i, "gate") in seen:
                sh = torch.sigmoid(seen[(i, "gate")][2].reshape(-1, 1).float()) * sh
            total = total + sh
        err = float((total - block).abs().max() / block.abs().max().clamp(min=1e-12))
        if err > 1e-4:
            raise fail(f"layer {i}'s MoE block output is not its experts' weighted outputs plus its shared experts "
                       f"(relative difference {err:.1e}): it computes something the fused contract does not describe")
    return adapter


def _path_of(model: nn.Module, target: nn.Module | None) -> str | None:
    if target is None:
        return None
    return next((n for n, m in model.named_modules() if m is target and n), None)


def _child(module: nn.Module, names: tuple[str, ...]) -> str | None:
    return next((n for n in names if isinstance(getattr(module, n, None), nn.Module)), None)


def _num_layers(config) -> int | None:
    for attr in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        n = getattr(config, attr, None)
        if isinstance(n, int) and n > 0:
            return n
    return None


def infer_adapter(model: nn.Module) -> Adapter:
    """An :class:`Adapter` for ``model`` read from its modules and verified on one forward.

    Raises a :class:`WorkbenchError` naming the first structural part that was not found.
    """
    mt = getattr(model.config, "model_type", None) or type(model).__name__
    n = _num_layers(model.config)
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and name and len(m) == n]
    if not lists:
        raise WorkbenchError(f"unsupported architecture {mt!r}: no list of {n} decoder layers found in the module tree; "
                             "declare an adapter (README, 'Your own architecture')")
    layers_path, layers = lists[0]
    first = layers[0]
    attn_name = _child(first, ATTENTION_NAMES)
    mlp_name = _child(first, MLP_NAMES + EXPERT_NAMES)
    missing = [what for what, got in (("attention module (one of " + ", ".join(ATTENTION_NAMES) + ")", attn_name),
                                      ("MLP (one of " + ", ".join(MLP_NAMES) + ")", mlp_name)) if got is None]
    for i, layer in enumerate(layers):
        if attn_name is not None and getattr(layer, attn_name, None) is None:
            missing.append(f"attention in layer {i} (a hybrid model: linear-attention or state-space layers)")
            break
    if missing:
        children = ", ".join(f"{k} ({type(v).__name__})" for k, v in first.named_children())
        raise WorkbenchError(f"unsupported architecture {mt!r}: layer 0 of {layers_path} has no {missing[0]}; its "
                             f"parts: {children}. Declare an adapter (README, 'Your own architecture')")
    moe: list[int] = []  # MoE layers; their router and experts are named as the first one's
    router = experts = None
    down_name = None
    for i, layer in enumerate(layers):
        mlp = getattr(layer, mlp_name)
        r, e = _child(mlp, ROUTER_NAMES), _child(mlp, EXPERT_NAMES)
        if r or e:
            found = getattr(mlp, e, None) if e else None
            if moe and (r, e) != (router, experts):
                raise WorkbenchError(f"unsupported architecture {mt!r}: layer {i}'s router and experts ({r!r}, {e!r}) "
                                     f"are named unlike layer {moe[0]}'s ({router!r}, {experts!r}); declare an adapter")
            if not (r and e and hasattr(found, "gate_up_proj") and hasattr(found, "down_proj")):
                raise WorkbenchError(
                    f"unsupported architecture {mt!r}: layer {i}'s {mlp_name} ({type(mlp).__name__}) is a mixture of "
                    f"experts (router {r!r}, experts {e!r}) without transformers' fused experts module and "
                    "router, so its routing cannot be read and verified; it needs a declared adapter (README, "
                    "'Your own architecture')")
            moe.append(i)
            router, experts = r, e
            continue
        if _child(mlp, DOWN_NAMES) is None:
            raise WorkbenchError(f"unsupported architecture {mt!r}: layer {i}'s {mlp_name} ({type(mlp).__name__}) has no "
                                 f"output projection (one of {', '.join(DOWN_NAMES)})")
        down_name = down_name or _child(mlp, DOWN_NAMES)
    if moe:
        block = getattr(layers[moe[0]], mlp_name)
        shared = tuple(n for n in SHARED_NAMES if isinstance(getattr(block, n, None), nn.Module))
        gate = next((n for n in SHARED_GATE_NAMES if isinstance(getattr(block, n, None), nn.Module)), None)
        shared_down = _child(getattr(block, shared[0]), DOWN_NAMES) if shared else None
        down_name = down_name or shared_down or "down_proj"
        if shared_down and shared_down != down_name:
            raise WorkbenchError(f"unsupported architecture {mt!r}: the shared expert's output projection "
                                 f"{shared_down!r} is named unlike the dense MLPs' {down_name!r}; declare an adapter")
    embed_path = _path_of(model, model.get_input_embeddings())
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_path = _path_of(model, head)
    body_path = layers_path.rpartition(".")[0]
    body = model.get_submodule(body_path) if body_path else model
    norms = [k for k, m in body.named_children() if "norm" in type(m).__name__.lower() or "norm" in k or k.startswith("ln_f")]
    if embed_path is None or head_path is None or not norms:
        what = "input embedding" if embed_path is None else "LM head" if head_path is None else f"final norm in {body_path}"
        raise WorkbenchError(f"unsupported architecture {mt!r}: no {what} found; declare an adapter "
                             "(README, 'Your own architecture')")
    final_norm_path = f"{body_path}.{norms[-1]}" if body_path else norms[-1]
    input_norm, post_norm = _child(first, INPUT_NORM_NAMES), _child(first, POST_NORM_NAMES)
    adapter = Adapter(name=f"{mt} (inferred)", model_types=(mt,), layers_path=layers_path, embed_path=embed_path,
                      final_norm_path=final_norm_path, lm_head_path=head_path, attn_name=attn_name, mlp_name=mlp_name,
                      input_norm_name=input_norm or "", post_attn_norm_name=post_norm or "", down_proj_name=down_name)
    if moe:
        base = {f.name: getattr(adapter, f.name) for f in fields(Adapter)}
        base.update(router_name=router, experts_name=experts, shared_names=shared, shared_gate_name=gate)
        adapter = InferredMoeAdapter(**base)
        adapter = _verify_routing(model, adapter, mt)
    prenorm = _verify(model, adapter, mt)
    if not prenorm:
        adapter = replace(adapter, input_norm_name="", post_attn_norm_name="")
    return adapter


def _verify(model: nn.Module, adapter: Adapter, mt: str) -> bool:
    """One forward of a few tokens: the output projection writes the MLP's output (else an error); returns
    whether every layer is a plain pre-norm block (input norm -> attention, residual + attention ->
    post-attention norm -> MLP)."""
    seen: dict[tuple[int, str], object] = {}
    handles = []
    layers = adapter.decoder_layers(model)

    def keep(i, key):  # the module's output under (i, key), its first input under (i, key + ".in")
        def hook(mod, args, kwargs, out):
            seen[(i, key)] = out[0] if isinstance(out, tuple) else out
            seen[(i, key + ".in")] = args[0] if args else next(iter(kwargs.values()), None)
        return hook

    for i, layer in enumerate(layers):
        mlp = adapter.mlp(layer)
        handles.append(layer.register_forward_hook(keep(i, "layer"), with_kwargs=True))
        handles.append(adapter.attention(layer).register_forward_hook(keep(i, "attn"), with_kwargs=True))
        handles.append(mlp.register_forward_hook(keep(i, "mlp"), with_kwargs=True))
        if adapter.experts(layer) is None:  # a dense MLP (MoE blocks were verified by _verify_routing)
            handles.append(getattr(mlp, adapter.down_proj_name).register_forward_hook(keep(i, "down"), with_kwargs=True))
        for key, name in (("norm1", adapter.input_norm_name), ("norm2", adapter.post_attn_norm_name)):
            if name and getattr(layer, name, None) is not None:
                handles.append(getattr(layer, name).register_forward_hook(keep(i, key), with_kwargs=True))
    vocab = int(getattr(model.config, "vocab_size", 2) or 2)
    ids = (torch.arange(5) * 7 + 3).remainder(vocab)[None]
    dev = next(model.parameters()).device
    try:
        with torch.no_grad():
            adapter.body(model)(input_ids=ids.to(dev), use_cache=False)
    except Exception as e:  # the model's own forward failed: say so in one line
        raise WorkbenchError(f"unsupported architecture {mt!r}: a forward of 5 tokens failed while verifying the "
                             f"structure read from the modules ({type(e).__name__}: {e})") from None
    finally:
        for h in handles:
            h.remove()
    prenorm = True
    for i in range(len(layers)):
        if (i, "mlp") not in seen or (i, "attn") not in seen:
            raise WorkbenchError(f"unsupported architecture {mt!r}: layer {i}'s attention or MLP did not run in a forward")
        if (i, "down") in seen and not torch.equal(seen[(i, "down")], seen[(i, "mlp")]):
            raise WorkbenchError(f"unsupported architecture {mt!r}: layer {i}'s {adapter.down_proj_name} output is not the "
                                 "MLP's output (the MLP transforms it further); declare an adapter")
        try:
            attn_in, mlp_in = seen[(i, "attn.in")], seen[(i, "mlp.in")]
            n1, n2 = seen[(i, "norm1")], seen[(i, "norm2")]
            x, a = seen[(i, "layer.in")], seen[(i, "attn")]
            tol = 1e-5 if x.dtype == torch.float32 else 1e-2  # the residual add rounds in half precision
            prenorm &= (torch.equal(n1, attn_in) and torch.equal(n2, mlp_in) and torch.equal(seen[(i, "norm1.in")], x)
                        and torch.allclose(seen[(i, "norm2.in")], x + a, rtol=tol, atol=tol))
        except KeyError:
            prenorm = False
    return prenorm
