"""The training loop, on a CPU, one GPU, under torchrun or as the tasks of a SLURM job.

`train(cfg, run_dir)` reads top to bottom in `Trainer.run`: resume from the run directory's
checkpoint if there is one, then for each epoch train, evaluate, log and checkpoint. Every random
draw of a step (data order, augmentation, dropout, ShakeDrop, hybrid steps) is keyed by (seed,
step, replica), so a run stopped at any step and resumed from its checkpoint ends exactly where an
uninterrupted run ends. Nothing in a step waits for the GPU: the loop reads the device's numbers
(NaN checks, stop requests, progress) every `train.sync_every` steps and at the end of each epoch.
"""
from __future__ import annotations

import copy
import json
import math
import signal
import subprocess
import sys
import time
from contextlib import ExitStack, nullcontext
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from gnp import checkpoint, distributed, io
from gnp.augment import build_augmentation
from gnp.config import ConfigError, build_method, validate
from gnp.data import BatchLoader, Stream, load_dataset, random_seed
from gnp.methods import StepReport
from gnp.models import build_model, count_parameters
from gnp.runs import RunDirectory, error_line, first_line, log, remove_stub, setup_console
from gnp.signals import StopSignals, exit_code
from gnp.tracking import Tracker

# Keys that may differ when a run is resumed: they change where and how it is logged, not what it computes.
RESUMABLE_CHANGES = ("wandb", "device", "train.progress", "train.checkpoint_minutes", "train.sync_every",
                     "train.eval_batch_size", "dataset.root", "dataset.download", "dataset.verify")
CNN_PREFIXES = ("resnet", "wrn", "pyramidnet")  # the models that channels_last speeds up
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Diverged(RuntimeError):
    """The loss or the gradient norm became NaN or infinite."""


