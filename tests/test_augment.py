"""Augmentations: per-image statistics of crop/flip/cutout, reflect padding against numpy, the
standard AutoAugment operations against torchvision's and the official ones against PIL or
hand-written references of the official code's formulas, the official batch-level cutout and the
order of mixup and cutout, mixup/cutmix targets, and config handling."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageEnhance
import PIL.ImageOps
import pytest
import scipy.stats
import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF
from omegaconf import OmegaConf

from gnp.augment import OPTIONS, STYLES, build_augmentation, presets
from gnp.augment.crop import _reflect, batch_cutout, cutout, random_crop_flip
from gnp.augment.mixing import sample_beta
from gnp.augment.official import OFFICIAL
from gnp.augment.policies import CIFAR10_POLICY, OFFICIAL_CIFAR_POLICY
from gnp.augment.standard import STANDARD

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CONF_AUG = Path(__file__).resolve().parents[1] / "conf" / "aug"


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def coordinate_images(n: int, size: int = 32) -> torch.Tensor:
    """Channel 0 holds 40 + row, channel 1 holds 40 + column: each output pixel names its source."""
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    image = torch.stack([40 + rows, 40 + cols, torch.zeros_like(rows)])
    return image.expand(n, 3, size, size).to(torch.uint8).contiguous()


def crop_draws(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row offset, column offset, flipped) of each image cropped from coordinate_images."""
    centre_row, centre_col = out[:, 0, 16, 16].long() - 40, out[:, 1, 16, 16].long() - 40
    flipped = out[:, 1, 16, 17] < out[:, 1, 16, 16]
    # crop then flip: output column 16 shows cropped column 15
    return centre_row - 16, torch.where(flipped, centre_col - 15, centre_col - 16), flipped


def random_images(n: int, seed: int = 0, size: int = 32) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), generator=generator(seed), dtype=torch.uint8)


def smooth_images(n: int) -> torch.Tensor:
    """Gradients plus noise: images on which every AutoAugment operation changes something."""
    rows, cols = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    base = torch.stack([cols * 6, rows * 6, (rows + cols) * 3])
    noise = torch.randn(n, 3, 32, 32, generator=generator(1)) * 20
    return (base + noise + 30 * torch.arange(n).view(n, 1, 1, 1) % 120).clamp(0, 255).to(torch.uint8)


# --- crop and flip -------------------------------------------------------------------------------

def test_reflect_indices_by_hand():
    assert _reflect(torch.tensor([-3, -2, -1, 0, 5, 6, 7, 8]), 6).tolist() == [3, 2, 1, 0, 5, 4, 3, 2]


def test_every_crop_offset_occurs_and_flips_are_about_half():
    out = random_crop_flip(coordinate_images(4000), 4, generator())
    dy, dx, flipped = crop_draws(out)
    for offsets in (dy, dx):
        counts = torch.bincount(offsets + 4, minlength=9)
        assert counts.numel() == 9 and (counts > 0).all()
        assert scipy.stats.chisquare(counts.numpy()).pvalue > 1e-4  # uniform over [-4, 4]
    assert abs(flipped.float().mean().item() - 0.5) < 0.04


def test_crop_flip_equals_numpy_reflect_padding():
    images, draws = random_images(64), random_crop_flip(coordinate_images(64), 4, generator(3))
    out = random_crop_flip(images, 4, generator(3))  # same generator state: same draws
    dy, dx, flipped = crop_draws(draws)
    padded = np.pad(images.numpy(), ((0, 0), (0, 0), (4, 4), (4, 4)), mode="reflect")
    for i in range(len(images)):
        expected = padded[i, :, 4 + dy[i]: 36 + dy[i], 4 + dx[i]: 36 + dx[i]]
        if flipped[i]:
            expected = expected[:, :, ::-1]
        np.testing.assert_array_equal(out[i].numpy(), expected)


def test_crop_draws_differ_per_image_and_follow_the_generator():
    images = coordinate_images(256)
    dy, dx, flipped = crop_draws(random_crop_flip(images, 4, generator(0)))
    assert len(set(zip(dy.tolist(), dx.tolist(), flipped.tolist()))) > 90  # of 162 combinations
    assert torch.equal(random_crop_flip(images, 4, generator(0)), random_crop_flip(images, 4, generator(0)))
    assert not torch.equal(random_crop_flip(images, 4, generator(0)), random_crop_flip(images, 4, generator(1)))


