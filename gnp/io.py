"""Atomic file writes: a killed process leaves either the old file or the new one, never half.

Every write goes to a temporary file beside the target (`.NAME.*.tmp`), is flushed to disk and then
renamed over the target. A failed write (a full disk, a read-only folder) raises `OutputError`
naming the path and the operating system's reason, whichever layer reported it (torch's zip writer
turns the ENOSPC of a write into a RuntimeError of its own), and leaves the previous file untouched.
Temporaries orphaned by a killed process are removed by `remove_stale_temporaries`. JSON is strict:
NaN and infinities become null, so every file parses with any JSON reader.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, IO

_TEMPORARY_SUFFIX = ".tmp"


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates 0600 files; the outputs get the permissions the user's umask gives new files.
_FILE_MODE = 0o666 & ~_current_umask()


class OutputError(OSError):
    """A file could not be written; the message names the path, the cause and the fix."""


class _Recording:
    """A file that remembers the first OSError of its writes, which a writer may hide behind its own error."""

    def __init__(self, file: IO[bytes]):
        self.file, self.error = file, None

    def write(self, data: bytes) -> int:
        return self._recorded(self.file.write, data)

    def flush(self) -> None:
        self._recorded(self.file.flush)

    def _recorded(self, operation: Callable, *args):
        try:
            return operation(*args)
        except OSError as e:
            self.error = self.error or e
            raise


def _atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    path = Path(path)
    tmp = recording = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_TEMPORARY_SUFFIX)
        with os.fdopen(fd, "wb") as f:
            recording = _Recording(f)
            write(recording)
            recording.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except Exception as e:
        cause = e if isinstance(e, OSError) else recording.error if recording else None
        if cause is None:
            raise  # not a failed write: the object could not be written at all
        raise OutputError(f"cannot write {path}: {cause.strerror or cause}. Free space or choose a writable "
                          f"folder; the previous {path.name} is unchanged.") from e
    finally:
        if tmp is not None and Path(tmp).exists():
            Path(tmp).unlink()


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporaries of writes that a killed process never finished; returns them."""
    stale = [p for p in Path(folder).glob(f".*{_TEMPORARY_SUFFIX}") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def strict_json(value: Any) -> Any:
    """`value` with every non-finite float replaced by None (JSON has no NaN or Infinity)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def dumps(obj: Any, **kwargs: Any) -> str:
    return json.dumps(strict_json(obj), allow_nan=False, sort_keys=True, **kwargs)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    _atomic_write(path, lambda f: f.write(data))


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, dumps(obj, indent=2) + "\n")


def write_jsonl(path: str | os.PathLike, rows: list[dict]) -> None:
    write_text(path, "".join(dumps(row) + "\n" for row in rows))


def torch_save(path: str | os.PathLike, obj: Any) -> None:
    import torch  # only for checkpoints: the run directory's other files are written without it

    _atomic_write(path, lambda f: torch.save(obj, f))
