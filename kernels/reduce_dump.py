"""``workbench reduce DUMP_DIR --out stats.json``: stream a full activation dump through the kernels.

A dump directory is what :class:`workbench.tracing.dump.DumpWriter` writes (``index.json`` listing
each site's safetensors shards of ``values`` [n, C] and global ``tokens`` [n]). Each site is read
shard by shard (memory bounded by one shard plus O(C) state) and reduced with

* ``channel_stats``, merged across shards, its argmax reported as the **global token index**
  (ties: the smallest token, as the ``absmax`` reducer does);
* ``token_absmax``: the ``top`` tokens with the largest |x| (larger first, then smaller token); these and the
  peak also carry each token's prompt index and position, from the dump's token table;
* ``log_histogram`` of log10|x| (``bins`` over [lo, hi), plus zero/under/over/NaN counts);
* per-channel mean and std of the finite entries as ``trace``'s ``moments`` reducer has them (float64, merged
  across shards; the kernel's fp32 ``sum`` / ``sumsq``, also written, lose the std where |mean| >> std).

``stats.json`` is written atomically. Shard values in float64 are reduced as float32.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from workbench.args import COUNT
from workbench.errors import WorkbenchError
from workbench.io import output_file, write_json
from workbench.kernels.channel_stats import ChannelStats, channel_stats, empty_channel_stats, merge_channel_stats
from workbench.kernels.dispatch import FLOAT_DTYPES, backend_for
from workbench.kernels.log_histogram import log_histogram, merge_log_histograms
from workbench.kernels.token_absmax import token_absmax
from workbench.tracing.dump import FORMAT as DUMP_FORMAT, MARKER, is_site_key, read_site
from workbench.tracing.reducers import Moments, Payload

_MOMENT_CHUNK = 1 << 22  # elements of a shard converted to float64 at once for the moments


def _read_index(dump_dir: Path) -> dict:
    if not dump_dir.is_dir():
        raise WorkbenchError(f"dump directory {dump_dir} does not exist or is not a directory")
    path = dump_dir / "index.json"
    if not path.is_file():
        raise WorkbenchError(f"{dump_dir} is not a complete dump: no index.json (written last by `trace --dump`)")
    try:
        index = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WorkbenchError(f"cannot read {path}: {str(e).splitlines()[0]}") from None
    sites = index.get("sites") if isinstance(index, dict) else None
    if not isinstance(sites, dict) or not all(isinstance(v, list) for v in sites.values()):
        raise WorkbenchError(f"{path} has no valid 'sites' table (expected {{site: [shard paths]}})")
    if not sites:
        raise WorkbenchError(f"{path} lists no sites: the dump holds nothing to reduce")
    if index.get("format") != DUMP_FORMAT:
        raise WorkbenchError(f"{path}: format {index.get('format')!r}, not {DUMP_FORMAT!r} (what `trace --dump` "
                             "writes)")
    n = index.get("num_tokens")
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise WorkbenchError(f"{path}: 'num_tokens' must be a count of tokens, got {n!r}")
    bad = next((key for key in sites if not is_site_key(key)), None)
    if bad is not None:
        raise WorkbenchError(f"{path}: {bad!r} is not a site key (e.g. L0.resid_post, L1.expert.E3)")
    root = dump_dir.resolve()
    seen: dict[str, str] = {}
    for key, names in sites.items():  # shards live inside the dump: an edited index cannot point elsewhere
        for name in names:
            if not isinstance(name, str) or not (dump_dir / name).resolve().is_relative_to(root):
                raise WorkbenchError(f"{path}: site {key} lists a shard outside the dump folder: {name!r}")
            if Path(name).parent.name != key:  # a dump keeps each site's shards in the site's own folder
                raise WorkbenchError(f"{path}: site {key} lists {name!r}, a shard of another folder")
            if name in seen:  # its rows would count twice
                raise WorkbenchError(f"{path}: shard {name!r} is listed twice (sites {seen[name]} and {key})")
            seen[name] = key
    rows = index.get("rows")  # dumps since 2026-12-07 record each site's rows; `reduce` checks it reads them all
    if rows is not None and (not isinstance(rows, dict) or set(rows) != set(sites)
                             or not all(isinstance(v, int) and not isinstance(v, bool) for v in rows.values())):
        raise WorkbenchError(f"{path}: 'rows' must give every site's row count")
    channels = index.get("channels")  # since 2026-12-07 too: each site's width, checked against every shard
    if channels is not None and (not isinstance(channels, dict) or set(channels) != set(sites) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in channels.values())):
        raise WorkbenchError(f"{path}: 'channels' must give every site's channel count")
    dtypes = index.get("value_dtypes")
    if dtypes is not None and (not isinstance(dtypes, dict) or set(dtypes) != set(sites)
                               or not all(isinstance(v, str) for v in dtypes.values())):
        raise WorkbenchError(f"{path}: 'value_dtypes' must give every site's value dtype")
    return index


def _token_table(dump_dir: Path, index: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The dump's prompt index and position of every global token (tokens.safetensors), checked against the
    index: a truncated or another dump's table was never read, and a dump with a broken token map reduced."""
    from safetensors.torch import load_file

    name = index.get("tokens", "tokens.safetensors")
    path = dump_dir / name if isinstance(name, str) else None
    if path is None or not path.resolve().is_relative_to(dump_dir.resolve()):
        raise WorkbenchError(f"{dump_dir / 'index.json'}: 'tokens' must name the token table inside the dump, "
                             f"got {name!r}")
    try:
        t = load_file(str(path))
        prompt, position = t["prompt"], t["position"]
    except Exception as e:  # missing file, truncated safetensors, missing tensor name
        raise WorkbenchError(f"cannot read the dump's token table {path}: {type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}") from None
    n = index["num_tokens"]
    if prompt.shape != (n,) or position.shape != (n,) or prompt.is_floating_point() or position.is_floating_point():
        raise WorkbenchError(f"the dump's token table {path} holds prompt {tuple(prompt.shape)} {prompt.dtype} and "
                             f"position {tuple(position.shape)} {position.dtype}, not {n} integers each (num_tokens)")
    return prompt.to(torch.int64), position.to(torch.int64)


