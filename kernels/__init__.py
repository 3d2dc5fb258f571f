"""Reductions over huge activation matrices: Triton kernels with plain-torch references.

One module per reduction (kernel, launcher and reference side by side); ``dispatch`` picks the
backend (``backend=`` argument, else ``WORKBENCH_KERNELS=triton|torch|auto``; auto = Triton on CUDA
tensors, the reference elsewhere). ``cpu`` holds compiled CPU loops (numba) for three reducers' hot paths,
used on CPU tensors under auto.

=================  ====================================================================
channel_stats      per channel: absmax, argmax row, sum, sumsq (fp32), finite and NaN counts
token_absmax       per row: absmax and its channel
grouped_absmax     per (group, channel): absmax and its row, O(G x d) extra memory
topk_abs           the k largest |x| with row and column (threshold + compaction, no full sort)
log_histogram      histogram of log10|x| with zero/under/over/NaN counts
=================  ====================================================================

Shared rules: NaN never wins a max (and is counted where a count exists), ``inf`` is a value,
ties go to the smallest index, and "nothing seen" is absmax 0 with argmax -1.

The names are imported lazily: ``import workbench.kernels`` imports neither torch nor Triton.
Five ops share their module's name; ``workbench.kernels.channel_stats`` is always the function,
so reach a module with ``from workbench.kernels.channel_stats import ...`` or ``importlib``.
"""

from __future__ import annotations

import importlib
import sys
import types

_EXPORTS = {
    "channel_stats": "channel_stats", "ChannelStats": "channel_stats", "merge_channel_stats": "channel_stats",
    "token_absmax": "token_absmax", "TokenAbsMax": "token_absmax",
    "grouped_absmax": "grouped_absmax", "GroupedAbsMax": "grouped_absmax",
    "topk_abs": "topk_abs", "TopKAbs": "topk_abs",
    "log_histogram": "log_histogram", "LogHistogram": "log_histogram", "log_histogram_edges": "log_histogram",
    "merge_log_histograms": "log_histogram",
    "backend_for": "dispatch",
    "reduce_dump": "reduce_dump",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *_EXPORTS})


class _Package(types.ModuleType):
    """Importing submodule ``channel_stats`` binds the package attribute to the function, not the module."""

    def __setattr__(self, name, value):
        if isinstance(value, types.ModuleType) and value.__name__ == f"{__name__}.{name}" and name in _EXPORTS:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
