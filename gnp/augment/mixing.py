"""Mixing a normalised batch with its reverse: mixup (Zhang et al. 2018) and CutMix (Yun et al.
2019), their Beta weights drawn from the loader's generator."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as nnf

from gnp.augment.crop import cutmix_box


def mix_with_reverse(x: torch.Tensor, labels: torch.Tensor, num_classes: int, mixup_alpha: float,
                     cutmix_alpha: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix the batch with its reverse: mixup (weight max(l, 1 - l), l ~ Beta(mixup_alpha,
    mixup_alpha), one per batch) or cutmix (a box of the reversed batch, l ~ Beta(cutmix_alpha,
    cutmix_alpha)), whichever is on (> 0), or one of the two chosen at random when both are; returns
    the mixed batch and soft targets [B, num_classes]."""
    targets = nnf.one_hot(labels, num_classes).to(x.dtype)
    candidates = []
    if mixup_alpha:
        weight = sample_beta(mixup_alpha, generator, x.device)
        weight = torch.maximum(weight, 1 - weight)  # the official code keeps the larger share
        candidates.append((weight * x + (1 - weight) * x.flip(0), weight))
    if cutmix_alpha:
        box = cutmix_box(x.shape[-2:], sample_beta(cutmix_alpha, generator, x.device), generator)
        candidates.append((torch.where(box, x.flip(0), x), 1 - box.to(x.dtype).mean()))
    if len(candidates) == 2:
        use_first = torch.rand((), generator=generator, device=x.device) < 0.5
        candidates = [tuple(torch.where(use_first, a, b) for a, b in zip(*candidates))]
    mixed, weight = candidates[0]
    return mixed, weight * targets + (1 - weight) * targets.flip(0)


def sample_beta(alpha: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """One draw of Beta(alpha, alpha) as a 0-dim tensor on `device`, from `generator` (torch's own
    Beta sampler takes no generator): the ratio of two Gamma(alpha) draws."""
    first, second = _sample_gamma(alpha, 2, generator, device)
    return first / (first + second)


def _sample_gamma(shape: float, count: int, generator: torch.Generator, device: torch.device,
                  candidates: int = 32) -> torch.Tensor:
    """Marsaglia-Tsang (2000): each draw takes its first accepted candidate (acceptance is above
    95% per candidate, so 32 never all fail in practice); shape < 1 boosts Gamma(shape + 1) by
    U^(1/shape)."""
    boosted = shape + 1.0 if shape < 1.0 else shape
    d = boosted - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    z = torch.randn(count, candidates, generator=generator, device=device)
    u = torch.rand(count, candidates, generator=generator, device=device)
    v = (1.0 + c * z) ** 3
    accepted = (v > 0) & (torch.log(u) < 0.5 * z**2 + d - d * v + d * torch.log(v))
    first = accepted.to(torch.uint8).argmax(dim=1, keepdim=True)
    gamma = d * v.gather(1, first).squeeze(1)
    if shape < 1.0:
        gamma = gamma * torch.rand(count, generator=generator, device=device) ** (1.0 / shape)
    return gamma
