"""One error type for everything a user can get wrong.

The CLI turns a :class:`WorkbenchError` into a single ``error: ...`` line and a non-zero exit;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


def few(items, n: int = 3) -> str:
    """The first ``n`` of ``items`` for a message, ", ..." after them when there are more ("L1.E2, L1.E7, ...")."""
    items = [str(x) for x in items]
    return ", ".join(items[:n]) + (", ..." if len(items) > n else "")


class WorkbenchError(Exception):
    """A problem with the user's input or environment, stated in one line."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message
