"""Training-set augmentation of whole uint8 batches on the device that holds them.

Two styles (`aug.style`) of the same presets:
- `official` (default), the authors' pipeline (their code's data pipeline is google-research/sam's):
  AutoAugment with the 95 CIFAR sub-policies of the AutoAugment authors ("good policies") and the
  operations of tensorflow/tpu's efficientnet `autoaugment.py` (which SAM's code forks), then crop
  + flip; after normalisation, `mix` applies mixup and a batch-level cutout (one hole position per
  batch, filled with 0, the mean).
- `standard`, the common PyTorch conventions: torchvision's 25-sub-policy CIFAR-10 AutoAugment and
  a per-image cutout filled with the dataset's mean colour before normalisation.

Every image gets its own random draws (crop offset, flip, AutoAugment sub-policy, sign of its
magnitudes, and in the standard style its cutout hole), all taken from the `generator` the loader
passes, with no Python loop over images and no host synchronisation: images are gathered through
per-image index grids, and AutoAugment applies each of its operations to the whole batch, keeping
the result only where an image drew it (`torch.where`), so tensor shapes never depend on the draws.

    augment = build_augmentation(cfg.aug, mean=cfg.dataset.mean)
    images_u8 = augment(images_u8, generator)                   # before normalisation
    x, target = augment.mix(x, labels, num_classes, generator)  # after normalisation
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import torch
import torch.nn.functional as nnf
import torchvision.transforms.v2.functional as F

from gnp.augment.crop import _in_window, batch_cutout, cutout, random_crop_flip
from gnp.augment.mixing import _cutmix_box, sample_beta
from gnp.augment.policies import CIFAR10_POLICY, OFFICIAL_CIFAR_POLICY

STYLES = ("official", "standard")
# Each preset fills in the options a config leaves out; the config's own keys win.
_DEFAULT_OPTIONS: dict[str, Any] = {
    "style": "official",
    "autoaugment": False,
    "crop_flip": True,
    "cutout_size": 0,
    "mixup_alpha": 0.0,
    "cutmix_alpha": 0.0,
}
PRESETS: dict[str, dict[str, Any]] = {
    "none": {"crop_flip": False},
    "basic": {},
    "cutout": {"cutout_size": 16},
    "autoaugment": {"autoaugment": True},
    "autoaugment_mixcut": {"autoaugment": True, "cutout_size": 16, "mixup_alpha": 1.0},
}


def build_augmentation(cfg: Mapping[str, Any], mean: Sequence[float]) -> Augmentation:
    """The augmentation that `cfg` (`name` from PRESETS plus optional overrides of its options)
    describes; `mean` (per channel, in [0, 1]) is the cutout fill, which normalises to about 0."""
    options = dict(cfg)
    name = options.pop("name", None)
    if name not in PRESETS:
        raise ValueError(f"aug.name={name!r} is not a known augmentation; choose one of: {', '.join(PRESETS)}")
    unknown = sorted(set(options) - set(_DEFAULT_OPTIONS))
    if unknown:
        raise ValueError(
            f"aug has no option(s) {', '.join(unknown)}; its options are: {', '.join(_DEFAULT_OPTIONS)}"
        )
    mean = [float(m) for m in mean]
    if len(mean) != 3 or not all(0.0 <= m <= 1.0 for m in mean):
        raise ValueError(f"mean={mean} must be 3 per-channel values in [0, 1] (dataset.mean)")
    settings = {**_DEFAULT_OPTIONS, **PRESETS[name], **options}
    return Augmentation(**settings, fill=tuple(round(255 * m) for m in mean))


class Augmentation:
    """Per-image AutoAugment and random crop + flip of uint8 batches (in that order; the standard
    style then cuts one hole per image), and the batch stage of the normalised batch (`mix`):
    mixup / cutmix, then, in the official style, one cutout hole for the whole batch."""

    def __init__(self, autoaugment: bool = False, crop_flip: bool = True, cutout_size: int = 0,
                 mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0,
                 fill: tuple[int, int, int] = (0, 0, 0), padding: int = 4, style: str = "official"):
        if style not in STYLES:
            raise ValueError(
                f"aug.style={style!r} is not a known augmentation style; choose one of: {', '.join(STYLES)}"
            )
        for option, value in (("cutout_size", cutout_size), ("padding", padding)):
            if int(value) != value or value < 0:
                raise ValueError(f"aug.{option}={value} must be a non-negative integer (0 = off)")
        for option, value in (("mixup_alpha", mixup_alpha), ("cutmix_alpha", cutmix_alpha)):
            if value < 0:
                raise ValueError(f"aug.{option}={value} must be >= 0 (0 = off)")
        self.style = style
        self.autoaugment = bool(autoaugment)
        self.crop_flip = bool(crop_flip)
        self.cutout_size = int(cutout_size)
        self.mixup_alpha = float(mixup_alpha)
        self.cutmix_alpha = float(cutmix_alpha)
        self.fill = tuple(int(f) for f in fill)
        self.padding = int(padding)
        self._policy_tables: dict[tuple[torch.device, int, int], _PolicyTable] = {}

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Augment a uint8 batch [B, 3, H, W]; returns a new uint8 batch of the same shape."""
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(
                f"augmentation expects uint8 images [B, 3, H, W], got {images.dtype} {tuple(images.shape)}"
            )
        official = self.style == "official"
        if self.autoaugment:
            policy = official_auto_augment if official else auto_augment
            images = policy(images, generator, self._policy_table(images), fill=128)
        if self.crop_flip:
            images = random_crop_flip(images, self.padding, generator)
        if self.cutout_size and not official:
            images = cutout(images, self.cutout_size, self.fill, generator)
        return images

    def mix(self, x: torch.Tensor, labels: torch.Tensor, num_classes: int,
            generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch stage, on the normalised batch: mixup / cutmix, then (official style) cutout.

        Mixing pairs the batch with its reverse (the loader shuffles, so that is a random partner)
        and returns soft targets [B, num_classes]; with mixup and cutmix both on, each batch uses
        one, chosen at random. The official cutout then sets one hole, at the same place in every
        image of the batch, to 0 (the dataset mean after normalisation): after mixup, as the
        official `mixcut`. Returns (x, labels) unchanged when neither stage is on."""
        if self.mixup_alpha or self.cutmix_alpha:
            x, labels = self._mix_with_reverse(x, labels, num_classes, generator)
        if self.cutout_size and self.style == "official":
            x = batch_cutout(x, self.cutout_size, generator)
        return x, labels

    def _mix_with_reverse(self, x: torch.Tensor, labels: torch.Tensor, num_classes: int,
                          generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        targets = nnf.one_hot(labels, num_classes).to(x.dtype)
        candidates = []
        if self.mixup_alpha:
            weight = sample_beta(self.mixup_alpha, generator, x.device)
            weight = torch.maximum(weight, 1 - weight)  # the official code keeps the larger share
            candidates.append((weight * x + (1 - weight) * x.flip(0), weight))
        if self.cutmix_alpha:
            box = _cutmix_box(x.shape[-2:], sample_beta(self.cutmix_alpha, generator, x.device), generator)
            candidates.append((torch.where(box, x.flip(0), x), 1 - box.to(x.dtype).mean()))
        if len(candidates) == 2:
            use_first = torch.rand((), generator=generator, device=x.device) < 0.5
            candidates = [tuple(torch.where(use_first, a, b) for a, b in zip(*candidates))]
        mixed, weight = candidates[0]
        return mixed, weight * targets + (1 - weight) * targets.flip(0)

    def _policy_table(self, images: torch.Tensor) -> _PolicyTable:
        # Built once per device and size, so that no batch waits on a host-to-device copy.
        key = (images.device, images.shape[-2], images.shape[-1])
        if key not in self._policy_tables:
            if self.style == "official":
                self._policy_tables[key] = _PolicyTable.build(OFFICIAL_CIFAR_POLICY, OFFICIAL_OPERATIONS,
                                                              _official_argument, *key)
            else:
                self._policy_tables[key] = _PolicyTable.build(CIFAR10_POLICY, OPERATIONS, _magnitude, *key)
        return self._policy_tables[key]

    def __repr__(self) -> str:
        return (f"Augmentation(style={self.style!r}, autoaugment={self.autoaugment}, crop_flip={self.crop_flip}, "
                f"cutout_size={self.cutout_size}, mixup_alpha={self.mixup_alpha}, "
                f"cutmix_alpha={self.cutmix_alpha}, fill={self.fill})")


# ---------------------------------------------------------------------------------------------
# AutoAugment (Cubuk et al. 2019): the standard style runs the CIFAR-10 policy (policies.py) with
# torchvision's operations.

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


def _blend(degenerate: torch.Tensor | float, images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """degenerate + factor * (images - degenerate) per image, clipped to [0, 255] and truncated."""
    out = degenerate + factor.view(-1, 1, 1, 1) * (images.float() - degenerate)
    return out.clamp(0, 255).to(torch.uint8)


def _grayscale(images: torch.Tensor) -> torch.Tensor:
    # floored to integers, as PIL's and torchvision's saturation and contrast of uint8 images
    return F.rgb_to_grayscale(images.float()).floor()


def _sharpness_degenerate(images: torch.Tensor, truncate: bool = False) -> torch.Tensor:
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


# Pixel operations of a batch and per-image magnitudes; the five geometric ones share one resampling.
_PIXEL_OPERATIONS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "Brightness": lambda x, m: _blend(0.0, x, 1 + m),
    "Color": lambda x, m: _blend(_grayscale(x), x, 1 + m),
    "Contrast": lambda x, m: _blend(_grayscale(x).mean(dim=(-3, -2, -1), keepdim=True), x, 1 + m),
    "Sharpness": lambda x, m: _blend(_sharpness_degenerate(x), x, 1 + m),
    "Posterize": _posterize,
    "Solarize": _solarize,
    "AutoContrast": lambda x, m: _autocontrast(x),
    "Equalize": lambda x, m: F.equalize(x),
    "Invert": lambda x, m: F.invert(x),
}
_GEOMETRIC_OPERATIONS = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
OPERATIONS = _GEOMETRIC_OPERATIONS + tuple(_PIXEL_OPERATIONS)


class _PolicyTable:
    """A policy as device tensors [num_sub_policies, 2]: operation index, probability, magnitude,
    and whether the magnitude's sign is random."""

    def __init__(self, operation: torch.Tensor, probability: torch.Tensor, magnitude: torch.Tensor,
                 signed: torch.Tensor):
        self.operation, self.probability = operation, probability
        self.magnitude, self.signed = magnitude, signed

    @classmethod
    def build(cls, policy: Sequence[Sequence[tuple[str, float, int | None]]], operations: Sequence[str],
              magnitude_of: Callable[[str, int | None, int, int], tuple[float, bool]], device: torch.device,
              height: int, width: int) -> _PolicyTable:
        """`operations` numbers the operations; `magnitude_of(operation, level, height, width)`
        gives a step's magnitude and whether its sign is random."""
        steps = [[(operations.index(op), prob, *magnitude_of(op, level, height, width))
                  for op, prob, level in sub_policy] for sub_policy in policy]
        columns = list(zip(*[step for sub_policy in steps for step in sub_policy]))
        operation, probability, magnitude, signed = (
            torch.tensor(column, dtype=dtype).view(len(policy), -1).to(device)
            for column, dtype in zip(columns, (torch.long, torch.float32, torch.float32, torch.bool))
        )
        return cls(operation, probability, magnitude, signed)


def auto_augment(images: torch.Tensor, generator: torch.Generator, table: _PolicyTable,
                 fill: int = 128) -> torch.Tensor:
    """Per image: draw one sub-policy, then run its two steps in order, each with its probability
    and, where the operation is signed, a random sign. Geometric steps fill uncovered pixels with
    `fill` (grey, as the official implementation)."""
    operation, magnitude = _draw_steps(images, generator, table)
    for step in range(2):
        images = apply_operations(images, operation[:, step], magnitude[:, step], fill)
    return images


def _draw_steps(images: torch.Tensor, generator: torch.Generator,
                table: _PolicyTable) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, a sub-policy drawn uniformly: the operation index of each of its two steps (-1
    where the step's probability skips it) and its magnitude, negated at random where signed."""
    b = images.shape[0]
    device = images.device
    choice = torch.randint(0, table.operation.shape[0], (b,), generator=generator, device=device)
    applied = torch.rand(b, 2, generator=generator, device=device) < table.probability[choice]
    negative = torch.rand(b, 2, generator=generator, device=device) < 0.5
    magnitude = torch.where(table.signed[choice] & negative, -1.0, 1.0) * table.magnitude[choice]
    operation = torch.where(applied, table.operation[choice], -1)
    return operation, magnitude


def apply_operations(images: torch.Tensor, operation: torch.Tensor, magnitude: torch.Tensor,
                     fill: int = 128) -> torch.Tensor:
    """Apply to image i the operation OPERATIONS[operation[i]] with magnitude[i] (-1: none)."""
    images = _affine_nearest(images, _affine_matrices(operation, magnitude, *images.shape[-2:]), fill)
    return _apply_pixel_operations(images, operation, magnitude, OPERATIONS, _PIXEL_OPERATIONS)


def _apply_pixel_operations(images: torch.Tensor, operation: torch.Tensor, magnitude: torch.Tensor,
                            operations: Sequence[str],
                            pixel_operations: Mapping[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]],
                            ) -> torch.Tensor:
    # each operation runs on the whole batch; only the images that drew it keep its result
    for index, name in enumerate(operations):
        if name in pixel_operations:
            chosen = (operation == index).view(-1, 1, 1, 1)
            images = torch.where(chosen, pixel_operations[name](images, magnitude), images)
    return images


def _affine_matrices(operation: torch.Tensor, magnitude: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Per-image 2x3 maps from output to input pixel coordinates, pixel centres at integers
    (identity for non-geometric operations). Shears act about the image's top-left corner
    (-0.5, -0.5), as PIL's; rotations about the image centre; translations move the content by
    +magnitude pixels."""
    def only(name: str) -> torch.Tensor:
        return torch.where(operation == OPERATIONS.index(name), magnitude, 0.0)

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


def _affine_nearest(images: torch.Tensor, matrix: torch.Tensor, fill: int) -> torch.Tensor:
    """Nearest-neighbour resampling with per-image affine maps; pixels mapped from outside the
    image get `fill`. Identity maps reproduce the image exactly."""
    b, c, h, w = images.shape
    device = images.device
    ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float32),
                            torch.arange(w, device=device, dtype=torch.float32), indexing="ij")
    output_coords = torch.stack([xs, ys, torch.ones_like(xs)], dim=-1).view(1, h * w, 3)
    source = output_coords @ matrix.transpose(1, 2)
    # grid_sample's normalised coordinates (align_corners=False): pixel centre i sits at (2i + 1) / size - 1
    grid = torch.stack([(source[..., 0] + 0.5) * (2.0 / w) - 1.0,
                        (source[..., 1] + 0.5) * (2.0 / h) - 1.0], dim=-1).view(b, h, w, 2)
    with_coverage = torch.cat([images.float(), torch.ones(b, 1, h, w, device=device)], dim=1)
    sampled = nnf.grid_sample(with_coverage, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    covered = sampled[:, -1:] > 0.5
    return torch.where(covered, sampled[:, :-1], float(fill)).to(torch.uint8)


# ---------------------------------------------------------------------------------------------
# The official AutoAugment: the policy of the AutoAugment authors' code (tensorflow/models
# research/autoaugment, policies.py `good_policies`, as google-research/sam's `policy_cifar`), run
# with the operations and level-to-argument maps of tensorflow/tpu's efficientnet `autoaugment.py`
# as SAM's code forks them (translate_const 250, cutout_const 100), on uint8 images before the crop
# and flip. Their behaviour on 32x32 images, kept as is:
# - levels are out of 10, and translations and the policy's Cutout are sized in pixels for
#   ImageNet: a translation of level >= 2 (50 px) or a Cutout of level 4 (a hole reaching 40 px
#   each side of its centre) leaves a plain grey (128) image;
# - Contrast blends towards a grey of (pixel count / 256), 4 for 32x32 images, not the image's mean
#   (the reference sums the histogram's counts instead of the pixel values);
# - the four enhancement factors are 0.1 + 1.8 * level / 10 with no random sign; Solarize inverts
#   pixels >= int(256 * level / 10); Posterize keeps int(4 * level / 10) bits (2 at the policy's
#   level 7; it never asks for 0 bits, which the reference leaves to TensorFlow's shift of 8);
# - geometric steps map output pixel centres (at integers) to source pixels rounded half away from
#   zero (TensorFlow's ImageProjectiveTransform), shears act about pixel (0, 0), and uncovered
#   pixels get grey 128, as does the policy's Cutout.
# Differences left: float32 evaluation order, which may move a blended, greyscale or sharpened pixel
# by one level, and AutoContrast's scaling, which may differ by one level from the reference's.

def _official_argument(operation: str, level: int | None, height: int, width: int) -> tuple[float, bool]:
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


def _official_contrast_grey(images: torch.Tensor) -> float:
    """The grey the official Contrast blends towards: its histogram's total count (the number of
    pixels) / 256, truncated, where PIL takes the mean grey level."""
    return float(min(images.shape[-2] * images.shape[-1] // 256, 255))


# The official code's factor is the blend factor itself (the standard one's magnitude is factor - 1);
# the other pixel operations are the same functions.
_OFFICIAL_PIXEL_OPERATIONS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    **_PIXEL_OPERATIONS,
    "Brightness": lambda x, f: _blend(0.0, x, f),
    "Color": lambda x, f: _blend(_tf_grayscale(x), x, f),
    "Contrast": lambda x, f: _blend(_official_contrast_grey(x), x, f),
    "Sharpness": lambda x, f: _blend(_sharpness_degenerate(x, truncate=True), x, f),
}
OFFICIAL_OPERATIONS = _GEOMETRIC_OPERATIONS + ("Cutout",) + tuple(_OFFICIAL_PIXEL_OPERATIONS)


def official_auto_augment(images: torch.Tensor, generator: torch.Generator, table: _PolicyTable,
                          fill: int = 128) -> torch.Tensor:
    """auto_augment with the official policy table (`_PolicyTable.build(OFFICIAL_CIFAR_POLICY,
    OFFICIAL_OPERATIONS, _official_argument, ...)`) and operations."""
    operation, argument = _draw_steps(images, generator, table)
    for step in range(2):
        images = apply_official_operations(images, operation[:, step], argument[:, step], generator, fill)
    return images


def apply_official_operations(images: torch.Tensor, operation: torch.Tensor, argument: torch.Tensor,
                              generator: torch.Generator, fill: int = 128) -> torch.Tensor:
    """Apply to image i the official operation OFFICIAL_OPERATIONS[operation[i]] with argument[i]
    (-1: none). Every image draws a Cutout centre from `generator`, used only where it does Cutout."""
    h, w = images.shape[-2:]
    images = _affine_nearest_half_away(images, _official_affine_matrices(operation, argument, h, w), fill)
    half_side = torch.where(operation == OFFICIAL_OPERATIONS.index("Cutout"), argument, 0.0)
    images = _policy_cutout(images, half_side, generator, fill)
    return _apply_pixel_operations(images, operation, argument, OFFICIAL_OPERATIONS, _OFFICIAL_PIXEL_OPERATIONS)


def _policy_cutout(images: torch.Tensor, half_side: torch.Tensor, generator: torch.Generator,
                   fill: int) -> torch.Tensor:
    """Per image, the hole [c - half_side, c + half_side) on each axis around a uniformly random
    centre c, clipped at the borders, set to `fill` (no hole where half_side is 0)."""
    b, _, h, w = images.shape
    device = images.device
    centre_rows = torch.randint(0, h, (b, 1), generator=generator, device=device)
    centre_cols = torch.randint(0, w, (b, 1), generator=generator, device=device)
    half_side = half_side.view(b, 1)
    rows = _in_window(torch.arange(h, device=device), centre_rows - half_side, 2 * half_side)
    cols = _in_window(torch.arange(w, device=device), centre_cols - half_side, 2 * half_side)
    return torch.where(rows[:, None, :, None] & cols[:, None, None, :], fill, images)


def _official_affine_matrices(operation: torch.Tensor, argument: torch.Tensor, height: int,
                              width: int) -> torch.Tensor:
    """Per-image 2x3 maps from output to input pixel coordinates (pixel centres at integers), as
    the official code's projective transforms: ShearX s: x_in = x + s y; ShearY: y_in = y + s x;
    TranslateX p: x_in = x + p (the content moves by -p); Rotate by the angle about the image
    centre (tfa.image.rotate); identity for the other operations."""
    def only(name: str) -> torch.Tensor:
        return torch.where(operation == OFFICIAL_OPERATIONS.index(name), argument, 0.0)

    angle = only("Rotate") * (math.pi / 180.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    offset_x = ((width - 1) - (cos * (width - 1) - sin * (height - 1))) / 2.0
    offset_y = ((height - 1) - (sin * (width - 1) + cos * (height - 1))) / 2.0
    return torch.stack([
        torch.stack([cos, only("ShearX") - sin, offset_x + only("TranslateX")], dim=-1),
        torch.stack([only("ShearY") + sin, cos, offset_y + only("TranslateY")], dim=-1),
    ], dim=1)


def _affine_nearest_half_away(images: torch.Tensor, matrix: torch.Tensor, fill: int) -> torch.Tensor:
    """Nearest-neighbour resampling as TensorFlow's ImageProjectiveTransform: each output pixel
    takes the source pixel at its mapped coordinates rounded half away from zero, or `fill` when
    that pixel lies outside the image."""
    b, c, h, w = images.shape
    device = images.device
    ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float32),
                            torch.arange(w, device=device, dtype=torch.float32), indexing="ij")
    xs, ys = xs.reshape(1, h * w), ys.reshape(1, h * w)
    source_x = matrix[:, 0, 0:1] * xs + matrix[:, 0, 1:2] * ys + matrix[:, 0, 2:3]
    source_y = matrix[:, 1, 0:1] * xs + matrix[:, 1, 1:2] * ys + matrix[:, 1, 2:3]
    col, row = _round_half_away(source_x), _round_half_away(source_y)
    covered = (col >= 0) & (col <= w - 1) & (row >= 0) & (row <= h - 1)
    index = (row.clamp(0, h - 1) * w + col.clamp(0, w - 1)).long()
    pixels = images.reshape(b, c, h * w).gather(2, index[:, None, :].expand(b, c, h * w))
    return torch.where(covered[:, None, :], pixels, fill).view(b, c, h, w)


def _round_half_away(values: torch.Tensor) -> torch.Tensor:
    # C's round(); torch.round rounds halves to even, and floor(v + 0.5) misrounds just below 0.5
    whole = values.trunc()
    return torch.where((values - whole).abs() == 0.5, whole + values.sign(), values.round())
