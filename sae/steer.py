"""SAE steering as an intervention kind: add ``coef * W_dec[feature]`` of an SAE at its site.

In an intervention spec (dict / YAML / JSON, so studies can put it next to expert ablations)::

    {op: sae_steer, sae: runs/sae-L2, feature: 812, coef: 8.0}            # at the SAE's own site
    {op: sae_steer, sae: runs/sae-L2, feature: 812, coef: 8.0, site: L3.resid_pre, positions: [-1]}

The direction is the feature's decoder row exactly as saved (SAELens decoders are usually unit norm;
``coef`` is in the site's units). ``layers`` is filled in from the site; ``positions``, ``token`` and
``prompts`` scope it like every other intervention. At an expert site the vector is added to that
expert's output before its routing weight. The SAE's ``cfg.json`` is read when the spec is parsed
(a bad path or feature fails before any model work); its weights are read once per process.
"""

from __future__ import annotations

from pathlib import Path

import torch

from workbench.errors import WorkbenchError
from workbench.sae.edit import install_edit
from workbench.sae.loading import (WEIGHTS_FILE, check_fit, check_weights, read_config, site_from_config,
                                   warn_other_model)
from workbench.tracing.sites import Site

OP = "sae_steer"
_DECODERS: dict[tuple[str, int], torch.Tensor] = {}


def complete(d: dict, where: str) -> dict:
    """Check an ``sae_steer`` spec's own fields against the SAE's cfg.json and fill in ``layers``."""
    if not isinstance(d.get("sae"), str) or not d["sae"].strip():
        raise WorkbenchError(f"{where}: op {OP!r} needs field 'sae' (a folder in SAELens' format)")
    feature = d.get("feature")
    if not isinstance(feature, int) or isinstance(feature, bool):
        raise WorkbenchError(f"{where}: op {OP!r} needs an integer field 'feature'")
    if not isinstance(d.get("coef"), (int, float)) or isinstance(d.get("coef"), bool):
        raise WorkbenchError(f"{where}: op {OP!r} needs a number field 'coef'")
    try:
        cfg = read_config(d["sae"])
        site = Site.from_key(d["site"]) if d.get("site") is not None else site_from_config(cfg, f"SAE {d['sae']}")
    except WorkbenchError as e:
        raise WorkbenchError(f"{where}: field 'sae' or 'site': {e}") from None
    if not 0 <= feature < cfg["d_sae"]:
        raise WorkbenchError(f"{where}: field 'feature': {feature} out of range (the SAE has {cfg['d_sae']})")
    given = d.get("layers", d.get("layer"))
    if given is not None and list(given if isinstance(given, (list, tuple)) else [given]) != [site.layer]:
        raise WorkbenchError(f"{where}: field 'layers': the SAE's site {site} is in layer {site.layer}, got {given!r}")
    out = {k: v for k, v in d.items() if k != "layer"}
    out.update(layers=[site.layer], site=site.key, coef=float(d["coef"]))
    return out


def _site(iv) -> Site:
    return Site.from_key(iv.site) if iv.site else site_from_config(read_config(iv.sae), f"SAE {iv.sae}")


def validate(lm, iv, where: str) -> None:
    """The SAE's d_in and site must fit ``lm`` (one-line error naming the field)."""
    cfg = read_config(iv.sae)
    check_fit(lm, _site(iv), int(cfg["d_in"]), f"{where}: field 'sae' ({iv.sae})")
    if not 0 <= iv.feature < cfg["d_sae"]:
        raise WorkbenchError(f"{where}: field 'feature': {iv.feature} out of range (the SAE has {cfg['d_sae']})")
    check_weights(iv.sae, cfg, f"{where}: field 'sae'")  # before any model work, not when the steer installs
    warn_other_model(cfg, lm, f"{where}: field 'sae' ({iv.sae})", stacklevel=2)


def decoder_direction(path: str | Path, feature: int) -> torch.Tensor:
    """``W_dec[feature]`` of the SAE at ``path`` ([d_in], float32), via SAELens' loader; cached per file version."""
    from workbench.sae.loading import load_sae

    real = Path(path).expanduser().resolve()
    key = (str(real), (real / WEIGHTS_FILE).stat().st_mtime_ns)
    if key not in _DECODERS:
        _DECODERS.clear()  # one SAE's decoder at a time is enough for a study; keeps memory flat
        _DECODERS[key] = load_sae(real).W_dec.detach().float().cpu()
    return _DECODERS[key][feature]


def install(applied, iv) -> None:
    """Hooks on ``applied`` (an :class:`workbench.interventions.Applied`) that add the scaled direction."""
    lm = applied.lm
    vec = iv.coef * decoder_direction(iv.sae, iv.feature).to(lm.device)

    def add(x: torch.Tensor, index, n_tokens: int) -> torch.Tensor:
        scope = applied._scope(iv, n_tokens)
        v = vec.to(x.dtype)
        if scope is None:
            return x + v
        mask = scope if index is None else scope[index]
        return torch.where(mask[:, None], x + v, x)

    install_edit(applied, lm, _site(iv), add)
