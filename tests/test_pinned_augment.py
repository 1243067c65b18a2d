"""Pins the augmentations' output bit for bit across refactors.

`tests/pinned/augment.json` holds the SHA-256 of every output of each preset in each style, and of
each option on its own (cutout_size, mixup_alpha, cutmix_alpha, both mixings, non-square images), on
a fixed uint8 batch with a fixed generator: the augmented uint8 batch, its normalised and mixed
batch and the targets, for five generator seeds (where both mixings are on, each occurs). It also
holds every AutoAugment operation of each style at every level and sign, each on its own image.
Digests keep the file small while the draws are many enough (5 x 64 images) to reach nearly all
of the official policy's 95 sub-policies. The commit that wrote it is inside. Rewrite the file only
for an intended change of an augmentation: `python tests/test_pinned_augment.py`.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gnp.augment import STYLES, build_augmentation, presets
from gnp.augment.autoaugment import AutoAugment
from gnp.augment.official import OFFICIAL
from gnp.augment.standard import STANDARD

PINNED = Path(__file__).parent / "pinned" / "augment.json"
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
BATCH, CLASSES, SEEDS = 64, 10, range(5)
AUTOAUGMENT = {"official": OFFICIAL, "standard": STANDARD}
# name -> (the aug config, image height, width)
CASES: dict[str, tuple[dict, int, int]] = {
    **{f"{preset}/{style}": ({"name": preset, "style": style}, 32, 32) for preset in presets() for style in STYLES},
    **{f"cutout_size=15/{style}": ({"name": "cutout", "cutout_size": 15, "style": style}, 32, 32) for style in STYLES},
    **{f"mixup_alpha=0.4/{style}": ({"name": "basic", "mixup_alpha": 0.4, "style": style}, 32, 32)
       for style in STYLES},
    **{f"cutmix_alpha=1/{style}": ({"name": "basic", "cutmix_alpha": 1.0, "style": style}, 32, 32)
       for style in STYLES},
    **{f"mixup_alpha=3,cutmix_alpha=0.5/{style}": (
        {"name": "autoaugment_mixcut", "mixup_alpha": 3.0, "cutmix_alpha": 0.5, "style": style}, 32, 32)
       for style in STYLES},
    **{f"autoaugment_mixcut,cutmix_alpha=1,24x40/{style}": (
        {"name": "autoaugment_mixcut", "cutmix_alpha": 1.0, "style": style}, 24, 40) for style in STYLES},
}


def images(n: int, height: int = 32, width: int = 32) -> torch.Tensor:
    """Gradients plus noise, each image with its own offset: every operation changes something."""
    g = torch.Generator().manual_seed(1)
    rows, cols = torch.meshgrid(torch.arange(float(height)), torch.arange(float(width)), indexing="ij")
    base = torch.stack([cols * 6, rows * 6, (rows + cols) * 3])
    noise = torch.randn(n, 3, height, width, generator=g) * 20
    return (base + noise + 30 * torch.arange(n).view(n, 1, 1, 1) % 120).clamp(0, 255).to(torch.uint8)


def digest(tensor: torch.Tensor) -> str:
    return f"{tensor.dtype} {list(tensor.shape)} " + hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()


def run(name: str) -> dict[str, str]:
    cfg, height, width = CASES[name]
    augment = build_augmentation(cfg, mean=MEAN)
    batch, labels = images(BATCH, height, width), torch.arange(BATCH) % CLASSES
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1) * 255, torch.tensor(STD).view(1, 3, 1, 1) * 255
    out = {"input": digest(batch)}
    for seed in SEEDS:
        g = torch.Generator().manual_seed(seed)  # one generator for both stages, as the loader's
        augmented = augment(batch, g)
        x, target = augment.mix((augmented.float() - mean) / std, labels, CLASSES, g)
        out.update({f"{seed}.images": digest(augmented), f"{seed}.x": digest(x), f"{seed}.target": digest(target)})
    return out


def operation_cases(autoaugment: AutoAugment) -> list[tuple[str, int | None, float]]:
    """(operation, level, sign) for every operation of the style at every level and sign."""
    cases = []
    for name in autoaugment.operations:
        no_level = autoaugment is STANDARD and name in ("AutoContrast", "Equalize", "Invert")
        for level in (None,) if no_level else range(10):
            signed = autoaugment.argument(name, level, 32, 32)[1]
            cases += [(name, level, sign) for sign in ((1.0, -1.0) if signed else (1.0,))]
    return cases


def run_operations(style: str) -> dict[str, str]:
    autoaugment = AUTOAUGMENT[style]
    cases = operation_cases(autoaugment)
    operation = torch.tensor([autoaugment.operations.index(name) for name, _, _ in cases])
    argument = torch.tensor([sign * autoaugment.argument(name, level, 32, 32)[0] for name, level, sign in cases])
    out = autoaugment.apply(images(len(cases)), operation, argument, torch.Generator().manual_seed(2))
    return {f"{name} {level} {sign:+.0f}": digest(out[i]) for i, (name, level, sign) in enumerate(cases)}


@pytest.mark.parametrize("name", CASES)
def test_augmentation_equals_the_pinned_one_bit_for_bit(name):
    pinned = json.loads(PINNED.read_text())["cases"][name]
    now = run(name)
    assert now["input"] == pinned["input"], "the input batch itself changed (torch's generator?)"
    assert now.keys() == pinned.keys()
    for key, value in pinned.items():
        assert now[key] == value, f"{name}: {key} differs from the pinned output"


@pytest.mark.parametrize("style", STYLES)
def test_each_autoaugment_operation_equals_the_pinned_one_bit_for_bit(style):
    pinned = json.loads(PINNED.read_text())["operations"][style]
    now = run_operations(style)
    assert now.keys() == pinned.keys()
    different = [key for key, value in pinned.items() if now[key] != value]
    assert not different, f"{style}: {len(different)} operations differ from the pinned ones: {different[:5]}"


if __name__ == "__main__":
    # "-dirty": the pins were made by uncommitted changes to that commit (committed with them)
    commit = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], capture_output=True,
                            text=True).stdout.strip()
    PINNED.parent.mkdir(exist_ok=True)
    record = {"commit": commit, "torch": str(torch.__version__),
              "cases": {name: run(name) for name in CASES},
              "operations": {style: run_operations(style) for style in STYLES}}
    PINNED.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {PINNED} ({len(CASES)} cases and the operations of {len(STYLES)} styles, commit {commit})",
          file=sys.stderr)
