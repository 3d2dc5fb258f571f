"""Built-in data shipped with the package (no downloads)."""

from __future__ import annotations

from pathlib import Path

from workbench.errors import WorkbenchError
from workbench.io import read_text

DATA_DIR = Path(__file__).parent


def default_prompts() -> list[str]:
    """The built-in prompt set: a few hundred lines of varied text (prose, code, facts, dialogue)."""
    return read_prompts(DATA_DIR / "prompts.txt")


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line (\\n or \\r\\n; a form feed or U+2028 inside a line stays in its prompt); blank lines are
    skipped. A file without a prompt is an error."""
    path = Path(path)
    text = read_text(path, "prompts file")
    prompts = [line.removesuffix("\r") for line in text.split("\n") if line.strip()]
    if not prompts:
        raise WorkbenchError(f"prompts file {path} has no prompts ("
                             + ("it is empty)" if not text else "only blank lines)"))
    return prompts


def check_prompts(prompts) -> list[str]:
    """Reject an empty list and empty prompts, naming the first bad one."""
    prompts = list(prompts)
    if not prompts:
        raise WorkbenchError("no prompts given (the prompt list is empty)")
    for i, text in enumerate(prompts):
        if not isinstance(text, str) or not text.strip():
            raise WorkbenchError(f"prompt {i} is empty")
    return prompts
