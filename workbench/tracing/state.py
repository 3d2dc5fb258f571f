"""A run's state as one flat dict of tensors: checkpoints (resumable runs) and rank merging.

Every stateful consumer of a trace (reducers, extra sinks, meters, and objects the caller names)
exposes ``state_dict()`` / ``load_state_dict()`` and ``merge()``. :func:`collect` names them
stably (``L3.expert.E5/absmax``, ``L3.router/sink1``, ``meter0``, ...); :func:`flatten` turns their
states into ``{"name::field": tensor}``, which is what a checkpoint file holds and what the ranks
of a distributed run send to rank 0.

A :class:`Checkpoint` is one safetensors file (no pickle) with the batch cursor and a fingerprint
of the run in its metadata, written atomically (temporary file, fsync, rename) every ``every``
batches. Loading the state and running the remaining batches gives bit-identical reducer state to an
uninterrupted run: the same batches reach the same reducers in the same order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from workbench.errors import WorkbenchError
from workbench.io import save_safetensors

SEP = "::"
FORMAT = "workbench-trace-state/1"


def collect(table: Mapping, extra: Mapping, meters, stateful: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Name every stateful object of a trace (those with ``state_dict``), in a stable order."""
    objs: dict[str, Any] = {}
    for site, reds in table.items():
        for kind, r in reds.items():
            objs[f"{site.key}/{kind}"] = r
    for site, sinks in extra.items():
        for i, s in enumerate(sinks):
            if hasattr(s, "state_dict"):
                objs[f"{site.key}/sink{i}"] = s
    for i, m in enumerate(meters):
        if hasattr(m, "state_dict"):
            objs[f"meter{i}"] = m
    for name, o in (stateful or {}).items():
        objs[name] = o
    return objs


