"""Built-in data shipped with the package (no downloads)."""

from __future__ import annotations

from pathlib import Path

from workbench.errors import WorkbenchError

DATA_DIR = Path(__file__).parent


def default_prompts() -> list[str]:
    """The built-in prompt set: a few hundred lines of varied text (prose, code, facts, dialogue)."""
    return read_prompts(DATA_DIR / "prompts.txt")


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line; blank lines are skipped. An empty file is an error."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise WorkbenchError(f"prompts file {path} does not exist") from None
    except UnicodeDecodeError:
        raise WorkbenchError(f"prompts file {path} is not UTF-8 text") from None
    except OSError as e:
        raise WorkbenchError(f"cannot read prompts file {path}: {e.strerror}") from None
    prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise WorkbenchError(f"prompts file {path} has no prompts (it is empty)")
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
