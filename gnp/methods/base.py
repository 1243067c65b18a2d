"""What every method shares: one `step(closure)` around a base optimizer.

A method says how it computes the gradient of a step (`gradient`); everything else is here once:
zeroing, the forward/backward pass with its in-loss L2 term, the shards of a step (gradient
accumulation: each shard treated as one device's share of the batch), float16 loss scaling with a
GradScaler, the average over DDP replicas, clipping of the final gradient, the base optimizer's step,
the step count that schedules depend on, and the per-step report (`last_step`) that a training loop reads.

The contract of a method (docs/methods.md, "Adding a method"): it defines `gradient` (or, in the SAM family,
`direction` and perhaps `combine`, two_pass.py). It may set `passes` (the forward/backward passes of its
full step) and `step_overhead` (its element-wise work beyond SAM's, for the benchmark's limits), and override
`expected_passes` (the mean over a run, for cost estimates), `schedule` (the hyperparameters a step reports),
`after_step` (state it keeps across steps, updated once the base optimizer has stepped), `check_shards`, and
`state_dict` / `load_state_dict` for that state. It says what each setting of its own constructor means in
`setting_help` (the comments of the generated conf/method/settings/<Class>.yaml). A constructor refuses a bad
setting with `SettingError(name, value, allowed)`; a class that defines neither `gradient` nor `direction` is
refused when it is built.
"""
from __future__ import annotations

import inspect
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.parallel import DistributedDataParallel

from gnp.checks import is_int, is_number

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
    if not (is_number(value) and ok(value)):
        raise SettingError(name, value, allowed)


@dataclass
class StepReport:
    """What one step did. Tensors are detached 0-dim tensors on the device, made without host synchronisation.

    first_pass_loss, first_pass_output: the closure's loss and aux at theta (aux: None if it returned a loss only).
        With several shards: the mean of their losses, and their auxes concatenated in shard order (a list
        of them where they are not tensors).
    perturbed_loss, perturbed_output: the same at the perturbed point (the first pass's for a one-pass step).
    g1_norm: ||grad L(theta)||, in-loss L2 included. A two-pass step's is each shard's own (the norm its
        perturbation divides by), averaged over this replica's shards (with a synced perturbation: the norm
        of the mean g1 of every shard); a one-pass step's is the norm of its gradient, the mean over every
        shard of every replica, before clipping. Either way it does not depend on the processes.
    final_grad_norm: the norm of the gradient handed to the base optimizer, after the DDP average and the clip.
    skipped: bool tensor, True when a float16 step was skipped for an inf or NaN.
    passes: the forward/backward passes the step ran (on each shard): 1 for a plain step, 2 for a SAM step.
    schedule: the method's hyperparameters in force at this step (e.g. r and alpha during a warmup).
    """
    first_pass_loss: torch.Tensor
    first_pass_output: Any
    perturbed_loss: torch.Tensor
    perturbed_output: Any
    g1_norm: torch.Tensor
    final_grad_norm: torch.Tensor
    skipped: torch.Tensor
    passes: int
    schedule: dict[str, float]

    @property
    def two_pass(self) -> bool:
        """Whether the step ran more than its first pass (it perturbed)."""
        return self.passes > 1


class Pass(NamedTuple):
    """One forward/backward pass: its loss and aux (detached) and the gradients it left in `p.grad`."""
    loss: torch.Tensor
    output: Any
    grads: list[torch.Tensor]


