"""Crop + flip, and the holes cut into images: each is one box, clipped at the borders, around a
uniformly random centre: per image (the standard style's cutout and the official policy's Cutout),
or one for the whole batch (the official style's cutout and the CutMix box)."""
from __future__ import annotations

from collections.abc import Sequence

import torch


def random_crop_flip(images: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Per image: a random H x W crop of the image reflect-padded by `padding` (offsets uniform in
    [-padding, padding] per axis), then a horizontal flip with probability 1/2. The official code
    flips first; with offsets symmetric about 0 that is the same distribution, so both styles use
    this."""
    b, c, h, w = images.shape
    if padding >= min(h, w):
        raise ValueError(f"padding={padding} must be smaller than the image size {h}x{w} for reflect padding")
    device = images.device
    shifts = torch.randint(-padding, padding + 1, (2, b, 1), generator=generator, device=device)
    rows = _reflect(torch.arange(h, device=device) + shifts[0], h)
    cols = _reflect(torch.arange(w, device=device) + shifts[1], w)
    flip = torch.rand(b, 1, generator=generator, device=device) < 0.5
    cols = torch.where(flip, cols.flip(1), cols)
    return images[
        torch.arange(b, device=device)[:, None, None, None],
        torch.arange(c, device=device)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]


def _reflect(index: torch.Tensor, size: int) -> torch.Tensor:
    """Mirror indices in [-size + 1, 2 * size - 2] into [0, size - 1] without repeating the edge."""
    index = index.abs()
    return torch.where(index > size - 1, 2 * (size - 1) - index, index)


def cutout(images: torch.Tensor, size: int | torch.Tensor, fill: int | Sequence[int],
           generator: torch.Generator) -> torch.Tensor:
    """One hole per image around a uniformly random centre c, [c - size // 2, c - size // 2 + size)
    on each axis, clipped at the borders, set to `fill` (a grey level, or a colour). `size` is the
    side of every hole, or of each image's ([B], 0 for none)."""
    b, c, h, w = images.shape
    device = images.device
    centre_rows = torch.randint(0, h, (b, 1), generator=generator, device=device)
    centre_cols = torch.randint(0, w, (b, 1), generator=generator, device=device)
    if torch.is_tensor(size):
        size = size.view(b, 1)
    hole = _box((h, w), centre_rows - size // 2, centre_cols - size // 2, size, size)
    if not isinstance(fill, int):
        fill = torch.tensor(fill, dtype=images.dtype).to(device, non_blocking=True).view(1, c, 1, 1)
    return torch.where(hole[:, None], fill, images)


def batch_cutout(x: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """The official cutout of a normalised batch: one hole for the whole batch, at the same place in
    every image, centred uniformly at random, reaching size // 2 pixels each side of its centre
    (size x size for an even size) and clipped at the borders, set to 0."""
    h, w = x.shape[-2:]
    centre_row = torch.randint(0, h, (), generator=generator, device=x.device)
    centre_col = torch.randint(0, w, (), generator=generator, device=x.device)
    half = size // 2
    return torch.where(_box((h, w), centre_row - half, centre_col - half, 2 * half, 2 * half), 0.0, x)


def cutmix_box(size: torch.Size, weight: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A [H, W] mask of one box covering about 1 - weight of the image (CutMix, Yun et al. 2019),
    at a uniformly random centre, clipped at the borders."""
    h, w = size
    ratio = torch.sqrt(1.0 - weight)
    centre = torch.rand(2, generator=generator, device=weight.device)
    half_h, half_w = (h * ratio / 2).floor(), (w * ratio / 2).floor()
    return _box((h, w), (centre[0] * h).floor() - half_h, (centre[1] * w).floor() - half_w, 2 * half_h, 2 * half_w)


def _box(size: tuple[int, int], top: torch.Tensor, left: torch.Tensor, height: int | torch.Tensor,
         width: int | torch.Tensor) -> torch.Tensor:
    """The mask of rows [top, top + height) x columns [left, left + width) of an image of `size`:
    [H, W] for 0-dim corners, [B, H, W] for corners [B, 1] (height and width alike, or numbers)."""
    h, w = size
    rows = torch.arange(h, device=top.device)
    cols = torch.arange(w, device=top.device)
    in_rows = (rows >= top) & (rows < top + height)
    in_cols = (cols >= left) & (cols < left + width)
    return in_rows[..., :, None] & in_cols[..., None, :]
