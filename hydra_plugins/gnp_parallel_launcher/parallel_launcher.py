"""Hydra launcher `parallel`: the jobs of a multirun as subprocesses, several at once, each on its own device.

    python train.py -m hydra/launcher=parallel method.alpha=0.5,0.8,1.0 seed=0,1,2

Each job runs as `python <the running script> <job overrides> device=... hydra.run.dir=<its sweep dir>`
with CUDA_VISIBLE_DEVICES set to one device. `jobs_per_device` jobs share each device of `devices`
(`auto`: every visible CUDA device, or one CPU slot without CUDA). A job's console output goes to
`launcher.log` in its directory. Ctrl-C (or SIGTERM) is passed on to the running jobs, which save a
checkpoint and stop; the launcher waits for them (up to `stop_timeout_s`) and exits with 128 + signal.

Hydra imports this module without registering it in sys.modules: no `from __future__ import annotations`
(dataclasses need the module), so classes come before the annotations that name them.
"""
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, setup_globals
from hydra.errors import CompactHydraException
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from gnp.rundir import LAUNCHER_LOG, SUMMARY, Damaged, RunDir
from gnp.sweep import ATTEMPT_START, LAUNCHER_PREFIX, SWEEP_DIR_VARIABLE, last_error_line

log = logging.getLogger(__name__)


# Hydra overrides of the multirun that a job does not inherit: the job runs in RUN mode in its own directory.
NOT_FOR_JOBS = ("hydra.mode", "hydra.run.", "hydra.sweep.", "hydra/launcher", "hydra.launcher.",
                "hydra/sweeper", "hydra.sweeper.")


@dataclass
class ParallelLauncherConf:
    _target_: str = "hydra_plugins.gnp_parallel_launcher.parallel_launcher.ParallelLauncher"
    devices: Any = "auto"  # auto | a list of CUDA_VISIBLE_DEVICES entries and/or cpu: [0, 1], [cpu, cpu]
    jobs_per_device: int = 1
    stop_timeout_s: float = 300.0  # after Ctrl-C: how long running jobs get to save a checkpoint


# conf/hydra/launcher/parallel.yaml extends this schema (a config file and a schema cannot share a name).
ConfigStore.instance().store(group="hydra/launcher", name="base_parallel", node=ParallelLauncherConf,
                             provider="gnp")


class JobFailed(CompactHydraException):
    """A job's process failed without recording its outcome in summary.json."""


class _Interrupted(BaseException):
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@dataclass(frozen=True)
class Slot:
    index: int
    device: str  # a CUDA_VISIBLE_DEVICES entry, or "cpu"

    def __str__(self) -> str:
        return f"slot {self.index} ({'cpu' if self.device == 'cpu' else f'cuda {self.device}'})"


def make_slots(devices: Any, jobs_per_device: int) -> list[Slot]:
    if isinstance(jobs_per_device, bool) or not isinstance(jobs_per_device, int) or jobs_per_device < 1:
        raise ValueError(f"hydra.launcher.jobs_per_device={jobs_per_device!r} is invalid: use a whole number >= 1")
    names = (visible_cuda_devices() or ["cpu"]) if devices == "auto" else _device_list(devices)
    return [Slot(i, name) for i, name in enumerate(name for name in names for _ in range(jobs_per_device))]


def _device_list(devices: Any) -> list[str]:
    fix = "use auto, or a list of CUDA device ids and/or cpu such as [0,1,2,3] or [cpu,cpu]"
    if not isinstance(devices, (list, tuple, ListConfig)) or len(devices) == 0:
        raise ValueError(f"hydra.launcher.devices={devices!r} is invalid: {fix}")
    names = []
    for device in devices:
        name = str(device).strip()
        if isinstance(device, bool) or isinstance(device, float) or (isinstance(device, int) and device < 0) \
                or not name or "," in name:
            raise ValueError(f"hydra.launcher.devices contains {device!r}, not a device: {fix}")
        names.append(name)
    return names


def visible_cuda_devices() -> list[str]:
    """The CUDA_VISIBLE_DEVICES entries of this process's CUDA devices (their indices when it is unset)."""
    import torch  # already imported by train.py; only `devices: auto` needs it

    count = torch.cuda.device_count()
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return [str(i) for i in range(count)]
    return [name.strip() for name in listed.split(",") if name.strip()][:count]


