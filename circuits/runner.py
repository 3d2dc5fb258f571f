"""Run a Hugging Face model as an EAP graph: record senders, give each receiver its own input.

One context manager, :class:`GraphRunner`, instruments the model in place (restored on exit) and
runs forwards in three modes:

* ``plain``: the model's own forward; optionally records every sender's output ``acts [S, B, T, d]``
  and the residual stream at every stage ``resid [P, B, T, d]``.
* ``grad``: each stage's receivers get their own copy of the normed residual stream (an ``expand``,
  so the forward is the same numbers); a gradient hook on the copies maps each receiver's gradient
  back through the norm (its vector-Jacobian product at the residual) and adds
  ``dM/d(receiver input)`` into ``grads [R, B, T, d]``. The embedding can be replaced (EAP-IG).
* ``patch``: path patching on edges. Receiver v's input is
  ``resid_corrupted - sum_{u in circuit(v)} (act_corrupted_u - act_current_u)``, i.e. the current
  outputs of the circuit's senders plus the corrupted outputs of every other sender (computed from
  whichever of the two edge sets is smaller, so a full circuit is the clean run and an empty one the
  corrupted run, exactly).

How receivers get their own input: the layer norm before a stage is hooked and its output expanded
to ``[B, T, R, d]`` copies (patch mode: the norm is applied to each patched copy); the attention's
input projections are swapped for stand-ins that project each query head / KV group from its own
copy (weights sliced, no ungrouping; ``circuits.attention`` has the layouts); in MoE blocks the router,
the fused experts and the shared expert (and its gate) are swapped for wrappers reading their own
copies (an MoE block with a ModuleList of experts is swapped as a whole for a wrapper that routes with
the adapter's rule, as tracing does). Everything after the projections (RoPE, q/k norms, attention kernel, o_proj) is the model's
own code. Parameters are frozen while the runner is active: backward computes activation
gradients only.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.utils.checkpoint
from torch import nn

from workbench.circuits import attention
from workbench.circuits.attention import _StandIn
from workbench.circuits.graph import Graph, LayerPlan, attention_shape
from workbench.adapters.base import Adapter, get_path
from workbench.errors import WorkbenchError
from workbench.tracing.capture import fused_expert_output


@dataclass
class Patch:
    """What a patched forward needs: the circuit and the corrupted run's senders and residuals."""

    mask: torch.Tensor  # [S, R] bool, edges in the circuit
    corr_acts: torch.Tensor | None  # [S, B, T, d]; None with forward(subtract=True) (acts holds them)
    corr_resid: torch.Tensor  # [P, B, T, d]


class _Slot(_StandIn):
    """Stands in for a module of an MoE block that reads receiver copy ``slot`` (router, shared expert, its gate)."""

    def __init__(self, base: nn.Module, runner: "GraphRunner", stage: int, slot: int):
        super().__init__(base, runner, stage)
        self.slot = slot

    def forward(self, hidden: torch.Tensor, *args, **kwargs):
        y = self.copies()
        if y is not None:
            hidden = y[:, :, self.slot].reshape(hidden.shape)
        return self.base(hidden, *args, **kwargs)


class _Experts(_StandIn):
    """Stands in for fused experts: each expert reads its own copy and its routed output is recorded."""

    def __init__(self, base: nn.Module, runner: "GraphRunner", plan: LayerPlan):
        super().__init__(base, runner, plan.mlp_stage)
        self.plan = plan

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        r = self.runner
        y = self.copies()
        if y is None and r._acts is None and r._live is None:
            return self.base(hidden, top_k_index, top_k_weights)
        out = torch.zeros_like(hidden)
        acts = None
        if r._acts is not None:
            acts = r._acts[self.plan.mlp_sender0:self.plan.mlp_sender0 + self.plan.n_experts]
            acts.zero_()
            acts = acts.view(self.plan.n_experts, -1, hidden.shape[-1])
        for e in range(self.plan.n_experts):
            tok, pos = torch.where(top_k_index == e)
            if tok.numel() == 0:
                continue
            x = hidden[tok] if y is None else y[:, :, 1 + e].reshape(-1, y.shape[-1])[tok]
            ye = fused_expert_output(self.base, x, e) * top_k_weights[tok, pos, None]
            out = out.index_add(0, tok, ye.to(out.dtype))
            if acts is not None:
                acts[e, tok] = ye.detach().to(acts.dtype)
            if r._live is not None:
                r._live[self.plan.mlp_sender0 + e] = torch.zeros_like(hidden).index_add(0, tok, ye).view(r._live[0].shape)
        if r._live is not None:
            for e in range(self.plan.n_experts):
                r._live.setdefault(self.plan.mlp_sender0 + e, torch.zeros_like(r._live[0]))
        return out


