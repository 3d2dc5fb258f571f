"""Atomic output: a file appears complete or not at all."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from workbench.errors import WorkbenchError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, folder: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it over ``path`` only if the block succeeds.

    The temporary file is fsynced before the rename, so a crash leaves either the old file or
    the new one, never a half-written one. ``folder``: the temporary path is inside a private hidden
    folder instead, for writers that make temporaries of their own beside their target (safetensors'
    ``.tmpXXXXXX``), so what a killed writer leaves is in that folder, which :func:`clear_stale_temps`
    removes like any other temporary.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if folder:
            private = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
            tmp_path = private / path.name
        else:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.close(fd)
            tmp_path = Path(tmp)
    except OSError as e:
        raise WorkbenchError(f"cannot write to {path.parent}: {e.strerror or e}") from e
    try:
        yield tmp_path
        # temporary files are made 0600 (mkstemp, safetensors); outputs get the usual permissions
        os.chmod(tmp_path, 0o666 & ~_umask())
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException as e:
        if not folder:
            with contextlib.suppress(FileNotFoundError):
                tmp_path.unlink()
        if isinstance(e, OSError) and e.errno is not None:  # disk full, quota, I/O error: a user-facing failure
            raise WorkbenchError(f"cannot write {path}: {e.strerror or e}") from e
        raise
    finally:
        if folder:
            shutil.rmtree(private, ignore_errors=True)


def save_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> Path:
    """Write ``tensors`` to a .safetensors file atomically, leaving nothing behind in ``path``'s folder if killed
    (through :func:`atomic_path`'s private folder: safetensors writes via a ``.tmpXXXXXX`` file of its own)."""
    from safetensors.torch import save_file

    try:
        with atomic_path(path, folder=True) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
    except WorkbenchError:
        raise
    except Exception as e:  # safetensors reports write failures as its own error type
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise WorkbenchError(f"cannot write {path}: {why}") from None
    return Path(path)


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
    return json.dumps(round_floats(obj), sort_keys=True, indent=2, allow_nan=True) + "\n"


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, dumps_json(obj))


