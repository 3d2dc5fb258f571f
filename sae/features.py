"""Expert -> SAE features, and circuit node -> SAE features.

Method (one choice, applied to every writer): a *writer* is a routed expert, a dense MLP, an MoE
block or an attention head. On real tokens, its direct contribution ``c`` to the SAE's site is
captured (a routed expert's down_proj output times the routing weight the router gave it, on the
tokens routed to it; a head's slice of ``o_proj``). The SAE encodes the site's activation ``x`` with
and without it, and a feature's score is the mean over those tokens of

    act_f(x) - act_f(x - c)          (SAELens' ``encode``: ReLU / TopK / JumpReLU as the SAE has it)

"the feature activation the writer's output raises". The mean change of the encoder pre-activation
(``hook_sae_acts_pre``; for a linear encoder that is ``c @ W_enc``, the projection on the encoder
directions) and the share of tokens where the activation went up are reported next to it. ``c`` is
the writer's *direct* path: it reaches ``resid_post`` of its own layer and ``resid_pre``/``resid_post``
of later layers as its block adds it to the residual stream (later layers' reactions to it are not counted):
times Granite's residual multiplier, and through a sandwich or post-norm block's output norm (Gemma 2/3, OLMo 2)
with the token's own norm scale, as circuits split that norm across senders (:class:`ResidualPaths`); it reaches
``mlp_out`` of its layer for experts/MLPs and ``attn_out`` of its layer for heads as written. At an expert site
(an SAE on one expert's output) the contribution is the expert's output itself, before its routing weight. Shared
experts are not writers yet.

Top activating tokens are the site's largest feature activations over the same prompts. Each prompt's
first token is left out by default (``skip_first``), as in ``sae train``.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import pandas as pd
import torch

from workbench.errors import WorkbenchError, few
from workbench.hooks import HookSet
from workbench.io import atomic_path, write_json
from workbench.sae.loading import resolve_site, same_model
from workbench.sae.stream import Buffer, Tokens, forward_batches
from workbench.tracing.sites import Component, Site

COLUMNS = ["writer", "kind", "layer", "index", "rank", "feature", "score", "delta_pre", "frac_raised", "tokens",
           "top_tokens"]


@dataclass(frozen=True)
class Writer:
    """Something that writes into the residual stream: a routed/dense ``expert``, an ``mlp`` block or a ``head``."""

    name: str
    kind: str  # expert | mlp | head
    layer: int
    index: int = -1  # expert or head index

    def feeds(self, site: Site) -> bool:
        """Whether its direct contribution reaches ``site`` (see the module docstring)."""
        c = site.component
        if c is Component.RESID_PRE:
            return self.layer < site.layer
        if c is Component.RESID_POST:
            return self.layer <= site.layer
        if c is Component.MLP_OUT:
            return self.layer == site.layer and self.kind in ("expert", "mlp")
        if c is Component.ATTN_OUT:
            return self.layer == site.layer and self.kind == "head"
        if c is Component.EXPERT:
            return self.kind == "expert" and (self.layer, self.index) == (site.layer, site.expert)
        return False


def expert_writers(lm, experts: Sequence[tuple[int, int]] | None = None) -> list[Writer]:
    """Writers for ``(layer, expert)`` pairs (default: every routed expert and dense MLP of the model)."""
    infos = lm.layer_infos()
    if experts is None:
        experts = [(i.index, e) for i in infos for e in range(i.num_experts)]
    out = []
    pairs = None if isinstance(experts, (str, tuple)) else list(experts)
    if pairs is None or not all(isinstance(p, (tuple, list)) and len(p) == 2 and all(
            isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in p) for p in pairs):
        # ((1, 2) unpacked as two pairs; "L1.E2" and ("1", "2") failed in comparisons)
        raise WorkbenchError(f"experts must be a list of (layer, expert) integer pairs, e.g. [(1, 2)], got {experts!r}")
    for layer, e in pairs:
        if not 0 <= layer < len(infos) or not 0 <= e < infos[layer].num_experts:
            raise WorkbenchError(f"expert L{layer}.E{e} does not exist in {lm.spec}")
        out.append(Writer(f"L{layer}.E{e}", "expert", layer, e))
    return out


def profile_experts(path: str | Path, top: int | None = None) -> list[tuple[int, int]]:
    """The top experts of a ``profile.json`` (all of them ranked when ``top`` is None): its super experts, then the
    rest by max |output| (routed/dense only)."""
    return [(layer, e) for layer, e, kind in profile_ranking(path) if kind != "shared"][:top]


def profile_ranking(path: str | Path) -> list[tuple[int, int, str]]:
    """A ``profile.json``'s experts as ``(layer, expert, kind)``: its super experts, then the rest by max |output|,
    shared experts included (they are not writers yet: :func:`profile_experts` leaves them out)."""
    from workbench.io import read_structured

    data, _ = read_structured(path, "profile")
    if not isinstance(data, dict) or not isinstance(data.get("experts"), list):
        raise WorkbenchError(f"{path}: not a profile.json (no 'experts' list)")
    kinds = ("routed", "dense", "shared")
    rows = [e for e in data["experts"] if e.get("kind") in kinds and not math.isnan(e.get("max_abs", math.nan))]
    supers = [(e["layer"], e["expert"], e["kind"]) for e in data.get("super_experts", []) if e.get("kind") in kinds]
    rest = [(e["layer"], e["expert"], e["kind"]) for e in sorted(rows, key=lambda e: -e["max_abs"])]
    return list(dict.fromkeys(supers + rest))


def reaching(experts: Sequence[tuple[int, int]], site: Site) -> list[tuple[int, int]]:
    """The ``(layer, expert)`` pairs whose direct output reaches ``site`` (:meth:`Writer.feeds`), in their order."""
    return [(layer, e) for layer, e in experts if Writer(f"L{layer}.E{e}", "expert", layer, e).feeds(site)]


def circuit_writers(circuit) -> dict[str, Writer]:
    """Node name -> writer for a circuit's heads, dense MLPs and routed experts (other nodes are skipped)."""
    kinds = {"head": "head", "mlp": "mlp", "expert": "expert"}
    return {name: Writer(name, kinds[a["kind"]], int(a["layer"]), int(a.get("index", -1)))
            for name, a in circuit.nodes.items() if a.get("kind") in kinds}


