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


def check_prompts(prompts, where: str = "") -> list[str]:
    """``prompts`` as a list (a generator is read once, here), each a non-empty string; an empty list, one string
    in place of a list, a non-string item or an empty prompt is a one-line error naming the first bad one.
    ``where`` prefixes the message (e.g. ``domain 'code'``)."""
    at = f"{where}: " if where else ""
    if isinstance(prompts, str):
        raise WorkbenchError(f"{at}prompts must be a list of strings, not one string: wrap it in a list")
    try:
        prompts = list(prompts)
    except TypeError:
        raise WorkbenchError(f"{at}prompts must be a list of strings, not "
                             + ("None" if prompts is None else _a(type(prompts).__name__))) from None
    if not prompts:
        raise WorkbenchError(f"{at}no prompts given (the prompt list is empty)")
    for i, text in enumerate(prompts):
        if not isinstance(text, str):
            raise WorkbenchError(f"{at}prompt {i} is {_a(type(text).__name__)}, not a string")
        if not text.strip():
            raise WorkbenchError(f"{at}prompt {i} is empty")
    return prompts


def _a(noun: str) -> str:
    """``noun`` with its indefinite article: "an int", "a list"."""
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"
