"""Standard training: one forward/backward pass per step and the base optimizer's update with g = grad L.

The paper's baseline whatever the base optimizer is (SGD for the CNN recipes, AdamW for ViT), with the
same in-loss L2, clipping, loss scaling and per-step report as the other methods.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from gnp.methods.base import Closure, Gradient, Method


class Plain(Method):
    """One pass per step: g = grad L(theta), clipped, then the base optimizer's step.

    Args: those of `Method` (l2, max_grad_norm, grad_scaler).
    """

    def gradient(self, closure: Closure, params: list[nn.Parameter], scale: torch.Tensor | None) -> Gradient:
        return self.plain_gradient(closure, params, scale)
