"""Model registry: every architecture is built by name through `build_model`."""
from __future__ import annotations

import inspect
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from gnp.models.pyramidnet import pyramidnet110, pyramidnet272
from gnp.models.resnet import resnet18, resnet101
from gnp.models.vit import vit_b, vit_s, vit_ti
from gnp.models.wide_resnet import wrn28_10

MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18,
    "resnet101": resnet101,
    "wrn28_10": wrn28_10,
    "pyramidnet110": pyramidnet110,
    "pyramidnet272": pyramidnet272,
    "vit_ti": vit_ti,
    "vit_s": vit_s,
    "vit_b": vit_b,
}


def check_model_options(name: str, options: Iterable[str]) -> None:
    """Raise ValueError unless `name` is a registered model and `options` are all its builder's."""
    if name not in MODELS:
        raise ValueError(
            f"model.name={name!r} is not a known model; choose one of: {', '.join(sorted(MODELS))}"
        )
    allowed = [p for p in inspect.signature(MODELS[name]).parameters if p != "num_classes"]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"model {name!r} has no option(s) {', '.join(unknown)}; its options are: {', '.join(allowed)}"
        )


def build_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """Build model `name` for `num_classes` classes; extra keyword arguments go to its builder."""
    check_model_options(name, kwargs)
    return MODELS[name](num_classes=num_classes, **kwargs)


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (trainable or not)."""
    return sum(p.numel() for p in model.parameters())


def normalises_with_batch_statistics(name: str, **kwargs: Any) -> bool:
    """Whether model `name` (with these builder options) has BatchNorm layers, which normalise with the
    batch's own statistics in training. Built on the meta device: no memory, no weights."""
    with torch.device("meta"):
        model = build_model(name, 10, **kwargs)
    return any(isinstance(module, _BatchNorm) for module in model.modules())
