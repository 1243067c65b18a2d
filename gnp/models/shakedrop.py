"""ShakeDrop (Yamada et al. 2019, arXiv 1802.02375) for the residual branch of PyramidNet.

Training: each sample's branch output is scaled by b + a - b*a in the forward pass and its gradient by
b + c - b*c in the backward pass, with b ~ Bernoulli(keep_prob), a ~ U[-1, 1], c ~ U[0, 1]; b = 1 makes
the block a plain residual block. Evaluation: the deterministic expectation E[b + a - b*a] = keep_prob.

The draws come from torch's default generator of the input's device, inside `forward`. The method
wrapper (gnp.methods) restores that generator's state before its second (perturbed) pass, so both
passes of one SAM/GNP step use the same gate and coefficients, as the official code does; the
backward pass reuses the draws saved by its own forward pass.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class _ShakeDropFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, forward_scale: torch.Tensor, backward_scale: torch.Tensor):
        ctx.save_for_backward(backward_scale)
        return x * forward_scale

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (backward_scale,) = ctx.saved_tensors
        return grad_output * backward_scale, None, None


class ShakeDrop(nn.Module):
    """Per-sample ShakeDrop on a residual branch; `keep_prob` is P(b = 1), 1.0 turns it off."""

    def __init__(self, keep_prob: float, alpha_range: tuple[float, float] = (-1.0, 1.0),
                 beta_range: tuple[float, float] = (0.0, 1.0)):
        super().__init__()
        if not 0.0 <= keep_prob <= 1.0:
            raise ValueError(f"ShakeDrop keep_prob={keep_prob} must lie in [0, 1]")
        self.keep_prob = keep_prob
        self.alpha_range = alpha_range
        self.beta_range = beta_range

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.keep_prob == 1.0:
            return x
        if not self.training:
            expected_alpha = sum(self.alpha_range) / 2
            return x * (self.keep_prob + expected_alpha * (1.0 - self.keep_prob))
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        kept = torch.rand(shape, device=x.device) < self.keep_prob
        alpha = _uniform(shape, self.alpha_range, x.device)
        beta = _uniform(shape, self.beta_range, x.device)
        # b + a - b*a with b in {0, 1}
        forward_scale = torch.where(kept, 1.0, alpha).to(x.dtype)
        backward_scale = torch.where(kept, 1.0, beta).to(x.dtype)
        return _ShakeDropFunction.apply(x, forward_scale, backward_scale)

    def extra_repr(self) -> str:
        return f"keep_prob={self.keep_prob:.4f}"


def _uniform(shape: tuple[int, ...], bounds: tuple[float, float], device: torch.device) -> torch.Tensor:
    low, high = bounds
    return torch.rand(shape, device=device) * (high - low) + low
