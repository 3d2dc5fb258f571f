"""Load a SAELens SAE from its own save format and find the model site it belongs to.

SAELens saves an SAE as a folder holding ``cfg.json`` and ``sae_weights.safetensors``
(``SAE.save_model`` / ``TrainingSAE.save_inference_model``); ``SAE.load_from_disk`` reads it back for
every registered architecture (standard, topk, jumprelu, gated, ...). The SAE names its hook in
``cfg.metadata.hook_name``, in TransformerLens' vocabulary (``blocks.3.hook_resid_post``); SAEs trained
here also record the workbench site (``metadata.workbench_site``, e.g. ``L3.expert.E5``), which has no
TransformerLens name for single experts. A site given explicitly wins over both.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

from workbench.errors import WorkbenchError
from workbench.tracing.sites import Component, Site, validate

CFG_FILE = "cfg.json"  # sae_lens.constants.SAE_CFG_FILENAME
WEIGHTS_FILE = "sae_weights.safetensors"  # sae_lens.constants.SAE_WEIGHTS_FILENAME

# TransformerLens hook names (HookedTransformer and TransformerBridge spellings) -> our components.
_TL_HOOKS: list[tuple[re.Pattern, Component]] = [
    (re.compile(r"^blocks\.(\d+)\.hook_resid_pre$"), Component.RESID_PRE),
    (re.compile(r"^blocks\.(\d+)\.hook_in$"), Component.RESID_PRE),
    (re.compile(r"^blocks\.(\d+)\.hook_resid_post$"), Component.RESID_POST),
    (re.compile(r"^blocks\.(\d+)\.hook_out$"), Component.RESID_POST),
    (re.compile(r"^blocks\.(\d+)\.hook_mlp_out$"), Component.MLP_OUT),
    (re.compile(r"^blocks\.(\d+)\.mlp\.hook_out$"), Component.MLP_OUT),
    (re.compile(r"^blocks\.(\d+)\.hook_attn_out$"), Component.ATTN_OUT),
    (re.compile(r"^blocks\.(\d+)\.attn\.hook_out$"), Component.ATTN_OUT),
]
_TL_NAMES = {Component.RESID_PRE: "hook_resid_pre", Component.RESID_POST: "hook_resid_post",
             Component.MLP_OUT: "hook_mlp_out", Component.ATTN_OUT: "hook_attn_out"}
# Sites an SAE can read and replace: everything that is a [tokens, d_model] stream.
SAE_COMPONENTS = (Component.RESID_PRE, Component.RESID_POST, Component.ATTN_OUT, Component.MLP_OUT,
                  Component.EXPERT, Component.SHARED_EXPERT)


def hook_name(site: Site) -> str:
    """The TransformerLens hook name of ``site`` (our key where TransformerLens has none, e.g. one expert)."""
    name = _TL_NAMES.get(site.component)
    return f"blocks.{site.layer}.{name}" if name else site.key


def read_config(path: str | Path) -> dict[str, Any]:
    """``cfg.json`` of an SAE folder (plain JSON: no sae_lens import), with a one-line error if it is not one."""
    if not isinstance(path, (str, Path)):
        raise WorkbenchError(f"an SAE is a folder path (str or Path), got {type(path).__name__} {path!r}")
    path = Path(path).expanduser()
    if not path.is_dir():
        raise WorkbenchError(f"SAE {path}: not a directory (expected SAELens' format: {CFG_FILE} + {WEIGHTS_FILE})")
    cfg_file = path / CFG_FILE
    if not cfg_file.is_file() or not (path / WEIGHTS_FILE).is_file():
        missing = CFG_FILE if not cfg_file.is_file() else WEIGHTS_FILE
        raise WorkbenchError(f"SAE {path}: no {missing} (expected SAELens' format: {CFG_FILE} + {WEIGHTS_FILE})")
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise WorkbenchError(f"SAE {path}: {CFG_FILE} is not valid JSON ({e})") from None
    for key in ("d_in", "d_sae"):
        if not isinstance(cfg, dict) or not isinstance(cfg.get(key), int):
            raise WorkbenchError(f"SAE {path}: {CFG_FILE} has no integer {key!r}")
    return cfg


def check_weights(path: str | Path, cfg: dict, where: str = "SAE") -> None:
    """Read ``sae_weights.safetensors``' header only (no tensor data): a one-line error unless every tensor's bytes
    are in the file (a truncated copy) and ``W_dec`` is ``[d_sae, d_in]`` as cfg.json says. Lets a study refuse such an
    SAE before any model work, where SAELens would refuse it only when it is loaded."""
    f = Path(path).expanduser() / WEIGHTS_FILE
    try:
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n)) if 0 < n < 100_000_000 else None
        size = f.stat().st_size
    except (OSError, ValueError, UnicodeDecodeError):
        header = None
    if not isinstance(header, dict):
        raise WorkbenchError(f"{where}: {f} is not a safetensors file (its header does not read)")
    tensors = {k: v for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}
    end = max((int(v.get("data_offsets", [0, 0])[1]) for v in tensors.values()), default=0)
    if size < 8 + n + end:
        raise WorkbenchError(f"{where}: {f} is cut short ({size} bytes, its header needs {8 + n + end})")
    want = [cfg["d_sae"], cfg["d_in"]]
    got = tensors.get("W_dec", {}).get("shape")
    if got != want:
        raise WorkbenchError(f"{where}: {f} " + (f"has W_dec of shape {got}, cfg.json says d_sae x d_in = {want}"
                                                  if got is not None else "has no W_dec (a decoder) tensor"))


def _metadata(cfg: dict) -> dict:
    meta = cfg.get("metadata") or {}
    # pre-6.0 SAELens configs keep these at the top level (and call the hook "hook_point")
    for key in ("hook_name", "hook_point", "hook_head_index", "model_name", "workbench_site"):
        if key in cfg and key not in meta:
            meta[key] = cfg[key]
    if "hook_name" not in meta and "hook_point" in meta:
        meta["hook_name"] = meta["hook_point"]
    return meta


def site_from_config(cfg: dict, where: str = "SAE") -> Site:
    """The site an SAE was trained on: ``metadata.workbench_site``, else its TransformerLens hook name."""
    meta = _metadata(cfg)
    if meta.get("workbench_site"):
        return Site.from_key(str(meta["workbench_site"]))
    name = meta.get("hook_name")
    if not name:
        raise WorkbenchError(f"{where}: cfg.json names no hook (metadata.hook_name); give the site explicitly")
    if meta.get("hook_head_index") is not None or str(name).endswith("hook_z"):
        raise WorkbenchError(f"{where}: hook {name!r} is a per-head site; only residual, attention/MLP output "
                             "and expert output SAEs can be attached")
    for pattern, comp in _TL_HOOKS:
        m = pattern.match(str(name))
        if m:
            return Site(int(m.group(1)), comp)
    try:
        return Site.from_key(str(name))
    except WorkbenchError:
        known = "blocks.L.hook_resid_pre|hook_resid_post|hook_mlp_out|hook_attn_out, or L<layer>.<component>"
        raise WorkbenchError(f"{where}: hook {name!r} has no matching workbench site (known: {known}); "
                             "give the site explicitly") from None


def site_width(lm, site: Site) -> int:
    """Channels of ``site`` in ``lm``: every SAE site is a d_model stream."""
    return int(lm.config.hidden_size)


def check_fit(lm, site: Site | str, d_in: int, where: str = "SAE") -> Site:
    """Raise a one-line error unless an SAE with ``d_in`` can sit at ``site`` of ``lm``; return the site."""
    site = Site.from_key(site) if isinstance(site, str) else site
    if site.component not in SAE_COMPONENTS:
        raise WorkbenchError(f"{where}: site {site} cannot hold an SAE (use one of "
                             f"{', '.join(c.value for c in SAE_COMPONENTS)})")
    try:
        validate(lm.adapter, lm.model, [site])
    except WorkbenchError as e:
        raise WorkbenchError(f"{where}: {e} in {lm.spec}") from None
    if site.component is Component.EXPERT and lm.layer_infos()[site.layer].kind == "dense" and site.expert != 0:
        raise WorkbenchError(f"{where}: site {site}: layer {site.layer} is dense (its MLP is expert 0)")
    width = site_width(lm, site)
    if d_in != width:
        raise WorkbenchError(f"{where}: d_in {d_in} does not fit site {site} of {lm.spec} (width {width})")
    return site


def resolve_site(lm, sae_or_cfg, site: Site | str | None = None, where: str = "SAE") -> Site:
    """The checked site for an SAE (a loaded SAELens SAE or its cfg dict): ``site`` if given, else its own."""
    cfg = sae_or_cfg if isinstance(sae_or_cfg, dict) else sae_or_cfg.cfg.to_dict()
    chosen = site if site is not None else site_from_config(cfg, where)
    checked = check_fit(lm, chosen, int(cfg["d_in"]), where)
    warn_other_model(cfg, lm, where, stacklevel=2)
    return checked


def same_model(a: str, b: str) -> bool:
    """Whether two model specs name one model: the same text, or folders that resolve to the same place
    (``m/phi3``, ``./m/phi3`` and its absolute path)."""
    if str(a) == str(b):
        return True
    pa, pb = Path(str(a)).expanduser(), Path(str(b)).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def warn_other_model(cfg: dict, lm, where: str = "SAE", stacklevel: int = 2) -> None:
    """A warning where the SAE's cfg names another model than ``lm`` (the width fits, the features may still mean
    nothing here)."""
    trained_on = _metadata(cfg).get("model_name")
    if trained_on and not same_model(str(trained_on), lm.spec):
        warnings.warn(f"{where}: trained on {trained_on}, read here on {lm.spec} (the width fits; its features are "
                      "that model's)", stacklevel=stacklevel + 1)


def load_sae(path: str | Path, device: str = "cpu"):
    """A SAELens SAE from a folder in SAELens' own format (``SAE.load_from_disk``), in eval mode, frozen."""
    cfg = read_config(path)
    if cfg.get("reshape_activations", "none") != "none":
        raise WorkbenchError(f"SAE {path}: reshape_activations={cfg['reshape_activations']!r} (per-head SAEs) "
                             "is not supported")
    from sae_lens import SAE

    try:
        sae = SAE.load_from_disk(str(Path(path).expanduser()), device=device)
    except Exception as e:  # SAELens and safetensors raise many types; all mean "not a loadable SAE"
        # torch's state-dict errors put the cause on the second line ("size mismatch for W_enc: ...")
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        first = "; ".join(lines[:2]) if lines else type(e).__name__
        if isinstance(e, KeyError) and len(e.args) == 1:  # SAELens' registry or cfg lookups: name the key
            first = f"no {e.args[0]!r} in its registry or cfg.json"
        raise WorkbenchError(f"SAE {path}: SAELens could not load it ({type(e).__name__}: {first})") from None
    sae.eval()
    for p in sae.parameters():
        p.requires_grad_(False)
    return sae
