"""SAM's sharpness (Foret et al., ICLR 2021): max over ||e|| <= rho of L(theta + e) - L(theta)."""
from __future__ import annotations

import torch

from gnp.analysis.objective import SubsetLoss, norm
from gnp.methods import NORM_FLOOR


def sam_sharpness(loss: SubsetLoss, rho: float, steps: int) -> dict:
    """Projected gradient ascent on the sphere of radius rho: e_0 = rho * g / ||g|| (SAM's own
    perturbation), then `steps` times e <- rho * grad L(theta + e) / ||grad L(theta + e)|| (a gradient
    step of unbounded length, projected back onto the ball). For a convex L every step raises the
    loss. The estimate is the largest L(theta + e_t) - L(theta) seen, a lower bound of the maximum.
    `first_order` is rho * ||g||, the maximum to first order. The parameters end exactly as they were."""
    with loss.moved() as theta:
        base, grad = loss.gradient()
        gains, first_order = [], rho * norm(grad)
        for step in range(steps + 1):
            loss.set_params(theta, (rho / norm(grad).clamp_min(NORM_FLOOR), grad))
            if step < steps:
                value, grad = loss.gradient()
            else:
                value, _ = loss.evaluate()
            gains.append(value - base)
    gains = torch.stack(gains).to(torch.float64).cpu()
    return {"value": gains.max().item(), "rho": rho, "ascent_steps": steps, "values": gains.tolist(),
            "first_order": first_order.item()}
