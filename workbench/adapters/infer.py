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

MoE blocks are not inferred: routing arithmetic (softmax or sigmoid, renormalisation, biases,
scaling) differs by family and cannot be read from the tree, so an undeclared MoE family gets a
one-line error naming what was found and pointing at a declared adapter (README, "Your own
architecture"). ``workbench check MODEL`` runs the full battery on any model, declared or inferred.
"""

from __future__ import annotations

from dataclasses import replace

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
    for i, layer in enumerate(layers):
        mlp = getattr(layer, mlp_name)
        router, experts = _child(mlp, ROUTER_NAMES), _child(mlp, EXPERT_NAMES)
        if router or experts:
            raise WorkbenchError(
                f"unsupported architecture {mt!r}: layer {i}'s {mlp_name} ({type(mlp).__name__}) is a mixture of experts "
                f"(router {router!r}, experts {experts!r}); its routing arithmetic cannot be read from the module tree, "
                "so it needs a declared adapter (README, 'Your own architecture')")
        if _child(mlp, DOWN_NAMES) is None:
            raise WorkbenchError(f"unsupported architecture {mt!r}: layer {i}'s {mlp_name} ({type(mlp).__name__}) has no "
                                 f"output projection (one of {', '.join(DOWN_NAMES)})")
    down_name = _child(getattr(first, mlp_name), DOWN_NAMES)
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
        if not torch.equal(seen[(i, "down")], seen[(i, "mlp")]):
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