# --- cutout ---------------------------------------------------------------------------------------

def test_cutout_holes_are_16x16_clipped_at_borders_and_mean_coloured():
    augment = build_augmentation({"name": "cutout", "style": "standard"}, mean=CIFAR10_MEAN)
    out = augment(torch.full((2000, 3, 32, 32), 255, dtype=torch.uint8), generator())
    fill = torch.tensor([round(255 * m) for m in CIFAR10_MEAN], dtype=torch.uint8)
    hole = (out != 255).all(dim=1)
    assert torch.equal(hole, (out == fill.view(1, 3, 1, 1)).all(dim=1))  # hole pixels are the fill
    rows, cols = hole.any(dim=2), hole.any(dim=1)
    assert torch.equal(hole, rows[:, :, None] & cols[:, None, :])  # one rectangle per image
    heights, widths = rows.sum(1), cols.sum(1)
    assert heights.min() >= 8 and widths.min() >= 8 and heights.max() == 16 and widths.max() == 16
    interior = ~rows[:, 0] & ~rows[:, -1] & ~cols[:, 0] & ~cols[:, -1]
    assert (heights[interior] == 16).all() and (widths[interior] == 16).all()
    # holes clear of all four borders: centre row and column each in [9, 23], 15 of 32 values
    assert abs(interior.float().mean().item() - (15 / 32) ** 2) < 0.04
    top_left = rows.float().argmax(1) * 32 + cols.float().argmax(1)
    assert top_left.unique().numel() > 200  # each image draws its own hole


def test_cutout_fill_normalises_to_about_zero():
    fill = build_augmentation({"name": "cutout", "style": "standard"}, mean=CIFAR10_MEAN).fill
    normalised = [(f / 255 - m) / s for f, m, s in zip(fill, CIFAR10_MEAN, CIFAR10_STD)]
    assert max(abs(v) for v in normalised) <= 0.5 / 255 / min(CIFAR10_STD)


def test_cutout_changes_only_the_hole():
    images = random_images(32)
    out = cutout(images, 16, (1, 2, 3), generator(4))
    blank = torch.full_like(images, 255)
    hole = (cutout(blank, 16, (1, 2, 3), generator(4)) != blank).any(dim=1, keepdim=True)  # same draws
    assert torch.equal(out, torch.where(hole, torch.tensor([1, 2, 3], dtype=torch.uint8).view(1, 3, 1, 1), images))


# --- AutoAugment ----------------------------------------------------------------------------------

def test_policy_is_torchvisions_cifar10_policy():
    reference = T.AutoAugment(T.AutoAugmentPolicy.CIFAR10)._policies
    assert [tuple(tuple(step) for step in sub) for sub in CIFAR10_POLICY] == [tuple(sub) for sub in reference]


def _torchvision_operation(name: str, magnitude: float, images: torch.Tensor) -> torch.Tensor:
    """The same operation through torchvision's functional API (its AutoAugment's conventions)."""
    geometric = dict(angle=0.0, translate=[0, 0], scale=1.0, shear=[0.0, 0.0], fill=128)
    shear = float(np.degrees(np.arctan(magnitude)))
    calls = {
        "ShearX": lambda x: TF.affine(x, **{**geometric, "shear": [shear, 0.0]}, center=[0, 0]),
        "ShearY": lambda x: TF.affine(x, **{**geometric, "shear": [0.0, shear]}, center=[0, 0]),
        "TranslateX": lambda x: TF.affine(x, **{**geometric, "translate": [int(magnitude), 0]}),
        "TranslateY": lambda x: TF.affine(x, **{**geometric, "translate": [0, int(magnitude)]}),
        "Rotate": lambda x: TF.rotate(x, magnitude, fill=128),
        "Brightness": lambda x: TF.adjust_brightness(x, 1 + magnitude),
        "Color": lambda x: TF.adjust_saturation(x, 1 + magnitude),
        "Contrast": lambda x: TF.adjust_contrast(x, 1 + magnitude),
        "Sharpness": lambda x: TF.adjust_sharpness(x, 1 + magnitude),
        "Posterize": lambda x: TF.posterize(x, int(magnitude)),
        "Solarize": lambda x: TF.solarize(x, magnitude),
        "AutoContrast": TF.autocontrast,
        "Equalize": TF.equalize,
        "Invert": TF.invert,
    }
    return calls[name](images)


