"""Streaming, mergeable reducers: what a capture keeps instead of the activations themselves.

Every reducer takes rows ``values [n, channels]`` with their global token indices ``tokens [n]``
(unique over a run), and supports ``merge``: reducing two disjoint parts and merging gives the
same result as reducing the whole. For :class:`AbsMax`, :class:`LogHistogram` and
:class:`ExpertCounts` that is exact (bit-equal); :class:`Moments` uses Chan's parallel update in
float64 and agrees to rounding.

Non-finite values (documented behaviour, tested):

* ``NaN`` never wins an absmax, is not counted in moments or histograms, and is counted in
  ``nan_count``.
* ``±inf`` is a value: it wins an absmax (|inf| = inf), falls into a histogram's overflow bin, is
  skipped by :class:`Moments` and counted in ``inf_count``.
* A tie in absmax is won by the smallest token index, so the result does not depend on batching.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from typing import ClassVar

import numpy as np
import torch

from workbench.kernels import cpu

NO_TOKEN = -1
_BIG = torch.iinfo(torch.int64).max


def _use_kernels(x: torch.Tensor) -> bool:
    """Whether the Triton kernels take this tensor (CUDA under auto, or WORKBENCH_KERNELS=triton)."""
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16) or x.dim() != 2:
        return False
    if not x.is_cuda and os.environ.get("WORKBENCH_KERNELS", "auto").strip().lower() != "triton":
        return False  # the common CPU case, decided without importing anything
    from workbench.kernels.dispatch import backend_for

    return backend_for(x) == "triton"


def broken_rows(logits: torch.Tensor) -> torch.Tensor | None:
    """[n] bool: router rows holding NaN or +inf (an overflow upstream), whose probabilities are NaN and whose top-k
    is arbitrary; -inf is a masked expert (probability 0), not broken. None where no row is: one sum tells (a NaN
    or +inf anywhere makes it NaN or +inf, -inf alone makes it -inf), so a clean payload costs one reduction."""
    total = float(logits.sum())
    if total == total and total != math.inf:
        return None
    bad = torch.isnan(logits).any(-1) | torch.isposinf(logits).any(-1)
    return bad if bool(bad.any()) else None


def jain(load) -> float:
    """Jain's fairness index of a load vector, (sum p)^2 / (E * sum p^2): 1 for equal loads, 1/E when one
    expert takes everything; NaN for an empty or all-zero load. The "expert utilization" of OLMoE and of
    "On DeepSeekMoE: Statistical Benefits of Shared Experts and Normalized Sigmoid Gating"."""
    p = torch.as_tensor(load, dtype=torch.float64)
    s2 = float((p * p).sum())
    return float(p.sum()) ** 2 / (p.numel() * s2) if p.numel() and s2 > 0 else math.nan


class Scratch:
    """Buffers kept for reducers' payload-sized temporaries, one per role, owned by whoever hands the payloads
    out (the capture: they go when the trace ends).

    Used on the CPU only (see :func:`scratch`). There a fresh payload-sized result can cost several times the op
    itself: ``|x|`` of a [1592, 1024] float32 expert payload took 0.4-0.6 ms into a new tensor against 0.08 ms
    into a kept one (the allocator gives such blocks back to the system and takes them again). A buffer is valid
    until its role is asked for again: a reducer uses it within one update. A payload's ``|x|`` (role ``abs``,
    shared by the site's reducers) is kept while no other payload has taken the buffer (:meth:`Payload.abs`
    checks, and computes it again if one has).
    """

    def __init__(self):
        self._buffers: dict[str, torch.Tensor] = {}
        self._owners: dict[str, int] = {}  # role -> id() of the object the buffer was last handed to

    def get(self, role: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
            owner: object = None) -> torch.Tensor:
        n = math.prod(shape)
        b = self._buffers.get(role)
        if b is None or b.numel() < n or b.dtype != dtype or b.device != torch.device(device):
            b = self._buffers[role] = torch.empty(n + n // 4, dtype=dtype, device=device)  # room for larger batches
        self._owners[role] = id(owner)
        return b[:n].view(shape)

    def holds(self, role: str, owner: object) -> bool:
        """Whether ``role``'s buffer was last handed to ``owner`` (a live object: ids are unique among those)."""
        return self._owners.get(role) == id(owner)


def scratch(s: Scratch | None, role: str, shape, dtype: torch.dtype, device: torch.device,
            owner: object = None) -> torch.Tensor:
    """``s``'s buffer for ``role`` (uninitialised); a new tensor without a scratch, or off the CPU: there the
    caching allocator already makes allocation cheap, and buffers kept between updates would hold memory that
    the forward needs."""
    if s is None or torch.device(device).type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    return s.get(role, tuple(shape), dtype, device, owner)


@dataclass
class Payload:
    """One hook's rows for one batch. Shapes are checked on construction."""

    values: torch.Tensor  # [n, channels]
    tokens: torch.Tensor  # [n] global token indices, int64
    topk: torch.Tensor | None = None  # [n, k] chosen experts (router sites)
    experts: torch.Tensor | None = None  # [n] the expert of each row (grouped "experts" sites)
    ordered: bool | None = None  # tokens strictly increasing (None: not known, checked when needed)
    scratch: Scratch | None = field(default=None, repr=False, compare=False)  # buffers for reducers' temporaries
    _abs: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)
    _abs_kept: bool = field(default=False, init=False, repr=False, compare=False)  # ``_abs`` is a Scratch buffer

    def __post_init__(self):
        if self.values.dim() != 2 or self.tokens.shape != self.values.shape[:1]:
            raise ValueError(f"payload shapes: values {tuple(self.values.shape)}, tokens {tuple(self.tokens.shape)}")
        if self.topk is not None and (self.topk.dim() != 2 or self.topk.shape[0] != self.values.shape[0]):
            raise ValueError(f"payload shapes: values {tuple(self.values.shape)}, topk {tuple(self.topk.shape)}")
        if self.experts is not None and self.experts.shape != self.values.shape[:1]:
            raise ValueError(f"payload shapes: values {tuple(self.values.shape)}, experts {tuple(self.experts.shape)}")

    def abs(self) -> torch.Tensor:
        """``|values|``, computed once and shared by every reducer of the site."""
        if self._abs is None or (self._abs_kept and not self.scratch.holds("abs", self)):
            v = self.values.detach()
            self._abs = torch.abs(v, out=scratch(self.scratch, "abs", v.shape, v.dtype, v.device, owner=self))
            self._abs_kept = self.scratch is not None and v.device.type == "cpu"
        return self._abs

    def increasing(self) -> bool:
        """Whether the rows' tokens are strictly increasing (capture emits most sites so)."""
        if self.ordered is None:
            t = self.tokens
            self.ordered = t.numel() < 2 or bool((t[1:] > t[:-1]).all())
        return self.ordered


