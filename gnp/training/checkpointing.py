"""The run's resumable state in its directory's checkpoint.pt: saved at an epoch's end or at any step
within one, restored when the run starts again.

The model is saved with the replicas' BatchNorm statistics averaged, each replica's own statistics
beside it, and the partial epoch's sums of every replica, so that a run resumed at any step, in one
process or under DDP, continues every replica exactly. The file is written atomically and read back
with an error that names it and the fix when it is truncated, empty, not a gnp checkpoint, or holds
tensors that do not fit the model it is loaded into.
"""
from __future__ import annotations

import pickle
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn as nn

from gnp import distributed, io
from gnp.console import first_line, log
from gnp.rundir import CHECKPOINT
from gnp.training.build import Parts
from gnp.training.epoch import EpochTotals

FORMAT = "gnp-checkpoint-v3"
FIX = "Move it away to start this run afresh, or resume from another run directory (hydra.run.dir=...)."


class CheckpointError(RuntimeError):
    """checkpoint.pt cannot be used to resume; the message says what to do with it."""


def save(run_dir: Path, state: dict[str, Any]) -> None:
    io.torch_save(run_dir / CHECKPOINT, {"format": FORMAT, **state})


def load(run_dir: Path) -> dict[str, Any] | None:
    """The saved state, on the CPU (loading it copies it to the model's device), or None when the run
    directory holds no checkpoint."""
    path = run_dir / CHECKPOINT
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as e:
        raise CheckpointError(f"{path} is unreadable ({first_line(e)}): it is truncated, empty or not a "
                              f"checkpoint. {FIX}") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a checkpoint of this version of gnp. {FIX}")
    return state


class Misfit(NamedTuple):
    """The first tensor of a saved state dict that does not fit a module's: its shape there and in the module
    (None where one of them lacks it)."""
    key: str
    saved: list[int] | None
    own: list[int] | None


def misfit(own: dict[str, torch.Tensor], saved: dict[str, torch.Tensor]) -> Misfit | None:
    """The first tensor of `saved` that does not fit `own` (a module's state dict), or None when all fit."""
    for key, tensor in own.items():
        if key not in saved or saved[key].shape != tensor.shape:
            return Misfit(key, list(saved[key].shape) if key in saved else None, list(tensor.shape))
    extra = [key for key in saved if key not in own]
    return Misfit(extra[0], list(saved[extra[0]].shape), None) if extra else None


def load_into(module: nn.Module, saved: dict[str, torch.Tensor], path: Path, what: str = "model") -> None:
    """`module.load_state_dict(saved)`, or a CheckpointError naming the file and the first tensor that does not
    fit (another model, or another version of its code, made the checkpoint)."""
    found = misfit(module.state_dict(), saved)
    if found:
        problem = (f"{found.key} is not in it" if found.saved is None else
                   f"it holds {found.key}, which this {what} has not" if found.own is None else
                   f"{found.key} has shape {found.saved} there and {found.own} in this {what}")
        raise CheckpointError(f"{path} does not fit this {what}: {problem} (it was made by another model or another "
                              f"version of its code). {FIX}")
    module.load_state_dict(saved)


@dataclass(frozen=True)
class Start:
    """Where a run continues: epoch `epoch` (0-based) from its step `step`, with this replica's sums of
    the steps of that epoch already taken (None at an epoch's start)."""
    epoch: int = 0
    step: int = 0
    totals: torch.Tensor | None = None


class Checkpoints:
    """The run directory's checkpoint.pt: written on the main process, with what every replica holds."""

    def __init__(self, run_dir: Path, ctx: distributed.Context):
        self.run_dir, self.ctx = run_dir, ctx
        self.last_written = time.monotonic()

    @property
    def path(self) -> Path:
        return self.run_dir / CHECKPOINT

    def kept(self) -> str:
        """Which checkpoint a run that stops now leaves, in words."""
        if self.path.exists():
            return f"the last good checkpoint, {self.path}, is kept"
        return "no checkpoint was written yet"

    def due(self, minutes: float) -> bool:
        """Whether a timed checkpoint is due (`train.checkpoint_minutes`, 0: never within an epoch)."""
        return self.ctx.is_main and minutes > 0 and time.monotonic() - self.last_written >= 60 * minutes

    def save(self, parts: Parts, epoch: int, step: int, totals: EpochTotals | None, record: dict) -> None:
        """The state after step `step` of epoch `epoch` (0-based; step 0: the end of the previous epoch);
        `record` holds what the run's records keep in it (config, history, W&B run id)."""
        replica_stats = None
        if self.ctx.world_size > 1 and parts.replica_stats:
            replica_stats = distributed.all_gather(torch.cat([s.flatten() for s in parts.replica_stats])).cpu()
        replica_totals = None if totals is None else distributed.all_gather(totals.sums).cpu()
        with distributed.replica_averaged(parts.replica_stats):
            distributed.on_main(lambda: self.write({
                **record, "epoch": epoch, "step": step, "model": parts.model.state_dict(),
                "optimizer": parts.method.state_dict(), "scheduler": parts.scheduler.state_dict(),
                "ema": parts.ema.model.state_dict() if parts.ema else None,
                "replica_stats": replica_stats, "totals": replica_totals}), self.ctx.device)
        if step:
            log.info(f"checkpoint at step {step}/{parts.steps_per_epoch} of epoch {epoch + 1}")

    def write(self, state: dict) -> None:
        self.last_written = time.monotonic()
        save(self.run_dir, state)

    def restore(self, parts: Parts, state: dict) -> Start:
        """Load the checkpoint's state into the parts; where to continue, with this replica's sums."""
        load_into(parts.model, state["model"], self.path)
        if parts.ema:
            load_into(parts.ema.model, state["ema"], self.path, "weight average")
        try:
            parts.method.load_state_dict(state["optimizer"])
            parts.scheduler.load_state_dict(state["scheduler"])
        except (KeyError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{self.path} does not fit this run's optimizer ({first_line(e)}). {FIX}") from None
        per_replica = state["replica_stats"]  # None for a single process: its model holds them
        if per_replica is not None and len(per_replica) == self.ctx.world_size:
            own = per_replica[self.ctx.rank].to(self.ctx.device)
            torch._foreach_copy_(parts.replica_stats, list(own.split([s.numel() for s in parts.replica_stats])))
        totals = state["totals"]
        if totals is not None:
            # Each replica continues its own sums; with another number of replicas the main one takes them all.
            same = len(totals) == self.ctx.world_size
            totals = totals[self.ctx.rank] if same else totals.sum(0) * float(self.ctx.is_main)
        epoch, step = state["epoch"], state["step"]
        where = f"epoch {epoch} of {parts.cfg.train.epochs}" if step == 0 else \
            f"step {step}/{parts.steps_per_epoch} of epoch {epoch + 1}"
        log.info(f"Resuming {self.run_dir} after {where}")
        return Start(epoch, step, totals)
