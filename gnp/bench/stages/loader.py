"""Stage 3: the input pipeline alone (BatchLoader with each augmentation preset and style) against
the rate at which each model's GNP step consumes images."""
from __future__ import annotations

import argparse
import itertools
from typing import Any, Callable

import torch

from gnp.augment import STYLES, build_augmentation, presets
from gnp.bench.console import print_table
from gnp.bench.settings import DataPaths
from gnp.bench.stages.cuda import no_sync
from gnp.bench.timing import interleaved, rate, spread, warm_up
from gnp.compose import compose_config
from gnp.data import BatchLoader

TARGET = 20.0  # loader images/s over the GNP step's images/s, basic and cutout, on a GPU
NUM_CLASSES = 10


def measure(args: argparse.Namespace, device: torch.device, data: DataPaths, models: list[dict]) -> dict:
    """images/s of BatchLoader over the synthetic training set per augmentation preset and style,
    and how many times the GNP step's rate of each model that is."""
    d = compose_config(validated=True).dataset
    images, labels = data.train(device)
    batch = args.models[0].batch_size
    loaders = {}
    for style, preset in itertools.product(STYLES, presets()):
        aug = compose_config(f"aug={preset}", f"aug.style={style}", validated=True).aug
        loaders[(style, preset)] = BatchLoader(images, labels, batch_size=batch, device=device, mean=d.mean, std=d.std,
                                               train=True, augment=build_augmentation(aug, mean=d.mean),
                                               num_classes=NUM_CLASSES)
    per_block = min(args.loader_batches, len(next(iter(loaders.values()))))
    epochs = itertools.count()

    def consume(loader: BatchLoader, batches: int) -> Callable[[], None]:
        """A call that takes the first `batches` batches of a new epoch (its shuffle included)."""
        def call() -> None:
            for _ in itertools.islice(loader.epoch(next(epochs)), batches):
                pass
        return call

    print(f"\n== loader: {len(labels)} images, batch {batch}, blocks of {per_block} batches", flush=True)
    calls = {key: consume(loader, per_block) for key, loader in loaders.items()}
    warm_up(calls, device, 1)
    samples = interleaved(calls, device, args.repeats, 1)
    gnp_rates = {m["label"]: m["variants"]["gnp"]["images_per_second"] for m in models}
    result: dict[str, Any] = {"batch_size": batch, "batches_per_block": per_block, "images": len(labels),
                              "target": TARGET, "styles": {}}
    for (style, preset), s in samples.items():
        timing = spread(s)
        images_per_second = rate(per_block * batch, timing)
        result["styles"].setdefault(style, {})[preset] = {
            "ms_per_block": timing, "images_per_second": images_per_second,
            "times_gnp_step": {label: images_per_second / r for label, r in gnp_rates.items()}}
    if args.checks and device.type == "cuda":
        result["sync"] = {f"{style}/{preset}": no_sync(consume(loader, 1), device)  # SYNC_STEPS batches
                          for (style, preset), loader in loaders.items()}
    return result


def show(loader: dict, device: torch.device) -> None:
    labels = list(loader["styles"]["official"]["basic"]["times_gnp_step"])
    rows = [[f"{style}/{preset}", f"{v['images_per_second']:,.0f}", *(f"{v['times_gnp_step'][k]:.1f}" for k in labels)]
            for style, measured in loader["styles"].items() for preset, v in measured.items()]
    print_table(["loader", "images/s", *(f"x GNP {label}" for label in labels)], rows)
    if device.type == "cuda":
        print(f"target: basic and cutout >= {TARGET:.0f}x the GNP step's rate")
    for name, check in loader.get("sync", {}).items():
        print(f"sync check loader {name}: {'ok' if check['ok'] else 'FAILED ' + check['error']}")
