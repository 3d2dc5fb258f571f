"""A set of forward hooks installed together and removed together (capture and interventions use it)."""

from __future__ import annotations

from torch import nn

from workbench.errors import WorkbenchError


class HookSet:
    """Subclasses implement ``_install``; entering installs, leaving (or a failed install) removes all. A set is
    entered once at a time: entered again inside itself, it would install its hooks twice and the inner exit would
    remove them all, leaving the rest of the outer block unhooked."""

    def __init__(self):
        self._handles: list = []
        self._entered = False

    def _install(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        if self._entered:
            raise WorkbenchError(f"{type(self).__name__} is already active: leave its 'with' block before entering it "
                                 "again (or make a new one)")
        self._entered = True
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
        self._entered = False

    def _hook(self, module: nn.Module, fn, *, pre: bool = False, prepend: bool = False) -> None:
        """Register ``fn`` (with kwargs) as a forward hook, or a forward pre-hook when ``pre``; ``prepend``: before
        the module's other hooks of that kind."""
        register = module.register_forward_pre_hook if pre else module.register_forward_hook
        self._handles.append(register(fn, with_kwargs=True, prepend=prepend))
