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
    skipped. A ``.jsonl`` file holds one JSON string, or object with a "prompt" or "text" string, per line (a
    prompt may then hold newlines). A file without a prompt is an error."""
    path = Path(path)
    text = read_text(path, "prompts file")
    if path.suffix.lower() == ".jsonl":  # one JSON value per line: a string, or an object with "prompt" or "text"
        prompts = [_jsonl_prompt(line, path, i) for i, line in enumerate(text.split("\n"), 1) if line.strip()]
    else:
        prompts = [line.removesuffix("\r") for line in text.split("\n") if line.strip()]
    if not prompts:
        raise WorkbenchError(f"prompts file {path} has no prompts ("
                             + ("it is empty)" if not text else "only blank lines)"))
    return prompts


def _jsonl_prompt(line: str, path: Path, number: int) -> str:
    import json

    try:
        v = json.loads(line)
    except ValueError as e:
        raise WorkbenchError(f"{path} line {number}: not JSON ({e})") from None
    if isinstance(v, dict):
        v = v.get("prompt", v.get("text"))
    if not isinstance(v, str) or not v.strip():
        raise WorkbenchError(f"{path} line {number}: expected a string or an object with a non-empty \"prompt\" or "
                             "\"text\" string")
    return v


def check_prompts(prompts) -> list[str]:
    """Reject an empty list and empty prompts, naming the first bad one."""
    prompts = list(prompts)
    if not prompts:
        raise WorkbenchError("no prompts given (the prompt list is empty)")
    for i, text in enumerate(prompts):
        if not isinstance(text, str) or not text.strip():
            raise WorkbenchError(f"prompt {i} is empty")
    return prompts
