"""workbench: look inside (Mixture-of-Experts) language models and change them on purpose.

The names below are imported lazily, so ``import workbench`` stays cheap.
"""

from __future__ import annotations

__version__ = "0.1.0"

_EXPORTS = {
    "load": "workbench.models.specs",
    "LoadedModel": "workbench.models.specs",
    "trace": "workbench.tracing.runner",
    "TraceResult": "workbench.tracing.runner",
    "Site": "workbench.tracing.sites",
    "Component": "workbench.tracing.sites",
    "Capture": "workbench.tracing.capture",
    "AbsMax": "workbench.tracing.reducers",
    "Moments": "workbench.tracing.reducers",
    "LogHistogram": "workbench.tracing.reducers",
    "ExpertCounts": "workbench.tracing.reducers",
    "default_prompts": "workbench.data",
    "WorkbenchError": "workbench.errors",
}

__all__ = [*_EXPORTS, "all_sites"]


def all_sites(lm, components, layers=None):
    """Every site of ``components`` in ``lm`` (a LoadedModel), experts expanded."""
    from workbench.tracing.sites import all_sites as _all

    return _all(lm.adapter, lm.model, components, layers)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'workbench' has no attribute {name!r}")
