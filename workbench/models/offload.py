"""Layer streaming: run a model that does not fit in memory one decoder layer at a time.

The reference Super-Experts script profiles DeepSeek-R1 on one GPU this way. The model is built with
every parameter on the meta device (buffers such as rotary frequencies are real, they are small);
then the whole prompt set goes through the embedding, and through each decoder layer in turn:
the layer's weights are read from the safetensors file(s) (through transformers' own checkpoint
conversion, so per-expert checkpoints become the fused ``gate_up_proj``/``down_proj`` exactly as
``from_pretrained`` makes them), every batch runs through it, and the weights go back to meta.
Peak memory is one layer plus the hidden states of all prompts (kept on the CPU between layers).

Each layer runs inside the model's own forward (the other layers replaced by pass-throughs, the
pass stopped right after the layer), so masks, rotary embeddings and per-layer attention types are
computed by the model itself and every number equals the in-memory run. Hooks (capture, meters)
see every batch of a layer before the next layer: per-site reducers get the same batches in the
same order as in memory.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from workbench.adapters.base import adapter_for, get_path, supported_model_types
from workbench.errors import WorkbenchError
from workbench.models.specs import TOKENIZER_FILES, LoadedModel, _check_model_type, _check_safetensors, _dtype, \
    _tokenizer, resolve_device

UNSUPPORTED = {"gpt2": "GPT-2 adds position embeddings to its inputs inside the model's forward"}


@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Create modules with parameters on the meta device and buffers where they would be (CPU)."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            p = module._parameters[name]
            module._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


class _Skip(nn.Module):
    """Stands in for a decoder layer that is not being run: passes the hidden states through."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


class _LayerDone(Exception):
    """Raised by a hook after the streamed layer: the rest of the forward is not needed."""


