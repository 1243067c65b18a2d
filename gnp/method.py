"""Gradient-norm penalty (GNP): penalise ||grad L|| by wrapping any torch optimizer.

Zhao, Zhang and Hu (ICML 2022) minimise L(theta) + lambda * ||grad L(theta)||. The first-order
update, with lambda = alpha * r, is

    g1 = grad L(theta)
    g2 = grad L(theta + r * g1 / ||g1||)        same batch, same dropout randomness
    g  = (1 - alpha) * g1 / ||g1|| + alpha * g2  (normalize_first_grad=True, the official code)
    g  = (1 - alpha) * g1 + alpha * g2           (normalize_first_grad=False, the paper's formula)

and the base optimizer steps from theta with g. alpha = 1 is SAM with rho = r; r = 0 is plain
training with the base optimizer. The switches of the authors' later code are here too: GR warmup
(Zhao, Zhang and Hu, ICML 2024), hybrid steps that are GNP steps only with a probability p, and
float16 training with a GradScaler.
"""
from __future__ import annotations

import math
import random
from contextlib import nullcontext
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn as nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.parallel import DistributedDataParallel

Closure = Callable[[], "torch.Tensor | tuple[torch.Tensor, Any]"]

# Floor for ||g1|| before dividing by it: a zero gradient gives a zero direction, not NaN.
_NORM_FLOOR = 1e-12

WARMUPS = ("none", "r", "lambda", "zero")