def _operation_cases() -> list[tuple[str, float]]:
    cases = []
    for name in STANDARD.operations:
        for level in ((None,) if name in ("AutoContrast", "Equalize", "Invert") else (2, 9)):
            magnitude, signed = STANDARD.argument(name, level, 32, 32)
            cases += [(name, magnitude)] + ([(name, -magnitude)] if signed else [])
    return cases


def test_each_operation_in_one_batch_matches_torchvision():
    """Every operation at two levels and both signs, each image of one batch its own case."""
    cases = _operation_cases()
    images = smooth_images(len(cases))
    operation = torch.tensor([STANDARD.operations.index(name) for name, _ in cases])
    out = STANDARD.apply(images, operation, torch.tensor([m for _, m in cases]), generator())
    for i, (name, magnitude) in enumerate(cases):
        expected = _torchvision_operation(name, magnitude, images[i: i + 1])[0]
        difference = (out[i].int() - expected.int()).abs().amax(dim=0)
        if name in ("ShearX", "ShearY"):
            # small shears put some source points exactly half-way between pixels: ties round either way
            assert (difference > 0).float().mean() < 0.02, (name, magnitude)
        else:
            # blends truncate to uint8, so a different float evaluation order may move a pixel by 1
            assert difference.max() <= 1, (name, magnitude)
            assert (difference > 0).float().mean() < 0.1, (name, magnitude)
        assert not torch.equal(out[i], images[i]), (name, magnitude)


def test_skipped_steps_leave_images_unchanged():
    images = smooth_images(8)
    out = STANDARD.apply(images, torch.full((8,), -1), torch.linspace(-5, 5, 8), generator())
    assert torch.equal(out, images)


@pytest.mark.parametrize("style", STYLES)
def test_autoaugment_keeps_uint8_and_shape_and_follows_the_generator(style):
    augment = build_augmentation({"name": "autoaugment", "crop_flip": False, "style": style}, mean=CIFAR10_MEAN)
    images = smooth_images(16)
    out = augment(images, generator(5))
    assert out.dtype == torch.uint8 and out.shape == images.shape
    assert torch.equal(out, augment(images, generator(5)))
    assert not torch.equal(out, augment(images, generator(6)))


def test_autoaugment_treats_each_image_differently():
    augment = build_augmentation({"name": "autoaugment", "crop_flip": False, "style": "standard"}, mean=CIFAR10_MEAN)
    copies = smooth_images(1).expand(48, 3, 32, 32).contiguous()
    out = augment(copies, generator())
    distinct = torch.unique(out.flatten(1), dim=0).shape[0]
    assert distinct > 20
    unchanged = (out == copies).flatten(1).all(1).float().mean().item()
    # P(neither step of the drawn sub-policy fires), averaged over the 25 sub-policies
    expected = np.mean([(1 - a[1]) * (1 - b[1]) for a, b in CIFAR10_POLICY])
    assert abs(unchanged - expected) < 0.2


def test_standard_style_composes_the_standard_steps_in_order():
    """The standard pipeline is today's: torchvision's policy, crop + flip, then a per-image hole,
    all from one generator; its batch stage mixes without cutting."""
    augment = build_augmentation({"name": "autoaugment_mixcut", "style": "standard"}, mean=CIFAR10_MEAN)
    images, labels = smooth_images(64), torch.arange(64) % 10
    g = generator(3)
    out = augment(images, g)
    x, target = augment.mix(out.float() / 255, labels, 10, g)
    g = generator(3)
    table = STANDARD.table(torch.device("cpu"), 32, 32)
    expected = cutout(random_crop_flip(STANDARD(images, g, table), 4, g), 16, augment.fill, g)
    assert torch.equal(out, expected)
    weight = target[0, labels[0]]
    torch.testing.assert_close(x, weight * out.float() / 255 + (1 - weight) * out.flip(0).float() / 255)


