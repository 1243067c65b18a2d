"""The run's resumable state in `checkpoint.pt`, written atomically, read back with an error that
names the file and the fix when it is truncated, empty or not a gnp checkpoint."""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from gnp import io
from gnp.runs import first_line

FILENAME = "checkpoint.pt"
_FORMAT = "gnp-checkpoint-v2"


class CheckpointError(RuntimeError):
    """checkpoint.pt cannot be used to resume; the message says what to do with it."""


def save(run_dir: Path, state: dict[str, Any]) -> None:
    io.torch_save(run_dir / FILENAME, {"format": _FORMAT, **state})


def load(run_dir: Path) -> dict[str, Any] | None:
    """The saved state, on the CPU (loading it copies it to the model's device), or None when the run
    directory holds no checkpoint."""
    path = run_dir / FILENAME
    if not path.exists():
        return None
    fix = "Move it away to start this run afresh, or resume from another run directory (hydra.run.dir=...)."
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as e:
        raise CheckpointError(f"{path} is unreadable ({first_line(e)}): it is truncated, empty or not a "
                              f"checkpoint. {fix}") from e
    if not isinstance(state, dict) or state.get("format") != _FORMAT:
        raise CheckpointError(f"{path} is not a checkpoint of this version of gnp. {fix}")
    return state
