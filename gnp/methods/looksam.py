"""LookSAM (Liu et al., CVPR 2022, "Towards Efficient and Scalable Sharpness-Aware Minimization"): a SAM step
every k steps keeps the part of SAM's gradient orthogonal to g1; the steps in between take one pass and add it
back.

    step % k == 0 (two passes):  g2 = grad L(theta + r * g1 / ||g1||),  g = g2,
                                 g_v = g2 - <g2, g1 / ||g1||> * g1 / ||g1||   (kept)
    otherwise (one pass):        g = g1 + alpha * ||g1|| / ||g_v|| * g_v     (g = g1 before the first g_v)

`layerwise=True` projects and rescales each parameter tensor on its own (norms and inner products per tensor),
as pytorch_optimizer's LookSAM does; the default is the paper's algorithm, on the whole gradient. A step costs
1 + 1/k passes on average.

Against pytorch_optimizer's LookSAM (`layerwise=True`), which it equals (tests): its norms are clamped at
`perturb_eps` and ||g_v|| gets 1e-8 added on the steps in between, where this floors every norm at 1e-12; its
protocol runs a first pass before every step (wasted on the steps in between, 2 passes each), this one pass.
Weight decay in its base optimizer is `optimizer.weight_decay_mode=optimizer` here; an in-loss L2 (`l2`) enters
g1 and g2.

g_v is part of the state dict. With several shards and under DDP each shard projects its own g1 and g2 and
g_v is their mean over the step's shards and replicas (one all-reduce more every k steps), one state on every
replica; each shard adds it to its own g1 in between. A float16 step that is skipped keeps the g_v there was.
sync_perturbation and hybrid steps are refused: the schedule of SAM steps is LookSAM's own.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn

from gnp.methods.base import (NORM_FLOOR, Closure, Gradient, SettingError, ShardMean, check_number, dot, global_norm,
                              is_int, keep_unless_skipped)
from gnp.methods.sam import SAM


class LookSAM(SAM):
    """SAM every k steps, its orthogonal gradient reused in between, around any torch optimizer.

    Args (beyond those of `TwoPassMethod` and `Method`):
        r: perturbation radius rho of the SAM steps, >= 0.
        k: a SAM step every k steps (step 0 is one), an integer >= 1 (1 is SAM).
        alpha: weight of the reused orthogonal gradient, >= 0 (0: plain steps in between).
        layerwise: project and rescale per parameter tensor (pytorch_optimizer's LookSAM) instead of the whole
            gradient (the paper).
    """

    step_overhead = 0.05
    label_settings = ("r", "k", "alpha")
    setting_help = {
        "k": "a SAM step every k steps (1 = SAM)",
        "alpha": "weight of the reused orthogonal gradient g_v (0: plain steps in between)",
        "layerwise": "true: project and rescale per parameter tensor (pytorch_optimizer's LookSAM)",
        "sync_perturbation": "false only: each shard reuses g_v with its own g1",
        "two_pass_probability": "1 only: its SAM steps come every k steps",
    }

    def __init__(self, model: nn.Module, base_optimizer: torch.optim.Optimizer, r: float = 0.05, k: int = 5,
                 alpha: float = 0.7, *, layerwise: bool = False, **settings):
        if not is_int(k) or k < 1:
            raise SettingError("k", k, "an integer >= 1 (a SAM step every k steps; 1 is SAM)")
        check_number("alpha", alpha, "a number >= 0", lambda v: v >= 0)
        if settings.get("sync_perturbation"):
            raise SettingError("sync_perturbation", True, "false for LookSAM (each shard reuses g_v with its own g1)")
        if settings.get("two_pass_probability", 1.0) != 1:
            raise SettingError("two_pass_probability", settings["two_pass_probability"],
                               "1 for LookSAM (its SAM steps come every k steps)")
        super().__init__(model, base_optimizer, r, **settings)
        self.k, self.alpha, self.layerwise = k, float(alpha), bool(layerwise)
        self.orthogonal: list[torch.Tensor] | None = None  # g_v
        self._orthogonal = ShardMean()

    def schedule(self, step: int) -> tuple[dict[str, float], bool]:
        schedule, perturbs = super().schedule(step)
        return {**schedule, "k": self.k, "alpha": self.alpha}, perturbs and step % self.k == 0

    def expected_passes(self, total_steps: int) -> float:
        sam_steps = math.ceil(total_steps / self.k) / max(total_steps, 1)
        return 1.0 + (super().expected_passes(total_steps) - 1.0) * sam_steps

    def gradient(self, closure: Closure, params: list[nn.Parameter], scale: torch.Tensor | None) -> Gradient:
        schedule, perturbs = self.schedule(self.steps_taken)
        if perturbs or self.orthogonal is None or not schedule["r"]:
            return super().gradient(closure, params, scale)
        first = self.forward_backward(closure, params, sync=False, scale=scale)
        g1_norm = global_norm(first.grads)
        torch._foreach_add_(first.grads, self._scaled(self.orthogonal, self._norms(first.grads), self.alpha))
        return Gradient(first, first, g1_norm, self.ddp, schedule)

    def combine(self, g2: list[torch.Tensor], direction: list[torch.Tensor], g1_norm: torch.Tensor,
                schedule: dict[str, float]) -> None:
        # direction = g1 / ||g1||: per tensor, its own unit vector is direction_i / ||direction_i||.
        squared = [n.square().clamp_min(NORM_FLOOR**2) for n in self._norms(direction)]
        if self.layerwise:
            along = [dot([a], [b]) / s for a, b, s in zip(g2, direction, squared)]
        else:
            along = [dot(g2, direction) / squared[0]] * len(g2)
        self._orthogonal.add(torch._foreach_sub(g2, _times(direction, along)))

    def after_step(self, skipped: torch.Tensor | None) -> None:
        orthogonal = self._orthogonal.take(self, across_replicas=True)
        if orthogonal is not None:
            self.orthogonal = keep_unless_skipped(self.orthogonal, orthogonal, skipped)

    def _norms(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """||t_i|| of each tensor (layerwise), or the global norm once."""
        return list(torch._foreach_norm(tensors)) if self.layerwise else [global_norm(tensors)]

    def _scaled(self, g_v: list[torch.Tensor], g1_norms: list[torch.Tensor], alpha: float) -> list[torch.Tensor]:
        """alpha * ||g1|| / ||g_v|| * g_v, per tensor or on the whole."""
        ratios = [alpha * a / b.clamp_min(NORM_FLOOR) for a, b in zip(g1_norms, self._norms(g_v))]
        return _times(g_v, ratios if self.layerwise else ratios * len(g_v))

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "orthogonal": self.orthogonal}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.orthogonal = state_dict.get("orthogonal")


def _times(tensors: list[torch.Tensor], factors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each tensor times its 0-dim factor, as new tensors."""
    return [t * f for t, f in zip(tensors, factors)]
