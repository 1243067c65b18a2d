"""Stop requests: SIGTERM (SLURM, Kubernetes and torchrun before a kill), SIGINT (Ctrl-C), SIGUSR1
and SIGUSR2 (the pre-timeout signals of SLURM and submitit) ask the training loop to stop after a
checkpoint, at the next step where it reads the device's flags (every `train.sync_every` steps).
Ctrl-C once a stop is under way stops at once.

After the checkpoint the loop calls `StopSignals.hand_over_at_exit()`: once the handlers are given
back, where a scheduler's handler was installed before (submitit's, which requeues the job), it runs
it; on a plain SLURM job it asks SLURM to requeue the job; then the process exits with 128 + the
signal's number, the code of a process ended by that signal. A process that ends with its run
(`ends_process=True`) ignores the signals once the run has recorded its end: nothing is left to
stop, and a signal must not turn a finished run's exit status into -15.
"""
from __future__ import annotations

import os
import signal
import subprocess
import threading
from types import FrameType

from gnp.console import log

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)
REQUEUE_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)  # a time limit is near: the job should come back


def exit_code(signum: int) -> int:
    return 128 + signum


class StopSignals:
    """While active (a context manager, main thread only), the handled signals set `signum`. On exit the
    handlers from before come back or, with `ends_process`, the signals are ignored from then on."""

    def __init__(self, ends_process: bool = False):
        self.signum: int | None = None
        self.ends_process = ends_process
        self._previous: dict[int, object] = {}
        self._hand_over: tuple[int, bool] | None = None
        self._ending = False

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, signal.SIG_IGN if self.ends_process else handler)
        if self._hand_over:
            self._run_hand_over(*self._hand_over)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.signum is not None:
            raise KeyboardInterrupt  # Ctrl-C after a stop request: stop now, without a checkpoint
        if self.signum is None:
            self.signum = signum
            if not self._ending:
                log.warning(f"received {signal.Signals(signum).name}: stopping after this step, with a checkpoint "
                            f"(press Ctrl-C again to stop at once)")

    def ending(self) -> None:
        """The run is recording its end: a signal from now on is noted without a word (nothing is left to stop)."""
        self._ending = True

    def hand_over_at_exit(self, signum: int, is_main: bool) -> None:
        """Once the checkpoint is safe: when the `with` block ends, let the scheduler requeue the job where
        it can. `signum` is the signal the replicas agreed on (a replica may have stopped for another
        one's signal)."""
        self._hand_over = (signum, is_main)

    def _run_hand_over(self, signum: int, is_main: bool) -> None:
        previous = self._previous.get(signum)  # none outside the main thread
        if callable(previous) and previous is not signal.default_int_handler:
            previous(signum, None)  # a scheduler's own handler (submitit's requeues the job and exits)
        elif is_main and signum in REQUEUE_SIGNALS and "SLURM_JOB_ID" in os.environ:
            _requeue_slurm_job(os.environ["SLURM_JOB_ID"])


def _requeue_slurm_job(job_id: str) -> None:
    try:
        subprocess.run(["scontrol", "requeue", job_id], check=True, capture_output=True, text=True, timeout=60)
        log.warning(f"requeued SLURM job {job_id}: it resumes from the checkpoint when it starts again")
    except (OSError, subprocess.SubprocessError) as e:
        log.warning(f"could not requeue SLURM job {job_id} ({e}); resubmit it to resume from the checkpoint")