class LayerStreamer:
    """Loads and frees groups of weights (the embedding, each decoder layer) from safetensors files."""

    def __init__(self, model: nn.Module, path: Path, adapter, device: str, dtype: torch.dtype):
        from safetensors import safe_open
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        self.model, self.path, self.adapter = model, path, adapter
        self.device, self.dtype = torch.device(device), dtype
        self.files = _weight_files(path)
        for module in model.modules():  # buffers (rotary frequencies, ...) are real and small: on the device
            for name, b in module._buffers.items():
                if b is not None:
                    module._buffers[name] = b.to(self.device)
        self.mapping = get_model_conversion_mapping(model)
        renamings = [w for w in self.mapping if isinstance(w, WeightRenaming)]
        converters = [w for w in self.mapping if isinstance(w, WeightConverter)]
        meta = model.state_dict()
        layers_path = adapter.layers_path
        self.layer_prefixes = [f"{layers_path}.{i}." for i in range(len(adapter.decoder_layers(model)))]
        embed_prefix = adapter.embed_path + "."
        layer_re = re.compile(re.escape(layers_path) + r"\.(\d+)\.")
        self.groups: dict[str, dict[str, Path]] = {}  # group -> checkpoint key -> file
        self.targets: dict[str, tuple[str, bool]] = {}  # checkpoint key -> (parameter name, needs a conversion op)
        for f in self.files:
            with safe_open(str(f), framework="pt") as sf:
                keys = list(sf.keys())
            for key in keys:
                target, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, meta)
                self.targets[key] = (target, pattern is not None)
                m = layer_re.match(target)
                group = f"layer{m.group(1)}" if m else "embed" if target.startswith(embed_prefix) else "other"
                self.groups.setdefault(group, {})[key] = f
        for i in range(len(self.layer_prefixes)):
            if f"layer{i}" not in self.groups:
                raise WorkbenchError(f"{path}: the safetensors files have no weights for decoder layer {i}")
        if "embed" not in self.groups:
            raise WorkbenchError(f"{path}: the safetensors files have no input embedding ({adapter.embed_path})")
        self.peak_group_bytes = 0

    def _load(self, group: str, module: nn.Module, prefix: str) -> None:
        """Materialise ``module``'s parameters from the checkpoint keys of ``group``."""
        from safetensors import safe_open
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig
        from transformers.utils import logging as hf_logging

        state: dict[str, torch.Tensor] = {}
        by_file: dict[Path, list[str]] = {}
        for key, f in self.groups[group].items():
            by_file.setdefault(f, []).append(key)
        for f, keys in by_file.items():
            with safe_open(str(f), framework="pt") as sf:
                for key in keys:
                    state[key] = sf.get_tensor(key)
        config = LoadStateDictConfig(dtype=self.dtype, weight_mapping=self.mapping, device_map={"": self.device},
                                     dtype_plan=self.model._get_dtype_plan(self.dtype))  # keep-in-fp32 tensors
        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            with self.adapter.unprepared(self.model):  # the loader finds modules by attribute: transformers' own
                info, _ = convert_and_load_state_dict_in_model(self.model, state, config)
        finally:
            if bar:
                hf_logging.enable_progress_bar()
        del state
        missing = [f"{prefix}{n}" for n, p in module.named_parameters() if p.device.type == "meta"]
        if missing or info.mismatched_keys:
            raise WorkbenchError(f"{self.path}: cannot stream {group}: missing {missing[:3]}, "
                                 f"mismatched {sorted(info.mismatched_keys)[:3]}")
        module.to(self.device)  # the layer's own buffers (they were built on the CPU)
        self.peak_group_bytes = max(self.peak_group_bytes, sum(p.numel() * p.element_size()
                                                               for p in module.parameters()))

    @staticmethod
    def _free(module: nn.Module) -> None:
        for sub in module.modules():
            for name, p in list(sub._parameters.items()):
                if p is not None:
                    sub._parameters[name] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)

    def embed(self, batches: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Every batch's input embeddings (on the CPU).

        A plain ``nn.Embedding`` stored as one tensor is read only at the rows the prompts use (in
        blocks of rows), so the full vocabulary x hidden table is never in memory; the result is the
        same gather. Anything else loads the embedding module for this step.
        """
        emb = get_path(self.model, self.adapter.embed_path)
        group = self.groups["embed"]
        if len(group) == 1 and type(emb) is nn.Embedding and emb.max_norm is None:
            key, file = next(iter(group.items()))
            if self.targets[key] == (self.adapter.embed_path + ".weight", False):  # stored as is: gather its rows
                return self._embed_rows(key, file, batches)
        self._load("embed", emb, self.adapter.embed_path + ".")
        try:
            with torch.no_grad():
                return [emb(ids.to(self.device)).cpu() for ids in batches]
        finally:
            self._free(emb)

    def _embed_rows(self, key: str, file: Path, batches: Sequence[torch.Tensor],
                    block: int = 4096) -> list[torch.Tensor]:
        from safetensors import safe_open

        used = torch.unique(torch.cat([ids.flatten() for ids in batches]))  # sorted
        rows = []
        with safe_open(str(file), framework="pt") as sf:
            table = sf.get_slice(key)
            for lo in range(0, int(used[-1]) + 1, block):
                want = used[(used >= lo) & (used < lo + block)]
                if want.numel():
                    rows.append(table[lo:lo + block][want - lo].to(self.dtype))
        weight = torch.cat(rows).to(self.device)
        return [torch.nn.functional.embedding(torch.searchsorted(used, ids).to(self.device), weight).cpu()
                for ids in batches]

    def run_layers(self, hidden: list[torch.Tensor], masks: Sequence[torch.Tensor],
                   before_batch: Callable[[int], None], progress: Callable[[int, int], None] | None = None) -> None:
        """Run every batch through every decoder layer in turn, replacing ``hidden`` in place."""
        layers = self.adapter.decoder_layers(self.model)
        parent_path, _, attr = self.adapter.layers_path.rpartition(".")
        parent = get_path(self.model, parent_path) if parent_path else self.model
        base = self.model.base_model
        out: list[torch.Tensor] = []

        def grab(mod, args, output):
            out.append(output[0] if isinstance(output, (tuple, list)) else output)
            raise _LayerDone

        current: list[torch.Tensor] = []  # the hidden states layer i > 0 takes, as they are

        def feed(mod, args, kwargs):
            # The base model may change inputs_embeds before its first layer (Granite's embedding_multiplier,
            # Gemma's sqrt(hidden)): right for the embeddings fed to layer 0, wrong for a later layer's input.
            if args:
                return (current[0], *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": current[0]}

        for i, layer in enumerate(layers):
            self._load(f"layer{i}", layer, self.layer_prefixes[i])
            setattr(parent, attr, nn.ModuleList([layer if j == i else _Skip() for j in range(len(layers))]))
            handle = layer.register_forward_hook(grab)  # after capture's hooks on the layer: runs last
            # before capture's pre-hooks, which read the layer's input
            fed = layer.register_forward_pre_hook(feed, with_kwargs=True, prepend=True) if i else None
            try:
                with torch.no_grad():
                    for b, mask in enumerate(masks):
                        before_batch(b)
                        out.clear()
                        current[:] = [hidden[b].to(self.device)]
                        try:
                            base(inputs_embeds=current[0], attention_mask=mask.to(self.device), use_cache=False)
                        except _LayerDone:
                            pass
                        if len(out) != 1:
                            raise RuntimeError(f"decoder layer {i} did not run for batch {b}")
                        hidden[b] = out[0].detach().cpu()
                        if progress is not None:
                            progress(i, b)
            finally:
                handle.remove()
                if fed is not None:
                    fed.remove()
                setattr(parent, attr, layers)
                self._free(layer)


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise WorkbenchError(f"{index} is not a valid safetensors index: {e}") from None
        files = [path / n for n in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise WorkbenchError(f"{path}: safetensors shard(s) named in the index are missing: "
                                 f"{', '.join(missing[:3])}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise WorkbenchError(f"{path}: no *.safetensors weights in the directory (pickled .bin weights are not loaded)")
    return files


def checkpoint_dir(spec: str) -> Path:
    """The folder of safetensors weights behind ``spec`` (zoo models exist only in memory)."""
    if spec == "smollm2-135m":
        from workbench.models import gguf

        return gguf.checkpoint_dir()
    if spec.startswith("zoo:"):
        raise WorkbenchError(f"--offload layers streams weights from safetensors files; {spec} is built in memory "
                             "(save it with save_pretrained and pass the folder)")
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise WorkbenchError(f"model path {spec!r} is not a directory")
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(spec, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as e:  # hub errors come in many types; all mean "cannot resolve"
        raise WorkbenchError(f"unknown model spec {spec!r}: not a local directory and not in the hub cache "
                             f"({type(e).__name__})") from None


def load_streamed(spec: str, *, device: str = "cpu", dtype: torch.dtype | str | None = None,
                  trust_remote_code: bool = False) -> LoadedModel:
    """A :class:`LoadedModel` whose parameters live on the meta device, run layer by layer by the tracer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    device = resolve_device(device)
    torch_dtype = _dtype(dtype) if dtype is not None else torch.float32
    path = checkpoint_dir(str(spec).strip())
    if not (path / "config.json").is_file():
        raise WorkbenchError(f"{spec}: no config.json in the directory (expected a save_pretrained checkpoint)")
    model_type = _check_model_type(path / "config.json")
    if model_type in UNSUPPORTED:
        raise WorkbenchError(f"--offload layers does not support {model_type} ({UNSUPPORTED[model_type]})")
    if model_type not in supported_model_types():
        raise WorkbenchError(f"--offload layers needs a declared adapter; {model_type!r} has none (its structure is "
                             "read from the loaded model: run without --offload)")
    for f in _weight_files(path):
        _check_safetensors(f)
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise WorkbenchError(f"{spec}: no tokenizer in the directory (none of {', '.join(TOKENIZER_FILES)})")
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with params_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    model.eval()
    adapter = adapter_for(model)
    try:
        tok = _tokenizer(path, trust_remote_code)
    except (OSError, ValueError, TypeError) as e:
        raise WorkbenchError(f"{spec}: no usable tokenizer in the directory: {str(e).splitlines()[0]}") from None
    streamer = LayerStreamer(model, path, adapter, device, torch_dtype)
    return LoadedModel(model, tok, adapter, str(spec), meta={"streamer": streamer, "run": {"offload": "layers"}})
