"""Write hooks at a typed site: replace the site's rows with ``fn(rows)``. Used to splice an SAE in and to steer.

Reading a site is :class:`workbench.tracing.capture.Capture`'s job; this module is its writing twin for
the sites an SAE can sit at (``loading.SAE_COMPONENTS``). Each hook hands ``fn`` the site's rows as
``[n, d_model]``, the index of each row among the forward pass's flattened tokens (``None`` when the
rows are all tokens in order) and the number of tokens, and puts the returned rows back.

A routed expert has no module of its own in the fused layout: its output ``y`` on the tokens routed
to it is recomputed from the experts module's inputs (as capture does) and the block's output is
corrected by ``w * (fn(y) - y)`` with ``w`` the routing weight the block used, so ``fn = identity`` adds
exactly zero. The ModuleList layout re-routes from the block's input with the adapter's rule.
"""

from __future__ import annotations

from typing import Callable

import torch

from workbench.hooks import HookSet
from workbench.tracing.capture import fused_expert_output
from workbench.tracing.sites import Component, Site

EditFn = Callable[[torch.Tensor, "torch.Tensor | None", int], torch.Tensor]


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _replace_first(out, new):
    if isinstance(out, tuple):
        return (new, *out[1:])
    if isinstance(out, list):
        return [new, *out[1:]]
    return new


def _whole(fn: EditFn, t: torch.Tensor) -> torch.Tensor:
    flat = t.reshape(-1, t.shape[-1])
    return fn(flat, None, flat.shape[0]).to(t.dtype).reshape(t.shape)


def install_edit(hooks: HookSet, lm, site: Site, fn: EditFn) -> None:
    """Register on ``hooks`` the hooks that pass ``site``'s rows through ``fn`` (see the module docstring)."""
    ad, model = lm.adapter, lm.model
    layer = ad.decoder_layers(model)[site.layer]
    comp = site.component

    def post(mod, args, kwargs, out):
        return _replace_first(out, _whole(fn, _first(out)))

    if comp is Component.RESID_PRE:
        def pre(mod, args, kwargs):
            if args:
                return (_whole(fn, args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": _whole(fn, kwargs["hidden_states"])}
        hooks._hook(layer, pre, pre=True)
    elif comp in (Component.RESID_POST, Component.ATTN_OUT, Component.MLP_OUT):
        module = {Component.RESID_POST: layer, Component.ATTN_OUT: ad.mixer(layer),
                  Component.MLP_OUT: ad.mlp(layer)}[comp]
        hooks._hook(module, post)
    elif comp is Component.SHARED_EXPERT:
        hooks._hook(ad.shared_down_proj(ad.shared_experts(layer)[site.expert]), post)
    elif comp is Component.EXPERT:
        _install_expert(hooks, lm, layer, site, fn, post)
    else:
        raise ValueError(f"no write hook for site {site}")


def _install_expert(hooks: HookSet, lm, layer, site: Site, fn: EditFn, post) -> None:
    ad, model = lm.adapter, lm.model
    info = lm.layer_infos()[site.layer]
    e = site.expert
    if info.layout == "dense":
        hooks._hook(ad.dense_down_proj(layer), post)
        return

    def correct(flat_out, hidden, index, weights, run):
        hit = index == e
        rows = hit.any(-1).nonzero().flatten()
        if not rows.numel():
            return flat_out
        w = (weights * hit).sum(-1)[rows].to(flat_out.dtype)
        y = run(hidden[rows])
        delta = fn(y, rows, hidden.shape[0]).to(y.dtype) - y
        flat_out = flat_out.clone()
        flat_out[rows] += w[:, None] * delta
        return flat_out

    if info.layout == "fused":
        experts = ad.experts(layer)

        def fused(mod, args, kwargs, out):
            get = lambda i, k: args[i] if len(args) > i else kwargs[k]  # noqa: E731
            hidden, index, weights = get(0, "hidden_states"), get(1, "top_k_index"), get(2, "top_k_weights")
            first = _first(out)
            new = correct(first.reshape(-1, first.shape[-1]), hidden, index, weights,
                          lambda h: fused_expert_output(experts, h, e))
            return _replace_first(out, new.reshape(first.shape))
        hooks._hook(experts, fused)
        return
    mlp, router, experts = ad.mlp(layer), ad.router(layer), ad.experts(layer)

    def modulelist(mod, args, kwargs, out):
        hidden = args[0] if args else kwargs["hidden_states"]
        hidden = hidden.reshape(-1, hidden.shape[-1])
        weights, index = ad.select_experts(model, router(hidden), router)
        first = _first(out)
        new = correct(first.reshape(-1, first.shape[-1]), hidden, index, weights, experts[e])
        return _replace_first(out, new.reshape(first.shape))
    hooks._hook(mlp, modulelist)


class Spliced(HookSet):
    """``with Spliced(lm, sae):`` the site's activations are replaced by the SAE's reconstruction.

    ``error_term=True`` adds the reconstruction error back (SAELens' ``use_error_term``), so the model's
    numbers are unchanged up to rounding while the features stay readable (and hookable). With
    ``keep_acts=True`` the feature activations of the last forward pass are kept in ``.acts``
    ``[rows, d_sae]``.
    """

    def __init__(self, lm, sae, site: Site | str | None = None, *, error_term: bool = False, keep_acts: bool = False):
        super().__init__()
        from workbench.sae.loading import resolve_site

        self.lm, self.sae, self.error_term, self.keep_acts = lm, sae, error_term, keep_acts
        self.site = resolve_site(lm, sae, site)
        self.acts: torch.Tensor | None = None

    def _install(self) -> None:
        install_edit(self, self.lm, self.site, self._replace)

    def _replace(self, x: torch.Tensor, index, n_tokens: int) -> torch.Tensor:
        feats = self.sae.encode(x.to(self.sae.dtype))
        recon = self.sae.decode(feats)
        if self.keep_acts:
            self.acts = feats.detach()
        if self.error_term:
            recon = recon + (x.to(recon.dtype) - recon).detach()
        return recon.to(x.dtype)


def attach(lm, sae, site: Site | str | None = None, *, error_term: bool = False, keep_acts: bool = False) -> Spliced:
    """Splice an SAE (a SAELens SAE or the path of one) into ``lm`` at its site; use as a context manager."""
    if not hasattr(sae, "encode"):
        from workbench.sae.loading import load_sae

        sae = load_sae(sae, device=str(lm.device))
    return Spliced(lm, sae, site, error_term=error_term, keep_acts=keep_acts)
