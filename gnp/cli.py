"""train.py's command line: a user's mistake costs one line, never a traceback.

`check_command_line` composes and validates every job of the command before Hydra starts any (all
the jobs of a sweep), so a typo fails at once with the key and its closest valid spelling (train.py runs
gnp.commandline's half of it, composition and keys, before torch is imported); `check_run_directory` then
makes sure the run (or sweep) directory can be used before Hydra writes
anything into it. `run_job` trains one job and turns expected failures into a one-line error and an
exit status: 2 for bad input (config, data, checkpoint, run directory, a failed write, W&B), 3 for a
diverged run, 128 + N for a run stopped by signal N (after a checkpoint), 1 when another process of
a DDP run died. In a sweep, a failed job is recorded in its summary.json and the sweep goes on; the
sweep's summary lists it at the end.
"""
from __future__ import annotations

import os
import shlex
import signal
import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from gnp import commandline, distributed, io, rundir
from gnp.compose import compose_config
from gnp.config import ConfigError, validate
from gnp.console import first_line, log, setup_console
from gnp.data import DataError
from gnp.rundir import RunDirectoryBusy, check_usable, remove_stub
from gnp.signals import StopSignals, exit_code
from gnp.sweep import SWEEP_DIR_VARIABLE
from gnp.tracking import TrackingError
from gnp.training import CheckpointError, Diverged, Stopped, check_resumable, train

USER_ERRORS = (ConfigError, DataError, CheckpointError, RunDirectoryBusy, io.OutputError, TrackingError,
               distributed.ReplicaFailed)
EXIT_USER_ERROR, EXIT_DIVERGED = commandline.EXIT_USER_ERROR, 3
def check_command_line(argv: list[str]) -> None:
    """Exit with status 2 and one line per problem when any job of the command is invalid: it does not compose
    or holds an unknown key (gnp.commandline, before torch is imported), or a value is out of range."""
    check_values(commandline.check(argv))


def check_values(composed: commandline.Composed | None) -> None:
    """Exit with status 2 and one line per job of a composed command whose values are invalid (a command that
    only prints its config is not judged)."""
    if composed is None or composed.command.prints:
        return
    problems = []
    for i, cfg in enumerate(composed.configs):
        try:
            validate(cfg, check_environment=not composed.command.remote)
        except ConfigError as e:
            problems.append((i, str(e)))
    commandline.exit_with_problems(composed.command, problems)


def check_run_directory(argv: list[str]) -> None:
    """Exit with status 2 and one line when the command's run directory (a sweep's directory, with every
    job's under it) cannot be created or written, or another run holds it: before Hydra writes its
    record (.hydra/) there, so that a refused run never touches another run's files."""
    command = commandline.parse(argv)
    if command is None or command.prints:
        return  # nothing is written by a command that only prints
    overrides, multirun = command.overrides, command.multirun
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        # The directories depend on the settings that every job shares (a sweep's values are left out).
        hydra = compose_config(*(o.input_line for o in parsed if not o.is_sweep_override()), with_hydra=True).hydra
        key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
        folder = Path(str(OmegaConf.select(hydra, key.removeprefix("hydra."))))
    except (HydraException, OmegaConfBaseException):
        return  # Hydra says what is wrong with the command
    try:
        check_usable(folder, key, whole_tree=multirun)
        if not multirun:
            _check_same_run(folder.absolute(), [o.input_line for o in parsed])
    except (RunDirectoryBusy, io.OutputError, ConfigError) as e:
        commandline.exit_with([str(e)])


def _check_same_run(run_dir: Path, overrides: list[str]) -> None:
    """A directory that holds a checkpoint resumes its own run only: another run's settings are refused
    now, before Hydra rewrites the record of the run that is there."""
    if not (run_dir / rundir.CHECKPOINT).is_file():
        return
    try:
        saved = rundir.RunDir(run_dir).read_config()  # the resolved config the run records
    except rundir.Damaged:
        return  # the run itself reads its checkpoint, and says what is wrong with it
    if saved is None:
        return
    check_resumable(saved, OmegaConf.to_container(compose_config(*overrides), resolve=True), run_dir,
                    distributed.detect_launch().world_size)


