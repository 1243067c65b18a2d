"""WSAM (Yue et al., KDD 2023, "Sharpness-Aware Minimization Revisited: Weighted Sharpness as a Regularization
Term"): minimise L(theta) + a * (L(theta + e) - L(theta)), a = gamma / (1 - gamma), the sharpness weighted.

    g1 = grad L(theta),   g2 = grad L(theta + r * g1 / ||g1||),   a = gamma / (1 - gamma)
    decoupled=False:  g = (1 - a) * g1 + a * g2 = g1 + a * (g2 - g1), handed to the base optimizer
    decoupled=True:   the base optimizer steps with g1, then theta <- theta - lr * a * (g2 - g1)

gamma = 1/2 is SAM. Without decoupling this is GNP's update with normalize_first_grad=False and alpha = a
(GNP takes alpha in [0, 1], so gamma in [0, 1/2]; WSAM's gamma goes up to 1): tested bit for bit. With
decoupling (the paper's default) the sharpness term is a plain gradient step of its own, at each param
group's learning rate, whatever the base optimizer (momentum or Adam) does with g1.

Against pytorch_optimizer's WSAM, which it equals (tests): its `eps` is added to ||g1|| where this floors it
at 1e-12; its `max_norm` clips g2 before the combination, where `max_grad_norm` here clips the gradient handed
to the base optimizer (g, or g1 when decoupled): the two are equal without clipping. Weight decay in the base
optimizer is `optimizer.weight_decay_mode=optimizer` here; an in-loss L2 (`l2`) enters g1 and g2.

Under DDP (without sync_perturbation) and with several shards, the decoupled sharpness g2 - g1 is each
shard's own, averaged over the shards and the replicas (one all-reduce more per step), as the step's
gradient is. A float16 step that is skipped takes no sharpness step either.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from gnp.methods.base import ShardMean, check_number, global_norm, keep_unless_skipped
from gnp.methods.sam import SAM


class WSAM(SAM):
    """Weighted SAM around any torch optimizer.

    Args (beyond those of `TwoPassMethod` and `Method`):
        r: perturbation radius rho, >= 0.
        gamma: the weight of the sharpness, in [0, 1): a = gamma / (1 - gamma) (1/2 is SAM).
        decoupled: take the sharpness term as a step of its own after the base optimizer's (True, the paper's
            default) or hand the base optimizer g1 + a * (g2 - g1) (False).
    """

    step_overhead = 0.05
    label_settings = ("r", "gamma")
    setting_help = {
        "gamma": "weight of the sharpness, in [0, 1): a = gamma / (1 - gamma) (1/2 = SAM)",
        "decoupled": "true (the paper's default): theta -= lr * a * (g2 - g1) after the base optimizer's step "
                     "with g1; false: the base optimizer gets g1 + a * (g2 - g1) (GNP's paper formula, alpha = a)",
        "max_grad_norm": "clip the gradient handed to the base optimizer to this global norm; null = off",
    }

    def __init__(self, model: nn.Module, base_optimizer: torch.optim.Optimizer, r: float = 0.05,
                 gamma: float = 0.9, *, decoupled: bool = True, **settings):
        check_number("gamma", gamma, "a number in [0, 1) (1/2 is SAM)", lambda v: 0 <= v < 1)
        super().__init__(model, base_optimizer, r, **settings)
        self.gamma = float(gamma)
        self.weight = self.gamma / (1 - self.gamma)
        self.decoupled = bool(decoupled)
        self._sharpness = ShardMean()

    def schedule(self, step: int) -> tuple[dict[str, float], bool]:
        schedule, perturbs = super().schedule(step)
        return {**schedule, "gamma": self.gamma}, perturbs

    def combine(self, g2: list[torch.Tensor], direction: list[torch.Tensor], g1_norm: torch.Tensor,
                schedule: dict[str, float]) -> None:
        torch._foreach_mul_(direction, g1_norm)  # back to g1
        if not self.decoupled:
            torch._foreach_lerp_(g2, direction, 1.0 - self.weight)  # g2 <- a * g2 + (1 - a) * g1
            return
        torch._foreach_sub_(g2, direction)
        self._sharpness.add(g2)
        # GradScaler decides the skip on the gradient it steps with: a second pass's overflow must reach it.
        overflow = global_norm(g2) * 0 if self.grad_scaler is not None else None
        torch._foreach_copy_(g2, direction)  # the base optimizer's gradient is g1
        if overflow is not None:
            g2[0].add_(overflow)

    def after_step(self, skipped: torch.Tensor | None) -> None:
        sharpness = self._sharpness.take(self, across_replicas=not self.sync_perturbation)
        if sharpness is None:
            return
        params = self.parameters()
        if skipped is not None:
            sharpness = keep_unless_skipped([torch.zeros_like(s) for s in sharpness], sharpness, skipped)
        index = {id(p): i for i, p in enumerate(params)}
        for group in self.param_groups:
            members = [index[id(p)] for p in group["params"] if id(p) in index]
            torch._foreach_add_([params[i] for i in members], [sharpness[i] for i in members],
                                alpha=-group["lr"] * self.weight)
