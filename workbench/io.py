"""Atomic output: a file appears complete or not at all."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from workbench.errors import WorkbenchError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it over ``path`` only if the block succeeds.

    The temporary file is fsynced before the rename, so a crash leaves either the old file or
    the new one, never a half-written one.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise WorkbenchError(f"cannot write to {path.parent}: {e.strerror or e}") from e
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600 files; outputs get the usual permissions
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def dumps_json(obj: Any) -> str:
    """Deterministic JSON: sorted keys, fixed indentation, floats with 8 significant digits."""
    return json.dumps(_round_floats(obj), sort_keys=True, indent=2, allow_nan=True) + "\n"


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, dumps_json(obj))


def _round_floats(obj: Any) -> Any:
    if isinstance(obj, float):
        return float(f"{obj:.8g}")
    if isinstance(obj, dict):
        return {str(k): _round_floats(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_round_floats(v) for v in obj]
    return obj


def output_dir(path: str | os.PathLike) -> Path:
    """An output folder argument: refuse one that exists as a file (checked before any model work)."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise WorkbenchError(f"--out {out} exists and is not a directory")
    return out


def read_structured(path: str | os.PathLike, what: str = "file") -> tuple[Any, str]:
    """Parse a .json file as JSON and anything else as YAML; return (data, text).

    Errors are one line naming the file and, where the parser knows it, the line.
    """
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise WorkbenchError(f"cannot read {what} {path}: {e.strerror}") from None
    try:
        return (json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)), text
    except json.JSONDecodeError as e:
        raise WorkbenchError(f"{path} line {e.lineno}: not valid JSON ({e.msg})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" line {mark.line + 1}" if mark is not None else ""
        raise WorkbenchError(f"{path}{at}: not valid YAML ({getattr(e, 'problem', e)})") from None
