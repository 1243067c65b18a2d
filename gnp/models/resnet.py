"""CIFAR ResNets (He et al. 2016): 3x3 stride-1 stem and no max-pool, so 32x32 inputs keep their
resolution until the first downsampling stage. resnet18 has 11,173,962 parameters for 10 classes."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from gnp.models.common import init_convolutions


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus the shortcut, then ReLU."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(in_planes, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """conv1x1-BN-ReLU-conv3x3-BN-ReLU-conv1x1 (x4)-BN plus the shortcut, then ReLU."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.shortcut = _shortcut(in_planes, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


def _shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Module:
    if stride == 1 and in_planes == out_planes:
        return nn.Identity()
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, 1, stride, bias=False), nn.BatchNorm2d(out_planes)
    )


class ResNet(nn.Module):
    """Four stages of widths width * (1, 2, 4, 8); stages 2-4 halve the resolution."""

    def __init__(self, block: type, num_blocks: list[int], num_classes: int, width: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        stages, in_planes = [], width
        for i, n in enumerate(num_blocks):
            planes, stride = width * 2**i, 1 if i == 0 else 2
            for s in [stride] + [1] * (n - 1):
                stages.append(block(in_planes, planes, s))
                in_planes = planes * block.expansion
        self.layers = nn.Sequential(*stages)
        self.fc = nn.Linear(in_planes, num_classes)
        init_convolutions(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


def resnet18(num_classes: int = 10, width: int = 64) -> ResNet:
    """ResNet-18: [2, 2, 2, 2] basic blocks."""
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, width)


def resnet101(num_classes: int = 10, width: int = 64) -> ResNet:
    """ResNet-101: [3, 4, 23, 3] bottleneck blocks (about 42.5M parameters)."""
    return ResNet(Bottleneck, [3, 4, 23, 3], num_classes, width)
