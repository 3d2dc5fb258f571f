"""A set of forward hooks installed together and removed together (capture and interventions use it)."""

from __future__ import annotations

from torch import nn


class HookSet:
    """Subclasses implement ``_install``; entering installs, leaving (or a failed install) removes all."""

    def __init__(self):
        self._handles: list = []

    def _install(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        try:
            self._install()
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, module: nn.Module, fn, *, pre: bool = False) -> None:
        """Register ``fn`` (with kwargs) as a forward hook, or a forward pre-hook when ``pre``."""
        register = module.register_forward_pre_hook if pre else module.register_forward_hook
        self._handles.append(register(fn, with_kwargs=True))