class GradientNormPenalty:
    """Wrap `base_optimizer` so that each `step` follows the gradient-norm-penalised objective.

    Args:
        model: the module whose loss the closure computes; may be wrapped in
            `DistributedDataParallel`. Its BatchNorm running statistics are updated by the first
            pass only.
        base_optimizer: any `torch.optim.Optimizer` over the model's parameters; it takes the
            actual step, so learning-rate schedulers attach to it.
        r: perturbation radius (>= 0). r = 0 is plain training: one pass, g = g1.
        alpha: weight of the perturbed gradient, in [0, 1]; the penalty coefficient is
            lambda = alpha * r. alpha = 1 is SAM with rho = r.
        normalize_first_grad: the (1 - alpha) term uses g1 / ||g1|| (True, the official code's
            default) or g1 (False, the paper's formula).
        l2: coefficient of 0.5 * l2 * ||theta||^2 added to the loss of both passes, so that it
            enters the perturbation and its norm (the official CNN recipes). A param group of the
            base optimizer with an "l2" key uses that coefficient instead (0 leaves its parameters
            out). Decoupled weight decay belongs to the base optimizer.
        max_grad_norm: clip the final combined gradient to this global L2 norm (None: no
            clipping; the official default is 5.0).
        sync_perturbation: under DDP, average g1 over replicas before perturbing (True) or let
            each replica perturb with its own shard's g1 (False, the official default). The
            combined gradient is averaged over replicas once per step either way.
        exact: compute the true gradient of L + lambda * ||grad L|| by double backward instead of
            the first-order update; slow, meant for small models and as a reference.
            `normalize_first_grad` does not apply to it.
        warmup: GR warmup over the first `warmup_steps` steps, with f = min(1, step / warmup_steps)
            and steps counted from 0: "r" uses r * f (alpha fixed), "lambda" alpha * f (r fixed),
            "zero" takes plain steps (one pass, g = g1) while f < 1; "none" (default) has none.
        warmup_steps: length of the GR warmup in steps; > 0 unless warmup is "none".
        gnp_probability: each step is a GNP step with this probability and a plain step (one
            pass, g = g1) otherwise; 1 (default) makes every step a GNP step.
        seed: seeds the draws of `gnp_probability`; the draw of step k depends only on
            (seed, k), so every DDP replica and a resumed run make the same draws.
        grad_scaler: a `torch.amp.GradScaler` for float16 autocast: both passes are scaled and
            unscaled, and a step whose gradients hold an inf or NaN is skipped. Not with `exact`.

    Each step zeroes the gradients, runs the closure once or twice (twice for a GNP step with
    alpha > 0), combines, averages over DDP replicas, clips and calls `base_optimizer.step()`.
    The closure computes the loss (it may return `(loss, aux)`) and never calls backward. Both
    passes see the same random numbers (dropout, stochastic depth), and the random state
    afterwards is the one the first pass left. Parameters that get no gradient are treated as
    having a zero gradient.

    After a step these attributes describe it (tensors detached, 0-dim, on the device, produced
    without host synchronisation):
        last_output, perturbed_output: the closure's aux in the first and the second pass (None
            if it returned only a loss); perturbed_loss: the second pass's loss. A one-pass step
            reports its only pass as both.
        grad_norm: ||g1|| (under DDP without `sync_perturbation`, this replica's).
        final_grad_norm: the global norm of the gradient handed to the base optimizer, after the
            DDP average and the clip (inf or NaN on a skipped float16 step).
        step_r, step_alpha: Python floats, the scheduled r and alpha of the step (a "zero" warmup
            schedules r = 0; a hybrid plain step keeps the schedule's values).
        two_pass: whether the step ran two passes.
        step_skipped: bool tensor, True when a float16 step was skipped for an inf or NaN.
    `steps_taken` counts the calls of `step` (skipped ones too, like a learning-rate scheduler).
    """

    def __init__(
        self,
        model: nn.Module,
        base_optimizer: torch.optim.Optimizer,
        r: float = 0.1,
        alpha: float = 0.8,
        normalize_first_grad: bool = True,
        l2: float = 0.0,
        max_grad_norm: float | None = None,
        sync_perturbation: bool = False,
        exact: bool = False,
        warmup: str = "none",
        warmup_steps: int = 0,
        gnp_probability: float = 1.0,
        seed: int = 0,
        grad_scaler: torch.amp.GradScaler | None = None,
    ):
        _check_number("r", r, "a finite number >= 0 (0 trains with the base optimizer alone)",
                      lambda v: v >= 0)
        _check_number("alpha", alpha, "a number in [0, 1] (1 is SAM, 0 the base optimizer)",
                      lambda v: 0 <= v <= 1)
        _check_number("l2", l2, "a finite number >= 0 (0 turns the in-loss L2 term off)",
                      lambda v: v >= 0)
        if max_grad_norm is not None:
            _check_number("max_grad_norm", max_grad_norm, "a number > 0, or None for no clipping",
                          lambda v: v > 0)
        if warmup not in WARMUPS:
            raise ValueError(f"warmup={warmup!r} is invalid: warmup must be one of {', '.join(WARMUPS)}")
        if not _is_int(warmup_steps) or warmup_steps < 0:
            raise ValueError(f"warmup_steps={warmup_steps!r} is invalid: warmup_steps must be an integer >= 0")
        if warmup != "none" and warmup_steps == 0:
            raise ValueError(f"warmup_steps=0 is invalid: warmup={warmup!r} needs warmup_steps > 0 "
                             "(or warmup='none')")
        _check_number("gnp_probability", gnp_probability,
                      "a number in (0, 1] (1 makes every step a GNP step)", lambda v: 0 < v <= 1)
        if not _is_int(seed):
            raise ValueError(f"seed={seed!r} is invalid: seed must be an integer")
        if not isinstance(base_optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"base_optimizer must be a torch.optim.Optimizer, got {type(base_optimizer).__name__}"
            )
        for index, group in enumerate(base_optimizer.param_groups):
            if "l2" in group:
                _check_number(f"param_groups[{index}]['l2']", group["l2"],
                              "a finite number >= 0 (it replaces l2 for that group)", lambda v: v >= 0)
        self._ddp = isinstance(model, DistributedDataParallel)
        if exact and self._ddp:
            raise ValueError(
                "exact=True is a single-process reference and does not support "
                "DistributedDataParallel; use exact=False or an unwrapped model"
            )
        if exact and grad_scaler is not None and grad_scaler.is_enabled():
            raise ValueError("exact=True does not support grad_scaler (float16 loss scaling); "
                             "use exact=False, or train in float32 / bfloat16 without a scaler")
        self.model = model
        self.base_optimizer = base_optimizer
        self.r = float(r)
        self.alpha = float(alpha)
        self.normalize_first_grad = bool(normalize_first_grad)
        self.l2 = float(l2)
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.sync_perturbation = bool(sync_perturbation)
        self.exact = bool(exact)
        self.warmup = warmup
        self.warmup_steps = warmup_steps
        self.gnp_probability = float(gnp_probability)
        self.seed = seed
        self.grad_scaler = grad_scaler
        if not self._parameters():
            raise ValueError("base_optimizer has no parameters that require a gradient")
        self.steps_taken = 0
        self.last_output: Any = None
        self.perturbed_output: Any = None
        self.grad_norm: torch.Tensor | None = None
        self.perturbed_loss: torch.Tensor | None = None
        self.final_grad_norm: torch.Tensor | None = None
        self.step_r: float | None = None
        self.step_alpha: float | None = None
        self.two_pass = False
        self.step_skipped: torch.Tensor | None = None

    @property
    def param_groups(self) -> list[dict]:
        """The base optimizer's parameter groups (learning rates and other settings)."""
        return self.base_optimizer.param_groups

    def zero_grad(self) -> None:
        """Set every gradient of the model and the base optimizer to None."""
        self.model.zero_grad(set_to_none=True)
        self.base_optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: the base optimizer's state (momentum buffers, step counts),
        the steps taken (they drive the GR warmup and the hybrid draws) and the scaler's state."""
        state = {"base_optimizer": self.base_optimizer.state_dict(), "steps_taken": self.steps_taken}
        if self.grad_scaler is not None:
            state["grad_scaler"] = self.grad_scaler.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "base_optimizer" not in state_dict:
            raise ValueError(
                "state_dict has no 'base_optimizer' entry; pass a dict made by "
                "GradientNormPenalty.state_dict()"
            )
        if self.grad_scaler is not None and "grad_scaler" not in state_dict:
            raise ValueError("state_dict has no 'grad_scaler' entry but this GradientNormPenalty has a "
                             "grad_scaler; resume with the precision the state was saved with")
        self.base_optimizer.load_state_dict(state_dict["base_optimizer"])
        # A state saved before steps were counted had neither GR warmup nor hybrid steps.
        self.steps_taken = int(state_dict.get("steps_taken", 0))
        if self.grad_scaler is not None:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])

    @torch.no_grad()
    def step(self, closure: Closure) -> torch.Tensor:
        """Take one step on the batch the closure evaluates; return the first pass's loss (detached)."""
        params = self._parameters()
        device = params[0].device
        r, alpha, gnp_step = self._schedule(self.steps_taken)
        scale = self._loss_scale(device)
        self.zero_grad()
        replicas_differ = False
        if self.exact:
            loss = self._exact_gradient(closure, params, alpha * r if gnp_step else 0.0)
        elif gnp_step and (alpha > 0 or self.normalize_first_grad):
            loss, replicas_differ = self._first_order_gradient(closure, params, r, alpha, scale)
        else:
            loss = self._plain_gradient(closure, params, scale)
        if replicas_differ:
            self._average_over_replicas(params)
        grads = [p.grad for p in params]
        if scale is not None:
            # GradScaler looks for inf/NaN (and so decides the skip) in the gradients it unscales
            # itself: hand it the final gradient in scaled units. Scales are powers of two, so
            # scaling back and forth is exact.
            torch._foreach_mul_(grads, scale)
            self.grad_scaler.unscale_(self.base_optimizer)
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        self.final_grad_norm = _global_norm(grads)
        if scale is None:
            self.base_optimizer.step()
            self.step_skipped = torch.zeros((), dtype=torch.bool, device=device)
        else:
            # Skips on inf/NaN; a fused optimizer takes the decision on the device, any other waits for it here.
            self.grad_scaler.step(self.base_optimizer)
            self.grad_scaler.update()  # after a skip: scale * backoff_factor
            self.step_skipped = self._loss_scale(device) < scale
        self.steps_taken += 1
        self.step_r, self.step_alpha = r, alpha
        return loss

    def _schedule(self, step: int) -> tuple[float, float, bool]:
        """r and alpha in force at `step` (counted from 0), and whether it is a GNP step (else plain)."""
        progress = 1.0 if self.warmup == "none" else min(1.0, step / self.warmup_steps)
        r = self.r * progress if self.warmup == "r" else self.r
        alpha = self.alpha * progress if self.warmup == "lambda" else self.alpha
        if self.warmup == "zero" and progress < 1:
            return 0.0, alpha, False
        # An r warmup starts from r = 0 and still takes two passes there (g2 = g1), as the
        # official step does; only a configured r = 0 means plain training.
        return r, alpha, self.r > 0 and self._draws_gnp(step)

    def _draws_gnp(self, step: int) -> bool:
        """The hybrid draw of `step`: True (a GNP step) with probability `gnp_probability`.

        Drawn on the host from (seed, step) alone: no device synchronisation, torch's generators
        untouched, the same on every replica and again after a resume.
        """
        if self.gnp_probability == 1:
            return True
        return random.Random(f"{self.seed}:{step}").random() < self.gnp_probability

    def _loss_scale(self, device: torch.device) -> torch.Tensor | None:
        """The scaler's current scale as a 0-dim tensor on `device`; None without an enabled scaler."""
        if self.grad_scaler is None or not self.grad_scaler.is_enabled():
            return None
        return self.grad_scaler.scale(torch.ones((), device=device))

    def _parameters(self) -> list[nn.Parameter]:
        seen, params = set(), []
        for group in self.base_optimizer.param_groups:
            for p in group["params"]:
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        return params

    def _l2_groups(self) -> list[tuple[float, list[nn.Parameter]]]:
        """(coefficient, parameters) of each param group with an in-loss L2 term."""
        groups = []
        for group in self.base_optimizer.param_groups:
            coefficient = float(group.get("l2", self.l2))
            params = [p for p in group["params"] if p.requires_grad]
            if coefficient and params:
                groups.append((coefficient, params))
        return groups

    def _plain_gradient(self, closure: Closure, params: list[nn.Parameter],
                        scale: torch.Tensor | None) -> torch.Tensor:
        """g = g1: one ordinary pass, synchronised by DDP as in plain training."""
        loss, aux, first = self._forward_backward(closure, params, sync=True, scale=scale)
        self.grad_norm = _global_norm(first)
        self._record(loss, aux, loss, aux, two_pass=False)
        return loss

    def _first_order_gradient(
        self, closure: Closure, params: list[nn.Parameter], r: float, alpha: float,
        scale: torch.Tensor | None,
    ) -> tuple[torch.Tensor, bool]:
        """Leave the first-order update direction in each `p.grad`.

        Returns the first pass's loss and whether the gradients still differ between DDP
        replicas (then the caller averages them).
        """
        local_first_pass = self._ddp and not self.sync_perturbation
        rng_before = _rng_state(params)
        loss, aux, direction = self._forward_backward(
            closure, params, sync=not local_first_pass, scale=scale
        )
        norm = _global_norm(direction)
        self.grad_norm = norm
        torch._foreach_div_(direction, norm.clamp_min(_NORM_FLOOR))  # g1 / ||g1||
        if alpha == 0:
            self._record(loss, aux, loss, aux, two_pass=False)
            return loss, local_first_pass

        rng_after = _rng_state(params)
        saved_params = _copies(params)
        running_stats = running_statistics(self.model)
        saved_stats = _copies(running_stats)
        torch._foreach_add_(params, direction, alpha=r)
        # An autocast region around `step` caches low-precision copies of the weights and would
        # hand pass 2 (and whatever follows the step) the copies of weights no longer current.
        torch.clear_autocast_cache()
        for p in params:
            p.grad = None  # the first pass's gradients live on in `direction`
        _set_rng_state(rng_before)
        perturbed_loss, perturbed_aux, perturbed = self._forward_backward(
            closure, params, sync=False, scale=scale
        )
        _set_rng_state(rng_after)
        torch._foreach_copy_(params, saved_params)
        torch.clear_autocast_cache()
        if running_stats:
            torch._foreach_copy_(running_stats, saved_stats)

        if not self.normalize_first_grad:
            torch._foreach_mul_(direction, norm)  # back to g1
        # perturbed <- alpha * g2 + (1 - alpha) * direction, in place in p.grad. An inf or NaN in
        # g1 makes `direction` NaN (inf / inf), which this carries into g even at alpha = 1
        # (0 * NaN = NaN), so the scaler's check of the final gradient sees either pass's overflow.
        torch._foreach_lerp_(perturbed, direction, 1.0 - alpha)
        self._record(loss, aux, perturbed_loss, perturbed_aux, two_pass=True)
        return loss, self._ddp

    def _record(self, loss: torch.Tensor, aux: Any, perturbed_loss: torch.Tensor, perturbed_aux: Any,
                two_pass: bool) -> None:
        self.last_output = aux
        self.perturbed_loss, self.perturbed_output = perturbed_loss, perturbed_aux
        self.two_pass = two_pass

    def _exact_gradient(self, closure: Closure, params: list[nn.Parameter], penalty: float) -> torch.Tensor:
        """Set `p.grad` to grad(L + lambda * ||grad L||) = g1 + lambda * H g1 / ||g1||, lambda = `penalty`."""
        with torch.enable_grad():
            loss, aux = _loss_and_aux(closure())
            objective = loss + self._l2_term()
            grads = torch.autograd.grad(
                objective, params, create_graph=penalty > 0, materialize_grads=True
            )
            squared_norm = torch.stack([g.pow(2).sum() for g in grads]).sum()
            # Floored before the square root, so a zero gradient has a zero (not NaN) derivative.
            norm = squared_norm.clamp_min(_NORM_FLOOR**2).sqrt()
            if penalty > 0 and norm.requires_grad:
                hessian_direction = torch.autograd.grad(norm, params, materialize_grads=True)
            else:
                hessian_direction = [torch.zeros_like(p) for p in params]
        for p, g, hg in zip(params, grads, hessian_direction):
            p.grad = g.detach() + penalty * hg
        self.grad_norm = squared_norm.detach().sqrt()
        loss, aux = loss.detach(), _detach(aux)
        self._record(loss, aux, loss, aux, two_pass=False)
        return loss

    def _l2_term(self) -> torch.Tensor | float:
        """0.5 * l2 * ||theta||^2, with each param group's coefficient."""
        return sum((0.5 * coefficient * torch.stack([p.pow(2).sum() for p in params]).sum()
                    for coefficient, params in self._l2_groups()), 0.0)

    def _forward_backward(
        self, closure: Closure, params: list[nn.Parameter], sync: bool, scale: torch.Tensor | None
    ) -> tuple[torch.Tensor, Any, list[torch.Tensor]]:
        """One pass: run the closure and backpropagate; return the loss and aux (detached) and the
        gradients (unscaled, plus L2).

        `sync=False` keeps the pass local to this DDP replica; `scale` multiplies the loss before
        backward (float16 loss scaling).
        """
        local = self.model.no_sync() if self._ddp and not sync else nullcontext()
        with local, torch.enable_grad():
            loss, aux = _loss_and_aux(closure())
            (loss if scale is None else loss * scale).backward()
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
        if scale is not None:
            torch._foreach_mul_(grads, scale.double().reciprocal().float())  # as GradScaler unscales
        for coefficient, group_params in self._l2_groups():
            # grad of 0.5 * l2 * ||theta||^2
            torch._foreach_add_([p.grad for p in group_params], group_params, alpha=coefficient)
        return loss.detach(), _detach(aux), grads

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