class _ModuleListMoe(_StandIn):
    """Stands in for an MoE block with a ModuleList of experts (the older layout): routes with the
    adapter's rule from the router's own copy, runs each expert on its own copy and records each
    routed expert's weighted output and the (gated) shared expert's output."""

    def __init__(self, base: nn.Module, runner: "GraphRunner", plan: LayerPlan):
        super().__init__(base, runner, plan.mlp_stage)
        self.plan = plan

    def forward(self, hidden: torch.Tensor, *args, **kwargs):
        r, plan, ad, base = self.runner, self.plan, self.runner.adapter, self._modules["base"]
        y = self.copies()
        if y is None and r._acts is None and r._live is None:
            return base(hidden, *args, **kwargs)
        B, T, d = hidden.shape
        flat = hidden.reshape(-1, d)

        def copy(slot: int) -> torch.Tensor:
            return flat if y is None else y[:, :, slot].reshape(-1, d)

        router = getattr(base, ad.router_name)
        weights, index = ad.select_experts(r.model, router(copy(0)), router)
        experts = getattr(base, ad.experts_name)
        acts = None
        if r._acts is not None:
            acts = r._acts[plan.mlp_sender0:plan.mlp_sender0 + plan.n_experts + plan.n_shared].view(
                plan.n_experts + plan.n_shared, -1, d)
            acts.zero_()
        out = torch.zeros_like(flat)
        for e in range(plan.n_experts):
            tok, pos = torch.where(index == e)
            if tok.numel() == 0:
                continue
            ye = experts[e](copy(1 + e)[tok]) * weights[tok, pos, None]
            out = out.index_add(0, tok, ye.to(out.dtype))
            if acts is not None:
                acts[e, tok] = ye.detach().to(acts.dtype)
            if r._live is not None:
                r._live[plan.mlp_sender0 + e] = torch.zeros_like(flat).index_add(0, tok, ye).view(B, T, d)
        if r._live is not None:
            for e in range(plan.n_experts):
                r._live.setdefault(plan.mlp_sender0 + e, torch.zeros_like(hidden))
        if plan.n_shared:
            slot = 1 + plan.n_experts
            name = next(n for n in ad.shared_names if getattr(base, n, None) is not None)
            x = copy(slot)
            ys = getattr(base, name)(x)
            gate = getattr(base, ad.shared_gate_name, None) if ad.shared_gate_name else None
            if gate is not None:
                ys = torch.sigmoid(gate(x)) * ys
            out = out + ys
            if acts is not None:
                acts[plan.n_experts] = ys.detach()
            if r._live is not None:
                r._live[plan.mlp_sender0 + plan.n_experts] = ys.view(B, T, d)
        return out.view(B, T, d)


class _Tap(torch.autograd.Function):
    """``y [B, T, d]`` expanded to a stage's ``n`` receiver copies ``[B, T, n, d]``. Backward maps each
    copy's gradient through the norm at its input ``x`` (``vjp(x, g)``) and hands it to ``sink``, then
    passes the sum on to ``y``. ``x`` is saved like any activation, so a checkpointed layer recomputes
    it instead of keeping it."""

    @staticmethod
    def forward(ctx, y, x, vjp, sink, n):
        ctx.save_for_backward(x)
        ctx.vjp, ctx.sink = vjp, sink
        return y.unsqueeze(2).expand(*y.shape[:2], n, y.shape[-1])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        ctx.sink(ctx.vjp(x.detach(), g))
        return g.sum(2), None, None, None, None


