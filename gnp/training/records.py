"""A run's records in its directory (through gnp.rundir) and in W&B: what a run finds there when it
starts (a checkpoint of the same run, a finished summary), its config, the per-epoch history
(metrics.jsonl), and its summary, written however the run ends.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from gnp import distributed
from gnp.config import ConfigError
from gnp.schema import dotted
from gnp.console import first_line, log
from gnp.rundir import RunDir, Status, Summary
from gnp.tracking import Tracker
from gnp.training import checkpointing
from gnp.training.build import Parts, init_seed, resolve_precision

# Keys that may differ when a run is resumed: they change where and how it is logged, not what it computes.
RESUMABLE_CHANGES = ("wandb", "device", "train.progress", "train.checkpoint_minutes", "train.sync_every",
                     "train.eval_batch_size", "dataset.root", "dataset.download", "dataset.verify")


class RunRecords:
    """The records of the run of `cfg` in `run_dir`: the main process writes them, every process keeps
    the history (it goes into checkpoints)."""

    def __init__(self, cfg: DictConfig, run_dir: Path, ctx: distributed.Context):
        self.cfg, self.run_dir, self.ctx = cfg, run_dir, ctx
        self.files = RunDir(run_dir)
        self.config = OmegaConf.to_container(cfg, resolve=True)
        self.history: list[dict] = []
        self.tracker: Tracker | None = None
        self.wandb_run_id: str | None = None  # a resumed run's, to continue its W&B run
        self.parts: Parts | None = None  # what the summary reports of the built run, once built

    # --- what the directory holds ----------------------------------------------------------------

    def open(self) -> tuple[dict | None, Summary | None]:
        """The checkpoint to resume from and, for a run that is finished already, its summary: the same
        on every process, or every process stops. A refusal (a corrupted checkpoint, another run's
        config) leaves the directory as it is."""
        def read() -> tuple[dict | None, Summary | None]:
            state = checkpointing.load(self.run_dir)
            if state:
                check_resumable(state["config"], self.config, self.run_dir, self.ctx.world_size)
                self.history, self.wandb_run_id = state["history"], state["wandb_run_id"]
            return state, self.finished_summary(state)

        state, finished = distributed.agreed(read, self.ctx.device)
        self.check_same_start(state, finished is not None)
        return state, finished

    def finished_summary(self, state: dict | None) -> Summary | None:
        """The summary of a run that this directory holds finished already, else None."""
        if not state or state["epoch"] < self.cfg.train.epochs:
            return None
        summary = self.files.read_summary()
        return summary if summary is not None and summary.finished else None

    def check_same_start(self, state: dict | None, finished: bool) -> None:
        """Every process must resume from the same checkpoint (they read it each on its own)."""
        where = [state["epoch"], state["step"], int(finished)] if state else [-1, -1, 0]
        seen = distributed.all_gather(torch.tensor(where, device=self.ctx.device)).tolist()
        if any(other != seen[0] for other in seen):
            raise checkpointing.CheckpointError(
                f"the processes of this run found different checkpoints in {self.run_dir} ((epoch, step, finished) "
                f"per process: {seen}); every node must see the same run directory, on a shared filesystem")

    # --- while it trains -------------------------------------------------------------------------

    def start(self, parts: Parts) -> None:
        """config.yaml and the W&B run (the main process); a resumed run's metrics.jsonl rewritten from
        the checkpoint's history, since a kill between the checkpoint and metrics.jsonl leaves it short."""
        self.parts = parts

        def start() -> Tracker:
            self.files.write_config(self.config)
            if self.history:
                self.files.write_metrics(self.history)
            return Tracker(self.run_dir, self.config, label_settings=type(parts.method).label_settings,
                           run_id=self.wandb_run_id)
        self.tracker = distributed.on_main(start, self.ctx.device)

    def checkpoint_record(self) -> dict:
        """What a checkpoint keeps of the records."""
        return {"config": self.config, "history": self.history,
                "wandb_run_id": self.tracker.run_id if self.tracker else None}

    def log_epoch(self) -> None:
        """The newest epoch's row to metrics.jsonl (rewritten whole, atomically) and W&B, and its line to the console."""
        def write() -> None:
            self.files.write_metrics(self.history)
            self.tracker.log_epoch(self.history[-1])
        distributed.on_main(write, self.ctx.device)
        log.info(epoch_line(self.history[-1], self.cfg.train.epochs))

    # --- how it ends -----------------------------------------------------------------------------

    def summary(self, status: Status, error: str | None = None) -> Summary:
        cfg, history, device = self.cfg, self.history, self.ctx.device  # the parts may not have been built
        last = history[-1] if history else {}
        finished = status is Status.FINISHED
        device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        return Summary(
            status=status, error=error,
            dataset=cfg.dataset.name, model=cfg.model.name, method=cfg.method.name, aug=cfg.aug.name,
            aug_style=cfg.aug.get("style"),
            method_settings={k: v for k, v in self.config["method"].items() if k not in ("_target_", "name")},
            seed=cfg.seed, init_seed=init_seed(cfg),
            epochs=cfg.train.epochs, epochs_completed=len(history),
            optimizer=cfg.optimizer.name, lr=cfg.optimizer.lr, batch_size=cfg.train.batch_size,
            shards=cfg.train.shards,
            precision=resolve_precision(cfg.precision, device),
            num_parameters=self.parts.num_parameters if self.parts else None,
            test_error=last.get("test_error") if finished else None,
            test_loss=last.get("test_loss") if finished else None,
            test_top5_error=last.get("test_top5_error") if finished else None,
            ema_test_error=last.get("ema_test_error") if finished else None,
            best_test_error=min((row["test_error"] for row in history), default=None),
            first_pass_loss=last.get("first_pass_loss"), first_pass_error=last.get("first_pass_error"),
            perturbed_loss=last.get("perturbed_loss"), perturbed_error=last.get("perturbed_error"),
            wall_seconds=sum(row["seconds"] for row in history),
            images_per_second=sum(row["images_per_second"] for row in history) / len(history) if history else None,
            data_verified=self.parts.data_verified if self.parts else None, git_commit=git_commit(),
            torch_version=torch.__version__,
            device=f"{device_name} x{self.ctx.world_size}" if self.ctx.world_size > 1 else device_name,
            world_size=self.ctx.world_size,
        )

    def finish(self) -> Summary:
        """Record the finished run and say so; its summary."""
        summary = self.summary(Status.FINISHED)
        distributed.on_main(lambda: self.record(summary), self.ctx.device)
        ema = f", EMA {summary.ema_test_error:.2f}%" if self.cfg.train.ema_decay else ""
        log.info(f"test error {summary.test_error:.2f}% (best {summary.best_test_error:.2f}%){ema}; "
                 f"outputs in {self.run_dir}")
        return summary

    def end(self, status: Status, error: str, exit_code: int, preempted: bool = False,
            speaks: bool | None = None) -> None:
        """Record a run that ends early (no collective: the other processes may be gone); a failure to
        record it never hides why it ended. `speaks`: whether this process writes summary.json (default:
        the main process; another one when the main one died)."""
        try:
            self.record(self.summary(status, error), exit_code, preempted, speaks)
        except Exception as e:
            log.warning(f"could not record the end of the run: {first_line(e)}")

    def record(self, summary: Summary, exit_code: int = 0, preempted: bool = False,
               speaks: bool | None = None) -> None:
        """summary.json (the process that speaks for the run), and the end of the W&B run where it started."""
        if self.tracker is not None or (self.ctx.is_main if speaks is None else speaks):
            self.files.write_summary(summary)
        if self.tracker is not None:
            self.tracker.finish(summary, exit_code=exit_code, preempted=preempted)


