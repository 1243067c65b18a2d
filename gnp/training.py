"""The training loop: one function that reads top to bottom, on a CPU, one GPU or under torchrun."""
from __future__ import annotations

import math
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from gnp import distributed
from gnp.augment import build_augmentation
from gnp.config import ConfigError, validate
from gnp.data import BatchLoader, load_dataset, stream_seed
from gnp.io import torch_save
from gnp.method import GradientNormPenalty
from gnp.models import build_model, count_parameters
from gnp.tracking import Tracker

# Keys that may differ when a run is resumed: they change where and how it is logged, not what it computes.
RESUMABLE_CHANGES = ("wandb", "device", "train.progress", "dataset.root", "dataset.download")


def train(cfg: DictConfig, run_dir: str | Path) -> dict:
    """Train as `cfg` says, writing every output into `run_dir`; returns the run's summary."""
    validate(cfg)
    ctx = distributed.setup(cfg.device)
    try:
        return _train(cfg, Path(run_dir), ctx)
    finally:
        distributed.teardown()


def build_optimizer(cfg: DictConfig, params) -> torch.optim.Optimizer:
    # With weight_decay_mode=loss the decay is the method's in-loss L2, so the base optimizer gets none.
    weight_decay = cfg.weight_decay if cfg.weight_decay_mode == "optimizer" else 0.0
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=weight_decay)


def cosine_schedule(total_steps: int, warmup_steps: int):
    """LR factor per step: linear warmup, then cosine decay to zero at the last step."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def _train(cfg: DictConfig, run_dir: Path, ctx: distributed.Context) -> dict:
    config = OmegaConf.to_container(cfg, resolve=True)
    device, t = ctx.device, cfg.train
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()  # noqa: E731
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    # Data: the main process fetches/extracts first, the others then read the finished files.
    d = cfg.dataset
    if not ctx.is_main:
        distributed.barrier()
    data = load_dataset(d.name, d.root, download=d.download, verify=d.verify,
                        limit_train=d.limit_train, limit_test=d.limit_test)
    if ctx.is_main:
        distributed.barrier()
    if len(data.train_labels) < t.batch_size:
        raise ConfigError(f"train.batch_size={t.batch_size} is invalid: larger than the training set "
                          f"({len(data.train_labels)} images); lower it or raise dataset.limit_train")
    augment = build_augmentation(cfg.aug, mean=d.mean)
    train_loader = BatchLoader(data.train_images, data.train_labels, batch_size=t.batch_size, device=device,
                               mean=d.mean, std=d.std, train=True, augment=augment, num_classes=d.num_classes,
                               seed=cfg.seed, rank=ctx.rank, world_size=ctx.world_size)
    test_loader = BatchLoader(data.test_images, data.test_labels, batch_size=t.eval_batch_size, device=device,
                              mean=d.mean, std=d.std, train=False, rank=ctx.rank, world_size=ctx.world_size)

    torch.manual_seed(cfg.seed)  # identical initial weights on every replica
    net = build_model(cfg.model.name, d.num_classes, **{k: v for k, v in cfg.model.items() if k != "name"})
    net = net.to(device)
    num_parameters = count_parameters(net)
    model = DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None) \
        if ctx.world_size > 1 else net
    base = build_optimizer(cfg.optimizer, net.parameters())
    m = cfg.method
    l2 = cfg.optimizer.weight_decay if cfg.optimizer.weight_decay_mode == "loss" else 0.0
    optimizer = GradientNormPenalty(model, base, r=m.r, alpha=m.alpha, normalize_first_grad=m.normalize_first_grad,
                                    l2=l2, max_grad_norm=m.max_grad_norm, sync_perturbation=m.sync_perturbation)
    steps_per_epoch = len(train_loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        base, cosine_schedule(t.epochs * steps_per_epoch, round(t.warmup_epochs * steps_per_epoch)))

    checkpoint_path = run_dir / "checkpoint.pt"
    start_epoch, history, wandb_id = 0, [], None
    if checkpoint_path.exists():
        checkpoint = torch.load(checkpoint_path, map_location=device, weights_only=False)
        _check_resumable(checkpoint["config"], config, run_dir)
        net.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        start_epoch, history, wandb_id = checkpoint["epoch"], checkpoint["history"], checkpoint["wandb_run_id"]
        if ctx.is_main:
            print(f"Resuming {run_dir} after epoch {start_epoch} of {t.epochs}")

    tracker = Tracker(run_dir, config, enabled=ctx.is_main, run_id=wandb_id)
    show_progress = ctx.is_main and (t.progress is True or (t.progress == "auto" and _is_terminal()))
    try:
        for epoch in range(start_epoch, t.epochs):
            # Dropout/ShakeDrop draws: per replica, and repeated by a resumed run (the loader's
            # streams are 0 and 1 + rank, so this one is distinct from them).
            torch.manual_seed(stream_seed(cfg.seed, epoch, 1_000 + ctx.rank))
            start = time.perf_counter()
            lr = scheduler.get_last_lr()[0]
            train_loss, train_error, grad_norm = _train_epoch(
                model, optimizer, scheduler, train_loader, epoch, autocast, t.label_smoothing,
                tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{t.epochs}", disable=not show_progress,
                     leave=False, dynamic_ncols=True))
            train_seconds = time.perf_counter() - start
            test_loss, test_error = evaluate(net, test_loader, autocast)
            history.append({
                "epoch": epoch + 1, "lr": lr, "train_loss": train_loss, "train_error": train_error,
                "grad_norm": grad_norm, "test_loss": test_loss, "test_error": test_error,
                "seconds": time.perf_counter() - start,
                "images_per_second": steps_per_epoch * t.batch_size / train_seconds,
            })
            if ctx.is_main:
                torch_save(checkpoint_path, {
                    "model": net.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "epoch": epoch + 1, "history": history,
                    "wandb_run_id": tracker.run_id, "config": config,
                })
                tracker.log_epoch(history)
                _print_epoch(history[-1], t.epochs)
        summary = _summary(cfg, history, num_parameters, data.verified, device, ctx.world_size)
    except BaseException:
        tracker.finish(None, exit_code=1)
        raise
    tracker.finish(summary)
    if ctx.is_main:
        print(f"test error {summary['test_error']:.2f}% (best {summary['best_test_error']:.2f}%)")
    return summary


def _train_epoch(model, optimizer, scheduler, loader, epoch, autocast, label_smoothing, bar) -> tuple[float, float, float]:
    """One pass over the training set; returns mean loss, error (%) and mean ||g1|| over all replicas."""
    model.train()
    device = loader.device
    totals = torch.zeros(4, device=device, dtype=torch.float64)  # loss sum, errors, images, grad-norm sum
    for step, (images, target) in enumerate(loader.epoch(epoch)):
        def closure():
            with autocast():
                logits = model(images)
            return F.cross_entropy(logits.float(), target, label_smoothing=label_smoothing), logits

        loss = optimizer.step(closure)
        scheduler.step()
        labels = target if target.ndim == 1 else target.argmax(1)  # soft targets from mixup/cutmix
        errors = (optimizer.last_output.argmax(1) != labels).sum()
        totals += torch.stack([loss.double() * len(labels), errors.double(),
                               torch.tensor(len(labels), dtype=torch.float64, device=device),
                               optimizer.grad_norm.double()])
        bar.update()
        if not bar.disable and step % 10 == 0:  # reading values back syncs the GPU: not every step
            loss_sum, err, n, _ = totals.tolist()
            rate = bar.format_dict["rate"] or 0.0
            bar.set_postfix(loss=f"{loss_sum / n:.3f}", acc=f"{100 - 100 * err / n:.1f}%",
                            img_s=f"{rate * loader.batch_size:.0f}")
    bar.close()
    distributed.all_reduce_sum(totals)
    loss_sum, errors, images, grad_norm_sum = totals.tolist()
    return loss_sum / images, 100 * errors / images, grad_norm_sum / (len(loader) * loader.world_size)


@torch.no_grad()
def evaluate(model: nn.Module, loader: BatchLoader, autocast=nullcontext) -> tuple[float, float]:
    """Mean cross-entropy and error (%) on the loader's whole dataset, summed over replicas."""
    model.eval()
    totals = torch.zeros(3, device=loader.device, dtype=torch.float64)
    for images, labels in loader.epoch():
        with autocast():
            logits = model(images)
        totals += torch.stack([F.cross_entropy(logits.float(), labels, reduction="sum").double(),
                               (logits.argmax(1) != labels).sum().double(),
                               torch.tensor(len(labels), dtype=torch.float64, device=loader.device)])
    distributed.all_reduce_sum(totals)
    loss_sum, errors, images = totals.tolist()
    return loss_sum / images, 100 * errors / images


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


