"""Opt-in full activation dumps, streamed to safetensors shards (never held whole in memory).

Layout of a dump directory::

    DIR/index.json                       sites, shard list, dtype, token table file
    DIR/tokens.safetensors               prompt index and position of every global token
    DIR/<site key>/shard-00000.safetensors   values [n, C] and tokens [n]; a router site's chosen experts
                                          (topk [n, k]), an ``experts`` site's expert of each row (experts [n])
    DIR/.workbench-dump                  written first: the folder is a dump's (a rerun may replace it)

Shards and the index are written atomically (temp file, fsync, rename); ``index.json`` is written
last, so a dump without it is incomplete.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch

from workbench.errors import WorkbenchError
from workbench.io import clear_stale_temps, save_safetensors, write_json
from workbench.tracing.reducers import Payload
from workbench.tracing.sites import Site


FORMAT = "workbench-dump-1"  # index.json's "format"
MARKER = ".workbench-dump"  # written first into a dump's folder: the folder is a dump's even before its index is


def check_dump_dir(directory: str | Path, flag: str = "dump_dir") -> None:
    """A dump goes into an empty or new folder, or over an earlier dump (its index.json, or the marker a dump writes
    first, says so): anything else is refused before any work, as a dump removes the site folders' shards it does not
    write again."""
    import json

    d = Path(directory)
    if not d.is_dir():
        return
    index = d / "index.json"
    if index.is_file():
        try:
            fmt = json.loads(index.read_text()).get("format")
        except (OSError, ValueError, AttributeError):
            fmt = None
        if fmt != FORMAT:
            raise WorkbenchError(f"{flag} {directory} holds an index.json that is not a dump's: give an empty or new "
                                 "folder (a dump replaces its index.json)")
        return
    if (d / MARKER).is_file():
        return
    # what a killed write leaves (hidden temporaries, also in a site folder) is not the user's; anything else may be
    other = sorted(p.name for p in d.iterdir() if not p.name.startswith(".") and not (
        p.is_dir() and is_site_key(p.name) and all(q.name.startswith(".") for q in p.iterdir())))
    if other:
        raise WorkbenchError(f"{flag} {directory} holds files that are not a dump's ({other[0]}"
                             f"{', ...' if len(other) > 1 else ''}): give an empty or new folder")


class _SiteSink:
    def __init__(self, writer: "DumpWriter", site: Site):
        self.writer, self.site = writer, site

    def update(self, p: Payload) -> None:
        self.writer._add(self.site, p)


class DumpWriter:
    def __init__(self, directory: str | Path, shard_rows: int = 65536, dtype: torch.dtype | None = None):
        self.dir = Path(directory)
        if self.dir.exists() and not self.dir.is_dir():
            raise WorkbenchError(f"dump_dir {directory} is a file, not a folder")
        check_dump_dir(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / MARKER).write_text(FORMAT + "\n")  # before any shard: a killed dump's folder is still known as one
        # what a killed earlier dump into this folder left half-written (its finished shards are overwritten)
        clear_stale_temps(self.dir, ["tokens.safetensors", "index.json"])
        for sub in self.dir.iterdir():
            if sub.is_dir() and not sub.name.startswith("."):
                clear_stale_temps(sub, ["shard-*.safetensors"])
        # An earlier dump's index goes first: until this one's is written the folder is incomplete (a killed rerun
        # must not leave the old index over a mix of old and new shards); earlier dumps' shards that this one does
        # not write again are removed when it closes.
        (self.dir / "index.json").unlink(missing_ok=True)
        self.shard_rows = shard_rows
        self.dtype = dtype
        self._buf: dict[Site, list[Payload]] = defaultdict(list)
        self._rows: dict[Site, int] = defaultdict(int)
        self._shards: dict[Site, list[str]] = defaultdict(list)
        self._total: dict[Site, int] = defaultdict(int)  # rows written per site (the index records them)
        self._shape: dict[Site, tuple[int, str]] = {}  # channels and value dtype per site (the index records them)

    def sink(self, site: Site) -> _SiteSink:
        return _SiteSink(self, site)

    def _add(self, site: Site, p: Payload) -> None:
        values = p.values.detach().to("cpu", self.dtype or p.values.dtype)
        order = None
        if not p.increasing():  # expert rows come in the model's own (unstable) sort: a dump keeps token order,
            key = p.tokens.detach().cpu()  # by expert first on a grouped site
            if p.experts is not None:
                key = p.experts.detach().cpu().to(torch.int64) * (int(key.max()) + 1) + key
            order = torch.argsort(key)
            values = values[order]

        def cpu(t):
            return None if t is None else t.detach().cpu() if order is None else t.detach().cpu()[order]
        # a router's chosen experts and a grouped site's expert of each row travel with the values (without them the
        # rows of an ``experts`` site cannot be told apart, nor biased or grouped routing rebuilt from the logits)
        self._buf[site].append(Payload(values, cpu(p.tokens), topk=cpu(p.topk), experts=cpu(p.experts)))
        self._shape.setdefault(site, (int(values.shape[1]), str(values.dtype).removeprefix("torch.")))
        self._rows[site] += values.shape[0]
        self._total[site] += values.shape[0]
        if self._rows[site] >= self.shard_rows:
            self._flush(site)

    def _flush(self, site: Site) -> None:
        parts = self._buf.pop(site, [])
        self._rows[site] = 0
        if not parts:
            return
        name = f"{site.key}/shard-{len(self._shards[site]):05d}.safetensors"
        tensors = {"values": torch.cat([q.values for q in parts]).contiguous(),
                   "tokens": torch.cat([q.tokens for q in parts]).to(torch.int64).contiguous()}
        for key in ("topk", "experts"):
            if getattr(parts[0], key) is not None:
                tensors[key] = torch.cat([getattr(q, key) for q in parts]).to(torch.int64).contiguous()
        save_safetensors(self.dir / name, tensors)
        self._shards[site].append(name)

    def close(self, token_prompt: torch.Tensor, token_position: torch.Tensor, meta: dict) -> Path:
        for site in list(self._buf):
            self._flush(site)
        save_safetensors(self.dir / "tokens.safetensors",
                         {"prompt": token_prompt.contiguous(), "position": token_position.contiguous()})
        index = {"format": FORMAT, "sites": {s.key: self._shards[s] for s in sorted(self._shards)},
                 "rows": {s.key: self._total[s] for s in sorted(self._shards)},  # what `reduce` checks it reads
                 # and each site's width and value dtype: a shard of another model's dump with as many rows is refused
                 "channels": {s.key: self._shape[s][0] for s in sorted(self._shards)},
                 "value_dtypes": {s.key: self._shape[s][1] for s in sorted(self._shards)},
                 "tokens": "tokens.safetensors", **meta}
        path = write_json(self.dir / "index.json", index)
        mine = {n for names in self._shards.values() for n in names}
        for sub in self.dir.iterdir():  # earlier dumps' shards: in site folders, named as this writer names them
            if not sub.is_dir() or not is_site_key(sub.name):
                continue
            for f in sub.glob("shard-*.safetensors"):
                if f"{sub.name}/{f.name}" not in mine:
                    f.unlink()
            if not any(sub.iterdir()):
                sub.rmdir()
        return path


def is_site_key(name: str) -> bool:
    try:
        Site.from_key(name)
    except (WorkbenchError, ValueError):
        return False
    return True


def read_site(directory: str | Path, site: Site | str):
    """Yield ``(values, tokens)`` shard by shard for one site of a dump."""
    import json

    from safetensors.torch import load_file

    directory = Path(directory)
    index = json.loads((directory / "index.json").read_text())
    key = site.key if isinstance(site, Site) else site
    for name in index["sites"].get(key, []):
        d = load_file(str(directory / name))
        yield d["values"], d["tokens"]
