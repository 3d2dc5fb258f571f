"""Compiled CPU loops (numba) for the reducers' hot paths, and the helper that compiles them.

On the CPU a reducer's update is dozens of torch ops, each paying its dispatch and a pass over the payload; on a
small model (hidden 64) that fixed cost, not the arithmetic, is the update. One loop over the rows does the same
work in a single pass. Each loop leaves the state its reducer's torch path leaves: exactly, or for RouterStats's
float64 sums to 1e-12 (tested on random payloads with NaN, inf and ties: tests/test_cpu_loops.py).
``WORKBENCH_KERNELS=torch`` runs the torch path instead (:func:`enabled`).

Loops are plain Python functions (plain Python runs them too, slowly) compiled by :func:`compiled` for the
signature they are called with, once per process, from numba's on-disk cache after the first time on a machine.
"""

from __future__ import annotations

import numpy as np

_COMPILED: dict = {}


def compiled(fn, signature: str):
    """``fn`` compiled by numba for one ``signature``, once per process: ~0.2-2 s the first time on a machine, then
    loaded from numba's on-disk cache (the first such load in a process ~0.4 s, most of it numba importing its numpy
    support). A loop taking float32 or float64 values is compiled for the one it is called with. Where numba finds
    no writable cache folder (it tries the package's, then the user's) it raises; the loop is then compiled without
    a cache."""
    kernel = _COMPILED.get((fn, signature))
    if kernel is None:
        import numba

        flags = dict(nogil=True, error_model="numpy")  # IEEE division: x / 0 is inf or NaN, as in torch, not an error
        try:
            kernel = numba.njit(signature, cache=True, **flags)(fn)
        except RuntimeError:
            kernel = numba.njit(signature, **flags)(fn)
        _COMPILED[(fn, signature)] = kernel
    return kernel


def enabled(x) -> bool:
    """Whether a reducer runs its compiled loop on tensor ``x``: a CPU tensor of floats, unless ``WORKBENCH_KERNELS``
    asks for the torch reference (``torch``; ``triton`` with the interpreter runs the Triton kernels on the CPU)."""
    if x.device.type != "cpu" or not x.is_floating_point():
        return False
    from workbench.kernels.dispatch import requested_backend

    return requested_backend() == "auto"


def as_array(x, float32: bool = False) -> np.ndarray:
    """A CPU tensor's values as a C-contiguous numpy array: float64 kept as it is (unless ``float32``), every other
    float dtype as float32 (bfloat16 and float16 convert exactly)."""
    import torch

    t = x.detach()
    if t.dtype != torch.float32 and (float32 or t.dtype != torch.float64):
        t = t.to(torch.float32)
    return np.ascontiguousarray(t.numpy())


# ----- ExpertAbsMax (each expert's peak token only) ------------------------------------------------------------
def _expert_peaks(x, ids, tok, absmax, peak, peak_token, peak_channel, nan_count, inf_count, rows):
    """Rows ``x [n, C]`` of experts ``ids`` at tokens ``tok`` into :class:`ExpertAbsMax` state, in place: per
    (expert, channel) the largest |x| (NaN never wins; inf is a value), per expert its rows, NaN and inf counts, and
    its peak (``peak``, the running row max of ``absmax``) with the smallest (token, channel) reaching it."""
    n, channels = x.shape
    for i in range(n):
        e = ids[i]
        rows[e] += 1
        best = absmax[e]
        row_max = -1.0
        odd = 0
        for c in range(channels):
            v = np.float64(abs(x[i, c]))
            best[c] = v if v > best[c] else best[c]  # a NaN compares false: it never wins
            row_max = v if v > row_max else row_max
            odd += (v != v) | (v == np.inf)
        if odd:
            for c in range(channels):
                v = abs(x[i, c])
                if v != v:
                    nan_count[e] += 1
                elif v == np.inf:
                    inf_count[e] += 1
        if row_max >= 0 and row_max >= peak[e]:
            t = tok[i]
            c = 0
            while np.float64(abs(x[i, c])) != row_max:  # the row's first channel holding its max
                c += 1
            was = peak_token[e]
            if row_max > peak[e] or was == -1 or t < was or (t == was and c < peak_channel[e]):
                peak[e] = row_max
                peak_token[e] = t
                peak_channel[e] = c


_PEAKS = {x: f"void({x}[:, ::1], int64[::1], int64[::1], float64[:, ::1], float64[::1], int64[::1], int64[::1], "
             "int64[::1], int64[::1], int64[::1])" for x in ("float32", "float64")}


def expert_peaks(x, ids, tok, absmax, peak, peak_token, peak_channel, nan_count, inf_count, rows) -> None:
    """:func:`_expert_peaks`, compiled. Expert indices must lie in 0..E-1 (the loop does not check)."""
    compiled(_expert_peaks, _PEAKS[x.dtype.name])(x, ids, tok, absmax, peak, peak_token, peak_channel, nan_count,
                                                  inf_count, rows)


# ----- Log2Histogram ---------------------------------------------------------------------------------------------
def _log2_codes(bits, counts, special):
    """Float32 bit patterns ``bits`` (int32) into ``counts`` by ``|x|``'s top 16 bits; ``special``: [inf, NaN]."""
    for i in range(bits.size):
        u = bits[i] & 0x7FFFFFFF  # |x|: the sign bit cleared
        if u < 0x7F800000:
            counts[u >> 16] += 1
        elif u == 0x7F800000:
            special[0] += 1
        else:
            special[1] += 1


_LOG2 = "void(int32[::1], int64[::1], int64[::1])"


def log2_codes(bits, counts, special) -> None:
    compiled(_log2_codes, _LOG2)(bits, counts, special)


