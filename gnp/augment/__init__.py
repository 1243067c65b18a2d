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

The package: crop.py (crop + flip and the holes), mixing.py (mixup and cutmix), autoaugment.py (the
AutoAugment machinery both styles share), standard.py and official.py (what each style's AutoAugment
does its own way), policies.py (the two policies as data).
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from functools import cache
from typing import TYPE_CHECKING, Any

import torch
import yaml

from gnp.augment.crop import batch_cutout, cutout, random_crop_flip
from gnp.augment.mixing import mix_with_reverse
from gnp.paths import CONF_DIR

if TYPE_CHECKING:
    from gnp.augment.autoaugment import AutoAugment, PolicyTable

STYLES = ("official", "standard")
PRESET_DIR = CONF_DIR / "aug"  # the presets, each every option of the augmentation: conf/aug/<name>.yaml


@cache
def presets() -> dict[str, dict[str, Any]]:
    """Each preset's options by its name: conf/aug/*.yaml, the one place they are stated. In the order tables
    show them, the least augmentation first (AutoAugment outweighs mixing, mixing a hole, a hole crop + flip)."""
    options = {path.stem: {k: v for k, v in yaml.safe_load(path.read_text()).items() if k != "name"}
               for path in sorted(PRESET_DIR.glob("*.yaml"))}
    return dict(sorted(options.items(), key=lambda item: (item[1]["autoaugment"], item[1]["mixup_alpha"] +
                                                          item[1]["cutmix_alpha"], item[1]["cutout_size"],
                                                          item[1]["crop_flip"])))


def _autoaugment(style: str) -> AutoAugment:
    """The style's AutoAugment, imported on first use: its operations are torchvision's, whose import (about
    1.5 s) a run without AutoAugment need not pay."""
    if style == "official":
        from gnp.augment.official import OFFICIAL
        return OFFICIAL
    from gnp.augment.standard import STANDARD
    return STANDARD


def build_augmentation(cfg: Mapping[str, Any], mean: Sequence[float]) -> Augmentation:
    """The augmentation that `cfg` (`name`, a preset, plus optional overrides of its options)
    describes; `mean` (per channel, in [0, 1]) is the cutout fill, which normalises to about 0."""
    options = dict(cfg)
    name = options.pop("name", None)
    if name not in presets():
        raise ValueError(f"aug.name={name!r} is not a known augmentation; choose one of: {', '.join(presets())}")
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"aug has no option(s) {', '.join(unknown)}; its options are: {', '.join(OPTIONS)}")
    mean = [float(m) for m in mean]
    if len(mean) != 3 or not all(0.0 <= m <= 1.0 for m in mean):
        raise ValueError(f"mean={mean} must be 3 per-channel values in [0, 1] (dataset.mean)")
    return Augmentation(**{**presets()[name], **options}, fill=tuple(round(255 * m) for m in mean))


class Augmentation:
    """Per-image AutoAugment and random crop + flip of uint8 batches (in that order; the standard
    style then cuts one hole per image), and the batch stage of the normalised batch (`mix`):
    mixup / cutmix, then, in the official style, one cutout hole for the whole batch.

    Every option is given: the presets (conf/aug/*.yaml, `build_augmentation`) say their values."""

    def __init__(self, *, style: str, autoaugment: bool, crop_flip: bool, cutout_size: int, mixup_alpha: float,
                 cutmix_alpha: float, fill: tuple[int, int, int] = (0, 0, 0), padding: int = 4):
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
        self._policy_tables: dict[tuple[torch.device, int, int], PolicyTable] = {}

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Augment a uint8 batch [B, 3, H, W]; returns a new uint8 batch of the same shape."""
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(
                f"augmentation expects uint8 images [B, 3, H, W], got {images.dtype} {tuple(images.shape)}"
            )
        if self.autoaugment:
            images = _autoaugment(self.style)(images, generator, self._policy_table(images))
        if self.crop_flip:
            images = random_crop_flip(images, self.padding, generator)
        if self.cutout_size and self.style == "standard":
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
            x, labels = mix_with_reverse(x, labels, num_classes, self.mixup_alpha, self.cutmix_alpha, generator)
        if self.cutout_size and self.style == "official":
            x = batch_cutout(x, self.cutout_size, generator)
        return x, labels

    def _policy_table(self, images: torch.Tensor) -> PolicyTable:
        # Built once per device and size, so that no batch waits on a host-to-device copy.
        key = (images.device, images.shape[-2], images.shape[-1])
        if key not in self._policy_tables:
            self._policy_tables[key] = _autoaugment(self.style).table(*key)
        return self._policy_tables[key]

    def __repr__(self) -> str:
        return (f"Augmentation(style={self.style!r}, autoaugment={self.autoaugment}, crop_flip={self.crop_flip}, "
                f"cutout_size={self.cutout_size}, mixup_alpha={self.mixup_alpha}, "
                f"cutmix_alpha={self.cutmix_alpha}, fill={self.fill})")


# The options a config gives: the constructor's arguments but the fill (the dataset's mean gives it) and the padding.
OPTIONS = tuple(name for name in inspect.signature(Augmentation).parameters if name not in ("fill", "padding"))
