"""What a sweep did: one table of every job of a Hydra multirun, written when the multirun ends.

`SweepSummary` is a Hydra callback (registered under `hydra.callbacks` in conf/config.yaml). When a
multirun ends it reads every job's run directory under `hydra.sweep.dir` (`summary.json`, written by
the training loop), prints a table sorted by test error with the failed jobs last and their one-line
errors, writes the same as `sweep_summary.md` and `sweep_summary.json` in the sweep directory, and
ends the multirun with exit status 1 when a job did not finish. `python -m gnp.sweep DIR` prints the
summary of an existing sweep directory again (e.g. after a SLURM sweep whose submitting shell died).
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from gnp import io
from gnp.rundir import LAUNCHER_LOG, Damaged, RunDir, Status

SWEEP_DIR_VARIABLE = "GNP_SWEEP_DIR"  # tells each job of the parallel launcher, a single run, the sweep it is of
# A job's launcher.log, as the parallel launcher writes it: the job's console output between its own lines.
LAUNCHER_PREFIX = "[launcher] "  # the launcher's own lines
ATTEMPT_START = LAUNCHER_PREFIX + "start"  # begins each attempt's section (a resumed job appends one)
HYDRA_HINT = "Set the environment variable HYDRA_FULL_ERROR=1"  # printed by Hydra after a traceback

# Job statuses in the order the table lists jobs without a test error: a run's own (summary.json's), then
# a job directory without a (readable) summary.json and a job that has no directory at all.
STATUSES = (*(s.value for s in Status), "did not finish", "did not start")
# A diverged run is a result of its hyperparameters; these mean the sweep itself is incomplete.
INCOMPLETE = (Status.STOPPED, Status.FAILED, "did not finish", "did not start")
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


class SweepIncomplete(SystemExit):
    """Ends the multirun with exit status 1 and a one-line message. A SystemExit, not a HydraException:
    Hydra 1.3 turns any Exception raised by a callback into a warning and exits 0."""


@dataclass
class Job:
    number: int | None  # hydra.job.num, when the sweep could be expanded
    dir: Path | None  # None: the job never started
    overrides: dict[str, str]  # the swept keys only
    status: str
    test_error: float | None = None
    error: str | None = None


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        report(config)


def report(config: DictConfig) -> list[Job]:
    """Print and write the summary of the multirun `config` describes; SweepIncomplete if a job did not finish."""
    sweep_dir = Path(str(config.hydra.sweep.dir))
    jobs, swept = collect_jobs(config)
    text = format_summary(sweep_dir, jobs, swept)
    print(text, flush=True)
    io.write_text(sweep_dir / "sweep_summary.md", text)
    io.write_json(sweep_dir / "sweep_summary.json", summary_json(sweep_dir, jobs, swept))
    unfinished = [job for job in jobs if job.status in INCOMPLETE]
    if unfinished:
        raise SweepIncomplete(f"error: {len(unfinished)} of {len(jobs)} jobs of the sweep did not finish "
                              f"({count_line(unfinished)}); see {sweep_dir / 'sweep_summary.md'}")
    return jobs


def collect_jobs(config: DictConfig) -> tuple[list[Job], list[str]]:
    """Every job of the sweep, sorted for the table, and the swept keys."""
    sweep_dir = Path(str(config.hydra.sweep.dir))
    found = find_job_dirs(sweep_dir, config.hydra.output_subdir)
    expansion = expand_sweep(config)
    if expansion is None:  # another sweeper: list the directories there are, by what differs between them
        swept = [key for key in dict.fromkeys(k for overrides in found.values() for k in overrides)
                 if len({overrides.get(key) for overrides in found.values()}) > 1]
        jobs = [_read_job(None, path, {k: v for k, v in overrides.items() if k in swept})
                for path, overrides in found.items()]
    else:
        expected, swept = expansion
        by_overrides: dict[tuple, list[Path]] = {}
        for path, overrides in found.items():
            by_overrides.setdefault(tuple(overrides.get(key) for key in swept), []).append(path)
        jobs = []
        for number, overrides in enumerate(expected):
            values = {key: overrides[key] for key in swept}
            paths = by_overrides.get(tuple(values.values()))
            jobs.append(_read_job(number, paths.pop(0) if paths else None, values))
    return sorted(jobs, key=_table_order), swept


def expand_sweep(config: DictConfig) -> tuple[list[dict[str, str]], list[str]] | None:
    """The jobs Hydra's BasicSweeper makes of this multirun's overrides, in job-number order, and the swept
    keys; None for another sweeper or a sweep it cannot expand here (e.g. glob, which needs the config)."""
    if OmegaConf.select(config, "hydra.sweeper._target_") != BASIC_SWEEPER:
        return None
    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    arguments = [f"{key}={value}" for key, value in params.items()]
    arguments += list(OmegaConf.to_container(config.hydra.overrides.task, resolve=False))
    try:
        parsed = OverridesParser.create().parse_overrides(arguments)
        batches = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    except HydraException:
        return None
    swept = list(dict.fromkeys(o.get_key_element() for o in parsed if o.is_sweep_override()))
    return [split_overrides(job) for job in batches[0]], swept


def find_job_dirs(sweep_dir: Path, output_subdir: str | None) -> dict[Path, dict[str, str]]:
    """Job directories under the sweep directory (those holding Hydra's overrides.yaml) and their overrides."""
    if output_subdir is None:
        return {}
    return {path.parent.parent: split_overrides(OmegaConf.to_container(OmegaConf.load(path)))
            for path in sorted(sweep_dir.rglob(f"{output_subdir}/overrides.yaml"))}


def split_overrides(overrides: list[str]) -> dict[str, str]:
    """{key: value} of override strings such as `method.alpha=0.5` (the key never holds '=')."""
    return dict(override.partition("=")[::2] for override in overrides)


def _read_job(number: int | None, path: Path | None, overrides: dict[str, str]) -> Job:
    if path is None:
        return Job(number, None, overrides, "did not start")
    try:
        summary = RunDir(path).read_summary()
    except Damaged as e:
        return Job(number, path, overrides, "did not finish", error=f"unreadable {e}")
    if summary is None:
        log = path / LAUNCHER_LOG
        return Job(number, path, overrides, "did not finish", error=last_error_line(log) if log.exists() else None)
    test_error = summary.test_error
    if not isinstance(test_error, (int, float)) or not math.isfinite(test_error):
        test_error = None
    return Job(number, path, overrides, summary.status.value, test_error, summary.error)


def last_error_line(log_path: Path) -> str | None:
    """The last line a job printed in its latest attempt: for a failure, the exception or error message."""
    lines = log_path.read_text(errors="replace").splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(ATTEMPT_START)]
    output = [line.strip() for line in lines[starts[-1] if starts else 0:]
              if line.strip() and not line.startswith((LAUNCHER_PREFIX, HYDRA_HINT))]
    return output[-1] if output else None


