"""Pieces shared by the CIFAR CNNs: the official code's initialisation and the pre-activation head."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


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


class PreActivationHead(nn.Module):
    """The end of a pre-activation network: BatchNorm, ReLU, global average pool, classifier."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels, num_classes)
        init_classifier(self.fc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(F.relu(self.norm(x)), 1), 1))
