"""AutoAugment (Cubuk et al. 2019) on whole uint8 batches: the machinery both styles share.

A policy becomes device tensors once; each image draws its own sub-policy, and each of the
sub-policy's two steps runs every operation on the whole batch, each image keeping only the result
of the operation it drew (`torch.where`), so that tensor shapes never depend on the draws and
nothing waits on the host. An `AutoAugment` says what differs between the styles (standard.py,
official.py): the policy, the level-to-argument map, the spatial steps (the geometric resampling,
and the official policy's Cutout) and the pixel operations; the pixel operations both use are here.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as nnf
import torchvision.transforms.v2.functional as F

# (operation, probability, level) steps, two per sub-policy; a level of None: no argument
Policy = Sequence[Sequence[tuple[str, float, int | None]]]
# (operation, level, height, width) -> (argument, whether its sign is drawn at random per image)
ArgumentMap = Callable[[str, int | None, int, int], tuple[float, bool]]
# (images, per-image argument) -> images, on the whole batch
PixelOperation = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# (images, per-image operation index, per-image argument, generator, fill) -> images
SpatialSteps = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Generator, int], torch.Tensor]

GEOMETRIC_OPERATIONS = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")


@dataclass(frozen=True, eq=False)
class AutoAugment:
    """One style's AutoAugment: `operations` numbers its operations, spatial ones first (run by
    `spatial`, which also draws what they need from the generator), then the `pixel_operations`;
    uncovered pixels get `fill`."""

    policy: Policy
    operations: tuple[str, ...]
    argument: ArgumentMap
    spatial: SpatialSteps
    pixel_operations: Mapping[str, PixelOperation]
    fill: int = 128  # grey, as the official implementation

    def table(self, device: torch.device, height: int, width: int) -> PolicyTable:
        """The policy as device tensors for images of this size (an argument may depend on it)."""
        steps = [[(self.operations.index(op), prob, *self.argument(op, level, height, width))
                  for op, prob, level in sub_policy] for sub_policy in self.policy]
        columns = list(zip(*[step for sub_policy in steps for step in sub_policy]))
        operation, probability, argument, signed = (
            torch.tensor(column, dtype=dtype).view(len(self.policy), -1).to(device)
            for column, dtype in zip(columns, (torch.long, torch.float32, torch.float32, torch.bool))
        )
        return PolicyTable(operation, probability, argument, signed)

    def __call__(self, images: torch.Tensor, generator: torch.Generator, table: PolicyTable) -> torch.Tensor:
        """Per image: draw one sub-policy, then run its two steps in order, each with its probability
        and, where the argument is signed, a random sign; `table` is `self.table(...)`."""
        operation, argument = table.draw(images, generator)
        for step in range(2):
            images = self.apply(images, operation[:, step], argument[:, step], generator)
        return images

    def apply(self, images: torch.Tensor, operation: torch.Tensor, argument: torch.Tensor,
              generator: torch.Generator) -> torch.Tensor:
        """Apply to image i the operation operations[operation[i]] with argument[i] (-1: none)."""
        images = self.spatial(images, operation, argument, generator, self.fill)
        for index, name in enumerate(self.operations):
            if name in self.pixel_operations:
                chosen = (operation == index).view(-1, 1, 1, 1)
                images = torch.where(chosen, self.pixel_operations[name](images, argument), images)
        return images


@dataclass(frozen=True, eq=False)
class PolicyTable:
    """A policy as device tensors [num_sub_policies, 2]: operation index, probability, argument,
    and whether the argument's sign is random."""

    operation: torch.Tensor
    probability: torch.Tensor
    argument: torch.Tensor
    signed: torch.Tensor

    def draw(self, images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Per image, a sub-policy drawn uniformly: the operation index of each of its two steps (-1
        where the step's probability skips it) and its argument, negated at random where signed."""
        b = images.shape[0]
        device = images.device
        choice = torch.randint(0, self.operation.shape[0], (b,), generator=generator, device=device)
        applied = torch.rand(b, 2, generator=generator, device=device) < self.probability[choice]
        negative = torch.rand(b, 2, generator=generator, device=device) < 0.5
        argument = torch.where(self.signed[choice] & negative, -1.0, 1.0) * self.argument[choice]
        operation = torch.where(applied, self.operation[choice], -1)
        return operation, argument


def argument_of(name: str, operations: Sequence[str], operation: torch.Tensor, argument: torch.Tensor) -> torch.Tensor:
    """Per image, its argument where it drew the operation `name` (of `operations`), else 0."""
    return torch.where(operation == operations.index(name), argument, 0.0)


def affine_nearest(images: torch.Tensor, matrix: torch.Tensor, fill: int,
                   rounding: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Nearest-neighbour resampling with per-image 2x3 maps from output to input pixel coordinates
    (pixel centres at integers): each output pixel takes the source pixel at its mapped coordinates
    rounded by `rounding`, or `fill` when that pixel lies outside the image. The coordinates are
    element-wise products and sums, each rounded once as IEEE says, not a matrix product (whose
    summation order and fused multiply-adds are the hardware's choice): a coordinate that falls on
    a half in exact arithmetic (a shear of 1/15 maps row 7 to x + 0.5) then rounds the same way on
    every CPU and GPU."""
    b, c, h, w = images.shape
    device = images.device
    ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float32),
                            torch.arange(w, device=device, dtype=torch.float32), indexing="ij")
    xs, ys = xs.reshape(1, h * w), ys.reshape(1, h * w)
    source_x = matrix[:, 0, 0:1] * xs + matrix[:, 0, 1:2] * ys + matrix[:, 0, 2:3]
    source_y = matrix[:, 1, 0:1] * xs + matrix[:, 1, 1:2] * ys + matrix[:, 1, 2:3]
    col, row = rounding(source_x), rounding(source_y)
    covered = (col >= 0) & (col <= w - 1) & (row >= 0) & (row <= h - 1)
    index = (row.clamp(0, h - 1) * w + col.clamp(0, w - 1)).long()
    pixels = images.reshape(b, c, h * w).gather(2, index[:, None, :].expand(b, c, h * w))
    return torch.where(covered[:, None, :], pixels, fill).view(b, c, h, w)


# --- the pixel operations both styles share ---------------------------------------------------------

def blend(degenerate: torch.Tensor | float, images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """degenerate + factor * (images - degenerate) per image, clipped to [0, 255] and truncated."""
    out = degenerate + factor.view(-1, 1, 1, 1) * (images.float() - degenerate)
    return out.clamp(0, 255).to(torch.uint8)


def sharpness_degenerate(images: torch.Tensor, truncate: bool) -> torch.Tensor:
    """PIL's SMOOTH filter inside a one-pixel border, rounded as torchvision's sharpness does (or
    truncated as the official code's uint8 cast); the kernel is filled on the device (torchvision
    copies it from the host, which synchronises)."""
    channels = images.shape[1]
    kernel = torch.full((channels, 1, 3, 3), 1.0 / 13.0, device=images.device)
    kernel[:, :, 1, 1] = 5.0 / 13.0
    degenerate = images.float()
    blurred = nnf.conv2d(degenerate, kernel, groups=channels)
    blurred = blurred.floor() if truncate else blurred.round()
    degenerate[..., 1:-1, 1:-1] = blurred
    return degenerate


def _autocontrast(images: torch.Tensor) -> torch.Tensor:
    # torchvision's autocontrast, without its boolean-mask assignment (a host synchronisation on GPU)
    x = images.float()
    low, high = x.amin(dim=(-2, -1), keepdim=True), x.amax(dim=(-2, -1), keepdim=True)
    flat = high == low
    inverse_scale = torch.where(flat, 1.0, (high - low) / 255.0)
    return ((x - torch.where(flat, 0.0, low)) / inverse_scale).clamp(0, 255).to(torch.uint8)


def _posterize(images: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    dropped = 8 - bits.long().clamp(0, 8)
    mask = torch.bitwise_left_shift(torch.full_like(dropped, 255), dropped) & 255
    return images & mask.to(torch.uint8).view(-1, 1, 1, 1)


def _solarize(images: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    return torch.where(images >= threshold.view(-1, 1, 1, 1), 255 - images, images)


# The styles differ in their four enhancements (Brightness, Color, Contrast, Sharpness) only.
SHARED_PIXEL_OPERATIONS: dict[str, PixelOperation] = {
    "Posterize": _posterize,
    "Solarize": _solarize,
    "AutoContrast": lambda x, a: _autocontrast(x),
    "Equalize": lambda x, a: F.equalize(x),
    "Invert": lambda x, a: F.invert(x),
}