def epoch_row(parts: Parts, epoch: int, sums: dict[str, float], test: dict[str, float], ema_test: dict[str, float],
              seconds: float, images_per_second: float) -> dict:
    """One line of metrics.jsonl: the epoch's means from its sums (over every replica), the test results."""
    images = parts.steps_per_epoch * parts.train_loader.batch_size
    steps = max(sums["applied_steps"], 1)  # one gradient norm per applied step and replica
    param_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(list(parts.model.parameters())))).item()
    return {
        "epoch": epoch + 1, "lr": parts.cfg.optimizer.lr * parts.lr_factor(epoch * parts.steps_per_epoch),
        "first_pass_loss": sums["first_pass_loss"] / images,
        "first_pass_error": 100 * sums["first_pass_errors"] / images,
        "perturbed_loss": sums["perturbed_loss"] / images,
        "perturbed_error": 100 * sums["perturbed_errors"] / images,
        "g1_norm": sums["g1_norm"] / steps, "final_grad_norm": sums["final_grad_norm"] / steps,
        "param_norm": param_norm, **parts.method.last_step.schedule,
        **{f"test_{k}": v for k, v in test.items()}, **{f"ema_test_{k}": v for k, v in ema_test.items()},
        "seconds": seconds, "images_per_second": images_per_second,
    }


def epoch_line(row: dict, epochs: int) -> str:
    """The console's line for one epoch."""
    line = (f"epoch {row['epoch']:>4}/{epochs}  lr {row['lr']:.4g}  train loss {row['first_pass_loss']:.4f} "
            f"err {row['first_pass_error']:5.2f}%  |g1| {row['g1_norm']:.3f}  test loss {row['test_loss']:.4f} "
            f"err {row['test_error']:5.2f}%")
    if "ema_test_error" in row:
        line += f"  EMA err {row['ema_test_error']:5.2f}%"
    return line + f"  {row['images_per_second']:.0f} img/s"


def check_resumable(saved: dict, current: dict, run_dir: Path, world_size: int) -> None:
    """Refuse to resume a checkpoint made with other settings than those of RESUMABLE_CHANGES, in a launch
    of `world_size` processes. train.shards is compared as the number it resolves to: `auto`, and a
    checkpoint from before the setting existed, are one shard per process."""
    def kept(config: dict) -> dict:
        return {k: v for k, v in dotted(config).items()
                if not any(k == change or k.startswith(change + ".") for change in RESUMABLE_CHANGES)}

    old, new = kept(saved), kept(current)
    for config in (old, new):
        if config.get("train.shards", "auto") == "auto":
            config["train.shards"] = world_size
    # A key the saved config has and this one has not is a setting that no longer exists (dataset.num_classes).
    changed = sorted(k for k in new if old.get(k) != new[k])
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