# --- the official style ---------------------------------------------------------------------------

def test_official_policy_is_the_95_good_policies():
    assert len(OFFICIAL_CIFAR_POLICY) == 95 and all(len(sub) == 2 for sub in OFFICIAL_CIFAR_POLICY)
    steps = [step for sub in OFFICIAL_CIFAR_POLICY for step in sub]
    assert all(0.0 <= p <= 1.0 and level in range(10) for _, p, level in steps)
    assert {name for name, _, _ in steps} == {
        "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "Color", "Contrast",
        "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY", "Cutout"}
    cutouts = [step for step in steps if step[0] == "Cutout"]
    assert cutouts == [("Cutout", 0.2, 4), ("Cutout", 0.3, 3), ("Cutout", 0.5, 3)]
    # the AutoAugment paper's CIFAR-10 policy (torchvision's) shares 20 of its 25 sub-policies
    def same(paper, good):
        return all(a[:2] == b[:2] and a[2] in (None, b[2]) for a, b in zip(paper, good))
    shared = [sub for sub in CIFAR10_POLICY if any(same(sub, good) for good in OFFICIAL_CIFAR_POLICY)]
    assert len(shared) == 20


@pytest.mark.parametrize(
    "operation, level, argument, signed",
    [
        # hand-computed from the official level_to_arg: levels out of 10, SAM's translate 250, cutout 100
        ("Rotate", 2, 6.0, True), ("Rotate", 7, 21.0, True),
        ("ShearX", 4, 0.12, True), ("ShearY", 8, 0.24, True),
        ("TranslateX", 8, 200.0, True), ("TranslateY", 3, 75.0, True),
        ("Color", 0, 0.1, False), ("Brightness", 9, 1.72, False), ("Contrast", 5, 1.0, False),
        ("Sharpness", 3, 0.64, False),
        ("Posterize", 7, 2.0, False), ("Posterize", 3, 1.0, False),
        ("Solarize", 0, 0.0, False), ("Solarize", 3, 76.0, False), ("Solarize", 5, 128.0, False),
        ("Cutout", 4, 40.0, False), ("Cutout", 3, 30.0, False),
        ("Equalize", 9, 0.0, False), ("Invert", 7, 0.0, False), ("AutoContrast", 8, 0.0, False),
    ],
)
def test_official_level_to_argument(operation, level, argument, signed):
    assert OFFICIAL.argument(operation, level, 32, 32) == (pytest.approx(argument), signed)


def _official_geometric_reference(name: str, argument: float, image: np.ndarray) -> np.ndarray:
    """The official code's projective transforms by hand: output pixel (x, y) reads the source pixel
    nearest to its mapped position (float32 arithmetic, halves rounded away from zero), else 128."""
    _, h, w = image.shape
    y, x = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32), indexing="ij")
    a = np.float32(argument)
    if name == "ShearX":
        source_x, source_y = x + a * y, y
    elif name == "ShearY":
        source_x, source_y = x, a * x + y
    elif name == "TranslateX":
        source_x, source_y = x + a, y
    elif name == "TranslateY":
        source_x, source_y = x, y + a
    else:  # Rotate: by the angle about the image centre
        t = np.deg2rad(argument)
        cx, cy = (w - 1) / 2, (h - 1) / 2
        source_x = np.cos(t) * (x - cx) - np.sin(t) * (y - cy) + cx
        source_y = np.sin(t) * (x - cx) + np.cos(t) * (y - cy) + cy
    col, row = (np.sign(v) * np.floor(np.abs(v.astype(np.float64)) + 0.5) for v in (source_x, source_y))
    inside = (col >= 0) & (col < w) & (row >= 0) & (row < h)
    out = np.full_like(image, 128)
    out[:, inside] = image[:, row[inside].astype(int), col[inside].astype(int)]
    return out


def _pil(image: torch.Tensor) -> PIL.Image.Image:
    return PIL.Image.fromarray(image.permute(1, 2, 0).numpy())


