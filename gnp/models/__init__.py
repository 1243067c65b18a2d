"""Model registry: every architecture is built by name through `build_model`."""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

from gnp.models.resnet import resnet18, resnet101

MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18,
    "resnet101": resnet101,
}


def build_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    """Build model `name` for `num_classes` classes; extra keyword arguments go to its builder."""
    if name not in MODELS:
        raise ValueError(
            f"model.name={name!r} is not a known model; choose one of: {', '.join(sorted(MODELS))}"
        )
    return MODELS[name](num_classes=num_classes, **kwargs)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