def run_job(cfg: DictConfig) -> float | None:
    """Train the job Hydra composed; returns its test error (the objective of a Hydra sweeper)."""
    setup_console()
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    sweep = hydra_cfg.mode == RunMode.MULTIRUN
    # A multirun's runs form one W&B group, unless the command names one; the parallel launcher
    # starts each as a single run, and says which sweep it belongs to.
    sweep_dir = hydra_cfg.sweep.dir if sweep else os.environ.get(SWEEP_DIR_VARIABLE)
    if sweep_dir:
        with open_dict(cfg):
            cfg.wandb.group = cfg.wandb.group or f"multirun-{Path(sweep_dir).name}"
            cfg.wandb.tags = [*cfg.wandb.tags, "multirun"]
    again = resume_command(run_dir, Path(hydra_cfg.sweep.dir).absolute() if sweep else None)
    # A single run's process ends with it: once its end is recorded, a signal has nothing left to stop.
    signals = StopSignals(ends_process=not sweep)
    try:
        summary = train(cfg, run_dir, signals)
    except Stopped as e:
        log.warning(f"{e}. Resume: {again}")
        raise SystemExit(e.exit_code) from None  # also ends a sweep: the machine is going away
    except KeyboardInterrupt:
        resumes = (run_dir / rundir.CHECKPOINT).exists()
        advice = ("Resume from the last checkpoint" if resumes else "Start it again (no checkpoint was written yet)") \
            if not sweep else f"Resume the sweep (its finished jobs are kept; this one " \
                              f"{'resumes from its last checkpoint' if resumes else 'starts again'})"
        log.warning(f"interrupted at once, without a checkpoint at this step. {advice}: {again}")
        raise SystemExit(130) from None
    except Exception as e:
        expected = isinstance(e, (*USER_ERRORS, Diverged, distributed.ProcessDied))
        rank = distributed.detect_launch().rank
        # The main process speaks for the run, and another one for an error of its own alone (or for a
        # run whose main process died).
        speaks = e.speaks if isinstance(e, distributed.ProcessDied) else \
            rank == 0 or not isinstance(e, distributed.ReplicaFailed)
        who = "" if rank == 0 else f"process {rank}: "
        if sweep:
            if rank == 0:
                _record_failed_job(run_dir, e)
            if speaks:
                log.error(f"{who}job {hydra_cfg.job.num} failed: {first_line(e)}", exc_info=not expected)
            return None  # the sweep goes on; its summary lists this job
        if not expected:
            raise  # a bug: its traceback is what a report needs
        if isinstance(e, distributed.ProcessDied):
            if speaks:
                print(f"error: {who}{e}; this process stopped too. Resume: {again}", file=sys.stderr)
            raise SystemExit(1) from None
        if speaks:
            print(f"error: {who}{e}", file=sys.stderr)
        if rank == 0 and not isinstance(e, (Diverged, RunDirectoryBusy)):
            remove_stub(run_dir)
        raise SystemExit(EXIT_DIVERGED if isinstance(e, Diverged) else EXIT_USER_ERROR) from None
    if sweep and signals.signum:  # the signal came in the job's last steps: the job finished, the sweep stops
        log.warning(f"received {signal.Signals(signals.signum).name} in the last steps of job {hydra_cfg.job.num}: "
                    f"it finished, and the sweep stops here. Resume: {again}")
        raise SystemExit(exit_code(signals.signum))
    return summary.test_error


def resume_command(run_dir: Path, sweep_dir: Path | None = None) -> str:
    """The command that continues this run, as it can be typed: the command line with the run's directory
    pinned, or for a job of a sweep the sweep's command with the sweep's directory (its finished jobs
    then return at once)."""
    key, folder = ("hydra.sweep.dir", sweep_dir) if sweep_dir else ("hydra.run.dir", run_dir)
    args = [a for a in sys.argv[1:] if not a.startswith(f"{key}=")]
    command = shlex.join([sys.argv[0], *args, f"{key}={folder}"])
    launcher = "torchrun <the same options>" if "TORCHELASTIC_RUN_ID" in os.environ else "python"
    return f"{launcher} {command}"


def _record_failed_job(run_dir: Path, error: Exception) -> None:
    """A job that failed before its run could record anything still leaves a summary for the sweep."""
    files = rundir.RunDir(run_dir)
    if isinstance(error, RunDirectoryBusy) or (files / rundir.SUMMARY).exists():
        return
    try:
        files.write_summary(rundir.Summary(rundir.Status.FAILED, first_line(error)))
    except io.OutputError:
        pass  # the run directory itself is the problem; the console line says so