class HeadOutputs(HookSet):
    """Read-only hooks: each chosen head's output (its slice of the output projection) per valid token, for the
    current batch."""

    def __init__(self, lm, heads: dict[int, list[int]]):
        super().__init__()
        self.lm, self.heads = lm, heads
        self.out: dict[tuple[int, int], torch.Tensor] = {}
        self._valid: torch.Tensor | None = None

    def begin_batch(self, grid: torch.Tensor) -> None:
        self._valid = grid.reshape(-1) >= 0
        self.out.clear()

    def _install(self) -> None:
        from workbench.circuits.attention import attention_spec, out_proj

        layers = self.lm.adapter.decoder_layers(self.lm.model)
        for layer, heads in self.heads.items():
            attn = self.lm.adapter.attention(layers[layer])
            spec = attention_spec(attn, self.lm.config, f"layer {layer}")
            proj, dh = out_proj(attn, spec), spec.head_dim  # o_proj, dense, out_proj or GPT-2's c_proj
            linear = isinstance(proj, torch.nn.Linear)  # else GPT-2's Conv1D, weight [in, out]

            def pre(mod, args, kwargs, layer=layer, heads=heads, dh=dh, linear=linear):
                z = (args[0] if args else kwargs["input"]).detach()
                z = z.reshape(-1, z.shape[-1])[self._valid]
                for h in heads:
                    cols = slice(h * dh, (h + 1) * dh)
                    self.out[(layer, h)] = z[:, cols] @ (mod.weight[:, cols].T if linear else mod.weight[cols])
            self._hook(proj, pre, pre=True)