class Reducer:
    """Base class: state is a set of tensors (``state_dict``) so reducers can be saved and all-reduced."""

    kind: ClassVar[str]
    registry: ClassVar[dict[str, type["Reducer"]]] = {}
    # Rows may reach update() in payloads of any split (several batches at once: Capture(coalesce=True));
    # a reducer whose result depends on the split says False.
    coalesce: ClassVar[bool] = True
    # The state tensors that hold global token indices (NO_TOKEN where none): what :meth:`shift_tokens` moves. A
    # subclass whose state holds token indices names them here, or merging traces of further prompts misplaces them.
    token_fields: ClassVar[tuple[str, ...]] = ()
    # Settings that the state tensors do not show (a histogram's edges, TopK's k): a state holds them as 0-d
    # tensors, so that it is not loaded into a reducer set up otherwise.
    settings: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if "kind" in cls.__dict__:
            Reducer.registry[cls.kind] = cls

    def update(self, p: Payload) -> None:
        raise NotImplementedError

    def merge(self, other: "Reducer") -> "Reducer":
        raise NotImplementedError

    def result(self) -> dict:
        raise NotImplementedError

    def _config(self) -> dict[str, int | float]:
        return {name: getattr(self, name) for name in self.settings}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Copies of the state tensors (later updates do not change a saved state), and the :attr:`settings` as
        0-d tensors."""
        out = {k: torch.tensor(v, dtype=torch.float64 if isinstance(v, float) else None)
               for k, v in self._config().items()}
        out.update({f.name: getattr(self, f.name).clone() for f in fields(self)
                    if isinstance(getattr(self, f.name), torch.Tensor)})
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> "Reducer":
        """Load a :meth:`state_dict` (settings it lacks are not checked: states saved before they were kept). A
        key that is no state field, or a setting other than this reducer's, is refused, naming it."""
        config = self._config()
        names = {f.name for f in fields(self)} | set(config)
        for k, v in state.items():
            if k not in names:
                raise ValueError(f"{type(self).__name__} state has unknown key {k!r}; known: "
                                 f"{', '.join(sorted(names))}")
            if k in config:
                saved = v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else v
                if saved != config[k]:
                    raise ValueError(f"{type(self).__name__} state was saved with {k}={saved!r}, this one has "
                                     f"{k}={config[k]!r}")
        for k, v in state.items():
            if k not in config:
                setattr(self, k, v.clone())
        return self

    def shift_tokens(self, offset: int) -> "Reducer":
        """Number this state's tokens ``offset`` later, in place (NO_TOKEN stays): the same rows as tokens of a
        run that follows ``offset`` tokens (:meth:`TraceResult.merge <workbench.tracing.runner.TraceResult.merge>`)."""
        for name in self.token_fields:
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, torch.where(t == NO_TOKEN, t, t + offset))
        return self

    def _check_same(self, other: "Reducer") -> None:
        if other is self:
            raise ValueError(f"cannot merge a {type(self).__name__} into itself (its rows would count twice)")
        if type(other) is not type(self):
            raise TypeError(f"cannot merge {type(other).__name__} into {type(self).__name__}")
        if getattr(other, "scoring", None) != getattr(self, "scoring", None):
            raise ValueError(f"cannot merge {other.scoring} router statistics into {self.scoring} ones")


def _rows_max(out: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``out.index_reduce_(0, index, src, "amax")``: row ``i`` of ``src`` into row ``index[i]``, NaN propagating.
    As a ``scatter_reduce_``, 3x faster on CPU (float32 [13k, 64] rows into 60) and without the beta warning."""
    return out.scatter_reduce_(0, index[:, None].expand_as(src), src, "amax")


def _absorb_max(best: torch.Tensor, token: torch.Tensor, m: torch.Tensor, t: torch.Tensor):
    """Elementwise merge of (max, token) pairs: the larger value wins, a tie goes to the smaller token.

    CPU tensors in and out; the arithmetic is numpy (a dozen small ops, each ~5 us as torch ops).
    """
    b, tk, mn, tn = best.numpy(), token.numpy(), m.numpy(), t.numpy()
    take = (mn > b) | ((mn == b) & (mn >= 0) & (tn != NO_TOKEN) & ((tk == NO_TOKEN) | (tn < tk)))
    return torch.from_numpy(np.where(take, mn, b)), torch.from_numpy(np.where(take, tn, tk))


def _peaks(absmax: torch.Tensor, token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row's peak of per-channel ``absmax`` / ``token`` [R, C]: the largest value; among equal values the
    smallest token, then the smallest channel. Returns (value, token, channel), [R] each."""
    channels = absmax.shape[1]
    top = absmax.max(1).values
    key = torch.where(absmax == top[:, None], token * channels + torch.arange(channels), _BIG).amin(1)
    return top, key // channels, key % channels


def _peak_result(peak: float, token: int, channel: int, rows: int, nan_count: int, inf_count: int) -> dict:
    """:meth:`AbsMax.result` of a peak (``peak < 0``: nothing seen)."""
    seen = peak >= 0
    return {"max_abs": peak if seen else math.nan, "channel": channel if seen else -1,
            "token": token if seen else NO_TOKEN, "rows": rows, "nan_count": nan_count, "inf_count": inf_count}


@dataclass
class AbsMax(Reducer):
    """Per-channel max |x| with the token where it occurred; ``result()`` adds the overall peak."""

    kind: ClassVar[str] = "absmax"
    token_fields: ClassVar[tuple[str, ...]] = ("token",)
    absmax: torch.Tensor | None = None  # [C] float64; -1 where nothing (non-NaN) has been seen
    token: torch.Tensor | None = None  # [C] int64; NO_TOKEN where nothing has been seen
    nan_count: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.int64))
    inf_count: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.int64))
    rows: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.int64))

    def _init(self, channels: int):
        if self.absmax is None:
            self.absmax = torch.full((channels,), -1.0, dtype=torch.float64)
            self.token = torch.full((channels,), NO_TOKEN, dtype=torch.int64)
        elif self.absmax.numel() != channels:
            raise ValueError(f"AbsMax saw {channels} channels after {self.absmax.numel()}")

    def update(self, p: Payload) -> None:
        x, tok = p.values, p.tokens.to(torch.int64)
        self._init(x.shape[1])
        self.rows += x.shape[0]
        if x.shape[0] == 0:
            return
        if _use_kernels(x) and p.increasing():
            self._update_kernel(x.detach(), tok)
            return
        a = p.abs()  # comparisons in the input's own dtype are exact; only [C] results go to float64
        m = a.amax(dim=0)  # [C]; NaN and inf propagate into m (and into its sum)
        if not math.isfinite(float(m.sum())) and not bool(torch.isfinite(m).all()):
            nan = torch.isnan(a)  # rare: count them, let NaN lose
            self.nan_count += nan.sum().cpu()
            self.inf_count += torch.isinf(a).sum().cpu()
            a = a.masked_fill(nan, -1.0)
            m = a.amax(dim=0)
        # Only channels whose batch max reaches the running max can change (ties included: the token
        # decides); after the first batches these are few, so the argmax runs on those columns only.
        # The [C]-sized selection is numpy (a torch op costs ~5 us each).
        md = m.to(torch.float64).cpu()
        cols = torch.from_numpy(np.flatnonzero(md.numpy() >= self.absmax.numpy()))
        if cols.numel() == 0:
            return
        ct = cols.to(a.device)
        sub = a.index_select(1, ct)
        # Ties go to the smallest token index, whatever the batching. Capture emits rows in increasing
        # token order, where the first maximal row is that token; otherwise resolve ties explicitly.
        if p.increasing():
            cand = tok[sub.argmax(dim=0)]
        else:
            cand = torch.where(sub == m[ct], tok[:, None], _BIG).min(dim=0).values
        self.absmax[cols], self.token[cols] = _absorb_max(self.absmax[cols], self.token[cols], md[cols], cand.cpu())

    def _update_kernel(self, x: torch.Tensor, tok: torch.Tensor) -> None:
        """The Triton ``channel_stats`` kernel (GPU, or the interpreter when asked): one read of x.

        Its argmax is the smallest row among ties, which is the smallest token when rows come in
        increasing token order (checked by the caller), so results equal the torch path.
        """
        from workbench.kernels import channel_stats

        st = channel_stats(x.contiguous())
        self.nan_count += st.nan.sum().cpu()
        self.inf_count += (x.numel() - st.count.sum() - st.nan.sum()).cpu()
        seen = st.argmax >= 0
        m = torch.where(seen, st.absmax.to(torch.float64), -1.0)
        t = torch.where(seen, tok[st.argmax.clamp(min=0)], NO_TOKEN)
        self._absorb(m.cpu(), t.cpu())

    def _absorb(self, m: torch.Tensor, t: torch.Tensor) -> None:
        self.absmax, self.token = _absorb_max(self.absmax, self.token, m, t)

    def merge(self, other: "AbsMax") -> "AbsMax":
        self._check_same(other)
        if other.absmax is not None:
            self._init(other.absmax.numel())
            self._absorb(other.absmax, other.token)
        self.nan_count += other.nan_count
        self.inf_count += other.inf_count
        self.rows += other.rows
        return self

    def result(self) -> dict:
        peak, token, channel = (-1.0, NO_TOKEN, -1) if self.absmax is None else \
            (x.item() for x in _peaks(self.absmax[None], self.token[None]))
        return _peak_result(peak, token, channel, int(self.rows), int(self.nan_count), int(self.inf_count))