class _Job:
    def __init__(self, number: int, overrides: list[str], config: DictConfig, inherited: list[str]) -> None:
        self.number, self.overrides, self.config = number, overrides, config
        self.dir = Path(str(config.hydra.sweep.dir), str(config.hydra.sweep.subdir)).absolute()
        self.inherited = inherited
        self.status: JobStatus = JobStatus.UNKNOWN
        self.return_value: Any = None

    def command(self, slot: Slot) -> list[str]:
        device = "cpu" if slot.device == "cpu" else "cuda"
        run_dir = "'" + str(self.dir).replace("'", "\\'") + "'"  # quoted: any path is one Hydra value
        return [sys.executable, str(Path(sys.argv[0]).absolute()), *self.overrides, f"device={device}",
                *self.inherited, f"hydra.run.dir={run_dir}"]

    def start(self, slot: Slot, threads: str) -> None:
        self.slot, self.started = slot, time.monotonic()
        summary = RunDir(self.dir) / SUMMARY
        self.summary_mtime = summary.stat().st_mtime_ns if summary.exists() else None
        command = self.command(slot)
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": "" if slot.device == "cpu" else slot.device,
               "OMP_NUM_THREADS": threads, SWEEP_DIR_VARIABLE: str(self.config.hydra.sweep.dir)}
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.dir / LAUNCHER_LOG
        self.log_file = open(self.log_path, "a")  # a resumed job keeps the log of its earlier attempts
        self.log_file.write(f"{ATTEMPT_START}: job {self.number} on {slot}, {_now()}\n"
                            f"{LAUNCHER_PREFIX}command: {shlex.join(command)}\n")
        self.log_file.flush()
        # Its own session: a Ctrl-C in the terminal reaches only the launcher, which passes it on once.
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=self.log_file,
                                        stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.info(f"\t#{self.number} started on {slot}: {' '.join(filter_overrides(self.overrides))}")

    def end(self) -> Slot:
        """Record how the job's process ended; returns its slot."""
        code, seconds = self.process.returncode, time.monotonic() - self.started
        self.log_file.write(f"{LAUNCHER_PREFIX}end: exit status {code} after {seconds:.1f} s, {_now()}\n")
        self.log_file.close()
        files = RunDir(self.dir)
        recorded = (files / SUMMARY).exists() and (files / SUMMARY).stat().st_mtime_ns != self.summary_mtime
        try:
            outcome = files.read_summary()
        except Damaged as e:
            outcome, code = None, code or 1  # a job whose summary is damaged did not record its outcome
            recorded = False
            log.error(f"\t#{self.number} {e}")
        if code == 0 or recorded:
            # As in-process: a failed run that recorded its failure in summary.json is a result of the sweep.
            self.status, self.return_value = JobStatus.COMPLETED, outcome.test_error if outcome else None
            status = outcome.status if outcome else f"no {SUMMARY}"
            text = f"ended on {self.slot} after {seconds:.0f} s: {status}"
            if code != 0:
                text += f", exit status {code}: {last_error_line(self.log_path)}"
            (log.info if code == 0 else log.error)(f"\t#{self.number} {text}")
        else:
            why = f"exit status {code}" if code > 0 else f"killed by {signal.Signals(-code).name}"
            failure = f"failed on {self.slot} with {why}: {last_error_line(self.log_path)} (log: {self.log_path})"
            self.status = JobStatus.FAILED
            self.return_value = JobFailed(f"job {self.number} ({' '.join(self.overrides)}) {failure}")
            log.error(f"\t#{self.number} {failure}")
        return self.slot

    def result(self) -> JobReturn:
        task_config = OmegaConf.masked_copy(self.config, [k for k in self.config if k != "hydra"])
        return JobReturn(overrides=self.overrides, cfg=task_config,
                         hydra_cfg=OmegaConf.masked_copy(self.config, "hydra"), working_dir=os.getcwd(),
                         task_name=self.config.hydra.job.name, status=self.status, _return_value=self.return_value)


class ParallelLauncher(Launcher):
    def __init__(self, devices: Any = "auto", jobs_per_device: int = 1, stop_timeout_s: float = 300.0) -> None:
        self.slots = make_slots(devices, jobs_per_device)
        self.stop_timeout_s = stop_timeout_s
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context = config, hydra_context

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        assert self.config is not None and self.hydra_context is not None
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        inherited = [o for o in self.config.hydra.overrides.hydra if not o.startswith(NOT_FOR_JOBS)]
        jobs = [_Job(initial_job_idx + i, list(overrides), self._job_config(initial_job_idx + i, overrides), inherited)
                for i, overrides in enumerate(job_overrides)]
        log.info(f"Launching {len(jobs)} jobs on {len(self.slots)} slots: {', '.join(map(str, self.slots))}")
        # Each job gets its share of the CPU cores, as torchrun does, unless the user chose.
        threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, len(os.sched_getaffinity(0)) // len(self.slots)))
        handlers = {s: signal.signal(s, _raise_interrupted) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self._run(jobs, threads)
        finally:
            for s, handler in handlers.items():
                signal.signal(s, handler)
        return [job.result() for job in jobs]

    def _job_config(self, number: int, overrides: Sequence[str]) -> DictConfig:
        assert self.config is not None and self.hydra_context is not None
        config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(config):
            config.hydra.job.id = config.hydra.job.num = number
        return config

    def _run(self, jobs: list[_Job], threads: str) -> None:
        pending, free, running = deque(jobs), deque(self.slots), []
        try:
            while pending or running:
                while pending and free:
                    job = pending.popleft()
                    job.start(free.popleft(), threads)
                    running.append(job)
                ended = [job for job in running if job.process.poll() is not None]
                for job in ended:
                    running.remove(job)
                    free.append(job.end())
                if not ended:
                    time.sleep(0.2)
        except _Interrupted as interrupt:
            self._stop(running, interrupt.signum)
            never_started = [str(job.number) for job in pending]
            log.warning(f"Stopped. Jobs that did not start: {', '.join(never_started) or 'none'}. Resume the sweep "
                        f"with the same command and hydra.sweep.dir={self.config.hydra.sweep.dir}")
            raise SystemExit(128 + interrupt.signum) from None

    def _stop(self, running: list[_Job], signum: int) -> None:
        """Pass the signal on, so that each job saves a checkpoint; a second Ctrl-C or the timeout kills them."""
        name = signal.Signals(signum).name
        log.warning(f"{name}: passing it on to {len(running)} running jobs and waiting up to "
                    f"{self.stop_timeout_s:.0f} s for them to save a checkpoint (Ctrl-C again kills them)")
        for job in running:
            job.process.send_signal(signum)
        deadline = time.monotonic() + self.stop_timeout_s
        try:
            for job in running:
                job.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except (subprocess.TimeoutExpired, _Interrupted):
            for job in running:
                if job.process.poll() is None:
                    log.warning(f"\t#{job.number}: killed")
                    job.process.kill()
                    job.process.wait()
        for job in running:
            job.end()


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise _Interrupted(signum)


def _now() -> str:
    return datetime.now().isoformat(timespec="milliseconds")