def _table_order(job: Job) -> tuple:
    """By test error; then the jobs without one, by status (failed ones last), each group by job number."""
    then = (-1 if job.number is None else job.number, str(job.dir))
    if job.test_error is not None:
        return (0, job.test_error, *then)
    return (1, STATUSES.index(job.status) if job.status in STATUSES else len(STATUSES), *then)


def short_names(keys: list[str]) -> dict[str, str]:
    """`method.alpha` -> `alpha` where the last part names one swept key only."""
    last = {key: key.lstrip("+~").split("@")[0].rsplit(".", 1)[-1] for key in keys}
    return {key: name if list(last.values()).count(name) == 1 else key for key, name in last.items()}


def counts(jobs: list[Job]) -> dict[str, int]:
    """Jobs per status, in the order of STATUSES (then any other status a summary holds)."""
    statuses = dict.fromkeys([*STATUSES, *(job.status for job in jobs)])
    return {status: sum(job.status == status for job in jobs) for status in statuses}


def count_line(jobs: list[Job]) -> str:
    return ", ".join(f"{n} {status}" for status, n in counts(jobs).items() if n)


def format_summary(sweep_dir: Path, jobs: list[Job], swept: list[str]) -> str:
    """Markdown: the table (aligned, so it reads on a terminal too), the errors, the counts."""
    names = short_names(swept)
    header = ["job", *(names[key] for key in swept), "status", "test error (%)"]
    rows = [[_job_name(job, sweep_dir), *(job.overrides.get(key, "") for key in swept), job.status,
             "" if job.test_error is None else f"{job.test_error:.2f}"] for job in jobs]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        *text, number = [cell.ljust(width) for cell, width in zip(cells, widths)]
        return "| " + " | ".join([*text, number.strip().rjust(widths[-1])]) + " |"

    rule = "|" + "|".join("-" * (w + 1) + (":" if i == len(widths) - 1 else "-") for i, w in enumerate(widths)) + "|"
    text = [f"# Sweep {sweep_dir}", "", line(header), rule, *(line(row) for row in rows)]
    errors = [job for job in jobs if job.error]
    if errors:
        text += ["", "Errors:"]
        text += [f"- job {_job_name(job, sweep_dir)}{_compact(job, names)}, {job.status}: {job.error}"
                 for job in errors]
    text += ["", f"{len(jobs)} jobs: {count_line(jobs)}"]
    return "\n".join(text) + "\n"


def summary_json(sweep_dir: Path, jobs: list[Job], swept: list[str]) -> dict:
    return {
        "sweep_dir": str(sweep_dir),
        "swept": swept,
        "counts": counts(jobs),
        "complete": not any(job.status in INCOMPLETE for job in jobs),
        "jobs": [{"job": _job_name(job, sweep_dir), "number": job.number,
                  "dir": None if job.dir is None else str(job.dir), "overrides": job.overrides,
                  "status": job.status, "test_error": job.test_error, "error": job.error} for job in jobs],
    }


def _job_name(job: Job, sweep_dir: Path) -> str:
    """The job's directory under the sweep directory (its number with Hydra's default subdir)."""
    return str(job.dir.relative_to(sweep_dir)) if job.dir is not None else str(job.number)


def _compact(job: Job, names: dict[str, str]) -> str:
    """` (alpha=0.5 seed=1)`: the job's swept values, or nothing when no key was swept."""
    values = " ".join(f"{names[key]}={value}" for key, value in job.overrides.items())
    return f" ({values})" if values else ""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Print and write the summary of a Hydra sweep directory again.")
    parser.add_argument("sweep_dir", type=Path, help="the multirun's directory (holds multirun.yaml)")
    sweep_dir = parser.parse_args(argv).sweep_dir
    saved = sweep_dir / "multirun.yaml"
    if not saved.exists():
        sys.exit(f"error: {saved} does not exist; give the directory of a Hydra multirun (multirun/<time>)")
    config = OmegaConf.load(saved)
    config.hydra.sweep.dir = str(sweep_dir)  # the saved value may be an interpolation such as ${now:...}
    report(config)


if __name__ == "__main__":
    main()
