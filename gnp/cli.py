"""train.py's command line: a user's mistake costs one line, never a traceback.

`check_command_line` composes and validates every job of the command before Hydra starts any (all
the jobs of a sweep), so a typo fails at once with the key and its closest valid spelling;
`check_run_directory` then makes sure the run (or sweep) directory can be used before Hydra writes
anything into it. `run_job` trains one job and turns expected failures into a one-line error and an
exit status: 2 for bad input (config, data, checkpoint, run directory, a failed write, W&B), 3 for a
diverged run, 128 + N for a run stopped by signal N (after a checkpoint), 1 when another process of
a DDP run died. In a sweep, a failed job is recorded in its summary.json and the sweep goes on; the
sweep's summary lists it at the end.
"""
from __future__ import annotations

import os
import re
import shlex
import signal
import sys
from pathlib import Path

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from gnp import checkpoint, distributed, io
from gnp.compose import compose_config, composer
from gnp.config import ConfigError, unknown_key_error, validate
from gnp.data import DataError
from gnp.runs import RunDirectoryBusy, check_usable, first_line, log, remove_stub, setup_console
from gnp.signals import StopSignals, exit_code
from gnp.tracking import TrackingError
from gnp.training import Diverged, Stopped, check_resumable, train
from hydra_plugins.gnp_parallel_launcher.parallel_launcher import SWEEP_DIR_VARIABLE

USER_ERRORS = (ConfigError, DataError, checkpoint.CheckpointError, RunDirectoryBusy, io.OutputError, TrackingError,
               distributed.ReplicaFailed)
EXIT_USER_ERROR, EXIT_DIVERGED = 2, 3
# Hydra flags that print something and start no job; and those that take a value.
_INFORMATION_FLAGS = {"--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i", "--shell-completion", "-sc",
                      "--version", "--resolve"}
_OTHER_CONFIG_FLAGS = {"--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd", "--experimental-rerun"}
_FLAGS_WITH_VALUE = {"--package", "-p"}
_REMOTE_LAUNCHERS = ("slurm", "submitit")  # jobs run elsewhere: do not check this machine's GPU or credentials
_MOST_ERRORS_SHOWN = 20
RENAMED_CHOICES = {"method=sgd": "method=plain: one pass per step with the base optimizer, whatever it is"}


def check_command_line(argv: list[str]) -> None:
    """Exit with status 2 and one line per problem when any job of the command is invalid."""
    overrides = _command_overrides(argv)
    if overrides is None:
        return
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as e:
        _exit_with([first_line(e)])
    hydra_overrides = [o for o in parsed if o.key_or_group.startswith("hydra")]
    if any(o.key_or_group == "hydra/sweeper" for o in hydra_overrides):
        return  # another sweeper draws its own jobs; each is validated when it starts
    remote = any(o.key_or_group == "hydra/launcher" and str(o.value()).startswith(_REMOTE_LAUNCHERS)
                 for o in hydra_overrides)
    job_overrides = [o for o in parsed if o not in hydra_overrides]
    multirun = "-m" in argv or "--multirun" in argv
    if not multirun and any(o.is_sweep_override() for o in job_overrides):
        return  # Hydra itself explains that a sweep needs --multirun
    try:
        jobs = BasicSweeper.split_arguments(job_overrides, None)[0] if multirun else \
            [[o.input_line for o in job_overrides]]
    except HydraException:
        return  # a sweep that needs the config to expand (glob): each job is validated when it starts
    # Where a user's own configs are (hydra.searchpath=[file://...]) counts for every job.
    search_path = [o.input_line for o in hydra_overrides if o.key_or_group == "hydra.searchpath"]
    problems = _check_jobs([[*search_path, *job] for job in jobs], check_environment=not remote)
    if problems:
        lines = [message if not multirun else f"job {i} ({' '.join(jobs[i]) or 'defaults'}): {message}"
                 for i, message in problems]
        if multirun:
            lines.append(f"{len(problems)} of {len(jobs)} jobs are invalid; no job was started")
        _exit_with(lines)


