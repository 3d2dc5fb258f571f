"""Command-line argument checking shared by every subcommand: numbers in a stated range, one-line errors.

Every numeric flag takes a :class:`Number` as its argparse ``type``, so an out-of-range or
non-numeric value is refused while the arguments are parsed, before any file is read or any
output folder is made, with one line that names the flag and the allowed range::

    error: argument --max-tokens: must be an integer >= 1, got '-5' (see `workbench profile --help`)

:class:`Parser` is the ``argparse.ArgumentParser`` of the ``workbench`` command (its subcommands
inherit it): every usage error is that one ``error:`` line and exit status 2, the status of a
:class:`~workbench.errors.WorkbenchError`.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

from workbench.errors import WorkbenchError


@dataclass(frozen=True)
class Number:
    """An argparse ``type``: an int (or float) in ``[low, high]`` (``(low, ...`` if ``open_low``), or ``off``."""

    kind: type = int
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    off: int | None = None  # one more allowed value that switches the feature off (e.g. 0)

    def allows(self, value: float) -> bool:
        if self.off is not None and value == self.off:
            return True
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.open_low else value < self.low):
            return False
        return self.high is None or value <= self.high

    def describe(self) -> str:
        what = "an integer" if self.kind is int else "a number"
        if self.low is not None and self.high is not None:
            rng = f"{what} in {'(' if self.open_low else '['}{_fmt(self.low)}, {_fmt(self.high)}]"
        elif self.low is not None:
            rng = f"{what} {'>' if self.open_low else '>='} {_fmt(self.low)}"
        elif self.high is not None:
            rng = f"{what} <= {_fmt(self.high)}"
        else:
            rng = what
        return rng if self.off is None else f"{self.off} (off) or {rng}"

    def __call__(self, text: str):
        try:
            value = self.kind(text)
        except (TypeError, ValueError):
            value = None
        if value is None or not self.allows(value):
            raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {text!r}")
        return value


def _fmt(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else str(v)


@dataclass(frozen=True)
class NumberList:
    """An argparse ``type``: comma-separated numbers, each a valid ``item``."""

    item: Number

    def __call__(self, text: str) -> list:
        parts = [t.strip() for t in text.split(",") if t.strip()]
        if not parts:
            raise argparse.ArgumentTypeError(f"expected comma-separated values, each {self.item.describe()}; got "
                                             f"{text!r}")
        try:
            return [self.item(t) for t in parts]
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"expected comma-separated values, each {self.item.describe()}; "
                                             f"got {text!r}") from None


# The ranges the subcommands share.
COUNT = Number(int, 1)  # batch sizes, token limits, top-N, steps: at least one
COUNT_OR_OFF = Number(int, 0)  # checkpoint intervals, control counts: 0 turns the feature off
SEED = Number(int, 0, 2**63 - 1)
PORT = Number(int, 1, 65535)


class Parser(argparse.ArgumentParser):
    """argparse with the project's usage errors: one ``error:`` line, exit status 2, no usage dump."""

    def error(self, message: str):  # noqa: D401 (argparse's hook)
        self.exit(WorkbenchError.exit_code, f"error: {message} (see `{self.prog} --help`)\n")
