"""The weight average a run may evaluate beside its model (`train.ema_decay`)."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn


class WeightAverage:
    """An exponential moving average of a model's parameters and floating-point buffers (BatchNorm
    statistics), updated in place on the device after every step: ema <- decay * ema + (1 - decay) * x."""

    def __init__(self, model: nn.Module, decay: float):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        pairs = [(a, b) for a, b in zip(self.model.state_dict().values(), model.state_dict().values())]
        self._floats = [(a, b) for a, b in pairs if a.is_floating_point()]
        self._others = [(a, b) for a, b in pairs if not a.is_floating_point()]  # e.g. BatchNorm's batch counter

    @torch.no_grad()
    def update(self) -> None:
        averaged, current = zip(*self._floats)
        torch._foreach_lerp_(list(averaged), list(current), 1.0 - self.decay)
        for a, b in self._others:
            a.copy_(b)
