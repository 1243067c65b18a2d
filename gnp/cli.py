"""train.py's command line: a user's mistake costs one line, never a traceback.

`check_command_line` composes and validates every job of the command before Hydra starts any (all
the jobs of a sweep), so a typo fails at once with the key and its closest valid spelling. `run_job`
trains one job and turns expected failures into a one-line error and an exit status: 2 for bad
input (config, data, checkpoint, run directory, W&B), 3 for a diverged run, 128 + N for a run
stopped by signal N (after a checkpoint). In a sweep, a failed job is recorded in its summary.json
and the sweep goes on; the sweep's summary lists it at the end.
"""
from __future__ import annotations

import os
import re
import shlex
import sys
from pathlib import Path

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from gnp import distributed, io
from gnp.compose import composer
from gnp.checkpoint import CheckpointError
from gnp.config import ConfigError, unknown_key_error, validate
from gnp.data import DataError
from gnp.runs import RunDirectoryBusy, first_line, log, remove_stub, setup_console
from gnp.tracking import TrackingError
from gnp.training import Diverged, Stopped, train
from hydra_plugins.gnp_parallel_launcher.parallel_launcher import SWEEP_DIR_VARIABLE

USER_ERRORS = (ConfigError, DataError, CheckpointError, RunDirectoryBusy, io.OutputError, TrackingError,
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
    if any(arg.split("=")[0] in _INFORMATION_FLAGS | _OTHER_CONFIG_FLAGS for arg in argv):
        return  # Hydra prints what was asked, or composes a config other than conf/config.yaml
    overrides, skip_next = [], False
    for arg in argv:
        if skip_next or arg in _FLAGS_WITH_VALUE:
            skip_next = not skip_next
            continue
        if not arg.startswith("-"):
            overrides.append(arg)
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
    try:
        return train(cfg, run_dir)["test_error"]
    except Stopped as e:
        again = f"the same command with hydra.sweep.dir={run_dir.parent}" if sweep else resume_command(run_dir)
        log.warning(f"{e}. Resume: {again}")
        raise SystemExit(e.exit_code) from None  # also ends a sweep: the machine is going away
    except KeyboardInterrupt:
        log.warning(f"interrupted at once, without a checkpoint at this step. Resume from the last one: "
                    f"{resume_command(run_dir)}")
        raise SystemExit(130) from None
    except Exception as e:
        expected = isinstance(e, (*USER_ERRORS, Diverged))
        rank = distributed.detect_launch().rank
        # The main process speaks for the run, and another one for an error of its own alone.
        speaks = rank == 0 or not isinstance(e, distributed.ReplicaFailed)
        who = "" if rank == 0 else f"process {rank}: "
        if sweep:
            if rank == 0:
                _record_failed_job(run_dir, e)
            if speaks:
                log.error(f"{who}job {hydra_cfg.job.num} failed: {first_line(e)}", exc_info=not expected)
            return None  # the sweep goes on; its summary lists this job
        if not expected:
            raise  # a bug: its traceback is what a report needs
        if speaks:
            print(f"error: {who}{e}", file=sys.stderr)
        if rank == 0 and not isinstance(e, (Diverged, RunDirectoryBusy)):
            remove_stub(run_dir)
        raise SystemExit(EXIT_DIVERGED if isinstance(e, Diverged) else EXIT_USER_ERROR) from None


def resume_command(run_dir: Path) -> str:
    args = [a for a in sys.argv[1:] if not a.startswith("hydra.run.dir=")]
    command = shlex.join([Path(sys.argv[0]).name, *args, f"hydra.run.dir={run_dir}"])
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
