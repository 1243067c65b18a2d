"""train.py's command line, checked before torch is imported: every job the command starts (all those of a
sweep) must compose, with no unknown key, or the command exits with status 2 and one line per problem, with
the fix (the closest spelling of a key, the choices of a group). gnp.cli then checks the values of the
composed configs, which needs the methods' and models' own checks.

`python train.py --cfg job ...` (and --info, --resolve) prints the composed config: it must compose too, and
its values are not judged.
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from gnp.compose import composer
from gnp.console import first_line
from gnp.schema import ConfigError, check_keys, unknown_key_error

EXIT_USER_ERROR = 2
# Hydra flags that print something and start no job, those among them that print the composed config, and
# the flags that take a value.
_INFORMATION_FLAGS = {"--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i", "--shell-completion", "-sc",
                      "--version", "--resolve"}
_PRINTING_FLAGS = {"--cfg", "-c", "--info", "-i", "--resolve"}
_OTHER_CONFIG_FLAGS = {"--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd", "--experimental-rerun"}
_FLAGS_WITH_VALUE = {"--package", "-p", "--cfg", "-c"}
_INFO_TOPICS = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}  # what --info prints
_REMOTE_LAUNCHERS = ("slurm", "submitit")  # jobs run elsewhere: do not check this machine's GPU or credentials
_MOST_ERRORS_SHOWN = 20
RENAMED_CHOICES = {"method=sgd": "method=plain: one pass per step with the base optimizer, whatever it is"}


@dataclass
class Command:
    """What a command line asks for: the overrides of its jobs (a sweep's, expanded), whether it only prints
    their config, and whether its jobs run on another machine (a SLURM launcher)."""
    overrides: list[str]  # every override, as given
    jobs: list[list[str]]  # each job's own overrides
    search_path: list[str]  # hydra.searchpath=...: where a user's own configs are, for every job
    multirun: bool
    prints: bool
    remote: bool


@dataclass
class Composed:
    """A command whose every job composed, and their configs."""
    command: Command
    configs: list[DictConfig]


def parse(argv: list[str]) -> Command | None:
    """The command's jobs; None where there is nothing to check (help, another config, another sweeper, a
    sweep Hydra must expand against the config); exits with one line where the overrides do not parse."""
    flags = {arg.split("=")[0] for arg in argv}
    if flags & (_INFORMATION_FLAGS - _PRINTING_FLAGS | _OTHER_CONFIG_FLAGS):
        return None
    overrides, previous = [], None
    for arg in argv:
        takes_value = previous in _FLAGS_WITH_VALUE or (previous in ("--info", "-i") and arg in _INFO_TOPICS)
        if not takes_value and not arg.startswith("-"):
            overrides.append(arg)
        previous = None if takes_value else arg
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as e:
        exit_with([first_line(e)])
    hydra_overrides = [o for o in parsed if o.key_or_group.startswith("hydra")]
    if any(o.key_or_group == "hydra/sweeper" for o in hydra_overrides):
        return None  # another sweeper draws its own jobs; each is validated when it starts
    job_overrides = [o for o in parsed if o not in hydra_overrides]
    multirun = "-m" in argv or "--multirun" in argv
    if not multirun and any(o.is_sweep_override() for o in job_overrides):
        return None  # Hydra itself explains that a sweep needs --multirun
    try:
        jobs = BasicSweeper.split_arguments(job_overrides, None)[0] if multirun else \
            [[o.input_line for o in job_overrides]]
    except HydraException:
        return None  # a sweep that needs the config to expand (glob): each job is validated when it starts
    remote = any(o.key_or_group == "hydra/launcher" and str(o.value()).startswith(_REMOTE_LAUNCHERS)
                 for o in hydra_overrides)
    search_path = [o.input_line for o in hydra_overrides if o.key_or_group == "hydra.searchpath"]
    return Command(overrides, jobs, search_path, multirun, bool(flags & _PRINTING_FLAGS), remote)


def check(argv: list[str]) -> Composed | None:
    """Compose every job of the command; exit with status 2 and one line per job that does not compose or
    holds an unknown key. None where there is nothing to check (see `parse`)."""
    command = parse(argv)
    if command is None:
        return None
    problems, configs = [], []
    with composer() as compose:
        for i, job in enumerate(command.jobs):
            try:
                configs.append(compose([*command.search_path, *job]))
                check_keys(configs[-1])
            except ConfigError as e:
                problems.append((i, str(e)))
            except (HydraException, OmegaConfBaseException) as e:
                problems.append((i, composition_problem(e, [*command.search_path, *job], compose)))
    exit_with_problems(command, problems)
    return Composed(command, configs)


def exit_with_problems(command: Command, problems: list[tuple[int, str]]) -> None:
    """Exit with one line per (job, problem), each job named in a sweep; nothing where there are none."""
    if not problems:
        return
    jobs = command.jobs
    lines = [message if not command.multirun else f"job {i} ({' '.join(jobs[i]) or 'defaults'}): {message}"
             for i, message in problems]
    if command.multirun:
        lines.append(f"{len(problems)} of {len(jobs)} jobs are invalid; no job was started")
    exit_with(lines)


def composition_problem(error: Exception, job: list[str], compose) -> str:
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


def exit_with(lines: list[str]) -> None:
    """Print each line as `error: <line>` (the first 20) and exit with status 2."""
    shown = lines[:_MOST_ERRORS_SHOWN] + ([f"... and {len(lines) - _MOST_ERRORS_SHOWN} more"]
                                         if len(lines) > _MOST_ERRORS_SHOWN else [])
    for line in shown:
        print(f"error: {line}", file=sys.stderr)
    raise SystemExit(EXIT_USER_ERROR)