def _official_pixel_reference(name: str, argument: float, image: torch.Tensor) -> np.ndarray:
    """PIL's operation, which the official code's TensorFlow ops reimplement, except for Contrast:
    the official one blends towards grey (pixel count / 256), where PIL takes the mean grey."""
    if name == "Contrast":
        grey = image.shape[1] * image.shape[2] // 256
        return np.clip(grey + argument * (image.numpy().astype(np.float64) - grey), 0, 255).astype(np.uint8)
    pil = _pil(image)
    calls = {
        "Brightness": lambda: PIL.ImageEnhance.Brightness(pil).enhance(argument),
        "Color": lambda: PIL.ImageEnhance.Color(pil).enhance(argument),
        "Sharpness": lambda: PIL.ImageEnhance.Sharpness(pil).enhance(argument),
        "Posterize": lambda: PIL.ImageOps.posterize(pil, int(argument)),
        "Solarize": lambda: PIL.ImageOps.solarize(pil, int(argument)),
        "AutoContrast": lambda: PIL.ImageOps.autocontrast(pil),
        "Equalize": lambda: PIL.ImageOps.equalize(pil),
        "Invert": lambda: PIL.ImageOps.invert(pil),
    }
    return np.asarray(calls[name]()).transpose(2, 0, 1)


_OFFICIAL_GEOMETRIC_CASES = [
    (name, sign * argument)
    for name, arguments in (("ShearX", (0.09, 0.24)), ("ShearY", (0.09, 0.24)), ("Rotate", (6.0, 21.0)),
                            ("TranslateX", (25.0, 225.0)), ("TranslateY", (25.0, 225.0)),
                            ("ShearX", (0.5,)))  # source columns at halves: rounded away from zero
    for argument in arguments for sign in (1, -1)
]
_OFFICIAL_PIXEL_CASES = (
    [(name, 0.1 + 1.8 * level / 10)
     for name in ("Brightness", "Color", "Contrast", "Sharpness") for level in (0, 3, 7, 9)]
    + [("Posterize", 2.0), ("Posterize", 1.0)]
    + [("Solarize", threshold) for threshold in (0.0, 51.0, 128.0, 204.0)]
    + [("AutoContrast", 0.0), ("Equalize", 0.0), ("Invert", 0.0)]
)


def test_each_official_operation_in_one_batch_matches_its_reference():
    """Every official operation with known arguments and signs, each image of one batch its own case."""
    cases = _OFFICIAL_GEOMETRIC_CASES + _OFFICIAL_PIXEL_CASES
    images = smooth_images(len(cases))
    operation = torch.tensor([OFFICIAL.operations.index(name) for name, _ in cases])
    out = OFFICIAL.apply(images, operation, torch.tensor([a for _, a in cases]), generator())
    for i, (name, argument) in enumerate(cases):
        if (name, argument) in _OFFICIAL_GEOMETRIC_CASES:
            expected = _official_geometric_reference(name, argument, images[i].numpy())
        else:
            expected = _official_pixel_reference(name, argument, images[i])
        difference = np.abs(out[i].numpy().astype(int) - expected.astype(int))
        if name == "Rotate":
            # cos and sin in float32 (the official code) and float64 (here) may round a pixel differently
            assert (difference.max(axis=0) > 0).mean() < 0.01, (name, argument)
        elif name in ("ShearX", "ShearY", "TranslateX", "TranslateY", "Posterize", "Solarize", "Equalize", "Invert"):
            assert difference.max() == 0, (name, argument)
        else:
            # truncations and greyscale weights of TensorFlow and PIL may differ by one level
            assert difference.max() <= 1, (name, argument)
        assert not torch.equal(out[i], images[i]), (name, argument)


def test_official_translations_of_50_pixels_or_more_leave_plain_grey():
    images = smooth_images(4)
    names = ("TranslateX", "TranslateY", "TranslateX", "Rotate")
    operation = torch.tensor([OFFICIAL.operations.index(name) for name in names])
    out = OFFICIAL.apply(images, operation, torch.tensor([50.0, -50.0, 31.0, 0.0]), generator())
    assert (out[:2] == 128).all()
    assert not (out[2] == 128).all() and (out[2, :, :, 1:] == 128).all()  # one column of 32 survives 31 px
    assert torch.equal(out[3], images[3])  # a zero angle is the identity


