"""PyramidNet (Han et al. 2017, additive widening) for 32x32 inputs, optionally with ShakeDrop.

The widths grow by alpha / N per block over the N blocks and are rounded (not truncated), as the
official SAM/GNP code and later work do; this adds about 0.2M parameters to the paper's counts.
Shortcuts are parameter-free: 2x2 average pooling when downsampling, zero channels appended when
widening. pyramidnet110 (alpha 270, basic blocks) has about 28.4M parameters, pyramidnet272
(alpha 200, bottleneck blocks, ShakeDrop) about 26.2M.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from gnp.models.common import PreActivationHead, init_convolutions
from gnp.models.shakedrop import ShakeDrop


class PyramidBasicBlock(nn.Module):
    """BN - conv3x3 - BN - ReLU - conv3x3 - BN, then ShakeDrop, plus the padded shortcut."""

    expansion = 1
    convs_per_block = 2

    def __init__(self, in_channels: int, planes: int, stride: int, keep_prob: float):
        super().__init__()
        self.branch = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            nn.Conv2d(in_channels, planes, 3, stride, 1, bias=False),
            nn.BatchNorm2d(planes),
            nn.ReLU(inplace=True),
            nn.Conv2d(planes, planes, 3, 1, 1, bias=False),
            nn.BatchNorm2d(planes),
        )
        self.shake_drop = ShakeDrop(keep_prob)
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.shake_drop(self.branch(x))
        return out + _shortcut(x, out.shape[1], self.stride)


class PyramidBottleneck(nn.Module):
    """BN - conv1x1 - BN - ReLU - conv3x3 - BN - ReLU - conv1x1 (x4) - BN, then ShakeDrop."""

    expansion = 4
    convs_per_block = 3

    def __init__(self, in_channels: int, planes: int, stride: int, keep_prob: float):
        super().__init__()
        self.branch = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            nn.Conv2d(in_channels, planes, 1, bias=False),
            nn.BatchNorm2d(planes),
            nn.ReLU(inplace=True),
            nn.Conv2d(planes, planes, 3, stride, 1, bias=False),
            nn.BatchNorm2d(planes),
            nn.ReLU(inplace=True),
            nn.Conv2d(planes, planes * self.expansion, 1, bias=False),
            nn.BatchNorm2d(planes * self.expansion),
        )
        self.shake_drop = ShakeDrop(keep_prob)
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.shake_drop(self.branch(x))
        return out + _shortcut(x, out.shape[1], self.stride)


def _shortcut(x: torch.Tensor, out_channels: int, stride: int) -> torch.Tensor:
    if stride != 1:
        x = F.avg_pool2d(x, stride, stride)
    return F.pad(x, (0, 0, 0, 0, 0, out_channels - x.shape[1]))


class PyramidNet(nn.Module):
    """Three stages of equal block count; block l of N gets ShakeDrop keep probability
    1 - (l / N) * shakedrop (linear decay, so the last block keeps with 1 - shakedrop)."""

    def __init__(self, block: type[PyramidBasicBlock] | type[PyramidBottleneck], depth: int,
                 alpha: float, num_classes: int, shakedrop: float):
        super().__init__()
        convs_per_stage = 3 * block.convs_per_block
        if depth < 2 + convs_per_stage or (depth - 2) % convs_per_stage:
            raise ValueError(
                f"depth={depth} does not fit {block.__name__}: depth - 2 must be a positive "
                f"multiple of {convs_per_stage}"
            )
        if not 0.0 <= shakedrop <= 1.0:
            raise ValueError(f"shakedrop={shakedrop} must lie in [0, 1] (0 turns ShakeDrop off)")
        blocks_per_stage = (depth - 2) // convs_per_stage
        num_blocks = 3 * blocks_per_stage
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16))
        width, in_channels, blocks = 16.0, 16, []
        for index in range(1, num_blocks + 1):
            width += alpha / num_blocks
            downsample = index > 1 and (index - 1) % blocks_per_stage == 0
            keep_prob = 1.0 - index / num_blocks * shakedrop
            blocks.append(block(in_channels, round(width), 2 if downsample else 1, keep_prob))
            in_channels = round(width) * block.expansion
        self.blocks = nn.Sequential(*blocks)
        self.head = PreActivationHead(in_channels, num_classes)
        init_convolutions(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


def pyramidnet110(num_classes: int = 10, depth: int = 110, alpha: float = 270,
                  shakedrop: float = 0.0) -> PyramidNet:
    """PyramidNet-110 with alpha 270 and basic blocks; ShakeDrop off unless `shakedrop` > 0."""
    return PyramidNet(PyramidBasicBlock, depth, alpha, num_classes, shakedrop)


def pyramidnet272(num_classes: int = 10, depth: int = 272, alpha: float = 200,
                  shakedrop: float = 0.5) -> PyramidNet:
    """PyramidNet-272 with alpha 200, bottleneck blocks and ShakeDrop (last block keeps with 0.5)."""
    return PyramidNet(PyramidBottleneck, depth, alpha, num_classes, shakedrop)
