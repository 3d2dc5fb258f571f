"""Massive activations (Sun et al.): residual-stream magnitudes ~1000x the median, few and fixed in place.

Per layer we keep the top-k |residual| entries (exact) and a log2 histogram of all |residual| values
on their float32 bit patterns (128 bins per octave), from which the median is estimated to within
0.3 % (the geometric centre of its bin). ``histogram_median`` reads the older log10 histogram.
"""

from __future__ import annotations

import math

import torch

from workbench.tracing.reducers import Log2Histogram, LogHistogram, TopK


def make_reducers(top: int) -> dict:
    return {"topk": TopK(k=top), "histogram": Log2Histogram()}


def histogram_median(h: LogHistogram) -> float:
    """Median of |x| estimated from a log histogram (geometric bin centre); 0 if half the values are 0."""
    total = int(h.zeros + h.under + h.over + h.counts.sum())
    if total == 0:
        return math.nan
    half = (total + 1) / 2
    seen = int(h.zeros)
    if seen >= half:
        return 0.0
    seen += int(h.under)
    if seen >= half:
        return 10.0 ** h.lo
    cum = torch.cumsum(h.counts, 0) + seen
    i = int(torch.searchsorted(cum, torch.tensor(half, dtype=cum.dtype)))
    if i >= h.num_bins:
        return 10.0 ** h.hi
    width = (h.hi - h.lo) / h.num_bins
    return 10.0 ** (h.lo + (i + 0.5) * width)