def test_official_contrast_blends_towards_grey_4_on_32x32_images():
    white = torch.full((1, 3, 32, 32), 255, dtype=torch.uint8)
    out = OFFICIAL.apply(white, torch.tensor([OFFICIAL.operations.index("Contrast")]),
                         torch.tensor([0.1]), generator())
    assert (out == 29).all()  # 4 + 0.1 * (255 - 4) = 29.1


def test_official_policy_cutout_holes_reach_the_argument_each_side_and_are_grey():
    white = torch.full((600, 3, 32, 32), 255, dtype=torch.uint8)
    half_side = torch.tensor([5.0, 40.0]).repeat(300)
    operation = torch.full((600,), OFFICIAL.operations.index("Cutout"))
    out = OFFICIAL.apply(white, operation, half_side, generator())
    hole = out[:, 0] != 255
    assert ((out == 128).all(dim=1) == hole).all()
    assert hole[1::2].all()  # 40 pixels each side of any centre covers a 32x32 image
    windows = {(max(0, c - 5), min(32, c + 5)) for c in range(32)}
    starts = set()
    for mask in hole[0::2]:
        rows, cols = mask.any(1), mask.any(0)
        assert torch.equal(mask, rows[:, None] & cols[None, :])
        for axis in (rows, cols):
            where = axis.nonzero().flatten()
            assert (where[0].item(), where[-1].item() + 1) in windows
            starts.add(where[0].item())
    assert len(starts) == len({start for start, _ in windows})  # every centre occurs


def test_official_autoaugment_leaves_as_many_plain_grey_images_as_its_policy_predicts():
    """A translation of level >= 2 or a Cutout of level 4 wipes a 32x32 image, a Cutout of level 3
    unless its centre is in the first two rows or columns; the operations after them keep a plain
    grey. Checks the sub-policy draw, each step's probability and the pixel sizes together."""
    def wipes(name, level):
        if name in ("TranslateX", "TranslateY"):
            return float(level >= 2)
        if name == "Cutout":
            return {4: 1.0, 3: (30 / 32) ** 2}[level]
        return 0.0
    expected = np.mean([1 - np.prod([1 - p * wipes(name, level) for name, p, level in sub])
                        for sub in OFFICIAL_CIFAR_POLICY])
    augment = build_augmentation({"name": "autoaugment", "crop_flip": False}, mean=CIFAR10_MEAN)
    out = augment(smooth_images(2000), generator())
    grey = (out == 128).flatten(1).all(1).float().mean().item()
    assert abs(grey - expected) < 0.03, (grey, expected)


def test_official_cutout_leaves_the_uint8_images_alone():
    augment = build_augmentation({"name": "cutout"}, mean=CIFAR10_MEAN)
    white = torch.full((64, 3, 32, 32), 255, dtype=torch.uint8)
    assert torch.equal(augment(white, generator()), white)


def test_official_cutout_is_one_hole_per_batch_set_to_zero_after_normalisation():
    augment = build_augmentation({"name": "cutout"}, mean=CIFAR10_MEAN)
    x, labels = torch.ones(4, 3, 32, 32), torch.arange(4)
    windows = {(max(0, c - 8), min(32, c + 8)) for c in range(32)}
    seen = set()
    for seed in range(300):
        out, target = augment.mix(x, labels, 10, generator(seed))
        assert target is labels
        hole = out == 0
        assert ((out == 1) | hole).all() and (hole == hole[:1, :1]).all()  # the same place in every image
        rows, cols = hole[0, 0].any(1), hole[0, 0].any(0)
        assert torch.equal(hole[0, 0], rows[:, None] & cols[None, :])
        for axis in (rows, cols):
            where = axis.nonzero().flatten()
            assert (where[0].item(), where[-1].item() + 1) in windows  # 16 wide, clipped at the borders
            seen.add((where[0].item(), where[-1].item() + 1))
    assert seen == windows  # every centre occurs


