"""One training epoch: the step with the loop's per-step work around it, the epoch's sums kept on the
device, and the reads of the device's flags every `train.sync_every` steps (NaN and inf anywhere,
stop requests, a timed checkpoint), the only places where the host waits for the device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from tqdm import tqdm

from gnp import distributed
from gnp.methods import StepReport
from gnp.signals import StopSignals
from gnp.training.build import Parts
from gnp.training.divergence import STEP_QUANTITIES, Diverged, first_nonfinite, nonfinite_flags, state_groups


class EpochTotals:
    """Per-step sums of one epoch on the device, added without reading them back (no GPU sync).
    Gradient norms are averaged over the steps that were applied: a float16 step skipped for an
    overflow has no meaningful gradient. `first_bad` holds, per quantity of STEP_QUANTITIES, the first
    step of the epoch where it was NaN or infinite (inf: none)."""

    FIELDS = ("first_pass_loss", "first_pass_errors", "perturbed_loss", "perturbed_errors", "g1_norm",
              "final_grad_norm", "applied_steps")

    def __init__(self, device: torch.device, saved: torch.Tensor | None = None):
        self.sums = torch.zeros(len(self.FIELDS), dtype=torch.float64, device=device) if saved is None \
            else saved.to(device=device, dtype=torch.float64)
        self.first_bad = torch.full((len(STEP_QUANTITIES),), math.inf, dtype=torch.float64, device=device)

    def field(self, name: str) -> torch.Tensor:
        return self.sums[self.FIELDS.index(name)]

    def add(self, step: StepReport, target: torch.Tensor, index: int) -> None:
        """Add the report of the epoch's step `index` (0-based), whose batch had these targets."""
        labels = target if target.ndim == 1 else target.argmax(1)  # soft targets from mixup/cutmix
        n = len(labels)
        applied = ~step.skipped
        bad = torch.stack([~(torch.isfinite(step.first_pass_loss) & torch.isfinite(step.perturbed_loss)),
                           applied & ~torch.isfinite(step.final_grad_norm)])
        self.sums += torch.stack([
            step.first_pass_loss.double() * n,
            (step.first_pass_output.argmax(1) != labels).sum().double(),
            step.perturbed_loss.double() * n,
            (step.perturbed_output.argmax(1) != labels).sum().double(),
            torch.where(applied, step.g1_norm.double(), 0.0),
            torch.where(applied, step.final_grad_norm.double(), 0.0),
            applied.double(),
        ])
        self.first_bad = torch.where(bad & torch.isinf(self.first_bad), float(index), self.first_bad)


def train_step(parts: Parts, global_step: int, images: torch.Tensor, target: torch.Tensor,
               totals: EpochTotals) -> None:
    """One optimisation step with everything the loop does around it: the step's random draws, the
    learning-rate schedule, the weight average and the epoch's sums."""
    if parts.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    parts.method.step(parts.shard_closures(global_step, images, target))
    parts.scheduler.step()
    if parts.ema:
        parts.ema.update()
    totals.add(parts.method.last_step, target, global_step % parts.steps_per_epoch)


@dataclass(frozen=True)
class Flags:
    """What the replicas agreed on at a read of the device's flags."""
    signum: int  # the signal that asked to stop (0: none)
    checkpoint_due: bool  # a timed checkpoint is due (train.checkpoint_minutes)


def epoch_steps(parts: Parts, epoch: int, totals: EpochTotals, start_step: int, signals: StopSignals,
                checkpoint_due: Callable[[], bool], show_progress: bool) -> Iterator[tuple[int, Flags]]:
    """Train epoch `epoch` (0-based) from step `start_step` on, adding to `totals`. At every read of the
    device's flags (each `train.sync_every` steps, at once on a signal in a single process, and after
    the epoch's last step) yield the steps done and the flags. Raises Diverged on a NaN or inf."""
    t, steps = parts.cfg.train, parts.steps_per_epoch
    read = start_step  # the steps done at the last read
    parts.compiled.train()
    bar = tqdm(total=steps, initial=start_step, desc=f"epoch {epoch + 1}/{t.epochs}", disable=not show_progress,
               leave=False, dynamic_ncols=True)
    for step, (images, target) in enumerate(parts.train_loader.epoch(epoch, start_step), start_step):
        train_step(parts, epoch * steps + step, images, target, totals)
        bar.update()
        done = step + 1
        if done == steps:
            break  # the end of the epoch is read below
        if done % t.sync_every == 0 or (signals.requested and parts.ctx.world_size == 1):
            yield done, read_flags(parts, epoch, totals, signals, checkpoint_due(), read, done)
            read = done
            if not bar.disable:
                loss, errors = totals.field("first_pass_loss").item(), totals.field("first_pass_errors").item()
                seen = done * parts.train_loader.batch_size // parts.ctx.world_size  # this replica's images
                bar.set_postfix(loss=f"{loss / seen:.3f}", err=f"{100 * errors / seen:.1f}%")
    bar.close()
    yield steps, read_flags(parts, epoch, totals, signals, False, read, steps)


def read_flags(parts: Parts, epoch: int, totals: EpochTotals, signals: StopSignals, due: bool, read: int,
               done: int) -> Flags:
    """Read the device's flags after `done` steps of the epoch (the last read was after `read`), agreed
    across replicas: raise Diverged where anything is NaN or infinite; return the signal that asked to
    stop and whether a timed checkpoint is due (on any replica)."""
    groups = state_groups(parts)
    host_flags = torch.tensor([float(signals.signum or 0), float(due)], dtype=torch.float64, device=parts.ctx.device)
    # MAX over replicas: each step quantity's earliest bad step (as its negative), each part of the state
    # that is not finite, a signal, a due checkpoint.
    flags = torch.cat([-totals.first_bad, nonfinite_flags(groups, parts.ctx.device), host_flags])
    values = distributed.all_reduce_max(flags).tolist()
    n = len(STEP_QUANTITIES)
    first_bad, state_bad, (signum, due) = [-v for v in values[:n]], values[n:-2], values[-2:]
    where = f"of epoch {epoch + 1}"
    if any(math.isfinite(step) for step in first_bad):
        first = min(range(n), key=first_bad.__getitem__)  # the earliest; the loss before the gradient norm
        raise Diverged(f"{STEP_QUANTITIES[first]} became NaN or infinite at step {int(first_bad[first]) + 1}/"
                       f"{parts.steps_per_epoch} {where}")
    for (what, tensors), bad in zip(groups.items(), state_bad):
        if bad:  # named where this replica holds it (under DDP each replica has its own BatchNorm statistics)
            name = first_nonfinite(tensors)
            when = f"at step {done}" if done == read + 1 else f"between step {read + 1} and step {done}"
            raise Diverged(f"{what}{f' ({name})' if name else ''} became NaN or infinite {when}/"
                           f"{parts.steps_per_epoch} {where}")
    return Flags(int(signum), bool(due))
