"""GSAM (Zhuang et al., ICLR 2022, "Surrogate Gap Guided Sharpness-Aware Minimization"): SAM's gradient minus
the part of g1 orthogonal to it, which lowers the surrogate gap L(theta + e) - L(theta) without raising the
perturbed loss.

    g1 = grad L(theta),   g2 = grad L(theta + r_t * g1 / ||g1||)
    g1_perp = g1 - (<g1, g2> / ||g2||^2) * g2
    g = g2 - alpha * g1_perp

r_t follows the learning rate when `r_min` is set (the paper's schedule): r_t = r_min + (r - r_min) * lr_t / lr_0,
with lr_t the learning rate of the base optimizer's first param group at the step and lr_0 its initial one (a
schedule that decays to 0, as this suite's cosine does; rho_max = r, rho_min = r_min in the paper). With
`r_min=None`, r_t = r.

Against the authors' code (juntang-zhuang/GSAM) and pytorch_optimizer's GSAM, which it equals (tests): their
`ProportionScheduler(max_lr=lr_0, min_lr=0, max_value=r, min_value=r_min)` is the schedule above, read from
the learning rate in force at the step; their norms add `perturb_eps` (1e-12) to ||g1|| and ||g2|| where this
floors them at 1e-12, the same for any gradient that is not zero; their weight decay is the base optimizer's
(`optimizer.weight_decay_mode=optimizer` here: l2 = 0), while an in-loss L2 (`l2`) enters g1 and g2 as their
closure's loss would. Their example trains WRN-16-8 on CIFAR-10 with the adaptive perturbation (rho 2.0,
alpha 0.2); this class perturbs along g1 / ||g1|| (SAM's), as the paper's ImageNet runs do.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from gnp.methods.base import NORM_FLOOR, check_number, dot, global_norm
from gnp.methods.sam import SAM


class GSAM(SAM):
    """Surrogate-gap guided SAM around any torch optimizer.

    Args (beyond those of `TwoPassMethod` and `Method`):
        r: the perturbation radius (rho_max when `r_min` is set), >= 0.
        alpha: weight of the orthogonal part of g1 that the step ascends, >= 0 (0 is SAM).
        r_min: None (r_t = r) or the radius when the learning rate reaches 0, in [0, r]: r_t follows lr_t.
    """

    step_overhead = 0.05
    label_settings = ("r", "alpha")
    setting_help = {
        "r": "perturbation radius (rho_max when r_min is set)",
        "alpha": "weight of g1's part orthogonal to g2, which the step ascends (0 = SAM)",
        "r_min": "null: a constant r; a number in [0, r]: r follows the learning rate down to it",
    }

    def __init__(self, model: nn.Module, base_optimizer: torch.optim.Optimizer, r: float = 0.05,
                 alpha: float = 0.2, *, r_min: float | None = None, **settings):
        check_number("alpha", alpha, "a number >= 0 (0 is SAM)", lambda v: v >= 0)
        if r_min is not None:
            check_number("r_min", r_min, f"null (a constant r) or a number in [0, r={r}]", lambda v: 0 <= v <= r)
        super().__init__(model, base_optimizer, r, **settings)
        self.alpha = float(alpha)
        self.r_min = None if r_min is None else float(r_min)

    def schedule(self, step: int) -> tuple[dict[str, float], bool]:
        schedule, perturbs = super().schedule(step)
        if self.r_min is not None and self.r:
            group = self.param_groups[0]
            lr_fraction = group["lr"] / group.get("initial_lr", group["lr"])
            schedule["r"] *= (self.r_min + (self.r - self.r_min) * lr_fraction) / self.r
        return {**schedule, "alpha": self.alpha}, perturbs

    def combine(self, g2: list[torch.Tensor], direction: list[torch.Tensor], g1_norm: torch.Tensor,
                schedule: dict[str, float]) -> None:
        torch._foreach_mul_(direction, g1_norm)  # back to g1
        along = dot(direction, g2) / global_norm(g2).square().clamp_min(NORM_FLOOR**2)
        # g2 - alpha * (g1 - along * g2) = (1 + alpha * along) * g2 - alpha * g1
        torch._foreach_mul_(g2, 1 + self.alpha * along)
        torch._foreach_add_(g2, direction, alpha=-self.alpha)