def _summary(cfg: DictConfig, history: list[dict], num_parameters: int, verified: bool,
             device: torch.device, world_size: int) -> dict:
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {
        "dataset": cfg.dataset.name, "model": cfg.model.name, "method": cfg.method.name, "aug": cfg.aug.name,
        "r": cfg.method.r, "alpha": cfg.method.alpha, "seed": cfg.seed, "epochs": cfg.train.epochs,
        "optimizer": cfg.optimizer.name, "lr": cfg.optimizer.lr, "batch_size": cfg.train.batch_size,
        "num_parameters": num_parameters,
        "test_error": history[-1]["test_error"], "test_loss": history[-1]["test_loss"],
        "best_test_error": min(row["test_error"] for row in history),
        "train_loss": history[-1]["train_loss"], "train_error": history[-1]["train_error"],
        "wall_seconds": sum(row["seconds"] for row in history),
        "images_per_second": sum(row["images_per_second"] for row in history) / len(history),
        "data_verified": verified, "git_commit": _git_commit(), "torch_version": torch.__version__,
        "device": f"{device_name} x{world_size}" if world_size > 1 else device_name,
        "world_size": world_size,
    }


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _is_terminal() -> bool:
    return sys.stderr.isatty()


def _print_epoch(row: dict, epochs: int) -> None:
    print(f"epoch {row['epoch']:>4}/{epochs}  lr {row['lr']:.4g}  train loss {row['train_loss']:.4f} "
          f"err {row['train_error']:5.2f}%  |g1| {row['grad_norm']:.3f}  test loss {row['test_loss']:.4f} "
          f"err {row['test_error']:5.2f}%  {row['images_per_second']:.0f} img/s", flush=True)
