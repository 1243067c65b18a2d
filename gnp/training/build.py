"""The parts a run trains with, built from its config: `build_parts(cfg, ctx)` returns them as `Parts`.

Data loaders on the device, the model (channels_last, compiled, in DDP with several replicas), the base
optimizer and the config's method around it, the learning-rate schedule, the weight average, and the
precision (autocast, loss scaling). Nothing here needs a run directory or a Trainer: a benchmark builds
the same parts and steps them.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Callable, ContextManager

import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import DictConfig

from gnp import distributed
from gnp.augment import build_augmentation
from gnp.config import BASE_OPTIMIZERS, ConfigError, build_method, model_options, optimizer_arguments, resolve_shards
from gnp.console import log
from gnp.data import CLASSES, BatchLoader, Stream, load_dataset, random_seed, shards_problem, training_batch_problem
from gnp.methods import Method, SettingError
from gnp.models import build_model, count_parameters, normalises_with_batch_statistics
from gnp.training.ema import WeightAverage

CNN_PREFIXES = ("resnet", "wrn", "pyramidnet")  # the models that channels_last speeds up
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
PARAMETER_DTYPES = {"fp64": torch.float64}  # float32 otherwise


@dataclass
class Parts:
    """Everything a run steps and evaluates. One model under three names for three uses: `model` is the
    module itself (its weights are what a checkpoint saves), `compiled` the same model compiled with
    train.compile (what evaluation calls), and `replica` what a training step calls: `compiled`, wrapped in
    DDP when there are several processes."""
    cfg: DictConfig
    ctx: distributed.Context
    train_loader: BatchLoader
    test_loader: BatchLoader
    data_verified: bool
    model: nn.Module
    compiled: nn.Module
    replica: nn.Module
    method: Method
    lr_factor: Callable[[int], float]
    scheduler: torch.optim.lr_scheduler.LambdaLR
    ema: WeightAverage | None
    # Each replica keeps its own BatchNorm statistics (the mean of its shards'), as the authors' code
    # keeps them per device; they are averaged for evaluation and checkpoints only.
    replica_stats: list[torch.Tensor]
    precision: str
    autocast: Callable[[], ContextManager]
    channels_last: bool

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train_loader)

    @property
    def num_parameters(self) -> int:
        return count_parameters(self.model)

    def loss_and_logits(self, images: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The closure each pass of a step evaluates: the loss in float32 (float64 with precision=fp64), and the logits."""
        with self.autocast():
            logits = self.replica(images)
        return F.cross_entropy(at_least_float32(logits), target, label_smoothing=self.cfg.train.label_smoothing), logits

    def shard_closures(self, step: int, images: torch.Tensor, target: torch.Tensor) -> list[Callable]:
        """The closures of this process's shards of step `step` (0-based, counted over the run): each
        seeds the shard's dropout, stochastic depth and ShakeDrop draws from (seed, step, shard), so a
        shard draws the same numbers whichever process runs it, then evaluates its images."""
        shards = self.train_loader.local_shards
        return [partial(self._shard_loss, step, shard, x, y)
                for shard, x, y in zip(shards, images.tensor_split(len(shards)), target.tensor_split(len(shards)))]

    def _shard_loss(self, step: int, shard: int, images: torch.Tensor,
                    target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(random_seed(self.cfg.seed, Stream.MODEL, step, shard))
        return self.loss_and_logits(images, target)


def build_parts(cfg: DictConfig, ctx: distributed.Context) -> Parts:
    """Data, model, method, schedule and weight average as the config says, on `ctx.device`."""
    t, d, device = cfg.train, cfg.dataset, ctx.device
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    precision = resolve_precision(cfg.precision, device)
    warn_if_slow(precision, device)
    dtype = AUTOCAST_DTYPES.get(precision)
    parameter_dtype = PARAMETER_DTYPES.get(precision, torch.float32)

    # Data: the main process fetches/extracts first, the others then read the finished files.
    data = distributed.main_first(lambda: load_dataset(d.name, d.root, download=d.download, verify=d.verify,
                                                       limit_train=d.limit_train, limit_test=d.limit_test), device)
    shards = resolve_shards(cfg, ctx.world_size)
    problem = training_batch_problem(t.batch_size, len(data.train_labels), ctx.world_size) or shards_problem(
        shards, t.batch_size, normalises_with_batch_statistics(**model_options(cfg)), ctx.world_size)
    if problem:
        raise ConfigError(problem)
    train_loader = BatchLoader(
        data.train_images, data.train_labels, batch_size=t.batch_size, device=device, mean=d.mean, std=d.std,
        train=True, augment=build_augmentation(cfg.aug, mean=d.mean), num_classes=CLASSES[d.name],
        seed=cfg.seed, rank=ctx.rank, world_size=ctx.world_size, shards=shards, dtype=parameter_dtype)
    test_loader = BatchLoader(data.test_images, data.test_labels, batch_size=t.eval_batch_size, device=device,
                              mean=d.mean, std=d.std, train=False, rank=ctx.rank, world_size=ctx.world_size,
                              dtype=parameter_dtype)
    steps_per_epoch = len(train_loader)

    # Model: identical initial weights on every replica, from init_seed (default: seed).
    torch.manual_seed(init_seed(cfg))
    model = build_model(num_classes=CLASSES[d.name], **model_options(cfg))
    channels_last = use_channels_last(t.channels_last, cfg.model.name, device)
    if channels_last and device.type == "cpu":
        hazard = onednn_nhwc_hazard(model) if parameter_dtype == torch.float32 else None
        if hazard:
            raise ConfigError(f"train.channels_last=true on the CPU: {hazard}, whose NHWC weight gradient hangs or is "
                              "wrong in oneDNN (issue uxlfoundation/oneDNN#6035); use train.channels_last=false")
        log.warning("train.channels_last=true on the CPU: its NHWC BatchNorm kernel computes batch statistics "
                    "less accurately than NCHW (docs/speed.md)")
    model = model.to(device, parameter_dtype,
                     memory_format=torch.channels_last if channels_last else torch.preserve_format)
    compiled = model if t.compile is False else torch.compile(model, mode=None if t.compile is True else t.compile)
    replica = distributed.wrap(compiled, device) if ctx.world_size > 1 else compiled

    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    method = build_method(cfg, replica, build_optimizer(cfg.optimizer, model, device), steps_per_epoch, scaler)
    try:
        method.check_shards(len(train_loader.local_shards))
    except SettingError as e:
        raise ConfigError(f"method.{e}") from None
    lr_factor = cosine_schedule(t.epochs * steps_per_epoch, round(t.warmup_epochs * steps_per_epoch))
    ema = WeightAverage(model, t.ema_decay) if t.ema_decay else None
    return Parts(
        cfg=cfg, ctx=ctx, train_loader=train_loader, test_loader=test_loader, data_verified=data.verified,
        model=model, compiled=compiled, replica=replica, method=method, lr_factor=lr_factor,
        scheduler=torch.optim.lr_scheduler.LambdaLR(method.base_optimizer, lr_factor), ema=ema,
        replica_stats=distributed.running_stats(model, *([ema.model] if ema else [])), precision=precision,
        autocast=(lambda: torch.autocast(device.type, dtype=dtype)) if dtype else nullcontext,
        channels_last=channels_last)


def at_least_float32(logits: torch.Tensor) -> torch.Tensor:
    """Logits for the loss: float16 and bfloat16 ones (autocast's) in float32, float64 ones as they are."""
    return logits if logits.dtype == torch.float64 else logits.float()


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` is bf16 autocast on CUDA and float32 elsewhere."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def warn_if_slow(precision: str, device: torch.device) -> None:
    """One line for a setting known to be much slower on this device than another; the run goes on."""
    if precision == "fp16" and device.type == "cpu":
        log.warning("precision=fp16 on the CPU trains about 70 times slower than fp32 (the digits demo: 3.5 against "
                    "258 images/s; the CPU has few float16 kernels): use precision=fp32 (or auto) unless you are "
                    "testing the loss scaling")


def use_channels_last(setting: bool | str, model_name: str, device: torch.device) -> bool:
    """`auto`: the CNNs on CUDA, where cuDNN's NHWC kernels are faster. On the CPU, NHWC is faster too
    (5-16% for a ResNet-18 step on 2 cores) but BatchNorm's NHWC kernel computes the batch variance
    less accurately (relative error 5.6e-5 against 1.8e-6 in NCHW, for inputs of mean 5 and std 0.1,
    measured against float64; gradients 0.5% off on the digits task), so it is opt-in there."""
    if setting == "auto":
        return device.type == "cuda" and model_name.startswith(CNN_PREFIXES)
    return bool(setting)


def onednn_nhwc_hazard(model: nn.Module) -> str | None:
    """The first layer oneDNN's CPU kernels mishandle in NHWC, or None: a strided 1x1 convolution with fewer
    input channels than a vector block (16 floats in AVX-512) runs a backward-weights kernel that writes past
    its workspace, and on 2 threads spins forever. Only narrow test-sized models have one."""
    for name, layer in model.named_modules():
        if (isinstance(layer, nn.Conv2d) and layer.kernel_size == (1, 1) and layer.stride != (1, 1)
                and layer.in_channels < 16):
            return f"layer {name} is a strided 1x1 convolution of {layer.in_channels} input channels"
    return None


def build_optimizer(cfg: DictConfig, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """The base optimizer. With `decay_norm_and_bias=false`, biases and normalisation weights (every
    parameter with fewer than two dimensions, as the official `no_weight_decay_on_bn`) get neither
    weight decay nor in-loss L2. With weight_decay_mode=loss the decay is the method's in-loss L2,
    so the base optimizer gets none."""
    weight_decay = cfg.weight_decay if cfg.weight_decay_mode == "optimizer" else 0.0
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.decay_norm_and_bias:
        groups = [{"params": params}]
    else:
        groups = [{"params": [p for p in params if p.ndim > 1]},
                  {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "l2": 0.0}]
    fused = device.type == "cuda" if cfg.fused == "auto" else bool(cfg.fused)
    return BASE_OPTIMIZERS[cfg.name](groups, lr=cfg.lr, weight_decay=weight_decay, fused=fused,
                                     **optimizer_arguments(cfg))


def init_seed(cfg: DictConfig) -> int:
    """The seed of the model's initial weights: `init_seed`, by default `seed`."""
    return cfg.seed if cfg.init_seed is None else cfg.init_seed


def cosine_schedule(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR factor per step: linear warmup, then cosine decay towards zero (reached one step after the last)."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor
