"""Opt-in full activation dumps, streamed to safetensors shards (never held whole in memory).

Layout of a dump directory::

    DIR/index.json                       sites, shard list, dtype, token table file
    DIR/tokens.safetensors               prompt index and position of every global token
    DIR/<site key>/shard-00000.safetensors   values [n, C] and tokens [n]

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


class _SiteSink:
    def __init__(self, writer: "DumpWriter", site: Site):
        self.writer, self.site = writer, site

    def update(self, p: Payload) -> None:
        self.writer._add(self.site, p)


class DumpWriter:
    def __init__(self, directory: str | Path, shard_rows: int = 65536, dtype: torch.dtype | None = None):
        self.dir = Path(directory)
        # what a killed earlier dump into this folder left half-written (its finished shards are overwritten)
        clear_stale_temps(self.dir, ["tokens.safetensors", "index.json"])
        for sub in (self.dir.iterdir() if self.dir.is_dir() else []):
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

    def sink(self, site: Site) -> _SiteSink:
        return _SiteSink(self, site)

    def _add(self, site: Site, p: Payload) -> None:
        values = p.values.detach().to("cpu", self.dtype or p.values.dtype)
        self._buf[site].append(Payload(values, p.tokens.detach().cpu()))
        self._rows[site] += values.shape[0]
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
        save_safetensors(self.dir / name, tensors)
        self._shards[site].append(name)

    def close(self, token_prompt: torch.Tensor, token_position: torch.Tensor, meta: dict) -> Path:
        for site in list(self._buf):
            self._flush(site)
        save_safetensors(self.dir / "tokens.safetensors",
                         {"prompt": token_prompt.contiguous(), "position": token_position.contiguous()})
        index = {"format": FORMAT, "sites": {s.key: self._shards[s] for s in sorted(self._shards)},
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
