"""Gradient-norm penalty (Zhao, Zhang, Hu, ICML 2022): minimise L(theta) + lambda * ||grad L(theta)||.

The first-order update, with lambda = alpha * r:

    g1 = grad L(theta)
    g2 = grad L(theta + r * g1 / ||g1||)          (SAM's perturbation)
    g  = (1 - alpha) * g1 / ||g1|| + alpha * g2    normalize_first_grad=True, the authors' code
    g  = (1 - alpha) * g1 + alpha * g2             normalize_first_grad=False, the paper's formula

alpha = 1 is SAM with rho = r. `exact=True` computes the true gradient of the objective instead,
g1 + lambda * H g1 / ||g1||, by double backward: the reference the first-order update converges to.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from gnp.methods.base import NORM_FLOOR, Closure, Gradient, Pass, SettingError, check_number, detach, loss_and_aux
from gnp.methods.sam import SAM


class GNP(SAM):
    """The gradient-norm penalty around any torch optimizer.

    Args (beyond those of `TwoPassMethod` and `Method`):
        r: perturbation radius (>= 0); 0 is plain training with the base optimizer.
        alpha: weight of the perturbed gradient, in [0, 1]; the penalty coefficient is lambda = alpha * r.
        normalize_first_grad: the (1 - alpha) term uses g1 / ||g1|| (True, the authors' code) or g1 (False).
        exact: the true gradient of L + lambda * ||grad L|| by double backward (one process, no float16
            scaler; slow: meant for small models and as a reference). normalize_first_grad does not apply;
            a step of several shards averages each shard's exact gradient.
        warmup: also "lambda": alpha * f with r fixed, during the warmup.
    """

    warmups = (*SAM.warmups, "lambda")
    label_settings = ("r", "alpha")
    setting_help = {
        "alpha": "weight of the perturbed gradient, in [0, 1] (1 = SAM, 0 = the base optimizer); penalty lambda = "
                 "alpha * r",
        "normalize_first_grad": "true (the authors' code): the (1 - alpha) term uses g1 / ||g1||; false gives the "
                                "paper's (1 - alpha) * g1",
        "exact": "true: the exact gradient of L + alpha*r*||grad L|| by double backward (small models)",
        "warmup": "GR warmup (follow-up paper) over warmup_epochs: none | r (r grows linearly) | lambda (alpha grows "
                  "linearly) | zero (plain steps)",
        "two_pass_probability": "hybrid training: each step is a GNP step with this probability, else plain",
    }

    def __init__(self, model: nn.Module, base_optimizer: torch.optim.Optimizer, r: float = 0.1, alpha: float = 0.8,
                 *, normalize_first_grad: bool = True, exact: bool = False, **settings):
        check_number("alpha", alpha, "a number in [0, 1] (1 is SAM, 0 the base optimizer)", lambda v: 0 <= v <= 1)
        super().__init__(model, base_optimizer, r, **settings)
        if exact and self.ddp:
            raise SettingError("exact", exact, "False under DistributedDataParallel (exact mode is a single-process "
                                               "reference): use exact=False or an unwrapped model")
        if exact and self.grad_scaler is not None:
            raise SettingError("exact", exact, "False with a grad_scaler (float16 loss scaling): use exact=False, or "
                                               "train in float32 / bfloat16 without a scaler")
        self.alpha = float(alpha)
        self.normalize_first_grad = bool(normalize_first_grad)
        self.exact = bool(exact)

    def check_shards(self, shards: int) -> None:
        if self.exact and self.sync_perturbation and shards > 1:
            raise SettingError("sync_perturbation", True, "False with exact=True and several shards (exact mode "
                                                          "penalises each shard's own gradient norm)")

    def schedule(self, step: int) -> tuple[dict[str, float], bool]:
        schedule, perturbs = super().schedule(step)
        alpha = self.alpha * self.warmup_progress(step) if self.warmup == "lambda" else self.alpha
        # alpha = 0 needs the first pass only, normalised or (the paper's formula) not.
        return {**schedule, "alpha": alpha}, perturbs and (alpha > 0 or self.normalize_first_grad)

    def needs_second_pass(self, schedule: dict[str, float]) -> bool:
        return schedule["alpha"] > 0

    def combine(self, g2: list[torch.Tensor], direction: list[torch.Tensor], g1_norm: torch.Tensor,
                schedule: dict[str, float]) -> None:
        if not self.normalize_first_grad:
            torch._foreach_mul_(direction, g1_norm)  # back to g1
        torch._foreach_lerp_(g2, direction, 1.0 - schedule["alpha"])  # g2 <- alpha * g2 + (1 - alpha) * direction

    def gradient(self, closure: Closure, params: list[nn.Parameter], scale: torch.Tensor | None) -> Gradient:
        if not self.exact:
            return super().gradient(closure, params, scale)
        schedule, perturbs = self.schedule(self.steps_taken)
        penalty = schedule["alpha"] * schedule["r"] if perturbs else 0.0
        with torch.enable_grad():
            loss, aux = loss_and_aux(closure())
            grads = torch.autograd.grad(loss + self.l2_term(), params, create_graph=penalty > 0,
                                        materialize_grads=True)
            squared_norm = torch.stack([g.pow(2).sum() for g in grads]).sum()
            # Floored before the square root, so a zero gradient has a zero (not NaN) derivative.
            norm = squared_norm.clamp_min(NORM_FLOOR**2).sqrt()
            if penalty > 0 and norm.requires_grad:
                hessian_direction = torch.autograd.grad(norm, params, materialize_grads=True)
            else:
                hessian_direction = [torch.zeros_like(p) for p in params]
        for p, g, hg in zip(params, grads, hessian_direction):
            p.grad = g.detach() + penalty * hg
        first = Pass(loss.detach(), detach(aux), [p.grad for p in params])
        return Gradient(first, first, squared_norm.detach().sqrt(), replicas_differ=False, schedule=schedule)