def test_official_cutout_of_odd_size_reaches_size_over_2_each_side():
    heights = {(batch_cutout(torch.ones(1, 3, 64, 64), 15, generator(seed))[0, 0] == 0).any(1).sum().item()
               for seed in range(20)}
    assert max(heights) == 14  # 7 rows each side of the centre, as the official code pads by 15 // 2


def test_official_mixcut_mixes_with_one_weight_then_cuts_one_hole():
    """One weight per batch, w >= 0.5, for images and targets; then one hole of zeros at the same
    place in every image (a hole shared by the batch gives the same images before or after mixup)."""
    augment = build_augmentation({"name": "autoaugment_mixcut"}, mean=CIFAR10_MEAN)
    x, labels = torch.randn(6, 3, 32, 32, generator=generator(2)) + 10, torch.arange(6)
    weights = set()
    for seed in range(20):
        out, target = augment.mix(x, labels, 6, generator(seed))
        weight = target[0, 0]
        assert weight >= 0.5
        torch.testing.assert_close(target[torch.arange(6), labels], weight.expand(6))
        torch.testing.assert_close(target[torch.arange(6), labels.flip(0)], (1 - weight).expand(6))
        hole = (out == 0).all(dim=1).all(dim=0)
        assert hole.sum() >= 64
        torch.testing.assert_close(out, torch.where(hole, 0.0, weight * x + (1 - weight) * x.flip(0)))
        weights.add(weight.item())
    assert len(weights) == 20


# --- mixup / cutmix -------------------------------------------------------------------------------

def test_mix_is_identity_when_off():
    x, labels = torch.randn(8, 3, 32, 32), torch.arange(8)
    augment = build_augmentation({"name": "basic"}, mean=CIFAR10_MEAN)
    out, target = augment.mix(x, labels, 10, generator())
    assert out is x and target is labels


def test_mixup_mixes_each_image_with_its_reverse():
    x, labels = torch.randn(8, 3, 32, 32, generator=generator(2)), torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    augment = build_augmentation({"name": "basic", "mixup_alpha": 1.0}, mean=CIFAR10_MEAN)
    out, target = augment.mix(x, labels, 10, generator())
    weight = target[0, 0].item()
    assert 0.5 <= weight <= 1.0 and target.shape == (8, 10) and target.dtype == x.dtype
    torch.testing.assert_close(target.sum(1), torch.ones(8))
    torch.testing.assert_close(target[torch.arange(8), labels], torch.full((8,), weight))
    torch.testing.assert_close(target[torch.arange(8), labels.flip(0)], torch.full((8,), 1 - weight))
    torch.testing.assert_close(out, weight * x + (1 - weight) * x.flip(0))


def test_cutmix_pastes_one_box_whose_area_sets_the_target():
    x = torch.randn(6, 3, 32, 32, generator=generator(2))
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    augment = build_augmentation({"name": "basic", "cutmix_alpha": 1.0}, mean=CIFAR10_MEAN)
    pasted_fractions = []
    for seed in range(10):
        out, target = augment.mix(x, labels, 6, generator(seed))
        pasted = (out == x.flip(0)).all(dim=1) & (out != x).any(dim=1)
        assert ((out == x) | (out == x.flip(0))).all()
        box = pasted[0]
        rows, cols = box.any(1), box.any(0)
        assert torch.equal(box, rows[:, None] & cols[None, :]) and (pasted == box).all()
        torch.testing.assert_close(target[0, 0], 1 - box.float().mean())
        torch.testing.assert_close(target[0, 5], box.float().mean())
        pasted_fractions.append(box.float().mean().item())
    assert len(set(pasted_fractions)) > 5


def test_mixup_and_cutmix_together_pick_one_per_batch():
    x, labels = torch.randn(4, 3, 8, 8, generator=generator(2)), torch.arange(4)
    augment = build_augmentation({"name": "basic", "mixup_alpha": 1.0, "cutmix_alpha": 1.0}, mean=CIFAR10_MEAN)
    kinds = set()
    for seed in range(30):
        out, _ = augment.mix(x, labels, 4, generator(seed))
        kinds.add("cutmix" if ((out == x) | (out == x.flip(0))).all() else "mixup")
    assert kinds == {"cutmix", "mixup"}