@dataclass
class Moments(Reducer):
    """Per-channel count, mean and M2 (sum of squared deviations), float64, non-finite skipped."""

    kind: ClassVar[str] = "moments"
    count: torch.Tensor | None = None  # [C] int64
    mean: torch.Tensor | None = None  # [C] float64
    m2: torch.Tensor | None = None  # [C] float64
    nan_count: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.int64))
    inf_count: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.int64))

    def _init(self, channels: int):
        if self.count is None:
            self.count = torch.zeros(channels, dtype=torch.int64)
            self.mean = torch.zeros(channels, dtype=torch.float64)
            self.m2 = torch.zeros(channels, dtype=torch.float64)
        elif self.count.numel() != channels:
            raise ValueError(f"Moments saw {channels} channels after {self.count.numel()}")

    def update(self, p: Payload) -> None:
        x = p.values.detach().to(torch.float64)
        self._init(x.shape[1])
        if x.shape[0] == 0:
            return
        finite = torch.isfinite(x)
        self.nan_count += torch.isnan(x).sum().cpu()
        self.inf_count += torch.isinf(x).sum().cpu()
        n = finite.sum(dim=0)
        xz = torch.where(finite, x, 0.0)
        s = xz.sum(dim=0)
        mean = torch.where(n > 0, s / n.clamp(min=1), 0.0)
        dev = torch.where(finite, x - mean, 0.0)
        m2 = (dev * dev).sum(dim=0)
        self._combine(n.cpu(), mean.cpu(), m2.cpu())

    def _combine(self, n: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor) -> None:
        tot = self.count + n
        safe = tot.clamp(min=1).to(torch.float64)
        delta = mean - self.mean
        self.mean = torch.where(tot > 0, self.mean + delta * (n / safe), 0.0)
        self.m2 = self.m2 + m2 + delta * delta * (self.count.to(torch.float64) * n / safe)
        self.count = tot

    def merge(self, other: "Moments") -> "Moments":
        self._check_same(other)
        if other.count is not None:
            self._init(other.count.numel())
            self._combine(other.count, other.mean, other.m2)
        self.nan_count += other.nan_count
        self.inf_count += other.inf_count
        return self

    @property
    def var(self) -> torch.Tensor:
        """Population variance per channel (NaN where a channel has no finite value)."""
        return torch.where(self.count > 0, self.m2 / self.count.clamp(min=1), math.nan)

    def result(self) -> dict:
        """Over the channels that saw a finite value; NaN where none did (an expert no token reached: its zeros
        read as measured ones)."""
        seen = self.count > 0 if self.count is not None else None
        if seen is None or not bool(seen.any()):
            return {"count": 0, "mean_abs_mean": math.nan, "max_std": math.nan, "nan_count": int(self.nan_count),
                    "inf_count": int(self.inf_count)}
        return {
            "count": int(self.count.max()),
            "mean_abs_mean": float(self.mean[seen].abs().mean()),
            "max_std": float(self.var[seen].sqrt().max()),
            "nan_count": int(self.nan_count),
            "inf_count": int(self.inf_count),
        }


