"""What every method shares: one `step(closure)` around a base optimizer.

A method says how it computes the gradient of a step (`gradient`); everything else is here once:
zeroing, the forward/backward pass with its in-loss L2 term, float16 loss scaling with a GradScaler,
the average over DDP replicas, clipping of the final gradient, the base optimizer's step, the step
count that schedules depend on, and the per-step report (`last_step`) that a training loop reads.
"""
from __future__ import annotations

import inspect
import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.parallel import DistributedDataParallel

Closure = Callable[[], "torch.Tensor | tuple[torch.Tensor, Any]"]

# Floor for a norm before dividing by it: a zero gradient gives a zero direction, not NaN.
NORM_FLOOR = 1e-12


class SettingError(ValueError):
    """A method's setting is out of range; `name` is the setting, the message says what is allowed."""

    def __init__(self, name: str, value: Any, allowed: str):
        super().__init__(f"{name}={value!r} is invalid: {name} must be {allowed}")
        self.name = name


def check_number(name: str, value: Any, allowed: str, ok: Callable[[float], bool]) -> None:
    """Raise SettingError unless `value` is a finite real number (not a bool) for which `ok` holds."""
    valid = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and ok(value)
    if not valid:
        raise SettingError(name, value, allowed)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class StepReport:
    """What one step did. Tensors are detached 0-dim tensors on the device, made without host synchronisation.

    first_pass_loss, first_pass_output: the closure's loss and aux at theta (aux: None if it returned a loss only).
    perturbed_loss, perturbed_output: the same at the perturbed point (the first pass's for a one-pass step).
    g1_norm: ||grad L(theta)||, in-loss L2 included (under DDP without a synced perturbation, this replica's).
    final_grad_norm: the norm of the gradient handed to the base optimizer, after the DDP average and the clip.
    skipped: bool tensor, True when a float16 step was skipped for an inf or NaN.
    two_pass: whether the step ran two passes.
    schedule: the method's hyperparameters in force at this step (e.g. r and alpha during a warmup).
    """
    first_pass_loss: torch.Tensor
    first_pass_output: Any
    perturbed_loss: torch.Tensor
    perturbed_output: Any
    g1_norm: torch.Tensor
    final_grad_norm: torch.Tensor
    skipped: torch.Tensor
    two_pass: bool
    schedule: dict[str, float]


class Pass(NamedTuple):
    """One forward/backward pass: its loss and aux (detached) and the gradients it left in `p.grad`."""
    loss: torch.Tensor
    output: Any
    grads: list[torch.Tensor]


class Gradient(NamedTuple):
    """What a method's `gradient` did; the final gradient itself is in each `p.grad`."""
    first: Pass
    perturbed: Pass                   # the first pass again for a one-pass step
    g1_norm: torch.Tensor
    replicas_differ: bool             # the gradients still differ between DDP replicas: average them
    schedule: dict[str, float]


