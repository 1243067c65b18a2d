"""Divergence: a run stops, with exit status 3, as soon as anything it keeps is NaN or infinite.

Every step's losses and gradient norms are checked on the device (`EpochTotals`); the state a checkpoint
would keep (the weights, the BatchNorm statistics, the optimizer's state, the weight average) is checked
at every read of the device's flags, before any checkpoint is written, so a kept checkpoint is finite in
every tensor; the test losses are checked at each epoch's end. Nothing here reads the device in a step.
"""
from __future__ import annotations

import math

import torch
from omegaconf import DictConfig

from gnp.training.build import Parts

STEP_QUANTITIES = ("the loss", "the gradient norm")  # checked at every step, in EpochTotals' order


class Diverged(RuntimeError):
    """Something the run keeps became NaN or infinite; the message says what and where."""


def state_groups(parts: Parts) -> dict[str, list[tuple[str, torch.Tensor]]]:
    """The floating-point tensors a checkpoint keeps, by what they are, each with its name."""
    stats = {id(s) for s in parts.replica_stats}
    model = [(name, t) for name, t in parts.model.state_dict(keep_vars=True).items() if t.is_floating_point()]
    optimizer = [(f"{key} of {name}", value) for name, p in parts.model.named_parameters()
                 for key, value in parts.method.base_optimizer.state.get(p, {}).items()
                 if isinstance(value, torch.Tensor) and value.is_floating_point() and value.device == p.device]
    groups = {
        "the weights": [(name, t) for name, t in model if id(t) not in stats],
        "the BatchNorm statistics": [(name, t) for name, t in model if id(t) in stats],
        "the optimizer's state": optimizer,
    }
    if parts.ema:
        groups["the weight average"] = [(name, t) for name, t in parts.ema.model.state_dict().items()
                                        if t.is_floating_point()]
    return {what: tensors for what, tensors in groups.items() if tensors}


def nonfinite_flags(groups: dict[str, list[tuple[str, torch.Tensor]]], device: torch.device) -> torch.Tensor:
    """1.0 for each group that holds a NaN or an infinity, else 0.0, on the device (no host sync). The
    largest magnitude of a finite tensor is finite, of any other NaN or inf."""
    flags = [~torch.stack(torch._foreach_norm([t.detach() for _, t in tensors], float("inf"))).isfinite().all()
             for tensors in groups.values()]
    return torch.stack(flags).to(device=device, dtype=torch.float64)


def first_nonfinite(tensors: list[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first tensor that holds a NaN or an infinity (this reads the device)."""
    return next((name for name, t in tensors if not torch.isfinite(t).all()), None)


def check_test_losses(epoch: int, test: dict[str, float], ema_test: dict[str, float]) -> None:
    """Raise Diverged when the epoch's test loss (or the weight average's) is NaN or infinite."""
    for what, result in (("the test loss", test), ("the weight average's test loss", ema_test)):
        if result and not math.isfinite(result["loss"]):
            raise Diverged(f"{what} became NaN or infinite at the end of epoch {epoch + 1}")


def divergence_advice(cfg: DictConfig) -> str:
    """What to change in the config of a run that diverged."""
    if "max_grad_norm" in cfg.method and cfg.method.max_grad_norm is None:
        return "Lower optimizer.lr, or clip the gradient (method.max_grad_norm=5.0, the official setting)"
    return "Lower optimizer.lr"
