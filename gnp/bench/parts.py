"""The one place the benchmark reaches into the training loop: a run's parts built from its config
as the loop builds them (model, data, method, optimizer, schedule), the loop's per-step work, its
evaluation, and a whole training run. Everything else in gnp.bench goes through this module."""
from __future__ import annotations

import torch
from omegaconf import DictConfig

from gnp.data import BatchLoader
from gnp.distributed import Context
from gnp.methods import Method
from gnp.training import EpochTotals, build_parts, evaluate, git_commit, train, train_step, use_channels_last

__all__ = ["OneProcessRun", "git_commit", "train", "use_channels_last"]


class OneProcessRun:
    """A one-process run of `cfg` on `device` as the training loop builds it, without a run directory:
    `model` (the module, channels_last as the config says), `method` (the configured method around its
    base optimizer) and the closures, loop step and evaluation the training loop uses."""

    def __init__(self, cfg: DictConfig, device: torch.device):
        self._parts = build_parts(cfg, Context(0, 1, device))
        self.cfg = cfg
        self.model: torch.nn.Module = self._parts.model
        self.method: Method = self._parts.method
        self.channels_last: bool = self._parts.channels_last
        self._totals = EpochTotals(device)

    def first_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The first training batch of epoch 0, augmented, in the memory format the model takes."""
        images, target = next(self._parts.train_loader.epoch(0))
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images, target

    def loss_and_logits(self, images: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The closure each pass of a training step evaluates."""
        return self._parts.loss_and_logits(images, target)

    def shard_closures(self, images: torch.Tensor, target: torch.Tensor) -> list:
        """The closures of a training step's shards (train.shards), as the training loop makes them."""
        return self._parts.shard_closures(self.method.steps_taken, images, target)

    def loop_step(self, images: torch.Tensor, target: torch.Tensor) -> None:
        """One step with the training loop's per-step work around it: the step's model seed, the
        learning-rate schedule and the epoch's running totals."""
        train_step(self._parts, self.method.steps_taken, images, target, self._totals)

    def evaluate(self, loader: BatchLoader) -> dict[str, float]:
        """The loop's evaluation of the (compiled) model on `loader`, in the run's precision."""
        p = self._parts
        return evaluate(p.compiled, loader, p.autocast, p.channels_last)