def _check_number(name: str, value: Any, allowed: str, ok: Callable[[float], bool]) -> None:
    valid = (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and ok(value)
    )
    if not valid:
        raise ValueError(f"{name}={value!r} is invalid: {name} must be {allowed}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _loss_and_aux(output: Any) -> tuple[torch.Tensor, Any]:
    loss, aux = output if isinstance(output, (tuple, list)) else (output, None)
    if not (isinstance(loss, torch.Tensor) and loss.numel() == 1):
        raise TypeError(
            "the closure must return a scalar loss tensor or (loss, aux), "
            f"got {type(loss).__name__} as the loss"
        )
    return loss, aux


def _detach(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, (tuple, list)):
        return type(value)(_detach(v) for v in value)
    if isinstance(value, dict):
        return {k: _detach(v) for k, v in value.items()}
    return value


def _global_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """L2 norm of all tensors together, computed on the device (no host synchronisation)."""
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors)))


def _copies(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    copies = [torch.empty_like(t) for t in tensors]
    if tensors:
        torch._foreach_copy_(copies, tensors)
    return copies


def running_statistics(model: nn.Module) -> list[torch.Tensor]:
    """Running-statistics buffers (mean, variance, batch counter) of the model's norm layers."""
    return [
        buffer
        for module in model.modules()
        if isinstance(module, _NormBase) and module.track_running_stats
        for buffer in (module.running_mean, module.running_var, module.num_batches_tracked)
        if buffer is not None
    ]


RngState = tuple[torch.Tensor, dict[int, torch.Tensor]]


def _rng_state(params: list[nn.Parameter]) -> RngState:
    """The CPU generator's state and that of every CUDA device holding parameters."""
    cuda_devices = {p.device.index for p in params if p.device.type == "cuda"}
    cuda = {i: torch.cuda.get_rng_state(i) for i in cuda_devices}
    return torch.get_rng_state(), cuda


def _set_rng_state(state: RngState) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    for index, cuda_state in cuda.items():
        torch.cuda.set_rng_state(cuda_state, index)