class _Staged:
    """What the hooks record senders into when ``forward(subtract=True)``: ``target [S, B, T, d]`` holds
    the corrupted senders and each sender's output of this run is to be subtracted from its row. The
    senders written since the last stage read sit in a small staging buffer, where hooks read and
    rewrite them as they would in ``acts`` (an output norm's share, an MoE block's shared expert, a
    scale); when the next stage reads the residual stream they are final and are subtracted from
    ``target`` (:meth:`commit`), so ``target`` ends as ``corrupted - current`` with no second buffer."""

    def __init__(self, target: torch.Tensor, graph: Graph):
        self.target = target
        self.bounds = [st.n_up for st in graph.stages]  # senders upstream of each stage (non-decreasing)
        width = max(b - a for a, b in zip([0] + self.bounds[:-1], self.bounds))
        self.buf = torch.zeros(width, *target.shape[1:], dtype=target.dtype, device=target.device)
        self.lo, self.hi = 0, self.bounds[0]

    def _local(self, i: int) -> int:
        if not self.lo <= i < self.hi:
            raise RuntimeError(f"sender {i} recorded outside the senders of this stage ({self.lo}..{self.hi - 1})")
        return i - self.lo

    def __getitem__(self, idx):
        if isinstance(idx, slice) and idx.step is None:
            return self.buf[self._local(idx.start):self._local(idx.stop - 1) + 1]
        return self.buf[self._local(int(idx))]

    def __setitem__(self, idx, value) -> None:
        if isinstance(idx, slice) and idx.step is None:
            self.buf[self._local(idx.start):self._local(idx.stop - 1) + 1] = value
        else:
            self.buf[self._local(int(idx))] = value

    def commit(self, stage: int) -> None:
        """Stage ``stage`` reads the residual stream: subtract the senders upstream of it not yet subtracted."""
        n = self.bounds[stage]
        if n > self.lo:
            self.target[self.lo:n].sub_(self.buf[:n - self.lo])
            self.buf[:n - self.lo].zero_()
            self.lo = n
        # the senders written before the next stage that reads more of them (a parallel block's MLP stage
        # reads what its attention stage reads: the layer's heads and MLP come before the next layer)
        self.hi = next((b for b in self.bounds[stage + 1:] if b > self.lo), self.lo)


class _Checkpointed(_StandIn):
    """Stands in for a decoder layer: in grad mode (outside ``within`` re-scoring) the layer runs under
    activation checkpointing, so backward keeps its input only and recomputes it (the runner's hooks
    run again then, and record nothing: see ``GraphRunner.forward``)."""

    def __init__(self, base: nn.Module, runner: "GraphRunner"):
        super().__init__(base, runner, -1)

    def forward(self, *args, **kwargs):
        r = self.runner
        if r._mode == "grad" and r._within is None and torch.is_grad_enabled():
            base = self._modules["base"]

            def layer(*a):
                try:
                    return base(*a, **kwargs)
                finally:  # the receivers' copies are the layer's own: a recomputation in backward leaves none behind
                    r._stash.clear()
            return torch.utils.checkpoint.checkpoint(layer, *args, use_reentrant=False)
        return self._modules["base"](*args, **kwargs)


PATCH_CHUNK = 32  # senders whose differences a patched stage forms at a time

_IDENTITY = nn.Identity()  # the "norm" of a stage that reads the residual stream directly (post-norm blocks)


def norm_split(norm: nn.Module, z: torch.Tensor, y: torch.Tensor, cache: dict):
    """``parts [n, ..., d]`` (summing to ``z``) -> their shares of ``y = norm(z)``: ``norm`` is an RMSNorm or
    LayerNorm, ``y = r(z) g * c(z) + b`` (c centres for a LayerNorm), so each part gets ``r g * c(part)``
    with the per-token ``r`` of the whole. The gain, bias and centring are read from the norm on probes;
    the split is checked once per norm against its own output. ``cache`` keeps what was read per norm (a dict the
    caller owns: ``id(norm) -> (gain, bias, centred, checked)``)."""
    key = id(norm)
    if key not in cache:
        d = z.shape[-1]
        p = torch.ones(d, device=z.device, dtype=z.dtype)
        p[1::2] = -1
        if d % 2:
            p[-1] = 0
        with torch.no_grad():
            up, down, shifted = norm.forward(p[None]), norm.forward(-p[None]), norm.forward(p[None] + 3)
        bias, gain = ((up + down) / 2)[0].float(), ((up - down) / 2)[0].float() * p.float()
        centred = bool(torch.allclose(shifted, up, rtol=1e-3, atol=1e-3 * float(up.abs().max())))
        cache[key] = (gain, bias, centred, False)
    gain, bias, centred, checked = cache[key]

    def centre(t):
        t = t.float()
        return t - t.mean(-1, keepdim=True) if centred else t

    gz = gain * centre(z)
    r = ((y.float() - bias) * gz).sum(-1, keepdim=True) / (gz * gz).sum(-1, keepdim=True).clamp(min=1e-30)
    if not checked:
        yd = y.detach().float()
        err = float(((r.detach() * gz + bias) - yd).abs().max() / yd.abs().max().clamp(min=1e-12))
        if err > (1e-4 if y.dtype == torch.float32 else 2e-2):
            raise WorkbenchError(f"circuits cannot split the output norm {type(norm).__name__} across its senders: "
                                 f"it is not r(z) * gain * z (+ bias) per token (relative error {err:.1e})")
        cache[key] = (gain, bias, centred, True)

    def split(parts: torch.Tensor) -> torch.Tensor:
        return (r * gain * centre(parts)).to(parts.dtype)
    return split


