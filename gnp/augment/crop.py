"""Crop + flip and the holes cut into images: the per-image cutout of the standard style and the
batch's cutout of the official style."""
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


def cutout(images: torch.Tensor, size: int, fill: Sequence[int], generator: torch.Generator) -> torch.Tensor:
    """One size x size hole per image at a uniformly random centre, clipped at the borders, set to
    the colour `fill`."""
    b, c, h, w = images.shape
    device = images.device
    centre_rows = torch.randint(0, h, (b, 1), generator=generator, device=device)
    centre_cols = torch.randint(0, w, (b, 1), generator=generator, device=device)
    rows = _in_window(torch.arange(h, device=device), centre_rows - size // 2, size)
    cols = _in_window(torch.arange(w, device=device), centre_cols - size // 2, size)
    hole = rows[:, None, :, None] & cols[:, None, None, :]
    colour = torch.tensor(fill, dtype=images.dtype).to(device, non_blocking=True).view(1, c, 1, 1)
    return torch.where(hole, colour, images)


def batch_cutout(x: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """The official cutout of a normalised batch: one hole for the whole batch, at the same place in
    every image, centred uniformly at random, reaching size // 2 pixels each side of its centre
    (size x size for an even size) and clipped at the borders, set to 0."""
    h, w = x.shape[-2:]
    device = x.device
    centre_row = torch.randint(0, h, (), generator=generator, device=device)
    centre_col = torch.randint(0, w, (), generator=generator, device=device)
    half = size // 2
    rows = _in_window(torch.arange(h, device=device), centre_row - half, 2 * half)
    cols = _in_window(torch.arange(w, device=device), centre_col - half, 2 * half)
    return torch.where(rows[:, None] & cols[None, :], 0.0, x)


def _in_window(positions: torch.Tensor, start: torch.Tensor, length: int) -> torch.Tensor:
    return (positions >= start) & (positions < start + length)