def flatten(objs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """``{"name::field": tensor}`` of every object's state (contiguous CPU copies)."""
    flat = {}
    for name, o in objs.items():
        for k, v in o.state_dict().items():
            flat[f"{name}{SEP}{k}"] = v.detach().cpu().contiguous()
    return flat


def _split(flat: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, v in flat.items():
        name, _, k = key.rpartition(SEP)
        out.setdefault(name, {})[k] = v
    return out


def load(objs: Mapping[str, Any], flat: Mapping[str, torch.Tensor]) -> None:
    """Load a flat state into the (fresh) objects; every object must have a state."""
    parts = _split(flat)
    if set(parts) - set(objs):
        raise ValueError(f"state for unknown objects: {sorted(set(parts) - set(objs))[:3]}")
    for name, o in objs.items():
        o.load_state_dict(parts.get(name, {}))


def fresh(o: Any) -> Any:
    """An empty object of the same kind and configuration (reducer dataclasses, or ``o.empty()``)."""
    if hasattr(o, "empty"):
        return o.empty()
    if dataclasses.is_dataclass(o):
        kw = {f.name: getattr(o, f.name) for f in dataclasses.fields(o)
              if f.init and not isinstance(getattr(o, f.name), torch.Tensor) and getattr(o, f.name) is not None}
        return type(o)(**kw)
    raise TypeError(f"cannot make an empty {type(o).__name__} to merge into")


def merge(objs: Mapping[str, Any], flat: Mapping[str, torch.Tensor]) -> None:
    """Merge another part's flat state (e.g. another rank's) into the objects."""
    parts = _split(flat)
    for name, o in objs.items():
        o.merge(fresh(o).load_state_dict(parts.get(name, {})))


def outside_inference(objs: Iterable[Any], model: torch.nn.Module | None = None) -> None:
    """Swap the inference tensors that ``objs`` and ``model``'s modules hold for normal copies (same values).

    A trace runs under ``torch.inference_mode`` (cheaper per op than ``no_grad``), so the state its reducers,
    sinks and meters build from the model's outputs is made of inference tensors, and so is any tensor a
    module caches during its forward (Phi-3's long-RoPE frequencies, a plain attribute). Those cannot be
    updated in place outside inference mode: after this, merging results in place works again.
    Looks into each object's attributes, their lists, tuples and dicts, and objects with a ``state_dict``
    among them (a reducer inside a sink); not into modules or other objects (a meter's model).
    """
    seen: set[int] = set()

    def normal(v: Any, depth: int) -> Any:
        if isinstance(v, torch.Tensor):
            return v.clone() if v.is_inference() else v
        if depth > 4 or isinstance(v, torch.nn.Module):
            return v
        if isinstance(v, list):
            v[:] = [normal(x, depth + 1) for x in v]
        elif isinstance(v, tuple) and not hasattr(v, "_fields"):
            return tuple(normal(x, depth + 1) for x in v)
        elif isinstance(v, dict):
            for k in list(v):
                v[k] = normal(v[k], depth + 1)
        elif hasattr(v, "__dict__") and (depth == 0 or hasattr(v, "state_dict")) and id(v) not in seen:
            seen.add(id(v))
            for k, x in list(vars(v).items()):
                y = normal(x, depth + 1)
                if y is not x:
                    setattr(v, k, y)
        return v

    for o in objs:
        normal(o, 0)
    if model is not None:
        for m in model.modules():
            for k, x in list(vars(m).items()):
                if isinstance(x, torch.Tensor) and x.is_inference():
                    setattr(m, k, x.clone())
            for store in (m._buffers, m._parameters):
                for k, x in store.items():
                    if x is not None and x.is_inference():
                        store[k] = x.clone() if store is m._buffers else torch.nn.Parameter(
                            x.clone(), requires_grad=x.requires_grad)


def weights_signature(model: torch.nn.Module) -> list:
    """What tells one model's weights from another's: each parameter's and buffer's name, shape, dtype and float64
    sum (12 digits: the same on the same machine, and any real change, a row scaled or another checkpoint at the
    same path, moves it). Costs one read of the weights (~0.1 s per GB); meta tensors (layer streaming) count by
    name and shape only."""
    out = []
    with torch.no_grad():
        for name, t in (*model.named_parameters(), *model.named_buffers()):
            total = "meta" if t.is_meta else f"{float(t.detach().sum(dtype=torch.float64)):.12g}"
            out.append([name, list(t.shape), str(t.dtype), total])
    return out


class Fingerprint(str):
    """A run's fingerprint, with a short hash of each part (``parts``) so a refused checkpoint can say what changed."""

    parts: dict[str, str]


# what each part of a fingerprint is, as a refused checkpoint names it
PART_NAMES = {"spec": "model", "model": "model class", "weights": "weights (or their dtype)", "token_ids": "prompts",
              "lengths": "prompts", "batch_size": "batch size", "objects": "statistics kept", "shard": "rank layout",
              "batches": "batch order", "tag.options": "options", "tag.dtype": "dtype", "tag": "options",
              "tag.counting": "how the statistics are counted (the checkpoint is from an older workbench)"}


def fingerprint(**parts: Any) -> Fingerprint:
    """A short hash of what defines a run (model, token ids, batching, sites, options); ``.parts`` hashes each part
    (a JSON ``tag``'s keys apart, e.g. the dtype)."""
    h = hashlib.sha256()
    each = {}
    for k in sorted(parts):
        v = parts[k]
        h.update(k.encode())
        data = v.numpy().tobytes() if isinstance(v, torch.Tensor) else json.dumps(v, sort_keys=True, default=str).encode()
        h.update(data)
        each[k] = hashlib.sha256(data).hexdigest()[:16]
        if k == "tag" and isinstance(v, str) and v.startswith("{"):
            with contextlib.suppress(ValueError):
                for sub, x in json.loads(v).items():
                    each[f"tag.{sub}"] = hashlib.sha256(json.dumps(x, sort_keys=True).encode()).hexdigest()[:16]
    fp = Fingerprint(h.hexdigest()[:32])
    fp.parts = each
    return fp


def _changed(saved: str | None, fp: str) -> str:
    """What differs between a checkpoint's saved part hashes and this run's ("" where not known)."""
    mine = getattr(fp, "parts", None)
    try:
        theirs = json.loads(saved) if saved else None
    except ValueError:
        theirs = None
    if not mine or not isinstance(theirs, dict):
        return ""
    split = any(k.startswith("tag.") for k in mine)  # the tag's keys are named apart: not the tag as a whole too
    keys = [k for k in mine if theirs.get(k) != mine[k] and not (k == "tag" and split)]
    if {"token_ids", "lengths", "batch_size"} & set(keys):  # the batch order and each rank's block follow from these
        keys = [k for k in keys if k not in ("batches", "shard")]  # (it said "batch order" for new prompts)
    return ", ".join(dict.fromkeys(PART_NAMES.get(k, k) for k in keys))


@dataclass
class Checkpoint:
    """Where and how often a run saves its state: ``path`` (a .safetensors file), every ``every`` batches.

    ``tag`` is added to the run's fingerprint by the caller (e.g. the profile options), so a
    checkpoint of a different command is ignored (with a warning) rather than resumed.
    """

    path: Path
    every: int
    tag: str = ""

    def __post_init__(self):
        self.path = Path(self.path)
        if self.every < 1:
            raise WorkbenchError("--checkpoint-every must be at least 1 (0 turns checkpoints off)")

    def load(self, fp: str) -> tuple[int, dict[str, torch.Tensor]] | None:
        """``(cursor, flat state)`` if a checkpoint of this run exists, else None."""
        if not self.path.is_file():
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(self.path), framework="pt") as f:
                meta = f.metadata() or {}
                flat = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # a damaged checkpoint is not fatal: start over
            warnings.warn(f"ignoring unreadable checkpoint {self.path} ({str(e).splitlines()[0]}); starting over",
                          stacklevel=2)
            return None
        if meta.get("format") != FORMAT or meta.get("fingerprint") != fp:
            what = _changed(meta.get("parts"), fp) if meta.get("format") == FORMAT else ""
            warnings.warn(f"ignoring checkpoint {self.path}: it belongs to a different run ("
                          + (f"changed: {what}" if what else "model or its weights, prompts or options changed")
                          + "); starting over", stacklevel=2)
            return None
        return int(meta["cursor"]), flat

    def save(self, cursor: int, fp: str, flat: Mapping[str, torch.Tensor]) -> None:
        meta = {"format": FORMAT, "fingerprint": str(fp), "cursor": str(cursor)}
        if getattr(fp, "parts", None):
            meta["parts"] = json.dumps(fp.parts)
        save_safetensors(self.path, dict(flat), meta)

    def discard(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
