"""SAM (Foret, Kleiner, Mobahi, Neyshabur, ICLR 2021): the gradient at theta + r * g1 / ||g1||.

    g1 = grad L(theta),   g = grad L(theta + r * g1 / ||g1||)

r is SAM's rho (0.05 for CIFAR-10 and 0.1 for CIFAR-100 in the paper). It is GNP with alpha = 1.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from gnp.methods.two_pass import TwoPassMethod, unit


class SAM(TwoPassMethod):
    """Sharpness-aware minimisation around any torch optimizer.

    Args: model, base_optimizer, r (rho, >= 0) and those of `TwoPassMethod` and `Method`.
    """

    def __init__(self, model: nn.Module, base_optimizer: torch.optim.Optimizer, r: float = 0.05, **settings):
        super().__init__(model, base_optimizer, r, **settings)

    def direction(self, params: list[nn.Parameter], g1: list[torch.Tensor],
                  g1_norm: torch.Tensor) -> list[torch.Tensor]:
        return unit(g1, g1_norm)
