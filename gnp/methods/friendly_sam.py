"""FriendlySAM (Li et al., CVPR 2024, "Friendly Sharpness-Aware Minimization"): SAM perturbed along the batch
gradient less an estimate of the full gradient, an exponential average of past batch gradients.

    g1 = grad L(theta)
    d  = g1 - sigma * m          (d = g1 at the first step, when there is no m yet)
    g  = grad L(theta + r * d / ||d||)
    m <- lmbda * m + (1 - lmbda) * g1      (m = g1 after the first step)

As the authors' code (nblt/F-SAM, `FriendlySAM`) and pytorch_optimizer's FriendlySAM, which it equals (tests):
their `1e-12` is added to ||d|| where this floors it at 1e-12; their weight decay is the base optimizer's
(`optimizer.weight_decay_mode=optimizer` here); an in-loss L2 (`l2`) enters g1, and so m and d. The authors'
CIFAR-100 ResNet-18 recipe (run.sh): SGD lr 0.05, batch 128, weight decay 1e-3, cutout, cosine, 200 epochs,
r 0.2, sigma 1, lmbda 0.95.

m is part of the state dict. It is one average for the whole batch: with several shards, and under DDP, it
averages the mean g1 of the step's shards and replicas (one all-reduce more per step without
sync_perturbation), which is the batch gradient the authors' single device averages; each shard still
perturbs along its own g1 - sigma * m. A float16 step that is skipped leaves m as it was, and a plain step
(hybrid training, a "zero" warmup) does not update it.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from gnp.methods.base import ShardMean, check_number, copies, global_norm, keep_unless_skipped
from gnp.methods.sam import SAM
from gnp.methods.two_pass import unit


class FriendlySAM(SAM):
    """Friendly SAM around any torch optimizer.

    Args (beyond those of `TwoPassMethod` and `Method`):
        r: perturbation radius rho, >= 0.
        sigma: how much of the averaged gradient the perturbation leaves out, >= 0 (0 is SAM).
        lmbda: the average's decay, in [0, 1).
    """

    step_overhead = 0.05
    label_settings = ("r", "sigma")
    setting_help = {
        "sigma": "how much of m, the average of past batch gradients, the perturbation leaves out (0 = SAM)",
        "lmbda": "m's exponential decay, in [0, 1)",
    }

    def __init__(self, model: nn.Module, base_optimizer: torch.optim.Optimizer, r: float = 0.2,
                 sigma: float = 1.0, lmbda: float = 0.95, **settings):
        check_number("sigma", sigma, "a number >= 0 (0 is SAM)", lambda v: v >= 0)
        check_number("lmbda", lmbda, "a number in [0, 1)", lambda v: 0 <= v < 1)
        super().__init__(model, base_optimizer, r, **settings)
        self.sigma, self.lmbda = float(sigma), float(lmbda)
        self.average: list[torch.Tensor] | None = None  # m
        self._g1 = ShardMean()

    def schedule(self, step: int) -> tuple[dict[str, float], bool]:
        schedule, perturbs = super().schedule(step)
        return {**schedule, "sigma": self.sigma, "lmbda": self.lmbda}, perturbs

    def direction(self, params: list[nn.Parameter], g1: list[torch.Tensor],
                  g1_norm: torch.Tensor) -> list[torch.Tensor]:
        self._g1.add(g1)
        if self.average is None:
            return unit(g1, g1_norm)
        torch._foreach_add_(g1, self.average, alpha=-self.sigma)
        return unit(g1, global_norm(g1))

    def after_step(self, skipped: torch.Tensor | None) -> None:
        g1 = self._g1.take(self, across_replicas=not self.sync_perturbation)
        if g1 is None:
            return
        if self.average is None:
            self.average = keep_unless_skipped(None, g1, skipped)
        elif skipped is None:
            torch._foreach_lerp_(self.average, g1, 1.0 - self.lmbda)
        else:
            updated = copies(self.average)
            torch._foreach_lerp_(updated, g1, 1.0 - self.lmbda)
            self.average = keep_unless_skipped(self.average, updated, skipped)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "average": self.average}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.average = state_dict.get("average")
