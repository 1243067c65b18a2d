"""What a benchmark measures: the models (with builder options, batch and steps per round), the fast
paths of a setting, the config of each measured run, the synthetic CIFAR-10 it trains on, and the
defaults that depend on the device."""
from __future__ import annotations

import argparse
import inspect
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from gnp.bench.parts import use_channels_last
from gnp.data import load_dataset, write_synthetic_cifar
from gnp.models import MODELS, check_model_options

CUDA_DEFAULT_MODELS = ("resnet18", "wrn28_10", "vit_s")
CPU_DEFAULT_MODELS = ("resnet18:width=16", "wrn28_10:depth=10,widen=2", "vit_s:depth=1")
ANALYSIS_MODELS = {"cuda": "resnet18", "cpu": "resnet18:width=8"}  # the analysis-cost stage's default model


@dataclass(frozen=True)
class ModelSpec:
    name: str
    options: dict  # builder options that differ from the builder's defaults
    batch_size: int | None = None  # None: --batch-size
    steps: int | None = None  # timed steps per round; None: --steps

    @property
    def label(self) -> str:
        options = ", ".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.name} ({options})" if options else self.name


@dataclass(frozen=True)
class FastPaths:
    precision: str  # fp32 | bf16 | fp16
    channels_last: bool
    compile: bool
    fused: bool

    def overrides(self) -> list[str]:
        return [f"precision={self.precision}", f"train.channels_last={_yaml(self.channels_last)}",
                f"train.compile={_yaml(self.compile)}", f"optimizer.fused={_yaml(self.fused)}"]

    def differences(self, other: FastPaths) -> str:
        """`compile=off,precision=fp32`: how these settings differ from `other`."""
        diffs = []
        for key, value in asdict(self).items():
            if value != getattr(other, key):
                diffs.append(f"{key}={value}" if isinstance(value, str) else f"{key}={'on' if value else 'off'}")
        return ",".join(diffs)

    @property
    def label(self) -> str:
        switches = [key for key in ("channels_last", "compile", "fused") if getattr(self, key)]
        return ", ".join([self.precision, *switches])


def _yaml(flag: bool) -> str:
    return "true" if flag else "false"


def parse_model(text: str) -> ModelSpec:
    """`resnet18`, or `resnet18:width=32,batch=128,steps=2`: a model, its builder options, and its own
    batch size and timed steps per round (an argparse type: a bad one is a one-line usage error)."""
    name, _, rest = text.partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, equals, value = item.partition("=")
        if not equals or not key:
            raise argparse.ArgumentTypeError(f"{text!r}: expected NAME or NAME:KEY=VALUE,... (e.g. resnet18:width=32)")
        options[key] = yaml.safe_load(value)
    own = {key: options.pop(key, None) for key in ("batch", "steps")}
    for key, value in own.items():
        if value is not None and not (isinstance(value, int) and value >= 1):
            raise argparse.ArgumentTypeError(f"{text!r}: {key}={value!r} must be an integer >= 1")
    try:
        check_model_options(name, options)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None
    defaults = inspect.signature(MODELS[name]).parameters
    options = {k: v for k, v in options.items() if defaults[k].default != v}
    return ModelSpec(name, options, own["batch"], own["steps"])


def resolve(args: argparse.Namespace, device: torch.device) -> argparse.Namespace:
    """Fill in the device-dependent defaults of the command line's settings."""
    cuda = device.type == "cuda"
    args.models = args.models or [parse_model(m) for m in (CUDA_DEFAULT_MODELS if cuda else CPU_DEFAULT_MODELS)]
    args.batch_size = args.batch_size or (256 if cuda else 32)
    args.steps = args.steps or (10 if cuda else 2)
    args.models = [replace(m, batch_size=m.batch_size or args.batch_size, steps=m.steps or args.steps)
                   for m in args.models]
    analysis_model = args.analysis_model or parse_model(ANALYSIS_MODELS["cuda" if cuda else "cpu"])
    args.analysis_model = replace(analysis_model, batch_size=analysis_model.batch_size or args.batch_size,
                                  steps=analysis_model.steps or args.steps)
    args.repeats = args.repeats or 5
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 2)
    args.precision = args.precision or ("bf16" if cuda else "fp32")
    args.precisions = args.precisions or (["fp32", "bf16", "fp16"] if cuda else ["fp32", "bf16"])
    args.compile = cuda if args.compile is None else args.compile
    args.loop_images = args.loop_images or (50_000 if cuda else 1024)
    args.loop_epochs = args.loop_epochs or (3 if cuda else 2)
    args.test_images = args.test_images or (10_000 if cuda else 512)
    args.checks = cuda if args.checks == "auto" else args.checks == "on"
    # A tenth of the training images, as a default analysis takes 5,000 of CIFAR's 50,000 (on CUDA its own default).
    if args.analysis_subset is None and not cuda:
        args.analysis_subset = max(1, args.loop_images // 10)
    largest = max(m.batch_size for m in [*args.models, *([args.analysis_model] if "analysis" not in args.skip else [])])
    if args.loop_images < largest:
        raise SystemExit(f"--loop-images={args.loop_images} is smaller than a batch ({largest}): raise it")
    return args


def main_paths(spec: ModelSpec, args: argparse.Namespace, device: torch.device) -> FastPaths:
    """The fast paths of the main comparison: what the suite chooses on this device, compile as asked."""
    return FastPaths(args.precision, use_channels_last("auto", spec.name, device), args.compile, device.type == "cuda")


def run_overrides(spec: ModelSpec, method: str, paths: FastPaths, device: torch.device, data_root: Path) -> list[str]:
    """The config of one training setting: the model's recipe with these options, batch and fast paths."""
    return [f"model={spec.name}", *(f"model.{k}={v}" for k, v in spec.options.items()), f"method={method}",
            f"train.batch_size={spec.batch_size}", *paths.overrides(), f"device={device}",
            f"dataset.root={data_root}", "dataset.verify=false", "wandb.mode=disabled", "train.progress=false"]


class DataPaths:
    """Synthetic CIFAR-10 in the real on-disk format: `full` (the loader, loop and checks) and `tiny`
    (one batch: the step variants build their loaders from it)."""

    def __init__(self, root: Path, n_train: int, n_test: int, batch: int):
        self.full, self.tiny = root / "full", root / "tiny"
        self.n_train, self.n_test = n_train, n_test
        write_synthetic_cifar(self.full, "cifar10", n_train, n_test)
        write_synthetic_cifar(self.tiny, "cifar10", batch, 10)
        self._splits = None

    def _load(self):
        if self._splits is None:
            self._splits = load_dataset("cifar10", self.full, verify=False)
        return self._splits

    def train(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        s = self._load()
        return s.train_images.to(device), s.train_labels.to(device)

    def test(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        s = self._load()
        return s.test_images.to(device), s.test_labels.to(device)
