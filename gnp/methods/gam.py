"""GAM (Zhang et al., CVPR 2023, "Gradient Norm Aware Minimization Seeks First-Order Flatness and Improves
Generalization"): the accelerated first-order algorithm the authors release (xxgege/GAM, their Appendix D),
four forward/backward passes per step.

    g0 = grad L(theta)
    g1 = grad L(theta + r * g0 / ||g0||)                          SAM's gradient
    d  = (g1 - g0) / ||g1 - g0||                                  the ascent of ||grad L||, first order
    g2 = grad L(theta + r_norm * d)
    g3 = grad L(theta + r_norm * d + r * g2 / ||g2||)
    g  = beta1 * g1 + (1 - beta1) * g3
    p  = g0 + |1 - beta0| * g2
    g <- g - gamma * (p - <p, g> / ||g||^2 * g)                   the part of p orthogonal to g, descended

In the authors' code r is `grad_rho` (rho'), r_norm `grad_norm_rho` (rho), beta0 and beta1 `grad_beta_0` and
`grad_beta_1` (their `grad_beta_2 = 1 - beta0`, `grad_beta_3 = 1 - beta1`), gamma `grad_gamma`; their CIFAR
recipes (main_cifar.py, ResNet): CIFAR-10 r 0.03, r_norm 0.2, beta0 0.1, beta1 0.1, gamma 0.05; CIFAR-100
r 0.02, r_norm 0.2, beta0 0.5, beta1 0.6, gamma 0.03 (SGD lr 0.1, batch 128, weight decay 5e-4 in the base
optimizer, label smoothing 0.1, 200 epochs, cosine per epoch). Their norms add `perturb_eps` (1e-12) where this
floors them at 1e-12, and they step back from each perturbation by subtracting it where this restores theta
bit for bit; the float64 reference of the tests follows their code otherwise.

Every pass of a step draws the first pass's random numbers and the three perturbed passes leave BatchNorm's
running statistics as the first pass left them. Each shard (each DDP replica's share of the batch, each shard
of `step([...])`) takes its own four passes; the step's gradient is their mean, as in the authors' code.
sync_perturbation and the "r" warmup are refused.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from gnp.methods.base import NORM_FLOOR, Closure, Gradient, SettingError, check_number, copies, dot, global_norm
from gnp.methods.two_pass import TwoPassMethod, rng_state, set_grads, set_rng_state, unit


class GAM(TwoPassMethod):
    """Gradient-norm aware minimisation around any torch optimizer: four passes per perturbed step.

    Args (beyond those of `TwoPassMethod` and `Method`):
        r: radius of the two SAM-like perturbations (the authors' grad_rho), >= 0; 0 is plain training.
        r_norm: radius of the ascent of the gradient norm (grad_norm_rho), >= 0.
        beta0: the weight 1 - beta0 of g2 in the vector whose orthogonal part is descended (grad_beta_0).
        beta1: the weight of g1 against g3 in the gradient (grad_beta_1), in [0, 1].
        gamma: how much of that orthogonal part is descended (grad_gamma), >= 0.
    """

    step_overhead = 0.05

    warmups = ("none", "zero")
    passes = 4
    setting_help = {
        "r": "grad_rho: radius of the two SAM-like perturbations; 0 = plain training",
        "r_norm": "grad_norm_rho: radius of the gradient norm's ascent",
        "beta0": "grad_beta_0 (grad_beta_2 = 1 - beta0)",
        "beta1": "grad_beta_1 (grad_beta_3 = 1 - beta1)",
        "gamma": "grad_gamma",
        "sync_perturbation": "false only: each shard takes its own four passes",
        "warmup": "GR warmup (follow-up paper) over warmup_epochs: none | zero (plain steps)",
        "two_pass_probability": "hybrid training: each step takes its four passes with this probability, else one",
    }

    def __init__(self, model: nn.Module, base_optimizer: torch.optim.Optimizer, r: float = 0.03,
                 r_norm: float = 0.2, beta0: float = 0.1, beta1: float = 0.1, gamma: float = 0.05, **settings):
        check_number("r_norm", r_norm, "a number >= 0", lambda v: v >= 0)
        check_number("beta0", beta0, "a finite number", lambda v: True)
        check_number("beta1", beta1, "a number in [0, 1]", lambda v: 0 <= v <= 1)
        check_number("gamma", gamma, "a number >= 0", lambda v: v >= 0)
        if settings.get("sync_perturbation"):
            raise SettingError("sync_perturbation", True, "false for GAM (each shard takes its own four passes)")
        super().__init__(model, base_optimizer, r, **settings)
        self.r_norm, self.beta0, self.beta1, self.gamma = float(r_norm), float(beta0), float(beta1), float(gamma)

    def schedule(self, step: int) -> tuple[dict[str, float], bool]:
        schedule, perturbs = super().schedule(step)
        return {**schedule, "r_norm": self.r_norm, "beta0": self.beta0, "beta1": self.beta1,
                "gamma": self.gamma}, perturbs

    def gradient(self, closure: Closure, params: list[nn.Parameter], scale: torch.Tensor | None) -> Gradient:
        schedule, perturbs = self.schedule(self.steps_taken)
        if not perturbs:
            return self.plain_gradient(closure, params, scale, schedule)
        rng_before = rng_state(params)
        first = self.forward_backward(closure, params, sync=False, scale=scale)
        rng_after = rng_state(params)
        g0 = first.grads
        g0_norm = global_norm(g0)

        sam = self.perturbed_pass(closure, params, scale, unit(copies(g0), g0_norm), self.r, rng_before)
        g1 = sam.grads
        ascent = torch._foreach_sub(g1, g0)
        ascent = unit(ascent, global_norm(ascent))
        g2 = self.perturbed_pass(closure, params, scale, ascent, self.r_norm, rng_before).grads
        # theta + r_norm * d + r * g2 / ||g2||, as one direction of radius 1
        torch._foreach_mul_(ascent, self.r_norm)
        torch._foreach_add_(ascent, unit(copies(g2), global_norm(g2)), alpha=self.r)
        g3 = self.perturbed_pass(closure, params, scale, ascent, 1.0, rng_before).grads
        set_rng_state(rng_after)

        torch._foreach_lerp_(g3, g1, self.beta1)  # g = beta1 * g1 + (1 - beta1) * g3, in g3's tensors
        torch._foreach_add_(g0, g2, alpha=abs(1.0 - self.beta0))  # p, in g0's tensors
        along = dot(g0, g3) / global_norm(g3).square().clamp_min(NORM_FLOOR**2)
        # g - gamma * (p - along * g) = (1 + gamma * along) * g - gamma * p
        torch._foreach_mul_(g3, 1 + self.gamma * along)
        torch._foreach_add_(g3, g0, alpha=-self.gamma)
        set_grads(params, g3)
        return Gradient(first, sam, g0_norm, self.ddp, schedule, self.passes)
