"""Weight initialisation shared by the CIFAR CNNs (the official code's choices)."""
from __future__ import annotations

import math

import torch.nn as nn


def init_convolutions(model: nn.Module) -> None:
    """Kaiming-normal convolution kernels (fan_out, gain sqrt(2)); BatchNorm keeps weight 1, bias 0."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")


def init_classifier(linear: nn.Linear) -> None:
    """Weights U[-s, s] with s = 1/sqrt(num_classes), zero bias, as the official WRN/PyramidNet."""
    bound = 1.0 / math.sqrt(linear.out_features)
    nn.init.uniform_(linear.weight, -bound, bound)
    nn.init.zeros_(linear.bias)
