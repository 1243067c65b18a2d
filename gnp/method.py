"""Gradient-norm penalty (GNP): penalise ||grad L|| by wrapping any torch optimizer.

Zhao, Zhang and Hu (ICML 2022) minimise L(theta) + lambda * ||grad L(theta)||. The first-order
update, with lambda = alpha * r, is

    g1 = grad L(theta)
    g2 = grad L(theta + r * g1 / ||g1||)        same batch, same dropout randomness
    g  = (1 - alpha) * g1 / ||g1|| + alpha * g2  (normalize_first_grad=True, the official code)
    g  = (1 - alpha) * g1 + alpha * g2           (normalize_first_grad=False, the paper's formula)

and the base optimizer steps from theta with g. alpha = 1 is SAM with rho = r; r = 0 is plain
training with the base optimizer.
"""
from __future__ import annotations

import math
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
            enters the perturbation and its norm (the official CNN recipes). Decoupled weight
            decay belongs to the base optimizer.
        max_grad_norm: clip the final combined gradient to this global L2 norm (None: no
            clipping; the official default is 5.0).
        sync_perturbation: under DDP, average g1 over replicas before perturbing (True) or let
            each replica perturb with its own shard's g1 (False, the official default). The
            combined gradient is averaged over replicas once per step either way.
        exact: compute the true gradient of L + lambda * ||grad L|| by double backward instead of
            the first-order update; slow, meant for small models and as a reference.
            `normalize_first_grad` does not apply to it.

    Each step zeroes the gradients, runs the closure once or twice (twice when r > 0 and
    alpha > 0), combines, averages over DDP replicas, clips and calls `base_optimizer.step()`.
    The closure computes the loss (it may return `(loss, aux)`) and never calls backward. Both
    passes see the same random numbers (dropout, stochastic depth), and the random state
    afterwards is the one the first pass left. Parameters that get no gradient are treated as
    having a zero gradient.

    After a step, `last_output` holds the first pass's `aux` (detached; None if the closure
    returned only a loss) and `grad_norm` holds ||g1|| as a detached 0-dim tensor (under DDP
    without `sync_perturbation`, this replica's).
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
        if not isinstance(base_optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"base_optimizer must be a torch.optim.Optimizer, got {type(base_optimizer).__name__}"
            )
        self._ddp = isinstance(model, DistributedDataParallel)
        if exact and self._ddp:
            raise ValueError(
                "exact=True is a single-process reference and does not support "
                "DistributedDataParallel; use exact=False or an unwrapped model"
            )
        self.model = model
        self.base_optimizer = base_optimizer
        self.r = float(r)
        self.alpha = float(alpha)
        self.normalize_first_grad = bool(normalize_first_grad)
        self.l2 = float(l2)
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.sync_perturbation = bool(sync_perturbation)
        self.exact = bool(exact)
        if not self._parameters():
            raise ValueError("base_optimizer has no parameters that require a gradient")
        self.last_output: Any = None
        self.grad_norm: torch.Tensor | None = None

    @property
    def param_groups(self) -> list[dict]:
        """The base optimizer's parameter groups (learning rates and other settings)."""
        return self.base_optimizer.param_groups

    def zero_grad(self) -> None:
        """Set every gradient of the model and the base optimizer to None."""
        self.model.zero_grad(set_to_none=True)
        self.base_optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: the base optimizer's state (momentum buffers, step counts)."""
        return {"base_optimizer": self.base_optimizer.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "base_optimizer" not in state_dict:
            raise ValueError(
                "state_dict has no 'base_optimizer' entry; pass a dict made by "
                "GradientNormPenalty.state_dict()"
            )
        self.base_optimizer.load_state_dict(state_dict["base_optimizer"])

    @torch.no_grad()
    def step(self, closure: Closure) -> torch.Tensor:
        """Take one step on the batch the closure evaluates; return the first pass's loss (detached)."""
        params = self._parameters()
        self.zero_grad()
        if self.exact:
            loss = self._exact_gradient(closure, params)
            replicas_differ = False
        else:
            loss, replicas_differ = self._first_order_gradient(closure, params)
        if replicas_differ:
            self._average_over_replicas(params)
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        self.base_optimizer.step()
        return loss

    def _parameters(self) -> list[nn.Parameter]:
        seen, params = set(), []
        for group in self.base_optimizer.param_groups:
            for p in group["params"]:
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        return params

    def _first_order_gradient(
        self, closure: Closure, params: list[nn.Parameter]
    ) -> tuple[torch.Tensor, bool]:
        """Leave the first-order update direction in each `p.grad`.

        Returns the first pass's loss and whether the gradients still differ between DDP
        replicas (then the caller averages them).
        """
        if self.r == 0 or (self.alpha == 0 and not self.normalize_first_grad):
            # g = g1: one ordinary pass, synchronised by DDP as in plain training.
            loss, first = self._forward_backward(closure, params, sync=True, record=True)
            self.grad_norm = _global_norm(first)
            return loss, False

        local_first_pass = self._ddp and not self.sync_perturbation
        rng_before = _rng_state(params)
        loss, direction = self._forward_backward(
            closure, params, sync=not local_first_pass, record=True
        )
        norm = _global_norm(direction)
        self.grad_norm = norm
        torch._foreach_div_(direction, norm.clamp_min(_NORM_FLOOR))  # g1 / ||g1||
        if self.alpha == 0:
            return loss, local_first_pass

        rng_after = _rng_state(params)
        saved_params = _copies(params)
        running_stats = _running_stats(self.model)
        saved_stats = _copies(running_stats)
        torch._foreach_add_(params, direction, alpha=self.r)
        # An autocast region around `step` caches low-precision copies of the weights and would
        # hand pass 2 (and whatever follows the step) the copies of weights no longer current.
        torch.clear_autocast_cache()
        for p in params:
            p.grad = None  # the first pass's gradients live on in `direction`
        _set_rng_state(rng_before)
        _, perturbed = self._forward_backward(closure, params, sync=False, record=False)
        _set_rng_state(rng_after)
        torch._foreach_copy_(params, saved_params)
        torch.clear_autocast_cache()
        if running_stats:
            torch._foreach_copy_(running_stats, saved_stats)

        if not self.normalize_first_grad:
            torch._foreach_mul_(direction, norm)  # back to g1
        # perturbed <- alpha * g2 + (1 - alpha) * direction, in place in p.grad
        torch._foreach_lerp_(perturbed, direction, 1.0 - self.alpha)
        return loss, self._ddp

    def _exact_gradient(self, closure: Closure, params: list[nn.Parameter]) -> torch.Tensor:
        """Set `p.grad` to grad(L + lambda * ||grad L||) = g1 + lambda * H g1 / ||g1||."""
        penalty = self.alpha * self.r
        with torch.enable_grad():
            loss, aux = _loss_and_aux(closure())
            objective = loss + self._l2_term(params)
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
        self.last_output = _detach(aux)
        return loss.detach()

    def _l2_term(self, params: list[nn.Parameter]) -> torch.Tensor | float:
        if self.l2 == 0:
            return 0.0
        return 0.5 * self.l2 * torch.stack([p.pow(2).sum() for p in params]).sum()

    def _forward_backward(
        self, closure: Closure, params: list[nn.Parameter], sync: bool, record: bool
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One pass: run the closure, backpropagate, return the loss and the gradients (plus L2).

        `sync=False` keeps the pass local to this DDP replica; `record` stores the closure's aux.
        """
        local = self.model.no_sync() if self._ddp and not sync else nullcontext()
        with local, torch.enable_grad():
            loss, aux = _loss_and_aux(closure())
            loss.backward()
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
        if self.l2:
            torch._foreach_add_(grads, params, alpha=self.l2)  # grad of 0.5 * l2 * ||theta||^2
        if record:
            self.last_output = _detach(aux)
        return loss.detach(), grads

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


def _running_stats(model: nn.Module) -> list[torch.Tensor]:
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