class Method:
    """The base of every method: the shared machinery around `gradient`, which each method defines.

    Args:
        model: the module whose loss the closure computes; may be wrapped in DistributedDataParallel.
        base_optimizer: any torch.optim.Optimizer over the model's parameters; it takes the actual step,
            so learning-rate schedulers attach to it.
        l2: coefficient of 0.5 * l2 * ||theta||^2 added to the loss of every pass, so that it enters the
            gradient (and a perturbation and its norm). A param group of the base optimizer with an "l2"
            key uses that coefficient instead (0 leaves its parameters out). Decoupled weight decay belongs
            to the base optimizer.
        max_grad_norm: clip the final gradient to this global L2 norm (None: no clipping).
        grad_scaler: a torch.amp.GradScaler for float16 autocast: every pass is scaled and unscaled, and a
            step whose final gradient holds an inf or NaN is skipped.

    `step(closure)` zeroes the gradients, has `gradient` leave the update direction in each `p.grad`,
    averages it over DDP replicas if they differ, clips it and calls `base_optimizer.step()`. The closure
    computes the loss (it may return `(loss, aux)`) and never calls backward. Parameters that get no
    gradient are treated as having a zero gradient. `steps_taken` counts the calls of `step` (skipped
    float16 steps too, like a learning-rate scheduler) and `last_step` reports the latest one.
    """

    def __init__(self, model: nn.Module, base_optimizer: torch.optim.Optimizer, *, l2: float = 0.0,
                 max_grad_norm: float | None = None, grad_scaler: torch.amp.GradScaler | None = None):
        check_number("l2", l2, "a finite number >= 0 (0 turns the in-loss L2 term off)", lambda v: v >= 0)
        if max_grad_norm is not None:
            check_number("max_grad_norm", max_grad_norm, "a number > 0, or None for no clipping", lambda v: v > 0)
        if not isinstance(base_optimizer, torch.optim.Optimizer):
            raise TypeError(f"base_optimizer must be a torch.optim.Optimizer, got {type(base_optimizer).__name__}")
        for index, group in enumerate(base_optimizer.param_groups):
            if "l2" in group:
                check_number(f"param_groups[{index}]['l2']", group["l2"],
                             "a finite number >= 0 (it replaces l2 for that group)", lambda v: v >= 0)
        self.model = model
        self.base_optimizer = base_optimizer
        self.l2 = float(l2)
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.grad_scaler = grad_scaler if grad_scaler is not None and grad_scaler.is_enabled() else None
        self.ddp = isinstance(model, DistributedDataParallel)
        if not self.parameters():
            raise ValueError("base_optimizer has no parameters that require a gradient")
        self.steps_taken = 0
        self.last_step: StepReport | None = None

    # --- what a method says of itself ----------------------------------------------------------------

    @classmethod
    def setting_names(cls) -> list[str]:
        """The keyword settings the constructor takes, following the `**settings` each class passes on."""
        names: list[str] = []
        for klass in cls.__mro__:
            init = klass.__dict__.get("__init__")
            if init is None:
                continue
            params = list(inspect.signature(init).parameters.values())[3:]  # after self, model, base_optimizer
            names += [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name not in names]
            if not any(p.kind is p.VAR_KEYWORD for p in params):
                break
        return names

    def gradient(self, closure: Closure, params: list[nn.Parameter], scale: torch.Tensor | None) -> Gradient:
        """Leave the update direction of this step in each `p.grad`."""
        raise NotImplementedError

    def plain_gradient(self, closure: Closure, params: list[nn.Parameter], scale: torch.Tensor | None,
                       schedule: dict[str, float] | None = None) -> Gradient:
        """g = g1: one ordinary pass, synchronised by DDP as in plain training."""
        first = self.forward_backward(closure, params, sync=True, scale=scale)
        return Gradient(first, first, global_norm(first.grads), replicas_differ=False, schedule=schedule or {})

    def expected_passes(self, total_steps: int) -> float:
        """Mean forward/backward passes per step over a run of `total_steps` steps (for cost estimates)."""
        return 1.0

    # --- the step ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Closure) -> torch.Tensor:
        """Take one step on the batch the closure evaluates; return the first pass's loss (detached)."""
        params = self.parameters()
        device = params[0].device
        scale = self._loss_scale(device)
        self.zero_grad()
        result = self.gradient(closure, params, scale)
        if result.replicas_differ:
            self._average_over_replicas(params)
        grads = [p.grad for p in params]
        if scale is not None:
            # GradScaler looks for inf/NaN (and so decides the skip) in the gradients it unscales itself:
            # hand it the final gradient in scaled units. Scales are powers of two, so this is exact.
            torch._foreach_mul_(grads, scale)
            self.grad_scaler.unscale_(self.base_optimizer)
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        final_grad_norm = global_norm(grads)
        if scale is None:
            self.base_optimizer.step()
            skipped = torch.zeros((), dtype=torch.bool, device=device)
        else:
            # Skips on inf/NaN; a fused optimizer takes the decision on the device, any other waits for it here.
            self.grad_scaler.step(self.base_optimizer)
            self.grad_scaler.update()  # after a skip: scale * backoff_factor
            skipped = self._loss_scale(device) < scale
        self.steps_taken += 1
        first, perturbed = result.first, result.perturbed
        self.last_step = StepReport(first.loss, first.output, perturbed.loss, perturbed.output, result.g1_norm,
                                    final_grad_norm, skipped, perturbed is not first, result.schedule)
        return first.loss

    def forward_backward(self, closure: Closure, params: list[nn.Parameter], sync: bool,
                         scale: torch.Tensor | None) -> Pass:
        """One pass: run the closure and backpropagate; the gradients come back unscaled, plus in-loss L2.

        `sync=False` keeps the pass local to this DDP replica; `scale` multiplies the loss before backward.
        """
        local = self.model.no_sync() if self.ddp and not sync else nullcontext()
        with local, torch.enable_grad():
            loss, aux = loss_and_aux(closure())
            (loss if scale is None else loss * scale).backward()
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
        if scale is not None:
            torch._foreach_mul_(grads, scale.double().reciprocal().float())  # as GradScaler unscales
        for coefficient, group_params in self.l2_groups():
            # grad of 0.5 * l2 * ||theta||^2
            torch._foreach_add_([p.grad for p in group_params], group_params, alpha=coefficient)
        return Pass(loss.detach(), detach(aux), grads)

    # --- state and parameters ----------------------------------------------------------------------------

    @property
    def param_groups(self) -> list[dict]:
        """The base optimizer's parameter groups (learning rates and other settings)."""
        return self.base_optimizer.param_groups

    def zero_grad(self) -> None:
        """Set every gradient of the model and the base optimizer to None."""
        self.model.zero_grad(set_to_none=True)
        self.base_optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: the base optimizer's state (momentum buffers, step counts), the
        steps taken (schedules depend on them) and the scaler's state."""
        state = {"base_optimizer": self.base_optimizer.state_dict(), "steps_taken": self.steps_taken}
        if self.grad_scaler is not None:
            state["grad_scaler"] = self.grad_scaler.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        name = type(self).__name__
        if "base_optimizer" not in state_dict or "steps_taken" not in state_dict:
            raise ValueError(f"state_dict has no 'base_optimizer' or 'steps_taken' entry; pass a dict made by "
                             f"{name}.state_dict()")
        if self.grad_scaler is not None and "grad_scaler" not in state_dict:
            raise ValueError(f"state_dict has no 'grad_scaler' entry but this {name} has a grad_scaler; resume "
                             f"with the precision the state was saved with")
        self.base_optimizer.load_state_dict(state_dict["base_optimizer"])
        self.steps_taken = int(state_dict["steps_taken"])
        if self.grad_scaler is not None:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])

    def parameters(self) -> list[nn.Parameter]:
        """The base optimizer's parameters that require a gradient, each once, in group order."""
        seen, params = set(), []
        for group in self.base_optimizer.param_groups:
            for p in group["params"]:
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        return params

    def l2_groups(self) -> list[tuple[float, list[nn.Parameter]]]:
        """(coefficient, parameters) of each param group with an in-loss L2 term."""
        groups = []
        for group in self.base_optimizer.param_groups:
            coefficient = float(group.get("l2", self.l2))
            params = [p for p in group["params"] if p.requires_grad]
            if coefficient and params:
                groups.append((coefficient, params))
        return groups

    def l2_term(self) -> torch.Tensor | float:
        """0.5 * l2 * ||theta||^2, with each param group's coefficient."""
        return sum((0.5 * coefficient * torch.stack([p.pow(2).sum() for p in params]).sum()
                    for coefficient, params in self.l2_groups()), 0.0)

    def _loss_scale(self, device: torch.device) -> torch.Tensor | None:
        """The scaler's current scale as a 0-dim tensor on `device`; None without an enabled scaler."""
        if self.grad_scaler is None:
            return None
        return self.grad_scaler.scale(torch.ones((), device=device))

    def _average_over_replicas(self, params: list[nn.Parameter]) -> None:
        """Average `p.grad` over DDP replicas: one all-reduce per (device, dtype) bucket."""
        group = self.model.process_group
        world_size = dist.get_world_size(group)
        buckets: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for p in params:
            buckets.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
        for grads in buckets.values():
            flat = _flatten_dense_tensors(grads)
            dist.all_reduce(flat, group=group)
            flat.div_(world_size)
            torch._foreach_copy_(grads, _unflatten_dense_tensors(flat, grads))


def loss_and_aux(output: Any) -> tuple[torch.Tensor, Any]:
    loss, aux = output if isinstance(output, (tuple, list)) else (output, None)
    if not (isinstance(loss, torch.Tensor) and loss.numel() == 1):
        raise TypeError(f"the closure must return a scalar loss tensor or (loss, aux), got {type(loss).__name__} "
                        "as the loss")
    return loss, aux


def detach(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, (tuple, list)):
        return type(value)(detach(v) for v in value)
    if isinstance(value, dict):
        return {k: detach(v) for k, v in value.items()}
    return value


def global_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """L2 norm of all tensors together, computed on the device (no host synchronisation)."""
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors)))


def running_statistics(model: nn.Module) -> list[torch.Tensor]:
    """Running-statistics buffers (mean, variance, batch counter) of the model's norm layers."""
    return [
        buffer
        for module in model.modules()
        if isinstance(module, _NormBase) and module.track_running_stats
        for buffer in (module.running_mean, module.running_var, module.num_batches_tracked)
        if buffer is not None
    ]
