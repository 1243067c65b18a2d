"""ASAM (Kwon, Kim, Park, Choi, ICML 2021): SAM with a perturbation scaled to each parameter's size.

    T = |theta| + eta (element-wise; 1 for biases),   e = r * T^2 g1 / ||T g1||,   g = grad L(theta + e)

As the authors' code (SamsungLabs/ASAM): a parameter is scaled when "weight" is in its name (conv, linear,
BatchNorm and LayerNorm weights); every other parameter gets T = 1: biases, and a ViT's `cls_token` and
`pos_embed`. (For the CNNs this is "every parameter but the biases".) davda54/sam's `adaptive=True`
differs: T = |theta| for every parameter, with no eta. The paper's CIFAR radius with WRN-28-10 is
r = 0.5 for CIFAR-10 and 1.0 for CIFAR-100.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from gnp.methods.base import NORM_FLOOR, check_number, global_norm
from gnp.methods.sam import SAM


class ASAM(SAM):
    """Adaptive SAM around any torch optimizer.

    Args: model, base_optimizer, r (the radius rho, >= 0), eta (>= 0, added to |theta| so that zero weights
    are perturbed too) and those of `TwoPassMethod` and `Method`.
    """

    step_overhead = 0.05
    setting_help = {"eta": "T = |theta| + eta scales the perturbation of a weight (biases: T = 1), so zero weights "
                           "are perturbed too"}

    def __init__(self, model: nn.Module, base_optimizer: torch.optim.Optimizer, r: float = 0.5, *,
                 eta: float = 0.01, **settings):
        check_number("eta", eta, "a finite number >= 0", lambda v: v >= 0)
        super().__init__(model, base_optimizer, r, **settings)
        self.eta = float(eta)
        names = {id(p): name for name, p in model.named_parameters()}
        self._scaled = [i for i, p in enumerate(self.parameters()) if "weight" in names.get(id(p), "")]

    def direction(self, params: list[nn.Parameter], g1: list[torch.Tensor],
                  g1_norm: torch.Tensor) -> list[torch.Tensor]:
        scale = torch._foreach_abs([params[i] for i in self._scaled])
        torch._foreach_add_(scale, self.eta)
        scaled_g1 = torch._foreach_mul([g1[i] for i in self._scaled], scale)  # T g1 of the scaled parameters
        t_g1, direction = list(g1), list(g1)  # biases: T = 1
        for i, t_g in zip(self._scaled, scaled_g1):
            t_g1[i] = t_g
        norm = global_norm(t_g1)
        torch._foreach_mul_(scaled_g1, scale)  # T^2 g1
        for i, t2_g in zip(self._scaled, scaled_g1):
            direction[i] = t2_g
        torch._foreach_div_(direction, norm.clamp_min(NORM_FLOOR))
        return direction