def _rms_vjp(norm: nn.Module, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Closed-form VJP of ``y = w * x / sqrt(mean(x^2) + eps)`` (Hugging Face RMSNorm), vectorised
    over the receiver dimension of ``g [B, T, R, d]``; ``x [B, T, d]``."""
    x32 = x.float()
    r = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)  # [B, T, 1]
    wg = g.float() * norm.weight.float()
    coef = torch.einsum("btrd,btd->btr", wg, x32).unsqueeze(-1) * (r.pow(3) / x.shape[-1]).unsqueeze(2)
    wg.mul_(r.unsqueeze(2))
    wg.addcmul_(x32.unsqueeze(2), coef, value=-1.0)  # r w g - x r^3 mean(w g x)
    return wg.to(g.dtype)


def _rms_matches(norm: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``norm`` is an RMSNorm the closed form describes (checked against autograd on ``x``)."""
    if not (hasattr(norm, "variance_epsilon") and isinstance(getattr(norm, "weight", None), torch.Tensor)
            and norm.weight.shape == x.shape[-1:]):
        return False
    xs = x[:1, :2].detach().clone().requires_grad_(True)
    g = torch.randn(*xs.shape[:2], 2, xs.shape[-1], generator=torch.Generator().manual_seed(0), dtype=x.dtype)
    g = g.to(x.device)
    with torch.enable_grad():
        y = norm.forward(xs)
        ref = torch.stack([torch.autograd.grad(y, xs, g[:, :, i], retain_graph=True)[0] for i in range(2)], dim=2)
    return torch.allclose(_rms_vjp(norm, xs.detach(), g), ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()) + 1e-12)