class ResidualPaths(HookSet):
    """How a writer's output reaches the residual stream, read off the model (circuits' block layouts): Granite's
    multipliers, and the output norm of a sandwich or post-norm block (Gemma 2/3, OLMo 2), through which each part of
    the sublayer's output gets its share with the token's own norm scale (:func:`workbench.circuits.runner.norm_split`,
    as circuits split it across senders). Read-only hooks on those norms keep their input and output per valid token
    of the current batch."""

    def __init__(self, lm, writers: Sequence[Writer]):
        from workbench.circuits.blocks import block_layouts

        super().__init__()
        self.lm = lm
        try:
            self.layouts = block_layouts(lm.model, lm.adapter)[0]
        except WorkbenchError as e:  # a block circuits cannot read: its writers' outputs are taken as written
            warnings.warn(f"sae features: cannot read how layer outputs reach the residual stream ({e}); each writer's "
                          "output is taken as it reaches it", stacklevel=3)
            self.layouts = None
        self.needs = set() if self.layouts is None else {
            (w.layer, side) for w in writers for side in [self.side(w)] if self._norm_path(w.layer, side)}
        self.seen: dict[tuple[int, str], tuple] = {}
        self._cache: dict = {}
        self._valid = self._order = self._sorted = None

    @staticmethod
    def side(w: Writer) -> str:
        return "attn" if w.kind == "head" else "mlp"

    def _norm_path(self, layer: int, side: str) -> str:
        blk = self.layouts[layer]
        return blk.attn_out if side == "attn" else blk.mlp_out

    def begin_batch(self, grid: torch.Tensor) -> None:
        flat = grid.reshape(-1)
        self._valid = flat >= 0
        self._order = flat[self._valid].argsort()
        self._sorted = flat[self._valid][self._order]
        self.seen.clear()

    def _install(self) -> None:
        from workbench.adapters.base import get_path

        layers = self.lm.adapter.decoder_layers(self.lm.model)
        for layer, side in self.needs:
            def hook(mod, args, kwargs, out, key=(layer, side)):
                z = (args[0] if args else next(iter(kwargs.values()))).detach()
                y = (out[0] if isinstance(out, tuple) else out).detach()
                rows = lambda t: t.reshape(-1, t.shape[-1])[self._valid][self._order]  # noqa: E731
                self.seen[key] = (mod, rows(z), rows(y))
            self._hook(get_path(layers[layer], self._norm_path(layer, side)), hook)

    def carry(self, w: Writer, tokens: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """``c [n, d]``, ``w``'s output at global ``tokens`` of the current batch -> what it adds to the residual."""
        if self.layouts is None:
            return c
        from workbench.circuits.runner import norm_split

        side = self.side(w)
        blk = self.layouts[w.layer]
        if (w.layer, side) in self.needs:
            mod, z, y = self.seen[(w.layer, side)]
            pos, _ = _rows_of(self._sorted, tokens)
            c = norm_split(mod, z[pos], y[pos], self._cache)(c)
        scale = blk.attn_scale if side == "attn" else blk.mlp_scale
        return c * scale if scale != 1.0 else c


class TopTokens:
    """Per feature, the ``k`` largest activations with their global token indices (ties: earlier token)."""

    def __init__(self, d_sae: int, k: int):
        self.values = torch.full((d_sae, k), -math.inf)
        self.tokens = torch.full((d_sae, k), -1, dtype=torch.int64)

    def update(self, acts: torch.Tensor, tokens: torch.Tensor) -> None:
        v = torch.cat([self.values, acts.T.float().cpu()], 1)
        t = torch.cat([self.tokens, tokens.cpu().expand(acts.shape[1], -1)], 1)
        top = v.topk(self.values.shape[1], dim=1, sorted=True)
        self.values, self.tokens = top.values, t.gather(1, top.indices)


def _encode(sae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SAELens feature activations and encoder pre-activations (read from ``hook_sae_acts_pre``)."""
    seen = {}
    handle = sae.hook_sae_acts_pre.register_forward_hook(lambda m, a, out: seen.__setitem__("pre", out))
    try:
        acts = sae.encode(x.to(sae.dtype))
    finally:
        handle.remove()
    return acts.float(), seen["pre"].float()


def _rows_of(sorted_tokens: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of ``tokens`` in ``sorted_tokens`` and a mask of those found."""
    pos = torch.searchsorted(sorted_tokens, tokens).clamp(max=max(len(sorted_tokens) - 1, 0))
    found = sorted_tokens[pos] == tokens if len(sorted_tokens) else torch.zeros_like(tokens, dtype=torch.bool)
    return pos, found


@dataclass
class FeatureReport:
    table: pd.DataFrame  # COLUMNS: one row per (writer, rank)
    tokens: pd.DataFrame  # feature, rank, activation, prompt_index, position, token, context
    meta: dict = field(default_factory=dict)


def writer_features(lm, sae, writers: Sequence[Writer], prompts: Sequence[str], *, site: Site | str | None = None,
                    top: int = 5, top_tokens: int = 8, batch_size: int = 8, max_tokens: int | None = 128,
                    skip_first: bool = True, progress: bool = False) -> FeatureReport:
    """For each writer feeding the SAE's site, its ``top`` features by mean activation raised (module docstring).

    ``skip_first`` leaves each prompt's first token out (as ``sae train`` does by default: the massive
    activation / attention sink position, where an SAE trained without it reads out-of-distribution values).
    """
    return _writer_features(lm, sae, writers, prompts, resolve_site(lm, sae, site), top=top, top_tokens=top_tokens,
                            batch_size=batch_size, max_tokens=max_tokens, skip_first=skip_first, progress=progress)


def _writer_features(lm, sae, writers: Sequence[Writer], prompts: Sequence[str], site: Site, *, top: int,
                     top_tokens: int, batch_size: int, max_tokens: int | None, skip_first: bool,
                     progress: bool) -> FeatureReport:
    """:func:`writer_features` at a site already resolved (and its SAE's model already checked) by the caller."""
    from workbench.tracing.runner import check_number

    for name, value in (("top", top), ("top_tokens", top_tokens), ("batch_size", batch_size)):
        check_number(name, value)  # (top=0 gave an empty table; 2.5 failed in torch's topk)
    if max_tokens is not None:
        check_number("max_tokens", max_tokens)
    use = [w for w in writers if w.feeds(site)]
    if not use:
        raise WorkbenchError(nothing_feeds(site, len(writers)))
    infos = lm.layer_infos()
    weighted = site.component is not Component.EXPERT
    sinks: dict[Site, list] = {site: [Buffer()]}
    for w in use:
        if w.kind == "expert":
            sinks.setdefault(Site(w.layer, Component.EXPERT, w.index), [Buffer()])
            if infos[w.layer].kind == "moe" and weighted:
                sinks.setdefault(Site(w.layer, Component.ROUTER), [Buffer()])
        elif w.kind == "mlp":
            sinks.setdefault(Site(w.layer, Component.MLP_OUT), [Buffer()])
    heads: dict[int, list[int]] = {}
    for w in use:
        if w.kind == "head":
            heads.setdefault(w.layer, []).append(w.index)
    tokens = Tokens.of(lm, prompts, max_tokens)
    d_sae = int(sae.cfg.d_sae)
    sums = {w: torch.zeros(3, d_sae, dtype=torch.float64) for w in use}  # delta act, delta pre, raised count
    counts = {w: 0 for w in use}
    tops = TopTokens(d_sae, top_tokens)
    head_hooks = HeadOutputs(lm, heads)
    routers = lm.adapter.decoder_layers(lm.model)
    # at a residual site a writer's output goes through its block's output norm and multiplier on its way there
    paths = ResidualPaths(lm, use) if site.component in (Component.RESID_PRE, Component.RESID_POST) else None
    meters = [head_hooks] + ([paths] if paths is not None else [])
    with head_hooks, paths if paths is not None else contextlib.nullcontext(), torch.no_grad():
        for _ in forward_batches(lm, tokens, sinks, batch_size=batch_size, meters=meters, progress=progress,
                                 desc=f"sae features {lm.spec}"):
            taken = {s: b[0].take() for s, b in sinks.items()}
            here = taken[site]
            if here is None:
                continue
            order = here.tokens.argsort()
            batch_tokens = here.tokens[order]  # a full-token site (or one expert's rows): all its tokens, sorted
            if skip_first:
                order = order[tokens.position[here.tokens[order].cpu()].to(order.device) > 0]
            if not order.numel():
                continue
            x, x_tok = here.values[order].float(), here.tokens[order]
            acts, pre = _encode(sae, x)
            tops.update(acts, x_tok)
            for w in use:
                got = _contribution(lm, w, taken, head_hooks, routers, weighted, infos, batch_tokens)
                if got is None:
                    continue
                c_tok, c = got
                if paths is not None:
                    c = paths.carry(w, c_tok, c)
                pos, found = _rows_of(x_tok, c_tok)
                rows, c = pos[found], c[found].float()
                if not rows.numel():
                    continue
                a0, p0 = _encode(sae, x[rows] - c)
                d_act = acts[rows] - a0
                sums[w][0] += d_act.sum(0).double().cpu()
                sums[w][1] += (pre[rows] - p0).sum(0).double().cpu()
                sums[w][2] += (d_act > 0).sum(0).double().cpu()
                counts[w] += int(rows.numel())
    token_table = _token_table(lm, tokens, tops)
    none = [w.name for w in use if counts[w] == 0]
    if none:  # (recorded in meta, but an expert no prompt routes to gave an empty table without a word)
        warnings.warn(f"{len(none)} of the {len(use)} writer(s) got no token of these prompts ({few(none)}): they "
                      "have no features here (more prompts may reach them)",
                      stacklevel=3)
    rows = []
    for w in use:
        n = counts[w]
        if n == 0:
            continue
        mean = sums[w] / n
        best = mean[0].topk(min(top, d_sae))
        rank = 0
        for score, f in zip(best.values.tolist(), best.indices.tolist()):
            if score <= 0:
                break
            rank += 1
            rows.append({"writer": w.name, "kind": w.kind, "layer": w.layer, "index": w.index, "rank": rank,
                         "feature": f, "score": score, "delta_pre": float(mean[1, f]),
                         "frac_raised": float(mean[2, f]), "tokens": n, "top_tokens": _summary(token_table, f)})
    meta = {"model": lm.spec, "site": site.key, "d_sae": d_sae, "num_prompts": len(tokens.ids),
            "num_tokens": int(tokens.token_id.numel()),  # all of the prompts' tokens; scored_tokens: those read
            "scored_tokens": int((tokens.position > 0).sum()) if skip_first else int(tokens.token_id.numel()),
            "writers": len(use), "top": top, "skip_first": skip_first,
            "method": "mean over the writer's tokens of act_f(x) - act_f(x - c), c = direct contribution",
            "writers_without_tokens": [w.name for w in use if counts[w] == 0]}
    return FeatureReport(pd.DataFrame(rows, columns=COLUMNS), token_table, meta)


def _contribution(lm, w: Writer, taken: dict, head_hooks: HeadOutputs, layers, weighted: bool, infos,
                  site_tokens: torch.Tensor):
    """(global tokens, rows [n, d]) of writer ``w``'s direct contribution in the current batch, or None."""
    if w.kind == "head":  # heads feed only full-token sites, whose sorted tokens are the batch's valid tokens
        out = head_hooks.out.get((w.layer, w.index))
        return None if out is None else (site_tokens, out)
    if w.kind == "mlp":
        p = taken[Site(w.layer, Component.MLP_OUT)]
        return None if p is None else (p.tokens, p.values)
    p = taken[Site(w.layer, Component.EXPERT, w.index)]
    if p is None or p.values.shape[0] == 0:
        return None
    if not weighted or infos[w.layer].kind == "dense":
        return p.tokens, p.values
    r = taken[Site(w.layer, Component.ROUTER)]
    router = lm.adapter.router(layers[w.layer])
    weights, index = lm.adapter.select_experts(lm.model, r.values, router)
    pos, found = _rows_of(r.tokens, p.tokens)
    wt = (weights[pos] * (index[pos] == w.index)).sum(-1).to(p.values.dtype)
    return p.tokens[found], (wt[:, None] * p.values)[found]


def _token_table(lm, tokens: Tokens, tops: TopTokens) -> pd.DataFrame:
    decode = {}

    def text(i: int) -> str:
        if i not in decode:
            decode[i] = lm.tokenizer.decode([i])
        return decode[i]

    rows = []
    for f in range(tops.values.shape[0]):
        for r, (v, t) in enumerate(zip(tops.values[f].tolist(), tops.tokens[f].tolist())):
            if t < 0 or v <= 0:
                break
            p, pos = int(tokens.prompt[t]), int(tokens.position[t])
            ctx = "".join(text(i) for i in tokens.ids[p][max(0, pos - 4):pos])
            rows.append({"feature": f, "rank": r + 1, "activation": v, "prompt_index": p, "position": pos,
                         "token": text(int(tokens.token_id[t])), "context": f"{ctx}[[{text(int(tokens.token_id[t]))}]]"})
    return pd.DataFrame(rows, columns=["feature", "rank", "activation", "prompt_index", "position", "token", "context"])


def _summary(token_table: pd.DataFrame, f: int, n: int = 5) -> str:
    d = token_table[token_table.feature == f].head(n)
    return " | ".join(f"{t!r} {v:.3g}" for t, v in zip(d.token, d.activation))


def expert_features(lm, sae, prompts: Sequence[str], experts: Sequence[tuple[int, int]] | None = None,
                    **kwargs) -> FeatureReport:
    """Expert -> features: for each ``(layer, expert)`` (default: all feeding the site), its top features."""
    site = resolve_site(lm, sae, kwargs.pop("site", None))
    writers = [w for w in expert_writers(lm, experts) if w.feeds(site)]
    if experts is not None and len(writers) < len(experts):
        missing = sorted({f"L{l}.E{e}" for l, e in experts} - {w.name for w in writers})
        raise WorkbenchError(f"expert {missing[0]} does not write into site {site} directly "
                             "(an expert reaches resid_post of its layer and later residual sites)")
    return _writer_features(lm, sae, writers, prompts, site, **{**FEATURE_DEFAULTS, **kwargs})


FEATURE_DEFAULTS = dict(top=5, top_tokens=8, batch_size=8, max_tokens=128, skip_first=True, progress=False)


def nothing_feeds(site: Site, given: int) -> str:
    """Why no writer's direct output reaches ``site`` (a one-line error)."""
    if site.component is Component.ATTN_OUT:
        return f"no expert or MLP writes into {site}: only attention heads do (give a circuit with head nodes)"
    if site.component is Component.SHARED_EXPERT:
        return f"{site} is a shared expert's output, and shared experts are not writers yet: no writer reaches it"
    if site.component is Component.RESID_PRE and site.layer == 0:
        return f"nothing but the embedding writes into {site}: read a later site"
    return (f"none of the {given} writers feeds site {site} directly (experts reach resid_post of their layer and "
            "later residual sites)" if given else f"no writer reaches site {site}")


def node_features(lm, sae, circuit, prompts: Sequence[str], **kwargs) -> tuple[dict[str, dict], FeatureReport]:
    """Circuit node -> features, as GraphML-safe node attributes ``{node: {sae_features, sae_scores, ...}}``.

    Heads, dense MLPs and routed experts that feed the SAE's site get attributes; other nodes are
    absent from the mapping. Merge them into the circuit with :func:`annotate_circuit`.
    """
    site = resolve_site(lm, sae, kwargs.pop("site", None))
    every = list(circuit_writers(circuit).values())
    _check_nodes(lm, circuit, every)
    writers = [w for w in every if w.feeds(site)]
    if not writers:
        raise WorkbenchError(f"no head, MLP or expert node of the circuit feeds site {site} directly")
    if len(writers) < len(every):  # they were left out without a word
        left = [w.name for w in every if not w.feeds(site)]
        warnings.warn(f"{len(left)} of the circuit's {len(every)} head, MLP and expert nodes do not write into "
                      f"{site} directly ({few(left)}: later layers); "
                      "they get no features (an SAE at a later site reads them)", stacklevel=2)
    report = _writer_features(lm, sae, writers, prompts, site, **{**FEATURE_DEFAULTS, **kwargs})
    attrs = {}
    for name, d in report.table.groupby("writer", sort=False):
        attrs[name] = {"sae_site": site.key, "sae_features": ",".join(str(f) for f in d.feature),
                       "sae_scores": ",".join(f"{s:.4g}" for s in d.score),
                       "sae_top_feature": int(d.feature.iloc[0]), "sae_top_tokens": str(d.top_tokens.iloc[0])}
    return attrs, report


def _check_nodes(lm, circuit, writers: Sequence[Writer]) -> None:
    """A circuit's writers must exist in ``lm`` (a circuit of another model named heads past its layers' ends, which
    read as nothing); a circuit found on another model is said."""
    from workbench.circuits.attention import attention_spec

    of = circuit.meta.get("model")
    other = bool(of) and not same_model(str(of), lm.spec)
    if other:
        warnings.warn(f"the circuit was found on {of}, its nodes are read here on {lm.spec}", stacklevel=3)
    infos, layers = lm.layer_infos(), lm.adapter.decoder_layers(lm.model)
    found = f" (the circuit is of {of})" if other else ""
    for w in writers:
        if not 0 <= w.layer < len(infos):
            raise WorkbenchError(f"circuit node {w.name}: {lm.spec} has {len(infos)} layers{found}")
        if w.kind == "expert" and not 0 <= w.index < infos[w.layer].num_experts:
            raise WorkbenchError(f"circuit node {w.name}: layer {w.layer} of {lm.spec} has "
                                 f"{infos[w.layer].num_experts} expert(s){found}")
        if w.kind == "head":
            n = attention_spec(lm.adapter.attention(layers[w.layer]), lm.config, f"layer {w.layer}").n_heads
            if not 0 <= w.index < n:
                raise WorkbenchError(f"circuit node {w.name}: layer {w.layer} of {lm.spec} has {n} heads{found}")


def annotate_circuit(circuit, attrs: dict[str, dict]):
    """A copy of ``circuit`` with node attributes from :func:`node_features` merged in."""
    from workbench.circuits.export import Circuit

    nodes = {n: {**a, **attrs.get(n, {})} for n, a in circuit.nodes.items()}
    return Circuit(nodes, list(circuit.edges), dict(circuit.meta))


def write_report(report: FeatureReport, out: str | Path, stem: str = "expert_features") -> list[Path]:
    """``STEM.parquet|csv``, ``feature_tokens.parquet|csv``, ``STEM.png`` (writers x features heatmap), ``STEM.json``."""
    out = Path(out)
    files = []
    for df, name in ((report.table, stem), (report.tokens, "feature_tokens")):
        with atomic_path(out / f"{name}.parquet") as tmp:
            df.to_parquet(tmp, index=False)
        with atomic_path(out / f"{name}.csv") as tmp:
            df.to_csv(tmp, index=False)
        files += [out / f"{name}.parquet", out / f"{name}.csv"]
    files.append(write_json(out / f"{stem}.json", report.meta))
    if len(report.table):
        files.append(plot(report.table, out / f"{stem}.png", report.meta.get("site", "")))
    return files


def plot(table: pd.DataFrame, path: Path, site: str = "", max_writers: int = 40, max_features: int = 40) -> Path:
    """Heatmap of scores: writers (rows) x the union of their top-3 features (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    writers = list(dict.fromkeys(table.writer))[:max_writers]
    feats = list(dict.fromkeys(table[(table["rank"] <= 3) & table.writer.isin(writers)].feature))[:max_features]
    grid = torch.zeros(len(writers), len(feats))
    for w, f, s in zip(table.writer, table.feature, table.score):
        if w in writers and f in feats:
            grid[writers.index(w), feats.index(f)] = s
    fig, ax = plt.subplots(figsize=(max(4, 0.3 * len(feats) + 2), max(3, 0.28 * len(writers) + 1.5)), dpi=100)
    im = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(feats)))
    ax.set_xticklabels([f"f{f}" for f in feats], rotation=90, fontsize=7)
    ax.set_yticks(range(len(writers)))
    ax.set_yticklabels(writers, fontsize=7)
    ax.set_title(f"SAE features raised by each writer ({site}): mean activation increase", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
