"""The run's resumable state in `checkpoint.pt`, written atomically, read back with an error that
names the file and the fix when it is truncated, empty, not a gnp checkpoint, or holds tensors that do
not fit the model it is loaded into."""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from gnp import io
from gnp.runs import first_line

FILENAME = "checkpoint.pt"
_FORMAT = "gnp-checkpoint-v3"


class CheckpointError(RuntimeError):
    """checkpoint.pt cannot be used to resume; the message says what to do with it."""


FIX = "Move it away to start this run afresh, or resume from another run directory (hydra.run.dir=...)."


def save(run_dir: Path, state: dict[str, Any]) -> None:
    io.torch_save(run_dir / FILENAME, {"format": _FORMAT, **state})


def load(run_dir: Path) -> dict[str, Any] | None:
    """The saved state, on the CPU (loading it copies it to the model's device), or None when the run
    directory holds no checkpoint."""
    path = run_dir / FILENAME
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as e:
        raise CheckpointError(f"{path} is unreadable ({first_line(e)}): it is truncated, empty or not a "
                              f"checkpoint. {FIX}") from e
    if not isinstance(state, dict) or state.get("format") != _FORMAT:
        raise CheckpointError(f"{path} is not a checkpoint of this version of gnp. {FIX}")
    return state


def load_into(module: nn.Module, saved: dict[str, torch.Tensor], path: Path, what: str = "model") -> None:
    """`module.load_state_dict(saved)`, or a CheckpointError naming the file and the first tensor that does not
    fit (another model, or another version of its code, made the checkpoint)."""
    own, problem = module.state_dict(), None
    for key, tensor in own.items():
        if key not in saved:
            problem = f"{key} is not in it"
        elif saved[key].shape != tensor.shape:
            problem = f"{key} has shape {list(saved[key].shape)} there and {list(tensor.shape)} in this {what}"
        if problem:
            break
    else:
        extra = [key for key in saved if key not in own]
        problem = f"it holds {extra[0]}, which this {what} has not" if extra else None
    if problem:
        raise CheckpointError(f"{path} does not fit this {what}: {problem} (it was made by another model or another "
                              f"version of its code). {FIX}")
    module.load_state_dict(saved)
