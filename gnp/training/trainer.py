"""One run in its run directory, from the first step or a checkpoint to the end: `train(cfg, run_dir)`."""
from __future__ import annotations

import signal
import sys
import time
from contextlib import ExitStack
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from gnp import distributed
from gnp.config import resolve_shards, validate
from gnp.console import error_line, log, setup_console
from gnp.rundir import Hold, Status, Summary, remove_stub
from gnp.signals import StopSignals, exit_code
from gnp.training.build import Parts, build_parts
from gnp.training.checkpointing import Checkpoints, Start
from gnp.training.divergence import Diverged, check_test_losses, divergence_advice
from gnp.training.epoch import EpochTotals, epoch_steps
from gnp.training.evaluate import evaluate
from gnp.training.records import RunRecords, epoch_row


class Stopped(Exception):
    """A signal stopped the run after a checkpoint; `exit_code` is the process's status to exit with."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum, self.exit_code = signum, exit_code(signum)


def train(cfg: DictConfig, run_dir: str | Path, signals: StopSignals | None = None) -> Summary:
    """Train as `cfg` says, writing every output into `run_dir`; returns the run's summary. `signals`
    (default: a new StopSignals) are the stop requests the run obeys; the caller may read them after."""
    validate(cfg)
    ctx = distributed.setup(cfg.device)
    cfg = OmegaConf.merge(cfg, {"train": {"shards": resolve_shards(cfg, ctx.world_size)}})  # recorded as a number
    setup_console(ctx.is_main)
    try:
        # Under torchrun every process composed its own (timestamped) run directory: the main one's wins.
        shared_dir = Path(distributed.broadcast_object(str(run_dir)))
        if shared_dir != Path(run_dir):
            remove_stub(run_dir)
        with ExitStack() as held:
            distributed.on_main(lambda: held.enter_context(Hold(shared_dir)), ctx.device)
            return Trainer(cfg, shared_dir, ctx, signals).run()
    finally:
        distributed.teardown()


class Trainer:
    """One run in a run directory that this process holds: `run` builds the parts, resumes from the
    directory's checkpoint if there is one, then trains to the end. Whatever stops it is recorded in
    summary.json (status stopped, diverged or failed) before the error goes on."""

    def __init__(self, cfg: DictConfig, run_dir: Path, ctx: distributed.Context, signals: StopSignals | None = None):
        self.cfg, self.run_dir, self.ctx = cfg, run_dir, ctx
        self.records = RunRecords(cfg, run_dir, ctx)
        self.checkpoints = Checkpoints(run_dir, ctx)
        self.signals = signals or StopSignals()
        self.parts: Parts | None = None

    def run(self) -> Summary:
        state, finished = self.records.open()
        if finished:
            log.info(f"{self.run_dir} already finished: test error {finished.test_error:.2f}%")
            return finished
        with ExitStack() as stack:
            try:
                self.parts = build_parts(self.cfg, self.ctx)
                start = self.checkpoints.restore(self.parts, state) if state else Start()
                self.records.start(self.parts)
                # From the first step until the end is recorded, a signal is a request to stop at the next
                # read of the device's flags: it never cuts a checkpoint or the run's records short.
                stack.enter_context(self.signals)
                for epoch in range(start.epoch, self.cfg.train.epochs):
                    self.train_epoch(epoch, start if epoch == start.epoch else Start(epoch))
            except Stopped as stopped:
                self.end(Status.STOPPED, str(stopped), exit_code=stopped.exit_code, preempted=True)
                self.signals.hand_over_at_exit(stopped.signum, self.ctx.is_main)  # a scheduler's handler may requeue
                raise
            except Diverged as e:
                diverged = Diverged(f"{e}; {self.checkpoints.kept()}. {divergence_advice(self.cfg)}")
                self.end(Status.DIVERGED, error_line(diverged), exit_code=1)
                raise diverged from None
            except KeyboardInterrupt:
                self.end(Status.STOPPED, "interrupted (Ctrl-C) without a checkpoint at this step; a resume continues "
                                    "from the last checkpoint", exit_code=130)
                raise
            except BaseException as e:
                died = distributed.lost_process(e, self.ctx)  # another process is gone: no traceback of ours
                self.end(Status.FAILED, error_line(died or e), exit_code=1, speaks=died.speaks if died else None)
                if died:
                    raise died from None
                raise
            self.signals.ending()
            return self.records.finish()

    def end(self, status: Status, error: str, exit_code: int, **how) -> None:
        """Record a run that ends early; a signal meanwhile waits for the record."""
        self.signals.ending()
        self.records.end(status, error, exit_code, **how)

    def train_epoch(self, epoch: int, start: Start) -> None:
        """Train one epoch from `start`, checkpointing where a signal or the clock asks, then end it."""
        parts, steps = self.parts, self.parts.steps_per_epoch
        totals = EpochTotals(self.ctx.device, start.totals)
        epoch_start = time.perf_counter()
        for done, flags in epoch_steps(parts, epoch, totals, start.step, self.signals,
                                       lambda: self.checkpoints.due(self.cfg.train.checkpoint_minutes),
                                       self.show_progress):
            if done == steps:
                break
            if flags.signum or flags.checkpoint_due:
                self.save(epoch, done, totals)
            if flags.signum:
                self.stop(flags.signum, f"step {done}/{steps} of epoch {epoch + 1}")
        images_per_second = (steps - start.step) * self.cfg.train.batch_size / (time.perf_counter() - epoch_start)
        self.end_epoch(epoch, totals, epoch_start, images_per_second)
        if flags.signum and epoch + 1 < self.cfg.train.epochs:  # after the last epoch the run is simply done
            self.stop(flags.signum, f"the end of epoch {epoch + 1}")

    def end_epoch(self, epoch: int, totals: EpochTotals, epoch_start: float, images_per_second: float) -> None:
        """Sum the epoch over replicas, evaluate, record and checkpoint."""
        parts = self.parts
        sums = dict(zip(EpochTotals.FIELDS, distributed.all_reduce_sum(totals.sums.clone()).tolist()))
        with distributed.replica_averaged(parts.replica_stats):
            test = evaluate(parts.compiled, parts.test_loader, parts.autocast, parts.channels_last)
            ema_test = evaluate(parts.ema.model, parts.test_loader, parts.autocast, parts.channels_last) \
                if parts.ema else {}
        check_test_losses(epoch, test, ema_test)  # before the epoch's checkpoint
        self.records.history.append(epoch_row(parts, epoch, sums, test, ema_test, time.perf_counter() - epoch_start,
                                              images_per_second))
        self.save(epoch + 1, 0, None)
        self.records.log_epoch()

    def save(self, epoch: int, step: int, totals: EpochTotals | None) -> None:
        self.checkpoints.save(self.parts, epoch, step, totals, self.records.checkpoint_record())

    def stop(self, signum: int, where: str) -> None:
        raise Stopped(f"stopped by {signal.Signals(signum).name} at {where}; the checkpoint in {self.run_dir} "
                      f"resumes it", signum)

    @property
    def show_progress(self) -> bool:
        progress = self.cfg.train.progress
        return self.ctx.is_main and (progress is True or (progress == "auto" and sys.stderr.isatty()))