@dataclass
class LogHistogram(Reducer):
    """Histogram of log10|x| on fixed edges, so histograms from anywhere merge exactly.

    Bins: ``zeros`` (x == 0), ``under`` (|x| < 10**lo), ``bins`` equal-width bins over
    [lo, hi), ``over`` (|x| >= 10**hi, inf included), ``nan_count``.
    """

    kind: ClassVar[str] = "log_histogram"
    settings: ClassVar[tuple[str, ...]] = ("lo", "hi", "num_bins")
    lo: float = -6.0
    hi: float = 6.0
    num_bins: int = 96
    counts: torch.Tensor | None = None  # [num_bins] int64
    zeros: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.int64))
    under: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.int64))
    over: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.int64))
    nan_count: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.int64))

    def __post_init__(self):
        if not self.hi > self.lo or self.num_bins < 1:
            raise ValueError("LogHistogram needs hi > lo and num_bins >= 1")
        if self.counts is None:
            self.counts = torch.zeros(self.num_bins, dtype=torch.int64)

    @property
    def edges(self) -> torch.Tensor:
        return torch.linspace(self.lo, self.hi, self.num_bins + 1, dtype=torch.float64)

    def update(self, p: Payload) -> None:
        # One pass of arithmetic and one bincount: codes 0 = NaN, 1 = zero, 2 = under, 3.. = bins, last = over.
        lg = torch.log10(p.values.detach().abs().flatten().to(torch.float64))
        pos = (lg - self.lo) * (self.num_bins / (self.hi - self.lo))
        codes = pos.floor().clamp(-1.0, float(self.num_bins)).nan_to_num(nan=-3.0).to(torch.int64) + 3
        codes = torch.where(lg == -math.inf, 1, codes)  # log10(0) = -inf: exact zeros (finite tiny values are "under")
        n = torch.bincount(codes, minlength=self.num_bins + 4).cpu()
        self.nan_count += n[0]
        self.zeros += n[1]
        self.under += n[2]
        self.counts += n[3:3 + self.num_bins]
        self.over += n[3 + self.num_bins]

    def merge(self, other: "LogHistogram") -> "LogHistogram":
        self._check_same(other)
        if (other.lo, other.hi, other.num_bins) != (self.lo, self.hi, self.num_bins):
            raise ValueError("cannot merge histograms with different edges")
        self.counts += other.counts
        for name in ("zeros", "under", "over", "nan_count"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        return self

    def result(self) -> dict:
        return {
            "lo": self.lo, "hi": self.hi, "counts": self.counts.tolist(), "zeros": int(self.zeros),
            "under": int(self.under), "over": int(self.over), "nan_count": int(self.nan_count),
        }


@dataclass
class Log2Histogram(Reducer):
    """Histogram of |x| on the top 16 bits of its float32 pattern: 128 bins per octave, no log taken.

    For a non-negative float32 the bit pattern orders like the value, so ``bits >> 16`` (the
    exponent and 7 mantissa bits, i.e. the bfloat16 value) is a log2-spaced bin code: bin width is
    a factor of 2**(1/128) (0.54 %), over the whole float32 range. Updating is one shift and one
    bincount; histograms merge exactly. Values are binned as float32 (float64 input is rounded to
    float32 first, so |x| beyond 3.4e38 counts as inf). ``counts[0]`` holds zeros (and denormals below 9.2e-41);
    ``inf`` is counted in ``inf_count``, NaN in ``nan_count``; neither is in ``counts``. On the CPU one compiled
    loop does it (:func:`workbench.kernels.cpu.log2_codes`).
    """

    kind: ClassVar[str] = "log2_histogram"
    CODES: ClassVar[int] = 1 << 15  # codes 0 .. 0x7fff (sign bit cleared by abs)
    INF: ClassVar[int] = 0x7F80  # code of +inf; codes above are NaN (a NaN with only low mantissa bits shares it)
    counts: torch.Tensor = field(default_factory=lambda: torch.zeros(0x7F80, dtype=torch.int64))
    inf_count: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.int64))
    nan_count: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.int64))

    def update(self, p: Payload) -> None:
        if p.values.numel() == 0:
            return
        if cpu.enabled(p.values):  # one compiled pass over the payload's float32 bits
            special = np.zeros(2, dtype=np.int64)
            bits = cpu.as_array(p.values, float32=True).reshape(-1).view(np.int32)
            cpu.log2_codes(bits, self.counts.numpy(), special)
            self.inf_count += int(special[0])
            self.nan_count += int(special[1])
            return
        a = p.abs()
        if a.dtype == torch.bfloat16:
            codes = a.flatten().view(torch.int16)  # a bfloat16 is the top half of its float32
        else:
            a = a.to(torch.float32)  # float64 beyond float32's range rounds to inf here, and is counted as inf
            codes = torch.bitwise_right_shift(a.flatten().view(torch.int32), 16)
        n = torch.bincount(codes, minlength=self.CODES).cpu()
        self.counts += n[: self.INF]
        special = int(n[self.INF:].sum())
        if special:  # inf and NaN share code 0x7f80 for NaNs with only low mantissa bits: count exactly
            inf = int(torch.isinf(a).sum())
            self.inf_count += inf
            self.nan_count += special - inf

    def merge(self, other: "Log2Histogram") -> "Log2Histogram":
        self._check_same(other)
        self.counts += other.counts
        self.inf_count += other.inf_count
        self.nan_count += other.nan_count
        return self

    @staticmethod
    def edges(code: int) -> tuple[float, float]:
        """The [low, high) range of |x| in bin ``code``."""
        as_float = lambda c: float(torch.tensor([c << 16], dtype=torch.int32).view(torch.float32))  # noqa: E731
        return as_float(code), as_float(code + 1)

    def quantile(self, q: float) -> float:
        """The q-quantile of |x| (inf included, NaN not): the geometric centre of its bin (0 for the zero bin)."""
        total = int(self.counts.sum() + self.inf_count)
        if total == 0:
            return math.nan
        rank = max(1, math.ceil(q * total))
        cum = torch.cumsum(self.counts, 0)
        if rank > int(cum[-1]):
            return math.inf
        code = int(torch.searchsorted(cum, torch.tensor(rank, dtype=cum.dtype)))
        if code == 0:
            return 0.0
        lo, hi = self.edges(code)
        return math.sqrt(lo * hi)

    def median(self) -> float:
        return self.quantile(0.5)

    def result(self) -> dict:
        nz = torch.nonzero(self.counts).flatten()
        return {"codes": nz.tolist(), "counts": self.counts[nz].tolist(), "inf_count": int(self.inf_count),
                "nan_count": int(self.nan_count), "median": self.median()}