def _shards(dump_dir: Path, key: str):
    it = read_site(dump_dir, key)
    while True:
        try:
            values, tokens = next(it)
        except StopIteration:
            return
        except Exception as e:  # missing file, corrupt safetensors, missing tensor name
            raise WorkbenchError(f"cannot read a shard of site {key} in {dump_dir}: "
                                 f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
        yield values, tokens


def _top_rows(vals, toks, chans, top: int):
    order = torch.argsort(toks, stable=True)
    order = order[torch.argsort(-vals[order], stable=True)][:top]
    return vals[order], toks[order], chans[order]


class _SiteState:
    def __init__(self, top: int, bins: int, lo: float, hi: float, backend: str | None, num_tokens: int,
                 channels: int | None = None, dtype: str | None = None):
        self.top, self.bins, self.lo, self.hi, self.backend = top, bins, lo, hi, backend
        self.num_tokens = num_tokens
        self.want = channels, dtype  # what the dump's index says the site's shards hold (None: an older dump)
        self.stats: ChannelStats | None = None
        self.hist = None
        # mean and std as trace's `moments` reducer has them (float64, per shard then merged): the kernel's fp32
        # sum and sum of squares lose a channel's std where |mean| >> std (a massive channel of 1000 +- 0.1: 0.32)
        self.moments = Moments()
        self.rows, self.shards, self.channels = 0, 0, None
        self.topv = torch.zeros(0, dtype=torch.float32)
        self.topt = torch.zeros(0, dtype=torch.int64)
        self.topc = torch.zeros(0, dtype=torch.int64)

    def update(self, key: str, values: torch.Tensor, tokens: torch.Tensor, device: torch.device) -> None:
        if values.dim() != 2 or tokens.shape != values.shape[:1]:
            raise WorkbenchError(f"site {key}: shard values {tuple(values.shape)} and tokens {tuple(tokens.shape)} "
                                 "do not match ([n, C] and [n])")
        if self.channels is not None and values.shape[1] != self.channels:
            raise WorkbenchError(f"site {key}: shard has {values.shape[1]} channels after {self.channels}")
        width, dtype = self.want
        held = str(values.dtype).removeprefix("torch.")  # as the dump's index names it
        if (width is not None and values.shape[1] != width) or (dtype is not None and held != dtype):
            raise WorkbenchError(f"site {key}: a shard holds {values.shape[1]} channels of {held}, the dump's index "
                                 f"says {width} of {dtype}: it belongs to another dump")
        if values.dtype == torch.float64:
            values = values.float()
        if values.dtype not in FLOAT_DTYPES:
            raise WorkbenchError(f"site {key}: shard values are {values.dtype}, not a floating type")
        self.channels, self.shards, self.rows = values.shape[1], self.shards + 1, self.rows + values.shape[0]
        if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
            raise WorkbenchError(f"site {key}: shard tokens are {tokens.dtype}, not global token indices (integers)")
        if values.shape[0] == 0:  # e.g. an expert no token was routed to in that batch
            return
        if not bool(((tokens >= 0) & (tokens < self.num_tokens)).all()):  # a shard of another dump
            raise WorkbenchError(f"site {key}: a shard holds tokens outside the dump's 0..{self.num_tokens - 1} "
                                 f"(tokens {int(tokens.min())}..{int(tokens.max())}): it belongs to another dump")
        values, tokens = values.to(device), tokens.to(device, torch.int64)
        if tokens.numel() > 1 and not bool((tokens[1:] > tokens[:-1]).all()):
            order = torch.argsort(tokens, stable=True)  # rows in token order: smallest row == smallest token
            values, tokens = values[order], tokens[order]
        step = max(1, _MOMENT_CHUNK // values.shape[1])  # float64 copies of a bounded row chunk at a time
        for r0 in range(0, values.shape[0], step):
            self.moments.update(Payload(values[r0:r0 + step], tokens[r0:r0 + step]))
        s = channel_stats(values, self.backend)
        s = s._replace(argmax=torch.where(s.argmax >= 0, tokens[s.argmax.clamp(min=0)], -1))
        self.stats = s if self.stats is None else merge_channel_stats(self.stats, s)
        t = token_absmax(values, self.backend)
        keep = t.argmax >= 0
        self.topv, self.topt, self.topc = _top_rows(torch.cat([self.topv, t.absmax[keep].cpu()]),
                                                    torch.cat([self.topt, tokens[keep].cpu()]),
                                                    torch.cat([self.topc, t.argmax[keep].cpu()]), self.top)
        h = log_histogram(values, self.bins, self.lo, self.hi, self.backend)
        self.hist = h if self.hist is None else merge_log_histograms(self.hist, h)

    def result(self) -> dict:
        out = {"rows": self.rows, "shards": self.shards, "channels": self.channels or 0}
        m = self.moments
        if self.stats is None:  # no shard, or only empty ones: every key a site with rows has, with nothing in it
            s = empty_channel_stats(self.channels or 0)
            m.update(Payload(torch.zeros(0, self.channels or 0), torch.zeros(0, dtype=torch.int64)))
            h = [torch.zeros(self.bins, dtype=torch.int64), 0, 0, 0, 0]
        else:
            s, h = ChannelStats(*(v.cpu() for v in self.stats)), [v.cpu() for v in self.hist]
        seen = s.argmax >= 0
        peak = {"max_abs": float("nan"), "channel": -1, "token": -1}
        if bool(seen.any()):
            top = s.absmax[seen].max()
            chans = torch.nonzero(seen & (s.absmax == top)).flatten()
            best = int(chans[torch.argmin(s.argmax[chans])])  # smallest token, then smallest channel
            peak = {"max_abs": float(top), "channel": best, "token": int(s.argmax[best])}
        nan = int(s.nan.sum())
        return {
            **out, "peak": peak, "nan_count": nan, "inf_count": self.rows * out["channels"] - int(s.count.sum()) - nan,
            "channel": {"absmax": s.absmax.tolist(), "argmax_token": s.argmax.tolist(),
                        "mean": torch.where(m.count > 0, m.mean, math.nan).tolist(), "std": m.var.sqrt().tolist(),
                        "sum": s.sum.tolist(), "sumsq": s.sumsq.tolist(),
                        "count": s.count.tolist(), "nan": s.nan.tolist()},
            "top_tokens": [{"token": int(t), "max_abs": float(v), "channel": int(c)}
                           for v, t, c in zip(self.topv.tolist(), self.topt.tolist(), self.topc.tolist())],
            "log_histogram": {"lo": self.lo, "hi": self.hi, "counts": h[0].tolist(), "zeros": int(h[1]),
                              "under": int(h[2]), "over": int(h[3]), "nan_count": int(h[4])},
        }


def reduce_dump(dump_dir: str | Path, out_path: str | Path, progress: bool = True, *, top: int = 16,
                bins: int = 96, lo: float = -6.0, hi: float = 6.0, device: str | None = None,
                backend: str | None = None) -> dict:
    """Reduce every site of a dump shard by shard and write ``out_path`` (JSON); returns the same dict.

    ``device``: where shards are reduced (default: CUDA when available, else CPU); ``backend`` as
    in :mod:`workbench.kernels.dispatch`.
    """
    dump_dir = Path(dump_dir)
    index = _read_index(dump_dir)
    if top < 0:
        raise WorkbenchError(f"top must be >= 0, got {top}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sites = index["sites"]
    prompt, position = _token_table(dump_dir, index)
    bar = tqdm(total=sum(len(v) for v in sites.values()), unit="shard", desc=f"reduce {dump_dir.name}",
               disable=not progress, file=sys.stderr, leave=False)
    results = {}
    for key in sorted(sites):
        state = _SiteState(top, bins, lo, hi, backend, index["num_tokens"], (index.get("channels") or {}).get(key),
                           (index.get("value_dtypes") or {}).get(key))
        for values, tokens in _shards(dump_dir, key):
            state.update(key, values, tokens, dev)
            bar.update(1)
        want = (index.get("rows") or {}).get(key)
        if want is not None and state.rows != want:
            raise WorkbenchError(f"site {key}: its shards hold {state.rows} rows, the dump's index says {want} "
                                 "(a shard was changed or replaced after the dump)")
        results[key] = state.result()
        for where in (results[key]["peak"], *results[key]["top_tokens"]):  # global index -> prompt and position
            t = where["token"]
            where["prompt_index"], where["position"] = (int(prompt[t]), int(position[t])) if t >= 0 else (None, None)
    bar.close()
    used = backend_for(torch.empty(0, device=dev), backend)
    summary = {"format": "workbench-reduce-1", "dump_dir": str(dump_dir), "spec": index.get("spec"),
               "num_tokens": index.get("num_tokens"), "backend": used, "device": str(dev),
               "options": {"top": top, "bins": bins, "lo": lo, "hi": hi}, "sites": results}
    write_json(out_path, summary)
    return summary


def cmd_reduce(args) -> int:
    from workbench.models.specs import resolve_device

    device = resolve_device(args.device) if args.device is not None else None  # one-line error for a bad name
    out, dump = Path(args.out).expanduser().resolve(), Path(args.dump_dir).expanduser().resolve()
    if (out.parent == dump and out.name in ("index.json", "tokens.safetensors", MARKER)) or (
            out.parent.parent == dump and is_site_key(out.parent.name)):
        raise WorkbenchError(f"--out {args.out} is one of the dump's own files: write the statistics beside them")
    output_file(args.out)  # before reducing every shard
    summary = reduce_dump(args.dump_dir, args.out, progress=not args.quiet, top=args.top, device=device)
    rows = sum(s["rows"] for s in summary["sites"].values())
    print(f"reduced {len(summary['sites'])} sites ({rows} rows) of {args.dump_dir} with the {summary['backend']} "
          f"backend on {summary['device']}; wrote {args.out}")
    return 0


def add_reduce_parser(subparsers) -> None:
    """Add ``reduce DUMP_DIR --out FILE [--quiet]`` to the ``workbench`` command's subparsers."""
    r = subparsers.add_parser("reduce", help="reduce a full activation dump (trace --dump) to per-site statistics",
                              description="Stream every site of DUMP_DIR (written by `workbench trace --dump`) "
                                          "shard by shard through the kernels: per-channel absmax with its token, "
                                          "sums, top tokens by |x| and a log10|x| histogram; write OUT (JSON).")
    r.add_argument("dump_dir", help="dump directory (with index.json)")
    r.add_argument("--out", required=True, help="output JSON file, e.g. stats.json")
    r.add_argument("--top", type=COUNT, default=16, help="tokens kept per site by max |x| (default 16)")
    r.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto (default: cuda when available)")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.set_defaults(func=cmd_reduce)
