"""Finished runs read back: run directories (config.yaml, summary.json, metrics.jsonl) and W&B runs,
each with its status and recorded settings, and the match of a run to a plan by those settings
(never by folder name)."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml

from gnp.runs import first_line
from gnp.tables.plans import Plan, flatten
from gnp.tables.spec import TableError

# The names the tables and figures read from a run's files (gnp.training writes them).
EPOCH = "epoch"                       # metrics.jsonl: one row per epoch
TEST_ERROR = "test_error"             # summary.json: at the end of training; metrics.jsonl: per epoch (%)
FIRST_PASS_LOSS = "first_pass_loss"   # metrics.jsonl: the training loss at theta, mean over the epoch's batches
G1_NORM = "g1_norm"                   # metrics.jsonl: ||grad L(theta)||, mean over the epoch's steps


@dataclass
class Run:
    source: str                       # a run directory, or wandb:ENTITY/PROJECT/ID
    status: str                       # finished, diverged, stopped, failed, running, no summary, ...
    settings: dict                    # the flattened config the run recorded (config.yaml, or W&B's config)
    summary: dict
    read_metrics: Callable[[], list[dict]] = field(repr=False, default=list)

    @property
    def seed(self) -> Any:
        return self.settings.get("seed")

    def metrics(self) -> list[dict]:
        return self.read_metrics()


RUN_FILES = ("summary.json", "checkpoint.pt", "metrics.jsonl")


def read_runs(folders: Iterable[str | Path]) -> list[Run]:
    """Every run directory (one holding summary.json, checkpoint.pt or metrics.jsonl) under the folders."""
    directories = set()
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise TableError(f"{folder}: no such folder; train first (scripts/reproduce.py TABLE --launch) "
                             f"or name the folder that holds the runs")
        directories.update(p.parent for name in RUN_FILES for p in folder.rglob(name))
    return [run for run in map(read_run, sorted(directories)) if run is not None]


def read_run(directory: Path) -> Run | None:
    summary_path, config_path = directory / "summary.json", directory / "config.yaml"
    if not any((directory / name).exists() for name in RUN_FILES):
        return None
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    config = flatten(yaml.safe_load(config_path.read_text()) or {}) if config_path.exists() else {}
    if not summary_path.exists():
        status = "no summary"
    elif not config:
        status = "no config.yaml"  # its settings are unknown: it cannot count for any cell
    else:
        status = _status(summary)
    return Run(str(directory), status, config, summary, lambda: _read_jsonl(directory / "metrics.jsonl"))


def read_wandb_runs(path: str) -> list[Run]:
    """Runs of the W&B project ENTITY/PROJECT through the public API (needs the network)."""
    try:
        import wandb

        api_runs = list(wandb.Api(timeout=30).runs(path))
    except Exception as e:  # no network, no credentials, no such project: all end here
        raise TableError(f"cannot read the W&B runs of {path!r} ({first_line(e)}); check the network, "
                         f"`wandb login` and the ENTITY/PROJECT name") from None
    runs = []
    for api_run in api_runs:
        summary = {k: v for k, v in dict(api_run.summary).items() if not isinstance(v, dict)}
        state = {"finished": "finished", "crashed": "failed", "failed": "failed", "killed": "stopped"}
        status = _status(summary) if "status" in summary else state.get(api_run.state, api_run.state)
        if status == "finished" and TEST_ERROR not in summary:
            status = "no summary"
        runs.append(Run(f"wandb:{path}/{api_run.id}", status, flatten(dict(api_run.config)), summary,
                        lambda r=api_run: [row for row in r.scan_history() if EPOCH in row]))
    return runs


def _status(summary: dict) -> str:
    status = summary.get("status") or "no status"
    if status == "finished" and not is_number(summary.get(TEST_ERROR)):
        return "no test error"
    return status


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def matches(run: Run, plan: Plan) -> list[str]:
    """The pinned settings in which `run` differs from `plan` ([] when it counts for the plan's cell).
    A key the run does not record predates it: the run used what is now its default."""
    differences = []
    for key, value in plan.expected.items():
        recorded = run.settings.get(key, plan.defaults.get(key))
        if not _same(recorded, value):
            differences.append(f"{key}: {recorded!r} -> {value!r}")
    return differences


# What a run directory holds, as scripts/reproduce.py sees it; LAUNCH: the states it (re)starts.
LAUNCH = ("missing", "partial", "failed")


def run_state(plan: Plan, seed: int) -> tuple[str, Run | None, str]:
    """(state, run, detail) of the run directory of `seed`: missing, partial (interrupted: resumes),
    failed (started again), finished, diverged (not restarted: it would diverge again), conflict
    (it holds a run with other settings) or not runnable."""
    if plan.expected is None:
        return "not runnable", None, plan.cell.reason or ""
    run = read_run(plan.run_dir(seed))
    if run is None:
        return "missing", None, ""
    if run.settings:
        differences = matches(run, plan) + ([f"seed: {run.seed!r} -> {seed}"] if run.seed not in (None, seed) else [])
        if differences:
            return "conflict", run, "holds another run (" + ", ".join(differences) + ")"
    if run.status in ("finished", "diverged"):
        return run.status, run, run.summary.get("error") or ""
    if run.status == "failed":
        return "failed", run, run.summary.get("error") or ""
    detail = f"{len(run.metrics())} epoch(s) done" + (f", {run.status}" if run.status != "no summary" else "")
    return "partial", run, detail


def _same(a: Any, b: Any) -> bool:
    if is_number(a) and is_number(b):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

