"""The official style's AutoAugment, the authors' pipeline: the 95 CIFAR "good policies" of the
AutoAugment authors' code (policies.py), run with the operations and level-to-argument maps of
tensorflow/tpu's efficientnet `autoaugment.py` as SAM's code (google-research/sam) forks them
(translate_const 250, cutout_const 100), on uint8 images before the crop and flip.

Their behaviour on 32x32 images, kept as is:
- levels are out of 10, and translations and the policy's Cutout are sized in pixels for
  ImageNet: a translation of level >= 2 (50 px) or a Cutout of level 4 (a hole reaching 40 px
  each side of its centre) leaves a plain grey (128) image;
- Contrast blends towards a grey of (pixel count / 256), 4 for 32x32 images, not the image's mean
  (the reference sums the histogram's counts instead of the pixel values);
- the four enhancement factors are 0.1 + 1.8 * level / 10 with no random sign; Solarize inverts
  pixels >= int(256 * level / 10); Posterize keeps int(4 * level / 10) bits (2 at the policy's
  level 7; it never asks for 0 bits, which the reference leaves to TensorFlow's shift of 8);
- geometric steps map output pixel centres (at integers) to source pixels rounded half away from
  zero (TensorFlow's ImageProjectiveTransform), shears act about pixel (0, 0), and uncovered
  pixels get grey 128, as does the policy's Cutout.
Differences left: float32 evaluation order, which may move a blended, greyscale or sharpened pixel
by one level, and AutoContrast's scaling, which may differ by one level from the reference's.
"""
from __future__ import annotations

import math

import torch

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
from gnp.augment.crop import cutout
from gnp.augment.policies import OFFICIAL_CIFAR_POLICY


def _argument(operation: str, level: int | None, height: int, width: int) -> tuple[float, bool]:
    """The argument the official code passes to `operation` at `level` (out of 10) and whether it
    negates it at random; the image size does not enter (its pixel constants are fixed)."""
    fraction = level / 10
    if operation in ("AutoContrast", "Equalize", "Invert"):
        return 0.0, False  # the level is ignored
    if operation == "Rotate":
        return fraction * 30.0, True  # degrees
    if operation in ("ShearX", "ShearY"):
        return fraction * 0.3, True
    if operation in ("TranslateX", "TranslateY"):
        return fraction * 250.0, True  # pixels
    if operation in ("Brightness", "Color", "Contrast", "Sharpness"):
        return fraction * 1.8 + 0.1, False  # blend factor
    if operation == "Posterize":
        return float(int(fraction * 4)), False  # bits kept
    if operation == "Solarize":
        return float(int(fraction * 256)), False  # threshold
    if operation == "Cutout":
        return float(int(fraction * 100)), False  # pixels each side of the hole's centre
    raise ValueError(f"AutoAugment operation {operation!r} is not in the official code")


def _tf_grayscale(images: torch.Tensor) -> torch.Tensor:
    """tf.image.rgb_to_grayscale of uint8 images: luma of the [0, 1] values, scaled by 255.5 and
    truncated; [B, 1, H, W] floats."""
    x = images.float() * (1.0 / 255.0)
    luma = x[:, 0:1] * 0.2989 + x[:, 1:2] * 0.5870 + x[:, 2:3] * 0.1140
    return (luma * 255.5).floor()


def _contrast_grey(images: torch.Tensor) -> float:
    """The grey the official Contrast blends towards: its histogram's total count (the number of
    pixels) / 256, truncated, where PIL takes the mean grey level."""
    return float(min(images.shape[-2] * images.shape[-1] // 256, 255))


# The official code's argument is the blend factor itself (the standard one's magnitude is factor - 1).
PIXEL_OPERATIONS: dict[str, PixelOperation] = {
    "Brightness": lambda x, f: blend(0.0, x, f),
    "Color": lambda x, f: blend(_tf_grayscale(x), x, f),
    "Contrast": lambda x, f: blend(_contrast_grey(x), x, f),
    "Sharpness": lambda x, f: blend(sharpness_degenerate(x, truncate=True), x, f),
    **SHARED_PIXEL_OPERATIONS,
}
OPERATIONS = GEOMETRIC_OPERATIONS + ("Cutout",) + tuple(PIXEL_OPERATIONS)


def _geometric_then_cutout(images: torch.Tensor, operation: torch.Tensor, argument: torch.Tensor,
                           generator: torch.Generator, fill: int) -> torch.Tensor:
    """The five geometric operations in one resampling, then the policy's Cutout, a hole reaching the
    argument each side of its centre: every image draws a centre from `generator`, used only where
    it does Cutout."""
    h, w = images.shape[-2:]
    # TensorFlow's ImageProjectiveTransform rounds the coordinates half away from zero
    images = affine_nearest(images, _affine_matrices(operation, argument, h, w), fill, _round_half_away)
    half_side = argument_of("Cutout", OPERATIONS, operation, argument)  # 0: no hole
    return cutout(images, 2 * half_side, fill, generator)


def _affine_matrices(operation: torch.Tensor, argument: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Per-image 2x3 maps from output to input pixel coordinates (pixel centres at integers), as
    the official code's projective transforms: ShearX s: x_in = x + s y; ShearY: y_in = y + s x;
    TranslateX p: x_in = x + p (the content moves by -p); Rotate by the angle about the image
    centre (tfa.image.rotate); identity for the other operations."""
    def only(name: str) -> torch.Tensor:
        return argument_of(name, OPERATIONS, operation, argument)

    angle = only("Rotate") * (math.pi / 180.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    offset_x = ((width - 1) - (cos * (width - 1) - sin * (height - 1))) / 2.0
    offset_y = ((height - 1) - (sin * (width - 1) + cos * (height - 1))) / 2.0
    return torch.stack([
        torch.stack([cos, only("ShearX") - sin, offset_x + only("TranslateX")], dim=-1),
        torch.stack([only("ShearY") + sin, cos, offset_y + only("TranslateY")], dim=-1),
    ], dim=1)


def _round_half_away(values: torch.Tensor) -> torch.Tensor:
    # C's round(); torch.round rounds halves to even, and floor(v + 0.5) misrounds just below 0.5
    whole = values.trunc()
    return torch.where((values - whole).abs() == 0.5, whole + values.sign(), values.round())


OFFICIAL = AutoAugment(policy=OFFICIAL_CIFAR_POLICY, operations=OPERATIONS, argument=_argument,
                       spatial=_geometric_then_cutout, pixel_operations=PIXEL_OPERATIONS)