def round_floats(obj: Any) -> Any:
    """``obj`` with every float rounded to 8 significant digits, as :func:`dumps_json` writes it (idempotent)."""
    if isinstance(obj, float):
        return float(f"{obj:.8g}")
    if isinstance(obj, dict):
        return {str(k): round_floats(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [round_floats(v) for v in obj]
    return obj


# A file only that command writes: a folder holding one holds that command's outputs.
WRITTEN_BY = {"profile": "profile.json", "ablate": "study.resolved.yaml", "trace": "trace.json",
              "contrast": "contrast.csv", "routing": "routing.json", "circuit": "circuit.json",
              "circuit-evolution": "evolution.json", "sae train": "sae_weights.safetensors"}


def output_dir(path: str | os.PathLike, flag: str = "--out", command: str | None = None) -> Path:
    """An output folder argument (given as ``flag``), checked before any model work and without leaving anything.

    Refused: a path that exists as a file, one below a file, one whose nearest existing folder is not
    writable (or refuses a file there: root passes every permission check, and some file systems take no file
    whatever the permissions say), and, for a ``command``, one holding a folder where its own output file goes
    or holding another command's outputs (:data:`WRITTEN_BY`).
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise WorkbenchError(f"{flag} {out} exists and is not a directory")
    base = out.absolute()
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise WorkbenchError(f"cannot write to {out}: {base} is not a directory")
    if not os.access(base, os.W_OK | os.X_OK):
        raise WorkbenchError(f"cannot write to {out}: {base} is not writable")
    try:
        with tempfile.TemporaryFile(dir=base):  # unnamed where the OS allows: nothing is left behind
            pass
    except OSError as e:
        raise WorkbenchError(f"cannot write to {out}: {base} takes no file ({e.strerror})") from None
    if command and (out / WRITTEN_BY[command]).is_dir():
        raise WorkbenchError(f"cannot write {out / WRITTEN_BY[command]}: a folder of that name is there")
    other = next((c for c, f in WRITTEN_BY.items() if c != command and (out / f).is_file()), None) if command else None
    if other is not None:  # their metrics.json, report.html ... would be overwritten, their report broken
        raise WorkbenchError(f"{flag} {out} holds the outputs of `workbench {other}` ({WRITTEN_BY[other]}); give "
                             f"`workbench {command}` a folder of its own")
    return out


def output_file(path: str | os.PathLike, flag: str = "--out") -> Path:
    """An output file argument, checked as :func:`output_dir` checks its folder, before any work."""
    out = Path(path)
    if out.is_dir():
        raise WorkbenchError(f"{flag} {out} is a directory; give the file to write, e.g. {out / 'stats.json'}")
    if out.parent.exists() and not out.parent.is_dir():
        raise WorkbenchError(f"{flag} {out}: {out.parent} exists and is not a directory")
    output_dir(out.parent, flag)
    return out


def clear_stale_temps(folder: str | os.PathLike, names: Iterable[str]) -> None:
    """Remove temporaries :func:`atomic_path` and :func:`save_safetensors` left for ``names`` (globs) when killed."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for name in names:
        for f in folder.glob(f".{name}.*.tmp"):
            if f.is_dir() and not f.is_symlink():
                shutil.rmtree(f, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    f.unlink()


def read_text(path: str | os.PathLike, what: str = "file") -> str:
    """A UTF-8 text file's contents, without the byte-order mark some editors write first (it would otherwise start the
    first prompt or break the first JSON line); a missing, undecodable or unreadable file is a one-line error naming
    it."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise WorkbenchError(f"{what} {path} does not exist") from None
    except UnicodeDecodeError:
        raise WorkbenchError(f"{what} {path} is not UTF-8 text") from None
    except OSError as e:
        raise WorkbenchError(f"cannot read {what} {path}: {e.strerror}") from None


def read_structured(path: str | os.PathLike, what: str = "file") -> tuple[Any, str]:
    """Parse a .json file as JSON and anything else as YAML; return (data, text).

    Errors are one line naming the file and, where the parser knows it, the line.
    """
    path = Path(path)
    text = read_text(path, what)
    return parse_structured(text, str(path), path.suffix == ".json"), text


def parse_structured(text: str, source: str, is_json: bool) -> Any:
    """``text`` parsed as JSON or YAML; an error is one line naming ``source`` and, where the parser knows it,
    the line."""
    import yaml

    try:
        return json.loads(text) if is_json else yaml.safe_load(text)
    except json.JSONDecodeError as e:
        raise WorkbenchError(f"{source} line {e.lineno}: not valid JSON ({e.msg})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" line {mark.line + 1}" if mark is not None else ""
        raise WorkbenchError(f"{source}{at}: not valid YAML ({getattr(e, 'problem', e)})") from None
    except RecursionError:  # (json's C parser on thousands of nested brackets)
        raise WorkbenchError(f"{source}: nested too deeply to read") from None


def read_upload(data: bytes, name: str, is_json: bool | None = None) -> Any:
    """A file's bytes (the app's file boxes) parsed as :func:`read_structured` parses a file: JSON for a ``.json``
    name (or ``is_json``), YAML otherwise; text that is not UTF-8 or does not parse is a one-line error naming it."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise WorkbenchError(f"{name} is not UTF-8 text") from None
    return parse_structured(text, name, name.lower().endswith(".json") if is_json is None else is_json)


def write_result_set(out: str | os.PathLike, stem: str, result: Any, table, plot: Callable[[Path], None] | None,
                     before: Iterable[Callable[[], Path]] = ()) -> list[Path]:
    """``before``'s files, OUT/STEM.parquet (``table``, a DataFrame), OUT/STEM.png (``plot(path)`` draws it;
    None: no plot, and an earlier one is removed) and OUT/STEM.json last: its presence means the run finished. If
    any step fails, the files this call wrote are removed."""
    out = Path(out)
    written: list[Path] = []
    if plot is None:  # no plot this time: an earlier run's would pass for this one's (and report.html shows it)
        (out / f"{stem}.png").unlink(missing_ok=True)
    try:
        for write in before:
            written.append(write())
        with atomic_path(out / f"{stem}.parquet") as tmp:
            table.to_parquet(tmp, index=False)
        written.append(out / f"{stem}.parquet")
        if plot is not None:
            with atomic_path(out / f"{stem}.png") as tmp:
                png = tmp.with_suffix(".png")  # matplotlib picks the format from the suffix
                plot(png)
                png.replace(tmp)
            written.append(out / f"{stem}.png")
        written.append(write_json(out / f"{stem}.json", result))
    except BaseException:
        for f in written:
            f.unlink(missing_ok=True)
        raise
    return written