class GraphRunner:
    """Context manager: instrument ``model`` as ``graph`` (see the module docstring)."""

    def __init__(self, model: nn.Module, adapter: Adapter, graph: Graph, *, checkpoint: bool = False):
        self.model, self.adapter, self.graph = model, adapter, graph
        self.checkpoint = checkpoint  # grad mode keeps each decoder layer's input only and recomputes the layer in backward
        self.base = getattr(model, model.base_model_prefix)
        self._handles: list = []
        self._swapped: list[tuple[nn.Module, str, nn.Module, bool]] = []
        self._frozen: list[tuple[nn.Parameter, bool]] = []
        self._stash: dict = {}  # stage -> receiver copies [B, T, R, d] (and MLA latents by (stage, "v_latent"))
        self._rms_ok: dict[type, bool] = {}
        self._norm_parts: dict[int, tuple] = {}  # id(output norm) -> (gain, bias, centred, checked)
        self._reset()

    def _reset(self) -> None:
        self._mode = "plain"
        self._acts = self._resid = self._embed = None
        self._patch: Patch | None = None
        self._mix: tuple[float, torch.Tensor] | None = None
        self._within: Patch | None = None
        self._live: dict[int, torch.Tensor] | None = None  # sender -> its output, in the autograd graph
        self._on_grad = None
        self._stash.clear()

    # ----- install / remove ------------------------------------------------------------------------
    def __enter__(self) -> "GraphRunner":
        try:
            self._install()
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._remove()

    def _swap(self, parent: nn.Module, name: str, new: nn.Module) -> None:
        """Put ``new`` where ``parent.name`` is. A module held as a plain attribute (Granite-MoE-Shared's block
        holds the layer's shared MLP so) stays a plain attribute, swapped and restored in ``__dict__``: a
        ``setattr`` would register it as a child and change the model's ``state_dict``."""
        plain = name in parent.__dict__
        self._swapped.append((parent, name, getattr(parent, name), plain))
        if plain:
            parent.__dict__[name] = new
        else:
            setattr(parent, name, new)

    def _install(self) -> None:
        ad, g = self.adapter, self.graph
        for p in self.model.parameters():
            self._frozen.append((p, p.requires_grad))
            p.requires_grad_(False)
        emb = ad.embedding(self.model)
        final_norm = get_path(self.model, ad.final_norm_path)
        if emb is None or final_norm is None:
            raise WorkbenchError(f"{ad.name} adapter: cannot find the embedding or the final norm")
        self._handles.append(emb.register_forward_hook(self._embed_hook))
        self._handles.append(final_norm.register_forward_hook(self._final_hook))
        layers = ad.decoder_layers(self.model)
        if self.checkpoint:
            for i in range(len(layers)):
                self._swap(layers, str(i), _Checkpointed(layers[i], self))
            layers = [m.base for m in layers]
        for plan in g.layers:
            layer, blk = layers[plan.layer], plan.block
            attn, mlp = ad.attention(layer), ad.mlp(layer)
            spec = attention_shape(ad, self.model, layer)
            out = attention.out_proj(attn, spec)
            if blk.attn_out and getattr(out, "bias", None) is not None:
                raise WorkbenchError(f"layer {plan.layer}: the attention's output projection has a bias and its output "
                                     f"goes through the norm {blk.attn_out!r}; circuits cannot split that across heads")
            # where each stage reads the residual stream: through its norm, or (post-norm) directly
            if blk.attn_in and blk.attn_in == blk.mlp_in:  # one norm feeds attention and MLP (Phi, Cohere, Falcon)
                self._handles.append(get_path(layer, blk.attn_in).register_forward_hook(
                    self._norm_reader((plan.attn_stage, plan.mlp_stage), plan.attn_stage)))
            else:
                for stage, name, consumer in ((plan.attn_stage, blk.attn_in, attn), (plan.mlp_stage, blk.mlp_in, mlp)):
                    if name:
                        self._handles.append(get_path(layer, name).register_forward_hook(
                            self._norm_reader((stage,), plan.attn_stage)))
                    else:
                        self._handles.append(consumer.register_forward_pre_hook(
                            self._direct_reader(stage, plan.attn_stage), with_kwargs=True))
            attention.install(self, attn, spec, plan.attn_stage)
            self._handles.append(out.register_forward_pre_hook(self._o_proj_hook(plan)))
            if blk.attn_out:
                self._handles.append(get_path(layer, blk.attn_out).register_forward_hook(
                    self._out_norm_hook(plan.head_sender0, plan.n_heads, blk.attn_scale)))
            n_mlp = 1 if plan.kind == "dense" else plan.n_experts + plan.n_shared
            if blk.mlp_out:
                self._handles.append(get_path(layer, blk.mlp_out).register_forward_hook(
                    self._out_norm_hook(plan.mlp_sender0, n_mlp, blk.mlp_scale)))
            if plan.kind == "dense":
                self._handles.append(mlp.register_forward_pre_hook(self._dense_input_hook(plan), with_kwargs=True))
                self._handles.append(mlp.register_forward_hook(self._dense_hook(plan)))
                continue
            if plan.layout == "modulelist":
                wrapper = _ModuleListMoe(mlp, self, plan)
                self._swap(layer, ad.mlp_name, wrapper)
                self._handles.append(wrapper.register_forward_hook(self._moe_hook(plan)))
                continue
            self._swap(mlp, ad.router_name, _Slot(ad.router(layer), self, plan.mlp_stage, 0))
            self._swap(mlp, ad.experts_name, _Experts(ad.experts(layer), self, plan))
            if plan.n_shared:
                slot = 1 + plan.n_experts
                name = next(n for n in ad.shared_names if getattr(mlp, n, None) is not None)
                self._swap(mlp, name, _Slot(getattr(mlp, name), self, plan.mlp_stage, slot))
                if ad.shared_gate_name and getattr(mlp, ad.shared_gate_name, None) is not None:
                    self._swap(mlp, ad.shared_gate_name,
                               _Slot(getattr(mlp, ad.shared_gate_name), self, plan.mlp_stage, slot))
            self._handles.append(mlp.register_forward_hook(self._moe_hook(plan)))

    def _remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for parent, name, old, plain in reversed(self._swapped):
            if plain:
                parent.__dict__[name] = old
            else:
                setattr(parent, name, old)
        self._swapped.clear()
        for p, flag in self._frozen:
            p.requires_grad_(flag)
        self._frozen.clear()
        self._reset()

    # ----- running -----------------------------------------------------------------------------------
    def forward(self, ids: torch.Tensor, *, mode: str = "plain", acts: torch.Tensor | None = None,
                resid: torch.Tensor | None = None, grads: torch.Tensor | None = None,
                embed: torch.Tensor | None = None, patch: Patch | None = None,
                mix: tuple[float, torch.Tensor] | None = None, within: Patch | None = None,
                backward=None, on_grad=None, subtract: bool = False) -> torch.Tensor:
        """The final hidden states (after the final norm) ``[B, T, d]``; fills ``acts``/``resid``/``grads``.

        In ``grad`` mode the result is part of an autograd graph: call ``backward`` on a metric of it
        and the receivers' gradients land in ``grads``. Or pass ``backward`` (final hidden -> scalar):
        the runner calls it after the forward (``acts`` are complete then and no longer written) and
        back-propagates the scalar itself, as it must when layers are checkpointed (their recomputation
        in backward needs the runner's state). ``on_grad(stage, g)`` instead of ``grads`` receives each
        stage's receiver gradients ``g [B, T, n, d]`` (at the receivers' residual copies) as backward
        produces them, to be contracted and dropped. ``subtract``: ``acts`` holds the corrupted
        senders and each sender's output of this run is subtracted from its row (:class:`_Staged`), so
        that ``acts`` ends as the differences ``corrupted - current`` without a second buffer. ``mix = (t, corr_resid [P, B, T, d])`` (grad
        mode) has every receiver read ``corr_resid + t (resid - corr_resid)`` instead of the residual
        ``resid`` of this run: every edge scaled by t between its corrupted and its current value.
        ``grads [R, B, T, d]`` is an ``on_grad`` that adds each stage's gradients into its rows.
        """
        if (mix is not None or within is not None) and mode != "grad":
            raise ValueError("mix and within are for grad mode")
        if within is not None and mix is None:
            raise ValueError("within needs mix (t and the corrupted residuals)")
        if mode not in ("plain", "grad", "patch"):
            raise ValueError(mode)
        if (mode == "patch") != (patch is not None):
            raise ValueError("patch mode needs a Patch (and only patch mode takes one)")
        if mode == "patch" and acts is None:
            raise ValueError("patch mode records the current senders: pass acts")
        if (backward is not None or on_grad is not None) and mode != "grad":
            raise ValueError("backward and on_grad are for grad mode")
        if self.checkpoint and mode == "grad" and backward is None:
            raise ValueError("with checkpointed layers, pass backward (the runner back-propagates)")
        if subtract and acts is None:
            raise ValueError("subtract needs acts (the corrupted senders)")
        if grads is not None and on_grad is not None:
            raise ValueError("pass grads or on_grad, not both")
        # the circuit's mask where the model is (callers keep theirs on the CPU)
        if patch is not None and patch.mask.device != ids.device:
            patch = replace(patch, mask=patch.mask.to(ids.device))
        if within is not None and within.mask.device != ids.device:
            within = replace(within, mask=within.mask.to(ids.device))
        if grads is not None:  # a buffer is one way to take the gradients stage by stage
            def on_grad(st, g, grads=grads):
                grads[st.start:st.stop].add_(g.permute(2, 0, 1, 3))
        self._reset()
        if subtract:
            acts = _Staged(acts, self.graph)
        self._mode, self._acts, self._resid, self._embed, self._patch = mode, acts, resid, embed, patch
        self._mix, self._within, self._on_grad = mix, within, on_grad
        del acts, resid, grads, embed, patch  # the runner's references only: backward may free what it no longer needs
        if within is not None:
            self._live = {}
        try:
            with torch.set_grad_enabled(mode == "grad"):
                out = self.base(input_ids=ids, use_cache=False)
                hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
                if backward is not None:
                    self._acts = self._resid = None  # recomputed layers must not record again
                    backward(hidden).backward()
            return hidden
        finally:
            self._reset()

    # ----- receiver inputs -------------------------------------------------------------------------
    def _receivers(self, stage_index: int, norm: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Each receiver's normed input ``[B, T, R, d]`` for a stage whose residual is ``x`` and norm output ``y``.

        grad mode: the receivers share the norm output (an ``expand``, so the forward is unchanged); a
        hook takes each receiver's gradient there and maps it through the norm's vector-Jacobian
        product at ``x`` (``torch.func``, vectorised over receivers) to the gradient with respect to
        the receiver's own copy of the residual stream. patch mode: each receiver's residual is
        patched and normed separately.
        """
        st = self.graph.stages[stage_index]
        B, T, d = x.shape
        if self._mode == "grad" and self._within is not None:
            return self._receivers_within(st, norm, x)
        if self._mode == "grad":
            if self._mix is not None:
                t, corr = self._mix
                x = torch.lerp(corr[stage_index].to(x.dtype), x, t)
                y = norm.forward(x)
            if not y.requires_grad or self._on_grad is None:
                return y.unsqueeze(2).expand(B, T, st.size, d)
            on_grad = self._on_grad
            return _Tap.apply(y, x, lambda xd, g: self._norm_vjp(norm, xd, g), lambda g: on_grad(st, g), st.size)
        p = self._patch
        block = p.mask[:st.n_up, st.start:st.stop]
        n_in = int(block.sum())
        if 2 * n_in <= block.numel():  # few circuit edges: start from the corrupted residual
            base, sign, use = p.corr_resid[stage_index].to(x.dtype), -1.0, block
        else:  # few patched edges: start from the current residual
            base, sign, use = x, 1.0, ~block
        rows = use.any(dim=1).nonzero().flatten()
        xs = base.unsqueeze(2).expand(B, T, st.size, d)
        if rows.numel():
            m = torch.zeros(st.size, B * T * d, dtype=x.dtype, device=x.device)
            for chunk in rows.split(PATCH_CHUNK):  # the differences of a few senders at a time
                if isinstance(self._acts, _Staged):  # upstream rows already hold corrupted - current
                    delta = self._acts.target[chunk].to(x.dtype).reshape(chunk.numel(), -1)
                else:
                    delta = (p.corr_acts[chunk].to(x.dtype) - self._acts[chunk].to(x.dtype)).reshape(chunk.numel(), -1)
                m.addmm_(use[chunk].T.to(x.dtype), delta)
            xs = xs + sign * m.view(st.size, B, T, d).permute(1, 2, 0, 3)
        elif sign > 0:  # nothing patched: the current normed residual, exactly
            return y.unsqueeze(2).expand(B, T, st.size, d)
        return norm.forward(xs)

    def _receivers_within(self, st, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """grad mode with ``within``: receiver v reads ``corr + t sum_{u -> v in circuit} (u - corrupted u)``,
        with u the senders' outputs of this run (every edge outside the circuit stays corrupted); its
        gradient is taken at that input."""
        t, corr = self._mix
        w = self._within
        B, T, d = x.shape
        block = w.mask[:st.n_up, st.start:st.stop]
        rows = block.any(dim=1).nonzero().flatten().tolist()
        xs = corr[st.index].to(x.dtype).unsqueeze(2).expand(B, T, st.size, d)
        if rows:
            live = torch.stack([self._live[i] for i in rows])
            diff = (live - w.corr_acts[rows]).reshape(len(rows), -1)
            m = (block[rows].T.to(diff.dtype) @ diff).view(st.size, B, T, d).permute(1, 2, 0, 3)
            xs = xs + t * m
        if not xs.requires_grad:
            xs = xs.clone().requires_grad_(True)
        if self._on_grad is not None:
            on_grad = self._on_grad
            xs.register_hook(lambda g: on_grad(st, g))
        return norm.forward(xs)

    def _set_live(self, first: int, outs: torch.Tensor) -> None:
        if self._live is not None:
            for i in range(outs.shape[0]):
                self._live[first + i] = outs[i]

    def _norm_vjp(self, norm: nn.Module, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """``g [B, T, R, d]`` (gradients at the norm's output, one per receiver) -> gradients at its input."""
        if norm is _IDENTITY:
            return g
        if self._rms_ok.get(type(norm)) is None:
            self._rms_ok[type(norm)] = _rms_matches(norm, x)
        if self._rms_ok[type(norm)]:
            return _rms_vjp(norm, x, g)
        _, vjp = torch.func.vjp(norm.forward, x)
        return torch.vmap(vjp, in_dims=2, out_dims=2)(g)[0]

    # ----- hooks --------------------------------------------------------------------------------------
    def _embed_hook(self, mod, args, out):
        if self._embed is not None:
            out = self._embed
        if self._mode == "grad" and not out.requires_grad:
            out = out.detach().requires_grad_(True)
        scale = self.graph.embed_scale  # the model multiplies the embedding by it before the first layer (Granite)
        if self._acts is not None:
            self._acts[0] = out.detach() * scale
        self._set_live(0, (out * scale if scale != 1.0 else out).unsqueeze(0))
        return out

    def _final_hook(self, mod, args, out):
        last = len(self.graph.stages) - 1
        self._read(last, mod, args[0], out)
        return None if self._mode == "plain" else self._stash.pop(last)[:, :, 0]

    def _norm_reader(self, stages: tuple[int, ...], first: int):
        """Forward hook on the norm the receivers of ``stages`` read through: records the residual and
        stashes the receivers' copies (the stand-ins and the dense MLP's input hook take them from there)."""
        def hook(mod, args, out):
            self._drop_stash(first)
            for stage in stages:
                self._read(stage, mod, args[0], out)
        return hook

    def _direct_reader(self, stage: int, first: int):
        """Forward pre-hook on a module that reads the residual stream with no norm (post-norm blocks)."""
        def hook(mod, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            self._drop_stash(first)
            self._read(stage, _IDENTITY, x, x)
        return hook

    def _drop_stash(self, stage: int) -> None:
        """Forget the receiver copies of the stages before ``stage`` (the first of a layer: the earlier layers have run)."""
        for k in [k for k in self._stash if (k if isinstance(k, int) else k[0]) < stage]:
            del self._stash[k]

    def _read(self, stage: int, norm: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        """Stage ``stage`` reads residual ``x`` through ``norm`` (output ``y``): record it, stash the receivers' copies."""
        if self._resid is not None:
            self._resid[stage] = x.detach()
        if isinstance(self._acts, _Staged):
            self._acts.commit(stage)
        if self._mode != "plain":
            self._stash[stage] = self._receivers(stage, norm, x, y)

    def _dense_input_hook(self, plan: LayerPlan):
        """Forward pre-hook on a dense MLP: its input is its receiver's copy."""
        def hook(mod, args, kwargs):
            y = self._stash.get(plan.mlp_stage)
            if y is None:
                return None
            if args:
                return (y[:, :, 0], *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": y[:, :, 0]}
        return hook

    def _o_proj_hook(self, plan: LayerPlan):
        scale = 1.0 if plan.block.attn_out else plan.block.attn_scale  # an output norm's hook scales instead

        def hook(mod, args):
            if self._acts is None and self._live is None:
                return None
            z = args[0] if self._live is not None else args[0].detach()
            heads = attention.head_outputs(mod, z, plan.n_heads, plan.head_dim)
            if scale != 1.0:
                heads = heads * scale
            if self._acts is not None:
                self._acts[plan.head_sender0:plan.head_sender0 + plan.n_heads] = heads.detach()
            self._set_live(plan.head_sender0, heads)
            return None
        return hook

    def _out_norm_hook(self, first: int, n: int, scale: float):
        """Forward hook on a sublayer's output norm: senders ``[first, first + n)`` (recorded before it, summing
        to its input) become their share of its output, the norm's per-token scale taken from the whole input."""
        def hook(mod, args, out):
            if self._acts is None and self._live is None:
                return None
            # recording alone builds no autograd graph (a checkpointed layer's recomputation records nothing,
            # and must save the same tensors as its forward)
            with torch.set_grad_enabled(self._live is not None and torch.is_grad_enabled()):
                split = norm_split(mod, args[0], out, self._norm_parts)
                if self._acts is not None:
                    self._acts[first:first + n] = split(self._acts[first:first + n]).detach() * scale
                if self._live is not None:
                    self._set_live(first, split(torch.stack([self._live[first + i] for i in range(n)])) * scale)
            return None
        return hook

    def _dense_hook(self, plan: LayerPlan):
        scale = 1.0 if plan.block.mlp_out else plan.block.mlp_scale

        def hook(mod, args, out):
            out = out * scale if scale != 1.0 else out
            if self._acts is not None:
                self._acts[plan.mlp_sender0] = out.detach()
            if self._live is not None:  # a copy: Falcon adds the attention's output to the MLP's in place
                self._set_live(plan.mlp_sender0, out.clone().unsqueeze(0))
        return hook

    def _moe_hook(self, plan: LayerPlan):
        scale = 1.0 if plan.block.mlp_out else plan.block.mlp_scale
        n = plan.n_experts + plan.n_shared

        def hook(mod, args, out):
            s0 = plan.mlp_sender0
            out = out[0] if isinstance(out, tuple) else out
            if plan.n_shared and plan.layout != "modulelist":  # the shared expert: what the routed ones leave
                if self._acts is not None:
                    self._acts[s0 + plan.n_experts] = out.detach() - self._acts[s0:s0 + plan.n_experts].sum(0)
                if self._live is not None:
                    routed = sum(self._live[s0 + e] for e in range(plan.n_experts))
                    self._set_live(s0 + plan.n_experts, (out.view_as(self._live[s0]) - routed).unsqueeze(0))
            if scale != 1.0:
                if self._acts is not None:
                    self._acts[s0:s0 + n] *= scale
                if self._live is not None:
                    self._set_live(s0, torch.stack([self._live[s0 + i] for i in range(n)]) * scale)
        return hook