class Gradient(NamedTuple):
    """What a method's `gradient` did; the final gradient itself is in each `p.grad`."""
    first: Pass
    perturbed: Pass                   # the first pass again for a one-pass step
    g1_norm: torch.Tensor | None      # None: the norm of the step's final gradient before clipping (one pass)
    replicas_differ: bool             # the gradients still differ between DDP replicas: average them
    schedule: dict[str, float]
    passes: int = 1                   # the forward/backward passes it ran


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
    `passes` is the number of forward/backward passes of the method's full step.

    `step([closure_0, ..., closure_k-1])` takes one step on k equal shards of the batch, each treated as
    one device's share of it under data parallelism (gradient accumulation): each shard runs its own
    passes with its own BatchNorm batch statistics and its own perturbation, the step's gradient is the
    mean of the shards' (then averaged over DDP replicas, clipped and applied once), and BatchNorm's
    running statistics end at the mean of the shards' updates, which is what k devices' running
    statistics average to. One shard is the plain `step(closure)`, bit for bit.
    """

    passes: int = 1
    # Element-wise work of a step beyond SAM's, as a fraction of a two-pass step: the benchmark's allowance.
    step_overhead: float = 0.0
    # The settings that tell the method's runs apart at a glance (W&B run names, figure titles, the demo).
    label_settings: tuple[str, ...] = ()
    # What each setting the class's own constructor takes means, in a line (`setting_meanings` merges the bases'):
    # the comment of each key of the generated conf/method/settings/<Class>.yaml and docs/methods.md's tables.
    setting_help: dict[str, str] = {
        "l2": "in-loss L2: 0.5 * l2 * ||theta||^2 enters the loss of every pass (optimizer.weight_decay_mode=loss)",
        "max_grad_norm": "clip the final gradient to this global norm; null = off",
        "grad_scaler": "a torch.amp.GradScaler for float16 autocast (precision=fp16)",
    }

    def __init__(self, model: nn.Module, base_optimizer: torch.optim.Optimizer, *, l2: float = 0.0,
                 max_grad_norm: float | None = None, grad_scaler: torch.amp.GradScaler | None = None):
        self.check_contract()
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
    def setting_defaults(cls) -> dict[str, Any]:
        """The keyword settings the constructor takes, following the `**settings` each class passes on, with
        their defaults (`inspect.Parameter.empty` where it has none); a subclass's default is the one in force."""
        defaults: dict[str, Any] = {}
        for klass in cls.__mro__:
            init = klass.__dict__.get("__init__")
            if init is None:
                continue
            params = list(inspect.signature(init).parameters.values())[3:]  # after self, model, base_optimizer
            for p in params:
                if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                    defaults.setdefault(p.name, p.default)
            if not any(p.kind is p.VAR_KEYWORD for p in params):
                break
        return defaults

    @classmethod
    def setting_meanings(cls) -> dict[str, str]:
        """What each setting means: the `setting_help` of the class and its bases, a subclass's text in force."""
        meanings: dict[str, str] = {}
        for klass in reversed(cls.__mro__):
            meanings.update(klass.__dict__.get("setting_help", {}))
        return meanings

    @classmethod
    def setting_names(cls) -> list[str]:
        """The keyword settings the constructor takes (`setting_defaults`' keys)."""
        return list(cls.setting_defaults())

    @classmethod
    def check_contract(cls) -> None:
        """Raise TypeError, naming what is missing, if the class does not say how it computes a gradient."""
        if cls.gradient is Method.gradient:
            raise TypeError(f"{cls.__name__} defines no gradient(closure, params, scale): a method says how it "
                            f"computes a step's gradient (a TwoPassMethod its direction); docs/methods.md: Adding a method")
        if not (is_int(cls.passes) and cls.passes >= 1):
            raise TypeError(f"{cls.__name__}.passes={cls.passes!r} is invalid: the forward/backward passes of its "
                            f"step, an integer >= 1")

    def gradient(self, closure: Closure, params: list[nn.Parameter], scale: torch.Tensor | None) -> Gradient:
        """Leave the update direction of this step's batch (or of one shard of it) in each `p.grad`."""
        raise NotImplementedError

    def shards_gradient(self, shards: list[Closure], params: list[nn.Parameter],
                        scale: torch.Tensor | None) -> Gradient:
        """Leave the step's update direction in each `p.grad`: the mean of each shard's `gradient`."""
        if len(shards) == 1:
            return self.gradient(shards[0], params, scale)
        return self.mean_over_shards(shards, params, lambda closure: self.gradient(closure, params, scale))

    def mean_over_shards(self, shards: list[Closure], params: list[nn.Parameter],
                         gradient: Callable[[Closure], Gradient]) -> Gradient:
        """`gradient` of each shard in turn, their mean left in each `p.grad`, their reports merged. Every
        shard's passes start from the BatchNorm running statistics the step found, which end at the mean
        of the shards' updates (an update is linear in the statistics: k devices' average is the same)."""
        statistics = ShardStatistics(self.model, len(shards))
        total: list[torch.Tensor] | None = None
        results = []
        for index, closure in enumerate(shards):
            statistics.before(index)
            results.append(gradient(closure))
            statistics.after(index)
            total = accumulate(total, params)
        torch._foreach_div_(total, len(shards))
        statistics.average()
        for p, g in zip(params, total):
            p.grad = g
        first = merge_passes([r.first for r in results], total)
        one_pass = all(r.perturbed is r.first for r in results)
        perturbed = first if one_pass else merge_passes([r.perturbed for r in results], total)
        norms = [r.g1_norm for r in results]
        g1_norm = None if norms[0] is None else torch.stack(norms).mean()
        return Gradient(first, perturbed, g1_norm, self.ddp, results[0].schedule, max(r.passes for r in results))

    def plain_gradient(self, closure: Closure, params: list[nn.Parameter], scale: torch.Tensor | None,
                       schedule: dict[str, float] | None = None) -> Gradient:
        """g = g1: one ordinary pass, synchronised by DDP as in plain training (when it is the step's only shard)."""
        first = self.forward_backward(closure, params, sync=True, scale=scale)
        return Gradient(first, first, None, replicas_differ=False, schedule=schedule or {})

    def expected_passes(self, total_steps: int) -> float:
        """Mean forward/backward passes per step over a run of `total_steps` steps (for cost estimates)."""
        return float(self.passes)

    def after_step(self, skipped: torch.Tensor | None) -> None:
        """Update what the method keeps across steps, once the base optimizer has stepped. `skipped` is the
        float16 step's skip flag (a bool device tensor; None without a scaler): a skipped step's gradients
        hold an inf or NaN that state must not take in. Default: nothing."""

    # --- the step ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Closure | Sequence[Closure]) -> torch.Tensor:
        """Take one step on the batch the closure evaluates, or on the shards a list of closures evaluate;
        return the first pass's loss (detached; the mean over the shards)."""
        shards = list(closure) if isinstance(closure, (list, tuple)) else [closure]
        if not shards:
            raise ValueError("step needs a closure, or a list of closures (one per shard of the batch)")
        self.check_shards(len(shards))
        params = self.parameters()
        device = params[0].device
        scale = self._loss_scale(device)
        self.zero_grad()
        # Several shards accumulate on this replica; their mean is averaged over the replicas once.
        local = self.model.no_sync() if self.ddp and len(shards) > 1 else nullcontext()
        with local:
            result = self.shards_gradient(shards, params, scale)
        grads = [p.grad for p in params]
        if result.replicas_differ:
            self.average_over_replicas(grads)
        g1_norm = global_norm(grads) if result.g1_norm is None else result.g1_norm
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
        self.after_step(None if scale is None else skipped)
        self.steps_taken += 1
        first, perturbed = result.first, result.perturbed
        self.last_step = StepReport(first.loss, first.output, perturbed.loss, perturbed.output, g1_norm,
                                    final_grad_norm, skipped, result.passes, result.schedule)
        return first.loss

    def check_shards(self, shards: int) -> None:
        """Raise SettingError if this method cannot take a step of `shards` shards (default: any number)."""

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

    def average_over_replicas(self, tensors: list[torch.Tensor]) -> None:
        """Average the tensors (gradients) over DDP replicas in place: one all-reduce per (device, dtype) bucket."""
        group = self.model.process_group
        world_size = dist.get_world_size(group)
        buckets: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for t in tensors:
            buckets.setdefault((t.device, t.dtype), []).append(t)
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


def dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """The inner product of two lists of tensors taken as one vector each, computed on the device."""
    return torch.stack([torch.vdot(x.reshape(-1), y.reshape(-1)) for x, y in zip(a, b)]).sum()


def copies(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    copied = [torch.empty_like(t) for t in tensors]
    if tensors:
        torch._foreach_copy_(copied, tensors)
    return copied


def accumulate(total: list[torch.Tensor] | None, params: list[nn.Parameter]) -> list[torch.Tensor]:
    """Add the parameters' gradients to `total` (the first shard's become it) and clear them for the next shard."""
    grads = [p.grad for p in params]
    for p in params:
        p.grad = None
    if total is None:
        return grads
    torch._foreach_add_(total, grads)
    return total


class ShardMean:
    """The mean over a step's shards, and over DDP replicas, of tensors that each shard adds: for state a
    method keeps across steps, so that it is one state, the same on every replica and in a checkpoint (as
    the step's gradient is one). `add` copies; `take` returns the mean and starts over (None if nothing was
    added)."""

    def __init__(self) -> None:
        self.total: list[torch.Tensor] | None = None
        self.count = 0

    def add(self, tensors: list[torch.Tensor]) -> None:
        if self.total is None:
            self.total = copies(tensors)
        else:
            torch._foreach_add_(self.total, tensors)
        self.count += 1

    def take(self, method: "Method", across_replicas: bool) -> list[torch.Tensor] | None:
        """The mean; averaged over DDP replicas too where `across_replicas` (one all-reduce)."""
        total, count = self.total, self.count
        self.total, self.count = None, 0
        if total is None:
            return None
        if count > 1:
            torch._foreach_div_(total, count)
        if across_replicas and method.ddp:
            method.average_over_replicas(total)
        return total


def keep_unless_skipped(old: list[torch.Tensor] | None, new: list[torch.Tensor],
                        skipped: torch.Tensor | None) -> list[torch.Tensor] | None:
    """`new`, or `old` where the float16 step was skipped (its tensors may hold an inf or NaN). Decided on the
    device; only a skip before any state exists is read on the host (GradScaler reads that flag anyway)."""
    if skipped is None:
        return new
    if old is None:
        return None if skipped.item() else new
    return [torch.where(skipped, o, n) for o, n in zip(old, new)]


def merge_passes(passes: list[Pass], grads: list[torch.Tensor]) -> Pass:
    """The shards' passes as one: the mean loss, the auxes concatenated (a list where they are not tensors)."""
    outputs = [p.output for p in passes]
    if all(isinstance(o, torch.Tensor) and o.ndim > 0 for o in outputs):
        output: Any = torch.cat(outputs)
    else:
        output = None if all(o is None for o in outputs) else outputs
    return Pass(torch.stack([p.loss for p in passes]).mean(), output, grads)


class ShardStatistics:
    """BatchNorm running statistics over the k shards of a step: `before(i)` puts back where the step found
    them (for every shard but the first), `after(i)` adds shard i's update, `average()` leaves the mean.
    Does nothing for one shard."""

    def __init__(self, model: nn.Module, shards: int):
        self.shards = shards
        self.stats = [s for s in running_statistics(model) if s.is_floating_point()] if shards > 1 else []
        self.counters = [s for s in running_statistics(model) if not s.is_floating_point()] if shards > 1 else []
        self.start = copies(self.stats + self.counters)
        self.total: list[torch.Tensor] | None = None

    def before(self, index: int) -> None:
        if index and self.start:
            torch._foreach_copy_(self.stats + self.counters, self.start)

    def after(self, index: int) -> None:
        if not self.stats:
            return
        if self.total is None:
            self.total = copies(self.stats)
        else:
            torch._foreach_add_(self.total, self.stats)

    def average(self) -> None:
        """The mean of the shards' statistics (the batch counters advance once, as on each device)."""
        if self.total is not None:
            torch._foreach_div_(self.total, self.shards)
            torch._foreach_copy_(self.stats, self.total)


def running_statistics(model: nn.Module) -> list[torch.Tensor]:
    """Running-statistics buffers (mean, variance, batch counter) of the model's norm layers."""
    return [
        buffer
        for module in model.modules()
        if isinstance(module, _NormBase) and module.track_running_stats
        for buffer in (module.running_mean, module.running_var, module.num_batches_tracked)
        if buffer is not None
    ]