@dataclass
class ExpertAbsMax(Reducer):
    """:class:`AbsMax` for every routed expert of a layer at once, from a grouped ``experts`` site.

    Rows carry their expert (``Payload.experts``); the state is ``[E, C]``, and :meth:`expert`
    returns one expert's :class:`AbsMax` (equal to reducing that expert's rows alone, ties to the
    smallest token, in any row order). On CUDA the ``grouped_absmax`` Triton kernel does the
    reduction when rows come in increasing token order within each expert (as the capture emits them).

    ``channel_tokens=False`` keeps every (expert, channel) maximum but the token of each expert's peak
    only: its largest value, the smallest token reaching it, then the smallest channel, which is what
    :meth:`results` reports either way (the profile needs no more). The token search then runs only
    on the experts whose peak can change, not on every (expert, channel) whose maximum can; :meth:`expert`
    is not available. On the CPU that mode is one compiled loop over the rows
    (:func:`workbench.kernels.cpu.expert_peaks`).
    """

    kind: ClassVar[str] = "expert_absmax"
    # Per-channel tokens: when the (expert, channel) pairs whose maximum can change have at most this share of the
    # payload's entries in their experts' rows, those rows are searched pair by pair (a gather); above it, every
    # entry at once. The share falls as the running maxima grow: on 1024-wide payloads (64 experts) 1.0, 0.6, 0.45
    # ... 0.11 over a layer's first 9 batches. Replaying them 24 times (noised) gave 2.4 ms per update at 0.1,
    # 2.9 at 0.05, 2.6 at 0.2, 4.1 never pair by pair (replayed payloads; the share changes only the speed).
    sparse_share: ClassVar[float] = 0.1
    token_fields: ClassVar[tuple[str, ...]] = ("token", "peak_token")
    settings: ClassVar[tuple[str, ...]] = ("num_experts", "channel_tokens")
    num_experts: int = 0
    channel_tokens: bool = True
    absmax: torch.Tensor | None = None  # [E, C] float64, -1 where nothing seen
    token: torch.Tensor | None = None  # [E, C] int64 (channel_tokens)
    peak_token: torch.Tensor | None = None  # [E] int64, NO_TOKEN before any value (not channel_tokens)
    peak_channel: torch.Tensor | None = None  # [E] int64, -1 before any value (not channel_tokens)
    nan_count: torch.Tensor | None = None  # [E]
    inf_count: torch.Tensor | None = None  # [E]
    rows: torch.Tensor | None = None  # [E]

    def __post_init__(self):
        e = self.num_experts
        if self.rows is None:
            self.nan_count = torch.zeros(e, dtype=torch.int64)
            self.inf_count = torch.zeros(e, dtype=torch.int64)
            self.rows = torch.zeros(e, dtype=torch.int64)
        if not self.channel_tokens and self.peak_token is None:
            self.peak_token = torch.full((e,), NO_TOKEN, dtype=torch.int64)
            self.peak_channel = torch.full((e,), -1, dtype=torch.int64)

    def _init(self, channels: int) -> None:
        if self.absmax is None:
            self.absmax = torch.full((self.num_experts, channels), -1.0, dtype=torch.float64)
            if self.channel_tokens:
                self.token = torch.full((self.num_experts, channels), NO_TOKEN, dtype=torch.int64)
        elif self.absmax.shape[1] != channels:
            raise ValueError(f"ExpertAbsMax saw {channels} channels after {self.absmax.shape[1]}")

    def update(self, p: Payload) -> None:
        if p.experts is None:
            raise ValueError("ExpertAbsMax needs a grouped experts site (payload without expert ids)")
        x, ids, tok = p.values.detach(), p.experts.to(torch.int64), p.tokens.to(torch.int64)
        self._init(x.shape[1])
        if x.shape[0] == 0:
            return
        if ids.min() < 0 or ids.max() >= self.num_experts:
            raise ValueError(f"expert index out of range 0..{self.num_experts - 1}: {int(ids.max())}")
        e = self.num_experts
        if not self.channel_tokens and cpu.enabled(x):  # one compiled pass: maxima, counts and peaks together
            if not self.absmax.is_contiguous():
                self.absmax = self.absmax.contiguous()
            values = cpu.as_array(x)
            state = [self.absmax, self.peak_token, self.peak_channel, self.nan_count, self.inf_count, self.rows]
            absmax, peak_token, peak_channel, nan_count, inf_count, rows = (t.numpy() for t in state)
            cpu.expert_peaks(values, np.ascontiguousarray(ids.numpy()), np.ascontiguousarray(tok.numpy()), absmax,
                             absmax.max(1), peak_token, peak_channel, nan_count, inf_count, rows)
            return
        counts = torch.bincount(ids, minlength=e)  # rows per expert, on the rows' device
        counts_cpu = counts.cpu()
        self.rows += counts_cpu
        a = raw = p.abs()
        if not bool(torch.isfinite(a.amax(dim=0)).all()):  # rare: per-expert NaN / inf counts, and NaN never wins
            nan = torch.isnan(a)
            self.nan_count += torch.bincount(ids, weights=nan.sum(1), minlength=e).to(torch.int64).cpu()
            self.inf_count += torch.bincount(ids, weights=torch.isinf(a).sum(1), minlength=e).to(torch.int64).cpu()
            a = a.masked_fill(nan, -1.0)
        if _use_kernels(x):
            from workbench.kernels.grouped_absmax import grouped_absmax

            # the kernel takes |x| itself and skips NaN: given the -1 fill, a NaN would be a value of 1
            g = grouped_absmax(raw, ids, e)  # ties -> the smallest row: the smallest token when rows are in order
            m = torch.where(g.argmax >= 0, g.absmax.to(a.dtype), -1.0)  # the maxima, in any row order
            in_order = tok.numel() < 2 or bool(((tok[1:] > tok[:-1]) | (ids[1:] != ids[:-1])).all())
            if in_order and self.channel_tokens:
                t = torch.where(g.argmax >= 0, tok[g.argmax.clamp(min=0)], NO_TOKEN)
                self.absmax, self.token = _absorb_max(self.absmax, self.token, m.to(torch.float64).cpu(), t.cpu())
                return
        else:  # per (expert, channel), in the input's own dtype
            m = _rows_max(a.new_full((e, a.shape[1]), -1.0), ids, a)
        if not self.channel_tokens:
            self._update_peaks(a, ids, tok, m)
            return
        # Per (expert, channel): the max, then the smallest token reaching it. Only pairs whose max reaches the
        # running max can change (ties included: the token decides).
        md = m.to(torch.float64).cpu()
        reach = (md >= self.absmax) & (md >= 0)
        if not bool(reach.any()):
            return
        pe, pc = torch.nonzero(reach, as_tuple=True)
        lengths = counts_cpu[pe]  # rows searched per reaching pair
        if int(lengths.sum()) <= self.sparse_share * a.numel():
            t = torch.full((e, a.shape[1]), NO_TOKEN, dtype=torch.int64)
            t[pe, pc] = self._pair_tokens(a, ids, tok, m, counts, pe.to(a.device), pc.to(a.device),
                                          lengths.to(a.device)).cpu()
        else:
            t = self._dense_tokens(p.scratch, a, ids, tok, m)
        self.absmax, self.token = _absorb_max(self.absmax, self.token, torch.where(reach, md, -1.0),
                                              torch.where(reach, t, NO_TOKEN))

    @staticmethod
    def _dense_tokens(s: Scratch | None, a: torch.Tensor, ids: torch.Tensor, tok: torch.Tensor,
                      m: torch.Tensor) -> torch.Tensor:
        """Every (expert, channel)'s smallest token among the rows equal to its max ``m`` ([E, C] CPU int64,
        NO_TOKEN where the expert has no rows), by one scatter-min over all rows: each entry is its token's rank
        (from the payload's smallest token) where it equals its pair's max, else inf. Ranks are floats, exact below
        2^24 in float32 and 2^53 in float64; a float scatter-min is many times faster on CPU than an int64 one or
        than listing the equal entries (nonzero) first."""
        lo = tok.min()
        rank_type = torch.float32 if int(tok.max() - lo) < 1 << 24 else torch.float64
        rank = (tok - lo).to(rank_type)
        shape = a.shape
        equal = torch.eq(a, torch.index_select(m, 0, ids, out=scratch(s, "gathered", shape, m.dtype, a.device)),
                         out=scratch(s, "equal", shape, torch.bool, a.device))
        ranked = torch.where(equal, rank[:, None], torch.tensor(math.inf, dtype=rank_type, device=a.device),
                             out=scratch(s, "ranked", shape, rank_type, a.device))
        first = torch.full((m.shape[0], shape[1]), math.inf, dtype=rank_type, device=a.device)
        first = first.scatter_reduce_(0, ids[:, None].expand(shape), ranked, "amin")
        return torch.where(torch.isinf(first), NO_TOKEN, first.to(torch.int64) + lo).cpu()

    @staticmethod
    def _pair_tokens(a: torch.Tensor, ids: torch.Tensor, tok: torch.Tensor, m: torch.Tensor, counts: torch.Tensor,
                     pe: torch.Tensor, pc: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The smallest token among the rows equal to its max, for the (expert ``pe``, channel ``pc``) pairs only
        ([P], each pair has rows): each pair's entries are gathered from its expert's rows (``lengths`` of them)."""
        order = torch.argsort(ids, stable=True)  # rows by expert
        first_row = torch.cumsum(counts, 0) - counts  # each expert's first place in ``order``
        pair = torch.repeat_interleave(torch.arange(pe.numel(), device=a.device), lengths)  # each searched entry's
        within = torch.arange(pair.numel(), device=a.device) - (torch.cumsum(lengths, 0) - lengths)[pair]
        rows = order[first_row[pe][pair] + within]
        hit = torch.nonzero(a[rows, pc[pair]] == m[pe, pc][pair]).flatten()
        t = torch.full((pe.numel(),), _BIG, dtype=torch.int64, device=a.device)
        return t.scatter_reduce_(0, pair[hit], tok[rows[hit]], "amin")

    def _update_peaks(self, a: torch.Tensor, ids: torch.Tensor, tok: torch.Tensor, m: torch.Tensor) -> None:
        """``channel_tokens=False``: every (expert, channel) maximum, and the (token, channel) of each expert whose
        payload peak (``m``'s row max) reaches its running peak, searched on those experts' rows only."""
        peak = m.amax(1)  # [E], in the rows' own dtype: the entries equal to it are exactly the peak's
        md, pd = m.to(torch.float64).cpu(), peak.to(torch.float64).cpu()
        running = self.absmax.max(1).values
        reach = (pd >= running) & (pd >= 0)
        if bool(reach.any()):
            # The rows holding their expert's peak (a row max, one pass), then the peak's channels in those few
            row_peak = peak.index_select(0, ids)
            rows = torch.nonzero(reach.to(a.device)[ids] & (a.amax(1) == row_peak)).flatten()
            sub, sub_ids, sub_tok = a.index_select(0, rows), ids[rows], tok[rows]
            r, c = torch.nonzero(sub == row_peak[rows, None], as_tuple=True)
            channels = a.shape[1]
            key = torch.full((self.num_experts,), _BIG, dtype=torch.int64, device=a.device)
            key = key.scatter_reduce_(0, sub_ids[r], sub_tok[r] * channels + c, "amin").cpu()  # (token, channel)
            self._absorb_peaks(running, torch.where(reach, pd, -1.0), key // channels, key % channels)
        self.absmax = torch.maximum(self.absmax, md)

    def _absorb_peaks(self, peak: torch.Tensor, value: torch.Tensor, token: torch.Tensor,
                      channel: torch.Tensor) -> None:
        """Each expert's (token, channel) where its ``value`` beats the running ``peak`` (``self.absmax``'s row max
        before it takes the values in), or equals it with a smaller (token, channel)."""
        channels = self.absmax.shape[1]
        mine = torch.where(self.peak_token == NO_TOKEN, _BIG, self.peak_token * channels + self.peak_channel)
        theirs = torch.where(token == NO_TOKEN, _BIG, token * channels + channel)
        take = (value >= 0) & ((value > peak) | ((value == peak) & (theirs < mine)))
        self.peak_token = torch.where(take, token, self.peak_token)
        self.peak_channel = torch.where(take, channel, self.peak_channel)

    def expert(self, e: int) -> AbsMax:
        """Expert ``e``'s state as an :class:`AbsMax` (a copy)."""
        if not self.channel_tokens:
            raise ValueError("this ExpertAbsMax keeps the token of each expert's peak only (channel_tokens=False): "
                             "use results()")
        a = AbsMax(nan_count=self.nan_count[e].clone(), inf_count=self.inf_count[e].clone(), rows=self.rows[e].clone())
        if self.absmax is not None:
            a.absmax, a.token = self.absmax[e].clone(), self.token[e].clone()
        return a

    def merge(self, other: "ExpertAbsMax") -> "ExpertAbsMax":
        self._check_same(other)
        if other.num_experts != self.num_experts:
            raise ValueError(f"cannot merge ExpertAbsMax over {other.num_experts} experts into {self.num_experts}")
        if other.channel_tokens != self.channel_tokens:
            raise ValueError("cannot merge ExpertAbsMax states with and without per-channel tokens")
        if other.absmax is not None:
            self._init(other.absmax.shape[1])
            if self.channel_tokens:
                self.absmax, self.token = _absorb_max(self.absmax, self.token, other.absmax, other.token)
            else:
                self._absorb_peaks(self.absmax.max(1).values, other.absmax.max(1).values, other.peak_token,
                                   other.peak_channel)
                self.absmax = torch.maximum(self.absmax, other.absmax)
        self.nan_count += other.nan_count
        self.inf_count += other.inf_count
        self.rows += other.rows
        return self

    def results(self) -> list[dict]:
        """Each expert's :meth:`AbsMax.result` (its peak, rows and NaN / inf counts), for all experts at once."""
        e = self.num_experts
        if self.absmax is None:
            peak, token, channel = [-1.0] * e, [NO_TOKEN] * e, [-1] * e
        elif self.channel_tokens:
            peak, token, channel = (x.tolist() for x in _peaks(self.absmax, self.token))
        else:
            peak, token, channel = self.absmax.max(1).values.tolist(), self.peak_token.tolist(), \
                self.peak_channel.tolist()
        return [_peak_result(*row) for row in zip(peak, token, channel, self.rows.tolist(), self.nan_count.tolist(),
                                                   self.inf_count.tolist())]

    def result(self) -> dict:
        return {"experts": self.results()}


@dataclass
class ExpertCounts(Reducer):
    """Token-slot assignments per expert, from a router site's chosen top-k indices."""

    kind: ClassVar[str] = "expert_counts"
    settings: ClassVar[tuple[str, ...]] = ("num_experts",)
    num_experts: int = 0
    counts: torch.Tensor | None = None  # [E] int64
    tokens: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.int64))
    # rows with NaN or +inf router logits (counted above as routed: the model did route them)
    nonfinite: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.int64))

    def __post_init__(self):
        if self.counts is None:
            self.counts = torch.zeros(self.num_experts, dtype=torch.int64)

    def update(self, p: Payload) -> None:
        if p.topk is None:
            raise ValueError("ExpertCounts needs a router site (payload without top-k indices)")
        ids = p.topk.flatten().cpu().to(torch.int64)
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.num_experts):
            raise ValueError(f"expert index out of range 0..{self.num_experts - 1}: {int(ids.max())}")
        self.tokens += p.topk.shape[0]
        self.counts += torch.bincount(ids, minlength=self.num_experts)
        bad = broken_rows(p.values) if p.values.is_floating_point() else None
        if bad is not None:
            self.nonfinite += int(bad.sum())

    def merge(self, other: "ExpertCounts") -> "ExpertCounts":
        self._check_same(other)
        if other.num_experts != self.num_experts:
            raise ValueError(f"cannot merge ExpertCounts over {other.num_experts} experts into {self.num_experts}")
        self.counts += other.counts
        self.tokens += other.tokens
        self.nonfinite += other.nonfinite
        return self

    def result(self) -> dict:
        total = int(self.counts.sum())
        return {
            "counts": self.counts.tolist(),
            "tokens": int(self.tokens),
            "nonfinite_tokens": int(self.nonfinite),
            "load": [c / total if total else 0.0 for c in self.counts.tolist()],
            "utilization": jain(self.counts),
        }