@pytest.mark.parametrize("alpha", [0.4, 1.0, 3.0])
def test_beta_sampler_matches_scipy(alpha):
    g = generator(7)
    draws = torch.stack([sample_beta(alpha, g, torch.device("cpu")) for _ in range(1500)]).numpy()
    assert scipy.stats.kstest(draws, scipy.stats.beta(alpha, alpha).cdf).pvalue > 1e-3


# --- configuration --------------------------------------------------------------------------------

@pytest.mark.parametrize("path", sorted(CONF_AUG.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_aug_config_builds_in_each_style_and_is_named_after_its_file(path):
    cfg = OmegaConf.load(path)
    assert cfg.name == path.stem and cfg.style == "official"
    for style in STYLES:
        augment = build_augmentation({**cfg, "style": style}, mean=CIFAR10_MEAN)
        assert augment.style == style
        out = augment(random_images(4), generator())
        assert out.dtype == torch.uint8 and out.shape == (4, 3, 32, 32)


def test_each_preset_states_every_option():
    """A preset is its conf/aug file, whole: every option is there to override without a +."""
    assert list(presets()) == ["none", "basic", "cutout", "autoaugment", "autoaugment_mixcut"]  # least first
    assert all(set(options) == set(OPTIONS) for options in presets().values())
    assert presets()["cutout"] == {"style": "official", "autoaugment": False, "crop_flip": True, "cutout_size": 16,
                                   "mixup_alpha": 0.0, "cutmix_alpha": 0.0}


def test_config_keys_override_the_preset():
    augment = build_augmentation({"name": "cutout", "cutout_size": 8, "crop_flip": False}, mean=CIFAR10_MEAN)
    assert (augment.cutout_size, augment.crop_flip, augment.autoaugment) == (8, False, False)


@pytest.mark.parametrize(
    "cfg, mean, message",
    [
        ({"name": "randaugment"}, CIFAR10_MEAN, "aug.name='randaugment'"),
        ({"name": "basic", "cutout": 16}, CIFAR10_MEAN, "cutout_size"),
        ({"name": "basic"}, (125, 122, 113), "mean="),
        ({"name": "basic", "cutout_size": -1}, CIFAR10_MEAN, "cutout_size=-1"),
        ({"name": "basic", "mixup_alpha": -0.5}, CIFAR10_MEAN, "mixup_alpha=-0.5"),
    ],
)
def test_bad_configs_name_the_problem(cfg, mean, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build_augmentation(cfg, mean=mean)


def test_style_defaults_to_official_and_an_unknown_one_names_the_choices():
    assert build_augmentation({"name": "basic"}, mean=CIFAR10_MEAN).style == "official"
    with pytest.raises(ValueError, match=re.escape("aug.style='fancy'")) as error:
        build_augmentation({"name": "basic", "style": "fancy"}, mean=CIFAR10_MEAN)
    assert "official, standard" in str(error.value)


def test_float_images_are_rejected():
    with pytest.raises(ValueError, match="uint8"):
        build_augmentation({"name": "basic"}, mean=CIFAR10_MEAN)(torch.rand(2, 3, 32, 32), generator())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("style", STYLES)
def test_gpu_augmentation_stays_on_the_device_without_host_synchronisation(style):
    images = random_images(512).cuda()
    labels = torch.randint(0, 10, (512,), device="cuda")
    augment = build_augmentation({"name": "autoaugment_mixcut", "cutmix_alpha": 1.0, "style": style},
                                 mean=CIFAR10_MEAN)
    augment(images, torch.Generator(device="cuda").manual_seed(0))  # builds the policy table
    torch.cuda.synchronize()
    g = torch.Generator(device="cuda").manual_seed(0)
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = augment(images, g)
        x, target = augment.mix(out.float() / 255, labels, 10, g)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert out.is_cuda and out.dtype == torch.uint8 and out.shape == images.shape
    assert x.is_cuda and target.shape == (512, 10)
    assert torch.equal(out, augment(images, torch.Generator(device="cuda").manual_seed(0)))
