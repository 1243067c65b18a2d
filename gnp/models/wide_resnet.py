"""Pre-activation Wide ResNet (Zagoruyko & Komodakis 2016) for 32x32 inputs.

1x1 convolution shortcuts wherever the width or resolution changes; dropout between the two 3x3
convolutions of a block. wrn28_10 has 36,479,194 parameters for 10 classes.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from gnp.models.common import PreActivationHead, init_convolutions


class WideBasicBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-dropout-conv3x3. When the shape changes, the shortcut is a 1x1
    convolution of the pre-activated input, as in the reference implementation."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.shortcut = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = F.relu(self.bn1(x))
        out = self.conv1(activated)
        out = self.conv2(self.dropout(F.relu(self.bn2(out))))
        return out + (x if self.shortcut is None else self.shortcut(activated))


class WideResNet(nn.Module):
    """Stem conv3x3(16), three stages of widths 16k, 32k, 64k, then BN-ReLU-pool-linear."""

    def __init__(self, depth: int, widen: int, num_classes: int, dropout: float):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"depth={depth} is not a Wide ResNet depth: use 6n + 4, e.g. 16, 22, 28, 40")
        if widen < 1:
            raise ValueError(f"widen={widen} must be a positive integer")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout} must lie in [0, 1)")
        blocks_per_stage = (depth - 4) // 6
        self.stem = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        blocks, in_channels = [], 16
        for stage, width in enumerate((16 * widen, 32 * widen, 64 * widen)):
            for index in range(blocks_per_stage):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(WideBasicBlock(in_channels, width, stride, dropout))
                in_channels = width
        self.blocks = nn.Sequential(*blocks)
        self.head = PreActivationHead(in_channels, num_classes)
        init_convolutions(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


def wrn28_10(num_classes: int = 10, depth: int = 28, widen: int = 10, dropout: float = 0.0) -> WideResNet:
    """WRN-28-10 (dropout off by default, as the official recipe)."""
    return WideResNet(depth, widen, num_classes, dropout)