@dataclass
class TopK(Reducer):
    """The ``k`` largest |x| over all rows and channels, with their token and channel.

    Order is total and batching-independent: larger value first, then smaller token, then smaller
    channel, so merging is exact. NaN is skipped (counted); inf is a value. Once ``k`` entries are kept, a CPU
    payload's candidates (the entries at or above the k-th) come from one compiled scan
    (:func:`workbench.kernels.cpu.at_least`).
    """

    kind: ClassVar[str] = "topk"
    token_fields: ClassVar[tuple[str, ...]] = ("tokens",)
    settings: ClassVar[tuple[str, ...]] = ("k",)
    k: int = 16
    values: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    tokens: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))
    channels: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))
    nan_count: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.int64))

    def __post_init__(self):
        if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k < 1:
            raise ValueError(f"TopK keeps k >= 1 entries, got k={self.k!r}")

    def update(self, p: Payload) -> None:
        x = p.values.detach()
        if x.shape[0] == 0 or x.shape[1] == 0:
            return
        c = x.shape[1]
        if self.values.numel() >= self.k:
            # Full: only entries >= the smallest kept value can enter (ties kept for the exact order), and
            # only in channels whose column max reaches it (usually a handful: the massive ones). NaN
            # propagates into the column max; it compares false and is counted when the batch has any.
            thr = float(self.values[-1])
            if cpu.enabled(x):  # one compiled pass finds them (and counts NaN)
                values = cpu.as_array(x)
                r, j, nan = cpu.at_least(values, thr)
                self.nan_count += nan
                if r.size:
                    self._absorb(torch.from_numpy(np.abs(values[r, j]).astype(np.float64)),
                                 p.tokens.cpu().to(torch.int64)[torch.from_numpy(r)], torch.from_numpy(j))
                return
            a = p.abs()
            colmax = a.amax(dim=0)
            nan_cols = torch.isnan(colmax)
            if bool(nan_cols.any()):
                self.nan_count += torch.isnan(a).sum().cpu()
            cols = torch.nonzero((colmax >= thr) | nan_cols).flatten()
            if cols.numel() == 0:
                return
            sub = a.index_select(1, cols)
            r, j = torch.nonzero(sub >= thr, as_tuple=True)
            self._absorb(sub[r, j].to(torch.float64).cpu(), p.tokens[r].to(torch.int64).cpu(), cols[j].cpu())
            return
        flat = p.abs().flatten()
        nan = torch.isnan(flat)
        self.nan_count += nan.sum().cpu()
        flat = flat.masked_fill(nan, -1.0)
        # Candidates: everything >= the k-th largest value (ties at the boundary kept for the exact order).
        kk = min(self.k, flat.numel())
        kth = torch.topk(flat, kk).values[-1]
        idx = torch.nonzero((flat >= kth) & (flat >= 0)).flatten()
        self._absorb(flat[idx].to(torch.float64).cpu(), p.tokens[idx // c].to(torch.int64).cpu(), (idx % c).cpu())

    def _absorb(self, v: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> None:
        v = np.concatenate([self.values.numpy(), v.numpy()])
        t = np.concatenate([self.tokens.numpy(), t.numpy()])
        c = np.concatenate([self.channels.numpy(), c.numpy()])
        # A total order: value descending, then token, then channel (numpy: few [k]-sized ops, no torch dispatch).
        order = np.lexsort((c, t, -v))[: self.k]
        self.values, self.tokens, self.channels = (torch.from_numpy(v[order]), torch.from_numpy(t[order]),
                                                   torch.from_numpy(c[order]))

    def merge(self, other: "TopK") -> "TopK":
        self._check_same(other)
        if other.k != self.k:
            raise ValueError("cannot merge TopK reducers with different k")
        self._absorb(other.values, other.tokens, other.channels)
        self.nan_count += other.nan_count
        return self

    def result(self) -> dict:
        return {"values": self.values.tolist(), "tokens": self.tokens.tolist(), "channels": self.channels.tolist(),
                "nan_count": int(self.nan_count)}


def routing_distribution(logits: torch.Tensor, scoring: str) -> torch.Tensor:
    """Each token's routing distribution over experts ``[N, E]`` from its router logits: ``softmax``, or for
    ``sigmoid`` routers (DeepSeek-V3, GLM-4.5) the sigmoid scores normalised to sum to 1."""
    if scoring == "softmax" and logits.shape[-1] <= 64:
        # by hand: torch's float64 softmax over a short last dim is 1.2-4x slower on CPU (equal to ~3e-16)
        probs = (logits - logits.amax(-1, keepdim=True)).exp_()
        return probs.div_(probs.sum(-1, keepdim=True))
    if scoring == "softmax":
        return torch.softmax(logits, dim=-1)
    scores = torch.sigmoid(logits)
    return scores / scores.sum(-1, keepdim=True)


@dataclass
class RouterStats(Reducer):
    """Routing statistics from a router site's logits and chosen experts.

    Keeps, per expert, the summed routing probability, token-slot counts and the co-activation
    matrix (how often two experts are chosen for the same token); per token, the summed routing
    entropy and top-k margin (k-th largest probability minus the (k+1)-th). The routing distribution
    is the family's own scoring: ``softmax`` of the logits, or for ``sigmoid`` routers (DeepSeek-V3)
    the sigmoid scores normalised to sum to 1 over experts. On the CPU one compiled loop does it, in float64
    (:func:`workbench.kernels.cpu.router_rows`: counts equal, sums equal to the torch path's to 1e-12).
    """

    kind: ClassVar[str] = "router_stats"
    settings: ClassVar[tuple[str, ...]] = ("num_experts", "sigmoid")
    num_experts: int = 0
    scoring: str = "softmax"
    prob_sum: torch.Tensor | None = None  # [E] float64
    counts: torch.Tensor | None = None  # [E] int64
    coactivation: torch.Tensor | None = None  # [E, E] int64
    entropy_sum: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.float64))
    margin_sum: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.float64))
    tokens: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.int64))
    # rows with NaN or +inf logits (an overflow upstream, e.g. float16): left out of every statistic here
    nonfinite: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.int64))

    def __post_init__(self):
        if self.scoring not in ("softmax", "sigmoid"):
            raise ValueError(f"router scoring must be 'softmax' or 'sigmoid', not {self.scoring!r}")
        e = self.num_experts
        if self.prob_sum is None:
            self.prob_sum = torch.zeros(e, dtype=torch.float64)
            self.counts = torch.zeros(e, dtype=torch.int64)
            self.coactivation = torch.zeros(e, e, dtype=torch.int64)

    def update(self, p: Payload) -> None:
        if p.topk is None:
            raise ValueError("RouterStats needs a router site (payload without top-k indices)")
        n, e = p.values.shape
        if n == 0:
            return
        if cpu.enabled(p.values) and p.topk.device.type == "cpu":  # one compiled pass over the rows
            chosen = np.ascontiguousarray(p.topk.numpy(), dtype=np.int64)
            if chosen.size and (chosen.min() < 0 or chosen.max() >= e):
                raise ValueError(f"expert index out of range 0..{e - 1}: {int(chosen.max())}")
            values = cpu.as_array(p.values)
            sums = np.zeros(2)
            used, bad = cpu.router_rows(values, chosen, self.scoring == "sigmoid", self.prob_sum.numpy(),
                                        self.counts.numpy(), self.coactivation.numpy(), sums)
            self.entropy_sum += sums[0]
            if chosen.shape[1] < e:
                self.margin_sum += sums[1]
            self.tokens += used
            self.nonfinite += bad
            return
        logits = p.values.detach().to(torch.float64)
        chosen = p.topk.to(torch.int64)
        bad = broken_rows(logits)
        if bad is not None:  # NaN logits' probabilities would make every sum NaN, their top-k arbitrary
            self.nonfinite += int(bad.sum())
            logits, chosen = logits[~bad], chosen[~bad]
            n = logits.shape[0]
            if n == 0:
                return
        probs = routing_distribution(logits, self.scoring)
        self.prob_sum += probs.sum(0).cpu()
        self.entropy_sum += torch.special.entr(probs).sum().cpu()  # -p log p, 0 at p = 0
        k = chosen.shape[1]
        if k < e:
            top = torch.topk(probs, k + 1, dim=-1).values
            self.margin_sum += (top[:, k - 1] - top[:, k]).sum().cpu()
        self.counts += torch.bincount(chosen.flatten(), minlength=e).cpu()
        onehot = torch.zeros(n, e, dtype=torch.float32, device=chosen.device).scatter_(1, chosen, 1.0)
        self.coactivation += (onehot.T @ onehot).round().to(torch.int64).cpu()  # exact: counts < 2**24 per batch
        self.tokens += n

    @property
    def sigmoid(self) -> bool:
        """The scoring as a setting a state can hold (a 0-d tensor; strings cannot be)."""
        return self.scoring == "sigmoid"

    def merge(self, other: "RouterStats") -> "RouterStats":
        self._check_same(other)
        if other.num_experts != self.num_experts:
            raise ValueError(f"cannot merge RouterStats over {other.num_experts} experts into {self.num_experts}")
        for name in ("prob_sum", "counts", "coactivation", "entropy_sum", "margin_sum", "tokens", "nonfinite"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        return self

    def result(self) -> dict:
        n = max(int(self.tokens), 1)
        slots = max(int(self.counts.sum()), 1)
        mean_p = self.prob_sum / n
        ent = float(-(mean_p * mean_p.clamp_min(1e-300).log()).sum()) if int(self.tokens) else math.nan
        return {
            "tokens": int(self.tokens),
            "nonfinite_tokens": int(self.nonfinite),
            "scoring": self.scoring,
            "load": (self.counts.to(torch.float64) / slots).tolist(),
            "utilization": jain(self.counts),
            "counts": self.counts.tolist(),
            "mean_prob": mean_p.tolist(),
            "entropy_of_mean": ent,
            "max_entropy": math.log(self.num_experts) if self.num_experts else math.nan,
            "mean_token_entropy": float(self.entropy_sum) / n if int(self.tokens) else math.nan,
            "mean_topk_margin": float(self.margin_sum) / n if int(self.tokens) else math.nan,
            "coactivation": self.coactivation.tolist(),
        }