class Stopped(Exception):
    """A signal stopped the run after a checkpoint; `exit_code` is the process's status to exit with."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum, self.exit_code = signum, exit_code(signum)


def train(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Train as `cfg` says, writing every output into `run_dir`; returns the run's summary."""
    validate(cfg)
    ctx = distributed.setup(cfg.device)
    setup_console(ctx.is_main)
    try:
        # Under torchrun every process composed its own (timestamped) run directory: the main one's wins.
        shared_dir = Path(distributed.broadcast_object(str(run_dir)))
        if shared_dir != Path(run_dir):
            remove_stub(run_dir)
        with ExitStack() as held:
            distributed.on_main(lambda: held.enter_context(RunDirectory(shared_dir)), ctx.device)
            return Trainer(cfg, shared_dir, ctx).run()
    finally:
        distributed.teardown()


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` is bf16 autocast on CUDA and float32 elsewhere."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def use_channels_last(setting: bool | str, model_name: str, device: torch.device) -> bool:
    """`auto`: the CNNs on CUDA, where cuDNN's NHWC kernels are faster. On the CPU, NHWC is faster too
    (5-16% for a ResNet-18 step on 2 cores) but BatchNorm's NHWC kernel computes the batch variance
    less accurately (relative error 5.6e-5 against 1.8e-6 in NCHW, for inputs of mean 5 and std 0.1,
    measured against float64; gradients 0.5% off on the digits task), so it is opt-in there."""
    if setting == "auto":
        return device.type == "cuda" and model_name.startswith(CNN_PREFIXES)
    return bool(setting)


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
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=weight_decay, fused=fused)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=weight_decay,
                             fused=fused)


def init_seed(cfg: DictConfig) -> int:
    """The seed of the model's initial weights: `init_seed`, by default `seed`."""
    return cfg.seed if cfg.init_seed is None else cfg.init_seed


def cosine_schedule(total_steps: int, warmup_steps: int):
    """LR factor per step: linear warmup, then cosine decay towards zero (reached one step after the last)."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


class WeightAverage:
    """An exponential moving average of a model's parameters and floating-point buffers (BatchNorm
    statistics), updated in place on the device after every step: ema <- decay * ema + (1 - decay) * x."""

    def __init__(self, model: nn.Module, decay: float):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        pairs = [(a, b) for a, b in zip(self.model.state_dict().values(), model.state_dict().values())]
        self._floats = [(a, b) for a, b in pairs if a.is_floating_point()]
        self._others = [(a, b) for a, b in pairs if not a.is_floating_point()]  # e.g. BatchNorm's batch counter

    @torch.no_grad()
    def update(self) -> None:
        averaged, current = zip(*self._floats)
        torch._foreach_lerp_(list(averaged), list(current), 1.0 - self.decay)
        for a, b in self._others:
            a.copy_(b)


class EpochTotals:
    """Per-step sums of one epoch on the device, added without reading them back (no GPU sync).
    Gradient norms are averaged over the steps that were applied: a float16 step skipped for an
    overflow has no meaningful gradient."""

    FIELDS = ("first_pass_loss", "first_pass_errors", "perturbed_loss", "perturbed_errors", "g1_norm",
              "final_grad_norm", "applied_steps", "nonfinite")

    def __init__(self, device: torch.device, saved: torch.Tensor | None = None):
        self.sums = torch.zeros(len(self.FIELDS), dtype=torch.float64, device=device) if saved is None \
            else saved.to(device=device, dtype=torch.float64)
        self.first_bad_step = torch.full((), math.inf, dtype=torch.float64, device=device)

    def field(self, name: str) -> torch.Tensor:
        return self.sums[self.FIELDS.index(name)]

    def add(self, step: StepReport, target: torch.Tensor, index: int) -> None:
        """Add the report of the epoch's step `index` (0-based), whose batch had these targets."""
        labels = target if target.ndim == 1 else target.argmax(1)  # soft targets from mixup/cutmix
        n = len(labels)
        applied = ~step.skipped
        nonfinite = ~(torch.isfinite(step.first_pass_loss) & torch.isfinite(step.perturbed_loss)
                      & (torch.isfinite(step.final_grad_norm) | ~applied))
        self.sums += torch.stack([
            step.first_pass_loss.double() * n,
            (step.first_pass_output.argmax(1) != labels).sum().double(),
            step.perturbed_loss.double() * n,
            (step.perturbed_output.argmax(1) != labels).sum().double(),
            torch.where(applied, step.g1_norm.double(), 0.0),
            torch.where(applied, step.final_grad_norm.double(), 0.0),
            applied.double(),
            nonfinite.double(),
        ])
        self.first_bad_step = torch.where(nonfinite & torch.isinf(self.first_bad_step), float(index),
                                          self.first_bad_step)


class Trainer:
    """One run in a run directory that this process holds: `run` builds everything, resumes from the
    directory's checkpoint if there is one, then trains to the end. Whatever stops it is recorded in
    summary.json (status stopped, diverged or failed) before the error goes on."""

    def __init__(self, cfg: DictConfig, run_dir: Path, ctx: distributed.Context):
        self.cfg, self.run_dir, self.ctx = cfg, run_dir, ctx
        self.config = OmegaConf.to_container(cfg, resolve=True)
        self.precision = resolve_precision(cfg.precision, ctx.device)
        self.history: list[dict] = []
        self.signals = StopSignals()
        self.tracker: Tracker | None = None
        self.num_parameters = self.data_verified = None
        self.last_checkpoint = time.monotonic()

    def build(self) -> None:
        """Data, model, optimizer, schedule and weight average, as the config says."""
        cfg, ctx = self.cfg, self.ctx
        t, d, device = cfg.train, cfg.dataset, ctx.device
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        dtype = AUTOCAST_DTYPES.get(self.precision)
        self.autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else nullcontext

        # Data: the main process fetches/extracts first, the others then read the finished files.
        data = distributed.main_first(lambda: load_dataset(d.name, d.root, download=d.download, verify=d.verify,
                                                           limit_train=d.limit_train, limit_test=d.limit_test), device)
        if len(data.train_labels) < t.batch_size:
            raise ConfigError(f"train.batch_size={t.batch_size} is invalid: larger than the training set "
                              f"({len(data.train_labels)} images); lower it or raise dataset.limit_train")
        if t.batch_size % ctx.world_size:
            raise ConfigError(f"train.batch_size={t.batch_size} is invalid: it is split evenly over the "
                              f"{ctx.world_size} processes; use a multiple of {ctx.world_size}")
        self.data_verified = data.verified
        self.train_loader = BatchLoader(
            data.train_images, data.train_labels, batch_size=t.batch_size, device=device, mean=d.mean, std=d.std,
            train=True, augment=build_augmentation(cfg.aug, mean=d.mean), num_classes=d.num_classes,
            seed=cfg.seed, rank=ctx.rank, world_size=ctx.world_size)
        self.test_loader = BatchLoader(data.test_images, data.test_labels, batch_size=t.eval_batch_size,
                                       device=device, mean=d.mean, std=d.std, train=False, rank=ctx.rank,
                                       world_size=ctx.world_size)
        self.steps_per_epoch = len(self.train_loader)

        # Model: identical initial weights on every replica, from init_seed (default: seed).
        torch.manual_seed(init_seed(cfg))
        self.net = build_model(cfg.model.name, d.num_classes, **{k: v for k, v in cfg.model.items() if k != "name"})
        self.channels_last = use_channels_last(t.channels_last, cfg.model.name, device)
        if self.channels_last and device.type == "cpu":
            log.warning("train.channels_last=true on the CPU: its NHWC BatchNorm kernel computes batch statistics "
                        "less accurately than NCHW (README: Speed)")
        memory_format = torch.channels_last if self.channels_last else torch.preserve_format
        self.net = self.net.to(device, memory_format=memory_format)
        self.num_parameters = count_parameters(self.net)
        self.forward = self.net if t.compile is False else \
            torch.compile(self.net, mode=None if t.compile is True else t.compile)
        # What a training step calls: the (compiled) model, in DDP when there are several replicas.
        self.model = distributed.wrap(self.forward, device) if ctx.world_size > 1 else self.forward
        scaler = torch.amp.GradScaler(device.type) if self.precision == "fp16" else None
        self.method = build_method(cfg, self.model, build_optimizer(cfg.optimizer, self.net, device),
                                   self.steps_per_epoch, scaler)
        self.lr_factor = cosine_schedule(t.epochs * self.steps_per_epoch, round(t.warmup_epochs * self.steps_per_epoch))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.method.base_optimizer, self.lr_factor)
        self.ema = WeightAverage(self.net, t.ema_decay) if t.ema_decay else None
        # Each replica keeps its own BatchNorm statistics, as the authors' code; they are averaged
        # for evaluation and checkpoints only.
        self.replica_stats = distributed.running_stats(self.net, *([self.ema.model] if self.ema else []))

    # --- the run, top to bottom ------------------------------------------------------------------

    def run(self) -> dict:
        device, main = self.ctx.device, self.ctx.is_main
        # A refusal here (a corrupted checkpoint, another run's config) leaves the directory as it is.
        state, finished = self.open_run_directory()
        if finished:
            log.info(f"{self.run_dir} already finished: test error {finished['test_error']:.2f}%")
            return finished
        try:
            self.build()
            start_epoch, start_step, saved_totals = self.resume(state) if state else (0, 0, None)
            wandb_id = state["wandb_run_id"] if state else None
            self.tracker = distributed.on_main(
                lambda: Tracker(self.run_dir, self.config, run_id=wandb_id), device)
            if state:  # a kill between the checkpoint and metrics.jsonl must not leave the file short
                distributed.on_main(lambda: io.write_jsonl(self.run_dir / "metrics.jsonl", self.history), device)
            with self.signals:
                for epoch in range(start_epoch, self.cfg.train.epochs):
                    self.train_epoch(epoch, start_step if epoch == start_epoch else 0,
                                     saved_totals if epoch == start_epoch else None)
        except Stopped as stopped:
            self.record_end(self.summary("stopped", str(stopped)), exit_code=stopped.exit_code, preempted=True)
            self.signals.hand_over(stopped.signum, main)
            raise
        except KeyboardInterrupt:
            self.record_end(self.summary("stopped", "interrupted (Ctrl-C) without a checkpoint at this step; a "
                                                    "resume continues from the last checkpoint"), exit_code=130)
            raise
        except BaseException as e:
            self.record_end(self.summary("diverged" if isinstance(e, Diverged) else "failed",
                                         error_line(e)), exit_code=1)
            raise
        summary = self.summary("finished")
        distributed.on_main(lambda: self.record(summary), device)
        ema = f", EMA {summary['ema_test_error']:.2f}%" if self.cfg.train.ema_decay else ""
        log.info(f"test error {summary['test_error']:.2f}% (best {summary['best_test_error']:.2f}%){ema}; "
                 f"outputs in {self.run_dir}")
        return summary

    def open_run_directory(self) -> tuple[dict | None, dict | None]:
        """The checkpoint to resume from and, for a run that is finished already, its summary: the same
        on every process, or every process stops."""
        def read() -> tuple[dict | None, dict | None]:
            state = checkpoint.load(self.run_dir)
            if state:
                _check_resumable(state["config"], self.config, self.run_dir)
                self.history = state["history"]
            return state, self.finished_summary(state)

        state, finished = distributed.agreed(read, self.ctx.device)
        self.check_same_start(state, finished is not None)
        return state, finished

    def finished_summary(self, state: dict | None) -> dict | None:
        """The summary of a run that this directory holds finished already, else None."""
        path = self.run_dir / "summary.json"
        if not state or state["epoch"] < self.cfg.train.epochs or not path.exists():
            return None
        summary = json.loads(path.read_text())
        return summary if summary.get("status") == "finished" else None

    def check_same_start(self, state: dict | None, finished: bool) -> None:
        """Every process must resume from the same checkpoint (they read it each on its own)."""
        where = [state["epoch"], state["step"], int(finished)] if state else [-1, -1, 0]
        seen = distributed.all_gather(torch.tensor(where, device=self.ctx.device)).tolist()
        if any(other != seen[0] for other in seen):
            raise checkpoint.CheckpointError(
                f"the processes of this run found different checkpoints in {self.run_dir} ((epoch, step, finished) "
                f"per process: {seen}); every node must see the same run directory, on a shared filesystem")

    def record(self, summary: dict, exit_code: int = 0, preempted: bool = False) -> None:
        """summary.json (main process), through W&B when the run got as far as starting it."""
        if self.tracker is not None:
            self.tracker.finish(summary, exit_code=exit_code, preempted=preempted)
        elif self.ctx.is_main:
            io.write_json(self.run_dir / "summary.json", summary)

    def record_end(self, summary: dict, exit_code: int, preempted: bool = False) -> None:
        """`record` for a run that ends early (no collective: the other processes may be gone); a
        failure to record it never hides why it ended."""
        try:
            self.record(summary, exit_code, preempted)
        except Exception as e:
            log.warning(f"could not record the end of the run: {first_line(e)}")

    def resume(self, state: dict) -> tuple[int, int, torch.Tensor | None]:
        """Restore the checkpoint's state; returns where to continue (epoch, step) and the partial
        epoch's sums of this replica."""
        self.net.load_state_dict(state["model"])
        self.method.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema:
            self.ema.model.load_state_dict(state["ema"])
        per_replica = state["replica_stats"]  # None for a single process: its model holds them
        if per_replica is not None and len(per_replica) == self.ctx.world_size:
            own = per_replica[self.ctx.rank].to(self.ctx.device)
            torch._foreach_copy_(self.replica_stats, list(own.split([s.numel() for s in self.replica_stats])))
        totals = state["totals"]
        if totals is not None:
            # Each replica continues its own sums; with another number of replicas the main one takes them all.
            same = len(totals) == self.ctx.world_size
            totals = totals[self.ctx.rank] if same else totals.sum(0) * float(self.ctx.is_main)
        epoch, step = state["epoch"], state["step"]
        where = f"epoch {epoch} of {self.cfg.train.epochs}" if step == 0 else \
            f"step {step}/{self.steps_per_epoch} of epoch {epoch + 1}"
        log.info(f"Resuming {self.run_dir} after {where}")
        return epoch, step, totals

    def train_epoch(self, epoch: int, start_step: int, saved_totals: torch.Tensor | None) -> None:
        t, device = self.cfg.train, self.ctx.device
        self.forward.train()
        totals = EpochTotals(device, saved_totals)
        epoch_start = time.perf_counter()
        bar = tqdm(total=self.steps_per_epoch, initial=start_step, desc=f"epoch {epoch + 1}/{t.epochs}",
                   disable=not self.show_progress, leave=False, dynamic_ncols=True)
        for step, (images, target) in enumerate(self.train_loader.epoch(epoch, start_step), start_step):
            self.train_step(epoch * self.steps_per_epoch + step, images, target, totals)
            bar.update()
            done = step + 1
            if done == self.steps_per_epoch:
                break  # the end of the epoch is checked, and checkpointed, below
            if done % t.sync_every == 0 or (self.signals.requested and self.ctx.world_size == 1):
                signum, due = self.poll(epoch, done, totals)
                if signum or due:
                    self.save_checkpoint(epoch, done, totals)
                if signum:
                    self.stop(signum, f"step {done}/{self.steps_per_epoch} of epoch {epoch + 1}")
                if not bar.disable:
                    loss, errors = totals.field("first_pass_loss").item(), totals.field("first_pass_errors").item()
                    seen = done * self.train_loader.batch_size // self.ctx.world_size  # this replica's images
                    bar.set_postfix(loss=f"{loss / seen:.3f}", err=f"{100 * errors / seen:.1f}%")
        bar.close()
        signum, _ = self.poll(epoch, self.steps_per_epoch, totals)
        images_per_second = (self.steps_per_epoch - start_step) * t.batch_size / (time.perf_counter() - epoch_start)
        self.finish_epoch(epoch, totals, epoch_start, images_per_second)
        if signum and epoch + 1 < t.epochs:  # after the last epoch the run is simply done
            self.stop(signum, f"the end of epoch {epoch + 1}")

    def train_step(self, global_step: int, images: torch.Tensor, target: torch.Tensor, totals: EpochTotals) -> None:
        """One optimisation step with everything the loop does around it."""
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        # Dropout, stochastic depth and ShakeDrop draws of this step on this replica.
        torch.manual_seed(random_seed(self.cfg.seed, Stream.MODEL, global_step, self.ctx.rank))
        self.method.step(lambda: self.loss_and_logits(images, target))
        self.scheduler.step()
        if self.ema:
            self.ema.update()
        totals.add(self.method.last_step, target, global_step % self.steps_per_epoch)

    def loss_and_logits(self, images: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The closure each pass of a step evaluates: the loss in float32, and the logits."""
        with self.autocast():
            logits = self.model(images)
        return F.cross_entropy(logits.float(), target, label_smoothing=self.cfg.train.label_smoothing), logits

    def poll(self, epoch: int, done: int, totals: EpochTotals) -> tuple[int, bool]:
        """Read the device's flags, agreed across replicas: raise Diverged on NaN or inf; return the
        signal that asked to stop (0: none) and whether a timed checkpoint is due."""
        minutes = self.cfg.train.checkpoint_minutes
        due = self.ctx.is_main and minutes > 0 and time.monotonic() - self.last_checkpoint >= 60 * minutes
        host_flags = torch.tensor([float(self.signals.signum or 0), float(due)], dtype=torch.float64,
                                  device=self.ctx.device)
        # MAX over replicas: any NaN, the earliest bad step (as its negative), a signal, a due checkpoint.
        flags = torch.cat([totals.field("nonfinite").view(1), -totals.first_bad_step.view(1), host_flags])
        nonfinite, minus_first_bad, signum, due = distributed.all_reduce_max(flags).tolist()
        if nonfinite:
            raise Diverged(self.divergence_message(epoch, int(-minus_first_bad)))
        return int(signum), bool(due)

    def stop(self, signum: int, where: str) -> None:
        raise Stopped(f"stopped by {signal.Signals(signum).name} at {where}; the checkpoint in {self.run_dir} "
                      f"resumes it", signum)

    def finish_epoch(self, epoch: int, totals: EpochTotals, epoch_start: float, images_per_second: float) -> None:
        """Average the epoch's sums over replicas, evaluate, checkpoint, log."""
        sums = distributed.all_reduce_sum(totals.sums.clone()).tolist()
        param_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(list(self.net.parameters())))).item()
        images = self.steps_per_epoch * self.train_loader.batch_size
        named = dict(zip(EpochTotals.FIELDS, sums))
        steps = max(named["applied_steps"], 1)  # one gradient norm per applied step and replica
        with distributed.replica_averaged(self.replica_stats):
            test = evaluate(self.forward, self.test_loader, self.autocast, self.channels_last)
            ema_test = evaluate(self.ema.model, self.test_loader, self.autocast, self.channels_last) \
                if self.ema else {}
        self.history.append({
            "epoch": epoch + 1, "lr": self.cfg.optimizer.lr * self.lr_factor(epoch * self.steps_per_epoch),
            "first_pass_loss": named["first_pass_loss"] / images,
            "first_pass_error": 100 * named["first_pass_errors"] / images,
            "perturbed_loss": named["perturbed_loss"] / images,
            "perturbed_error": 100 * named["perturbed_errors"] / images,
            "g1_norm": named["g1_norm"] / steps, "final_grad_norm": named["final_grad_norm"] / steps,
            "param_norm": param_norm, **self.method.last_step.schedule,
            **{f"test_{k}": v for k, v in test.items()}, **{f"ema_test_{k}": v for k, v in ema_test.items()},
            "seconds": time.perf_counter() - epoch_start, "images_per_second": images_per_second,
        })
        self.save_checkpoint(epoch + 1, 0, None)
        distributed.on_main(lambda: self.tracker.log_epoch(self.history), self.ctx.device)
        log.info(_epoch_line(self.history[-1], self.cfg.train.epochs))

    def save_checkpoint(self, epoch: int, step: int, totals: EpochTotals | None) -> None:
        """The state after step `step` of epoch `epoch` (0-based; step 0: the end of the previous
        epoch), with the replicas' BatchNorm statistics averaged in the saved model and each one's
        own kept beside them, so that a resumed DDP run continues every replica exactly."""
        replica_stats = self.gather_replica_stats()
        replica_totals = None if totals is None else distributed.all_gather(totals.sums).cpu()
        with distributed.replica_averaged(self.replica_stats):
            distributed.on_main(lambda: self.write_checkpoint(epoch, step, replica_totals, replica_stats),
                                self.ctx.device)
        if step:
            log.info(f"checkpoint at step {step}/{self.steps_per_epoch} of epoch {epoch + 1}")

    def gather_replica_stats(self) -> torch.Tensor | None:
        """Every replica's own BatchNorm statistics, so that a resumed DDP run continues each exactly."""
        if self.ctx.world_size == 1 or not self.replica_stats:
            return None
        return distributed.all_gather(torch.cat([s.flatten() for s in self.replica_stats])).cpu()

    def write_checkpoint(self, epoch: int, step: int, totals: torch.Tensor | None,
                         replica_stats: torch.Tensor | None) -> None:
        self.last_checkpoint = time.monotonic()
        checkpoint.save(self.run_dir, {
            "config": self.config, "epoch": epoch, "step": step, "history": self.history,
            "model": self.net.state_dict(), "optimizer": self.method.state_dict(),
            "scheduler": self.scheduler.state_dict(), "ema": self.ema.model.state_dict() if self.ema else None,
            "replica_stats": replica_stats, "totals": totals,
            "wandb_run_id": self.tracker.run_id if self.tracker else None,
        })

    def divergence_message(self, epoch: int, step: int) -> str:
        kept = "no checkpoint was written yet"
        if (self.run_dir / checkpoint.FILENAME).exists():
            kept = f"the last good checkpoint, {self.run_dir / checkpoint.FILENAME}, is kept"
        return (f"the loss or gradient norm became NaN or infinite at step {step + 1}/{self.steps_per_epoch} of "
                f"epoch {epoch + 1}; {kept}. Lower optimizer.lr or keep method.max_grad_norm set")

    @property
    def show_progress(self) -> bool:
        progress = self.cfg.train.progress
        return self.ctx.is_main and (progress is True or (progress == "auto" and sys.stderr.isatty()))

    def summary(self, status: str, error: str | None = None) -> dict:
        cfg, history, device = self.cfg, self.history, self.ctx.device  # build() may not have finished
        last = history[-1] if history else {}
        finished = status == "finished"
        device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        return {
            "status": status, "error": error,
            "dataset": cfg.dataset.name, "model": cfg.model.name, "method": cfg.method.name, "aug": cfg.aug.name,
            "aug_style": cfg.aug.get("style"),
            "method_settings": {k: v for k, v in self.config["method"].items() if k not in ("_target_", "name")},
            "seed": cfg.seed, "init_seed": init_seed(cfg),
            "epochs": cfg.train.epochs, "epochs_completed": len(history),
            "optimizer": cfg.optimizer.name, "lr": cfg.optimizer.lr, "batch_size": cfg.train.batch_size,
            "precision": self.precision, "num_parameters": self.num_parameters,
            "test_error": last.get("test_error") if finished else None,
            "test_loss": last.get("test_loss") if finished else None,
            "test_top5_error": last.get("test_top5_error") if finished else None,
            "ema_test_error": last.get("ema_test_error") if finished else None,
            "best_test_error": min((row["test_error"] for row in history), default=None),
            **{key: last.get(key) for key in ("first_pass_loss", "first_pass_error", "perturbed_loss",
                                              "perturbed_error")},
            "wall_seconds": sum(row["seconds"] for row in history),
            "images_per_second": sum(row["images_per_second"] for row in history) / len(history) if history else None,
            "data_verified": self.data_verified, "git_commit": git_commit(), "torch_version": torch.__version__,
            "device": f"{device_name} x{self.ctx.world_size}" if self.ctx.world_size > 1 else device_name,
            "world_size": self.ctx.world_size,
        }


@torch.inference_mode()
def evaluate(model: nn.Module, loader: BatchLoader, autocast=nullcontext,
             channels_last: bool = False) -> dict[str, float]:
    """Mean cross-entropy, error (%) and, with more than 10 classes, top-5 error (%) on the loader's
    whole dataset, summed over replicas."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, device=loader.device, dtype=torch.float64)
    classes = 0
    for images, labels in loader.epoch():
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast():
            logits = model(images)
        classes = logits.shape[1]
        top5 = logits.topk(min(5, classes), dim=1).indices
        totals += torch.stack([F.cross_entropy(logits.float(), labels, reduction="sum").double(),
                               (logits.argmax(1) != labels).sum().double(),
                               (top5 != labels[:, None]).all(1).sum().double()])
    model.train(was_training)
    loss_sum, errors, top5_errors = distributed.all_reduce_sum(totals).tolist()
    images = len(loader.labels)
    result = {"loss": loss_sum / images, "error": 100 * errors / images}
    if classes > 10:
        result["top5_error"] = 100 * top5_errors / images
    return result


def _check_resumable(saved: dict, current: dict, run_dir: Path) -> None:
    def flatten(d: dict, prefix: str = "") -> dict:
        out = {}
        for key, value in d.items():
            name = prefix + key
            if any(name == k or name.startswith(k + ".") for k in RESUMABLE_CHANGES):
                continue
            out.update(flatten(value, name + ".") if isinstance(value, dict) else {name: value})
        return out

    old, new = flatten(saved), flatten(current)
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    if changed:
        diffs = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
        raise ConfigError(f"{run_dir} holds a checkpoint of a different run ({diffs}). Resume with the same "
                          f"settings, or start a new run in another directory (hydra.run.dir=...).")


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _epoch_line(row: dict, epochs: int) -> str:
    line = (f"epoch {row['epoch']:>4}/{epochs}  lr {row['lr']:.4g}  train loss {row['first_pass_loss']:.4f} "
            f"err {row['first_pass_error']:5.2f}%  |g1| {row['g1_norm']:.3f}  test loss {row['test_loss']:.4f} "
            f"err {row['test_error']:5.2f}%")
    if "ema_test_error" in row:
        line += f"  EMA err {row['ema_test_error']:5.2f}%"
    return line + f"  {row['images_per_second']:.0f} img/s"
