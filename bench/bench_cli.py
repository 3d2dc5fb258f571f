"""What the bench scripts' command lines share: a user's mistake ends in one ``error: ...`` line, as the CLI's do.

A bench script runs its ``main`` through :func:`run`: a :class:`WorkbenchError` from inside (an unknown model
spec, a missing file) prints ``error: MESSAGE`` on stderr and exits with status 2, without a traceback; anything
else is a bug and keeps its traceback. :func:`fail` is the same line for a script's own checks.
"""

from __future__ import annotations

import sys
from typing import Callable, NoReturn


def fail(message: str, code: int = 2) -> NoReturn:
    """``error: MESSAGE`` on stderr, exit status ``code`` (2, the CLI's for a user error)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def run(main: Callable[[], int | None]) -> NoReturn:
    """Runs ``main`` and exits with its return value; a WorkbenchError becomes one ``error:`` line."""
    from workbench.errors import WorkbenchError

    try:
        code = main()
    except WorkbenchError as e:
        fail(str(e), e.exit_code)
    raise SystemExit(code)
