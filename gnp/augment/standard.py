"""The standard style's AutoAugment, the common PyTorch conventions: torchvision's CIFAR-10 policy
with the AutoAugment paper's magnitude ranges (10 bins, random signs) and torchvision's operations;
geometric steps resample the nearest pixel (halves to even, as grid_sample) and fill with grey.
"""
from __future__ import annotations

import math

import torch
import torchvision.transforms.v2.functional as F

from gnp.augment.autoaugment import (
    GEOMETRIC_OPERATIONS,
    SHARED_PIXEL_OPERATIONS,
    AutoAugment,
    PixelOperation,
    affine_nearest,
    argument_of,
    blend,
    sharpness_degenerate,
)
from gnp.augment.policies import CIFAR10_POLICY


def _magnitude(operation: str, level: int | None, height: int, width: int) -> tuple[float, bool]:
    """The operation's magnitude at `level` (10 bins, the AutoAugment paper's ranges) and whether
    its sign is drawn at random per image."""
    if level is None:
        return 0.0, False
    step = level / 9
    if operation in ("ShearX", "ShearY"):
        return 0.3 * step, True
    if operation in ("TranslateX", "TranslateY"):
        extent = width if operation == "TranslateX" else height
        return float(math.trunc(150.0 / 331.0 * extent * step)), True
    if operation == "Rotate":
        return 30.0 * step, True
    if operation in ("Brightness", "Color", "Contrast", "Sharpness"):
        return 0.9 * step, True
    if operation == "Posterize":
        return float(8 - round(4 * step)), False  # bits kept
    if operation == "Solarize":
        return 255.0 * (1.0 - step), False  # threshold
    raise ValueError(f"AutoAugment operation {operation!r} takes no magnitude")


def _grayscale(images: torch.Tensor) -> torch.Tensor:
    # floored to integers, as PIL's and torchvision's saturation and contrast of uint8 images
    return F.rgb_to_grayscale(images.float()).floor()


# torchvision's enhancements blend with factor 1 + magnitude
PIXEL_OPERATIONS: dict[str, PixelOperation] = {
    "Brightness": lambda x, m: blend(0.0, x, 1 + m),
    "Color": lambda x, m: blend(_grayscale(x), x, 1 + m),
    "Contrast": lambda x, m: blend(_grayscale(x).mean(dim=(-3, -2, -1), keepdim=True), x, 1 + m),
    "Sharpness": lambda x, m: blend(sharpness_degenerate(x, truncate=False), x, 1 + m),
    **SHARED_PIXEL_OPERATIONS,
}
OPERATIONS = GEOMETRIC_OPERATIONS + tuple(PIXEL_OPERATIONS)


def _geometric(images: torch.Tensor, operation: torch.Tensor, magnitude: torch.Tensor,
               generator: torch.Generator, fill: int) -> torch.Tensor:
    """The five geometric operations in one resampling (they draw nothing)."""
    return affine_nearest(images, _affine_matrices(operation, magnitude, *images.shape[-2:]), fill, torch.round)


def _affine_matrices(operation: torch.Tensor, magnitude: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Per-image 2x3 maps from output to input pixel coordinates, pixel centres at integers
    (identity for non-geometric operations). Shears act about the image's top-left corner
    (-0.5, -0.5), as PIL's; rotations about the image centre; translations move the content by
    +magnitude pixels."""
    def only(name: str) -> torch.Tensor:
        return argument_of(name, OPERATIONS, operation, magnitude)

    shear_x, shear_y = only("ShearX"), only("ShearY")
    angle = only("Rotate") * (math.pi / 180.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    centre_x, centre_y = (width - 1) / 2, (height - 1) / 2
    return torch.stack([
        torch.stack([cos, shear_x - sin, 0.5 * shear_x - only("TranslateX")
                     + centre_x - cos * centre_x + sin * centre_y], dim=-1),
        torch.stack([shear_y + sin, cos, 0.5 * shear_y - only("TranslateY")
                     + centre_y - sin * centre_x - cos * centre_y], dim=-1),
    ], dim=1)


STANDARD = AutoAugment(policy=CIFAR10_POLICY, operations=OPERATIONS, argument=_magnitude, spatial=_geometric,
                       pixel_operations=PIXEL_OPERATIONS)