def _command_overrides(argv: list[str]) -> list[str] | None:
    """The overrides of a command that starts jobs of conf/config.yaml; None where Hydra only prints what
    was asked, or composes another config."""
    if any(arg.split("=")[0] in _INFORMATION_FLAGS | _OTHER_CONFIG_FLAGS for arg in argv):
        return None
    overrides, skip_next = [], False
    for arg in argv:
        if skip_next or arg in _FLAGS_WITH_VALUE:
            skip_next = not skip_next
            continue
        if not arg.startswith("-"):
            overrides.append(arg)
    return overrides


def check_run_directory(argv: list[str]) -> None:
    """Exit with status 2 and one line when the command's run directory (a sweep's directory, with every
    job's under it) cannot be created or written, or another run holds it: before Hydra writes its
    record (.hydra/) there, so that a refused run never touches another run's files."""
    overrides = _command_overrides(argv)
    if overrides is None:
        return
    multirun = "-m" in argv or "--multirun" in argv
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
        _exit_with([str(e)])


def _check_same_run(run_dir: Path, overrides: list[str]) -> None:
    """A directory that holds a checkpoint resumes its own run only: another run's settings are refused
    now, before Hydra rewrites the record of the run that is there."""
    record = run_dir / "config.yaml"  # the resolved config the run records
    if not (run_dir / checkpoint.FILENAME).is_file() or not record.is_file():
        return
    try:
        saved = OmegaConf.to_container(OmegaConf.load(record))
    except (OSError, OmegaConfBaseException, ValueError):
        return  # the run itself reads its checkpoint, and says what is wrong with it
    check_resumable(saved, OmegaConf.to_container(compose_config(*overrides), resolve=True), run_dir,
                    distributed.detect_launch().world_size)


def _check_jobs(jobs: list[list[str]], check_environment: bool) -> list[tuple[int, str]]:
    problems = []
    with composer() as compose:
        for i, job in enumerate(jobs):
            try:
                validate(compose(job), check_environment=check_environment)
            except ConfigError as e:
                problems.append((i, str(e)))
            except (HydraException, OmegaConfBaseException) as e:
                problems.append((i, _composition_problem(e, job, compose)))
    return problems


def _composition_problem(error: Exception, job: list[str], compose) -> str:
    """Hydra's composition errors, said as this suite says the others (with the closest spelling)."""
    if isinstance(error, MissingConfigException) and error.options:
        group, _, choice = error.missing_cfg_file.rpartition("/")
        if f"{group}={choice}" in RENAMED_CHOICES:
            return f"{group}={choice} is now {RENAMED_CHOICES[f'{group}={choice}']}"
        return f"{group}={choice} is not a choice of {group}: choose one of {', '.join(sorted(error.options))}"
    exists = re.search(r"Could not append to config\. An item is already at '([^']+)'", str(error))
    if exists:
        line = next(o for o in job if o.lstrip("+").split("=")[0] == exists.group(1))
        return f"{exists.group(1)} exists already: set it without the + ({line.lstrip('+')})"
    key = re.search(r"Could not (?:override|delete) '([^']+)'|Key '([^']+)' is not in struct", str(error))
    if key:
        name = next(g for g in key.groups() if g)
        rest = [o for o in job if o.lstrip("+~").split("=")[0] != name]
        try:
            valid = _flat_keys(OmegaConf.to_container(compose(rest)))
        except (HydraException, OmegaConfBaseException):
            valid = []
        return str(unknown_key_error(name, valid))
    return first_line(error)


def _flat_keys(node, prefix: str = "") -> list[str]:
    if not isinstance(node, dict):
        return [prefix.rstrip(".")]
    return [key for k, v in node.items() for key in _flat_keys(v, f"{prefix}{k}.")]


def _exit_with(lines: list[str]) -> None:
    shown = lines[:_MOST_ERRORS_SHOWN] + ([f"... and {len(lines) - _MOST_ERRORS_SHOWN} more"]
                                         if len(lines) > _MOST_ERRORS_SHOWN else [])
    for line in shown:
        print(f"error: {line}", file=sys.stderr)
    raise SystemExit(EXIT_USER_ERROR)


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
        resumes = (run_dir / checkpoint.FILENAME).exists()
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
    return summary["test_error"]


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
    if isinstance(error, RunDirectoryBusy) or (run_dir / "summary.json").exists():
        return
    try:
        io.write_json(run_dir / "summary.json", {"status": "failed", "error": first_line(error)})
    except io.OutputError:
        pass  # the run directory itself is the problem; the console line says so