# ----- TopK (once full: the entries at or above the k-th kept value) ------------------------------------------------
def _at_least(x, threshold, out_rows, out_cols):
    """How many entries of ``x`` have |x| >= ``threshold`` (NaN never does), their (row, column) written into
    ``out_rows`` / ``out_cols`` while there is room; and how many are NaN. Returns (found, nan)."""
    n, channels = x.shape
    found = 0
    nan = 0
    room = out_rows.size
    for i in range(n):
        for c in range(channels):
            v = np.float64(abs(x[i, c]))
            if v >= threshold:
                if found < room:
                    out_rows[found] = i
                    out_cols[found] = c
                found += 1
            elif v != v:
                nan += 1
    return found, nan


_AT_LEAST = {x: f"UniTuple(int64, 2)({x}[:, ::1], float64, int64[::1], int64[::1])" for x in ("float32", "float64")}


def at_least(x, threshold: float, room: int = 256) -> tuple[np.ndarray, np.ndarray, int]:
    """The (rows, columns) of the entries of ``x`` with |x| >= ``threshold``, in row-major order, and the NaN count."""
    kernel = compiled(_at_least, _AT_LEAST[x.dtype.name])
    rows, cols = np.empty(room, dtype=np.int64), np.empty(room, dtype=np.int64)
    found, nan = kernel(x, threshold, rows, cols)
    if found > room:  # more than there was room for: again, with room for all
        rows, cols = np.empty(found, dtype=np.int64), np.empty(found, dtype=np.int64)
        found, nan = kernel(x, threshold, rows, cols)
    return rows[:found], cols[:found], nan


# ----- RouterStats -------------------------------------------------------------------------------------------------
def _router_rows(logits, chosen, sigmoid, prob_sum, counts, coactivation, sums, seen):
    """Router rows into :class:`RouterStats` state, in place; returns (rows used, rows left out: NaN or +inf).

    Per row, in float64: the routing distribution p (softmax of the logits, or the sigmoid scores normalised),
    its entropy, the margin between its k-th and (k+1)-th largest values (k = ``chosen``'s width, when below E),
    the chosen experts' counts, and their co-activation (each distinct chosen pair once per row, itself included).
    ``sums``: [entropy, margin] totals. The softmax entropy needs one log per row: with w = exp(z - max z) and
    S = sum w, -sum p log p = log S + sum p (max z - z). ``seen`` [E]: scratch, -1 everywhere on the first call."""
    n, e = logits.shape
    k = chosen.shape[1]
    w = np.empty(e, dtype=np.float64)
    top = np.empty(k + 1, dtype=np.float64)
    distinct = np.empty(k, dtype=np.int64)
    used = 0
    bad = 0
    for i in range(n):
        m = -np.inf
        broken = False
        for j in range(e):
            v = np.float64(logits[i, j])
            if v != v or v == np.inf:
                broken = True
            m = v if v > m else m
        if broken:
            bad += 1
            continue
        used += 1
        total = 0.0
        entropy = 0.0
        if sigmoid:
            for j in range(e):
                s = 1.0 / (1.0 + np.exp(-np.float64(logits[i, j])))
                w[j] = s
                total += s
            for j in range(e):
                p = w[j] / total
                w[j] = p
                if p != 0:  # entr(0) = 0; a NaN (every score 0: 0 / 0) stays NaN, as in torch
                    entropy -= p * np.log(p)
        else:
            spread = 0.0
            for j in range(e):
                d = np.float64(logits[i, j]) - m
                x = np.exp(d)
                w[j] = x
                total += x
                if x > 0:
                    spread -= x * d
            for j in range(e):
                w[j] = w[j] / total
            entropy = np.log(total) + spread / total
        for j in range(e):
            prob_sum[j] += w[j]
        sums[0] += entropy
        if k < e:  # the k+1 largest, kept sorted (descending) by insertion
            filled = 0
            for j in range(e):
                p = w[j]
                if filled <= k:
                    filled += 1
                elif p <= top[k]:
                    continue
                slot = filled - 1
                while slot > 0 and top[slot - 1] < p:
                    top[slot] = top[slot - 1]
                    slot -= 1
                top[slot] = p
            sums[1] += top[k - 1] - top[k]
        count = 0
        for j in range(k):
            a = chosen[i, j]
            counts[a] += 1
            if seen[a] != i:
                seen[a] = i
                distinct[count] = a
                count += 1
        for a in range(count):
            for b in range(count):
                coactivation[distinct[a], distinct[b]] += 1
    return used, bad


_ROUTER = {x: f"UniTuple(int64, 2)({x}[:, ::1], int64[:, ::1], boolean, float64[::1], int64[::1], int64[:, ::1], "
              "float64[::1], int64[::1])" for x in ("float32", "float64")}


def router_rows(logits, chosen, sigmoid: bool, prob_sum, counts, coactivation, sums) -> tuple[int, int]:
    """:func:`_router_rows`, compiled. Expert indices must lie in 0..E-1 (the loop does not check)."""
    seen = np.full(logits.shape[1], -1, dtype=np.int64)
    return compiled(_router_rows, _ROUTER[logits.dtype.name])(logits, chosen, sigmoid, prob_sum, counts,
                                                                coactivation, sums, seen)


def load() -> None:
    """Compile, or load from numba's cache, every loop here for float32 values (what models run in; float64 ones
    are compiled when met) now: call it early to take that out of a timing."""
    compiled(_expert_peaks, _PEAKS["float32"])
    compiled(_log2_codes, _LOG2)
    compiled(_at_least, _AT_LEAST["float32"])
    compiled(_router_rows, _ROUTER["float32"])
