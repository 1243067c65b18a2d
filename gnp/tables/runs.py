"""Finished runs read back: run directories (config.yaml, summary.json, metrics.jsonl) and W&B runs,
each with its status and recorded settings, and the match of a run to a plan by those settings
(never by folder name)."""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from gnp.checks import is_number
from gnp.schema import dotted
from gnp.console import first_line
from gnp.paths import RUNS_DIR
from gnp.rundir import CHECKPOINT, CONFIG, Damaged, RunDir, Status, find_runs
from gnp.tables.plans import Plan, Shrink, composed, display_path, make_plans
from gnp.tables.spec import Table, TableError

# The names the tables and figures read from a run's files (gnp.training writes them).
EPOCH = "epoch"                       # metrics.jsonl: one row per epoch
TEST_ERROR = "test_error"             # summary.json: at the end of training; metrics.jsonl: per epoch (%)
FIRST_PASS_LOSS = "first_pass_loss"   # metrics.jsonl: the training loss at theta, mean over the epoch's batches
G1_NORM = "g1_norm"                   # metrics.jsonl: ||grad L(theta)||, mean over the epoch's steps


@dataclass
class Run:
    """A run as the tables see it: from its directory (gnp.rundir reads its files) or from W&B."""
    source: str                       # a run directory, or wandb:ENTITY/PROJECT/ID
    status: str                       # finished, diverged, stopped, failed, running, no summary, unreadable, ...
    settings: dict                    # the flattened config the run recorded (config.yaml, or W&B's config)
    summary: dict
    read_metrics: Callable[[], list[dict]] = field(repr=False, default=list)
    problem: str | None = None        # status unreadable: the damaged file and what is wrong with it
    analysis: dict | None = None      # analysis.json's quantities; None: no (readable) analysis.json
    analysis_problem: str | None = None  # a damaged analysis.json: the file and what is wrong with it
    analysis_settings: dict | None = None  # the options the analysis ran with; None: not recorded
    analysis_details: dict | None = None  # analysis.json's details (the Hessian's density, ...); None: none

    @property
    def seed(self) -> Any:
        return self.settings.get("seed")

    def metrics(self) -> list[dict]:
        return self.read_metrics()


def read_runs(folders: Iterable[str | Path]) -> list[Run]:
    """Every run directory (one holding summary.json, checkpoint.pt or metrics.jsonl) under the folders."""
    directories = set()
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise TableError(f"{folder}: no such folder; train first (scripts/reproduce.py TABLE --launch) "
                             f"or name the folder that holds the runs")
        directories.update(find_runs(folder))
    return [run for run in map(read_run, sorted(directories)) if run is not None]


def read_run(directory: Path) -> Run | None:
    """The run in `directory` (None when it holds none). A damaged file makes it `unreadable`, with
    the file and the damage in `problem`: runs copied or synced from a cluster can be cut short."""
    files = RunDir(directory)
    if not files.holds_run():
        return None
    try:
        summary = files.read_summary()
        config = files.read_config()
        if config is None and summary is not None:
            raise Damaged(files / CONFIG, "missing, so the run's settings are unknown")
        metrics = files.read_metrics()
    except Damaged as e:
        return Run(str(directory), "unreadable", {}, {}, problem=_shown(e))
    status = _status(summary.as_dict()) if summary else "no summary"
    run = Run(str(directory), status, dotted(config or {}), summary.as_dict() if summary else {}, lambda: metrics)
    try:  # a damaged analysis.json costs the run its analysis quantities only
        analysis = files.read_analysis()
    except Damaged as e:
        run.analysis_problem = _shown(e)
    else:
        if analysis is not None:
            run.analysis, run.analysis_settings = analysis["quantities"], analysis["settings"]
            run.analysis_details = analysis.get("details") if isinstance(analysis.get("details"), dict) else None
    return run


def _shown(damage: Damaged) -> str:
    """The damage, with its file's path as the tables show paths (relative to the repository)."""
    return f"{display_path(damage.path)}: {damage.what}"


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
        state = {"finished": Status.FINISHED, "crashed": Status.FAILED, "failed": Status.FAILED,
                 "killed": Status.STOPPED}
        status = _status(summary) if "status" in summary else str(state.get(api_run.state, api_run.state))
        if status == Status.FINISHED and TEST_ERROR not in summary:
            status = "no summary"
        runs.append(Run(f"wandb:{path}/{api_run.id}", status, dotted(dict(api_run.config)), summary,
                        lambda r=api_run: [row for row in r.scan_history() if EPOCH in row]))
    return runs


def _status(summary: dict) -> str:
    status = summary["status"]
    if status == Status.FINISHED and not is_number(summary.get(TEST_ERROR)):
        return "no test error"
    return status


SHARDS = "train.shards"  # the layout: the number of shards of a step, recorded as a number


def run_shards(run: Run) -> int:
    """The shards of a run's steps; a run from before train.shards took one per process."""
    recorded = run.settings.get(SHARDS)
    return recorded if isinstance(recorded, int) else run.summary.get("world_size") or 1


def matches(run: Run, plan: Plan, layout: bool = True) -> list[str]:
    """The pinned settings in which `run` differs from `plan` ([] when it counts for the plan's cell).
    A key the run does not record predates it: the run used what is now its default. The layout
    (train.shards) counts where the plan fixes it (`layout`: compare it at all); a plan's `auto` takes
    the runs of any layout, and the table keeps one layout a cell (stats.collect)."""
    differences = []
    for key, value in plan.expected.items():
        if key == SHARDS:
            if layout and value != "auto" and run_shards(run) != value:
                differences.append(f"{key}: {run_shards(run)!r} -> {value!r}")
            continue
        recorded = run.settings.get(key, plan.defaults.get(key))
        if not _same(recorded, value):
            differences.append(f"{key}: {recorded!r} -> {value!r}")
    return differences


# What a run directory holds, as scripts/reproduce.py sees it; LAUNCH: the states it (re)starts.
LAUNCH = ("missing", "partial", "interrupted", "failed")


def run_state(plan: Plan, seed: int) -> tuple[str, Run | None, str]:
    """(state, run, detail) of the run directory of `seed`: missing, partial (a checkpoint and no finished
    summary: resumes), interrupted (stopped before its first checkpoint: started again), failed (started
    again), finished, diverged (not restarted: it would diverge again), conflict
    (it holds a run with other settings), unreadable (a damaged file: left for you to look at) or
    not runnable."""
    if plan.expected is None:
        return "not runnable", None, plan.cell.reason or ""
    run = read_run(plan.run_dir(seed))
    if run is None:
        return "missing", None, ""
    if run.status == "unreadable":
        return "unreadable", run, run.problem or ""
    if run.settings:
        differences = matches(run, plan) + ([f"seed: {run.seed!r} -> {seed}"] if run.seed not in (None, seed) else [])
        if differences:
            return "conflict", run, "holds another run (" + ", ".join(differences) + ")"
    if run.status in (Status.FINISHED, Status.DIVERGED):
        return run.status, run, run.summary.get("error") or ""
    if run.status == Status.FAILED:
        return "failed", run, run.summary.get("error") or ""
    status = f", {run.status}" if run.status != "no summary" else ""
    if not (plan.run_dir(seed) / CHECKPOINT).exists():
        return "interrupted", run, f"no checkpoint to resume from: it starts again{status}"
    return "partial", run, f"{len(run.metrics())} epoch(s) done{status}"


# --- The options that would match runs found --------------------------------------------------------

SHRUNK_KEYS = ("dataset.limit_train", "dataset.limit_test", "train.batch_size", "train.epochs",
               "train.warmup_epochs", "method.warmup_epochs")  # what Shrink sets
CELL_KEYS = ("dataset.name", "model.name", "method.name")     # a run of another cell differs in these


def matching_options(table: Table, plans: list[Plan], runs: Iterable[Run], root: str | Path = RUNS_DIR,
                     seeds: Iterable[int] | None = None, shrink: Shrink = Shrink(),
                     extra: Iterable[str] = ()) -> tuple[int, dict] | None:
    """For finished runs that count for no plan: the selection (make_plans' seeds, shrink and extra)
    under which most of them would count, and how many would; None when none would. A run is a
    candidate for a plan when it differs only in what a smoke test shrinks and in keys no override
    of the cell sets (e.g. model.width); each guess is checked by composing its cells."""
    extra = tuple(extra)
    runnable = [p for p in plans if p.expected is not None]
    guesses: dict[tuple, list[tuple[Run, Plan]]] = {}
    for run in runs:
        if run.status != Status.FINISHED or any(not matches(run, p) and run.seed in p.seeds for p in runnable):
            continue
        for plan in runnable:
            guess = _guess(run, plan, shrink, extra)
            if guess is not None:
                guesses.setdefault(guess, []).append((run, plan))
                break
    ranked = Counter({guess: len(found) for guess, found in guesses.items()})
    for (limit_train, epochs, new_extra), _ in ranked.most_common():
        found = guesses[limit_train, epochs, new_extra]
        listed = set(table.seeds if seeds is None else seeds)
        needed = {run.seed for run, _ in found}
        new_seeds = seeds if needed <= listed else tuple(sorted(listed | needed))
        selection = {"seeds": new_seeds, "shrink": Shrink(limit_train, epochs), "extra": new_extra}
        try:
            checked = {p.cell: p for p in make_plans(table, root, only=dict.fromkeys(p.cell for _, p in found),
                                                     **selection)}
        except TableError:  # the guessed overrides do not compose
            continue
        n = sum(1 for run, plan in found
                if not matches(run, checked[plan.cell]) and run.seed in checked[plan.cell].seeds)
        if n:
            return n, selection
    return None


def _guess(run: Run, plan: Plan, shrink: Shrink, extra: tuple[str, ...]) -> tuple | None:
    """(limit_train, epochs, extra overrides) under which `run` would count for `plan`'s cell."""
    unshrunk = composed((*plan.cell.overrides, *extra))
    set_by_cell = {o.split("=", 1)[0].lstrip("+~") for o in plan.cell.overrides if "=" in o}
    differing = {key: run.settings.get(key, plan.defaults.get(key)) for key, value in plan.expected.items()
                 if not _same(run.settings.get(key, plan.defaults.get(key)), value)}
    if any(key in CELL_KEYS or key in set_by_cell for key in differing):
        return None
    limits = [run.settings.get(k) for k in ("dataset.limit_train", "dataset.limit_test")]
    limit_train = None if all(_same(v, unshrunk.get(k)) for v, k in zip(limits, ("dataset.limit_train",
                                                                                  "dataset.limit_test"))) else limits[0]
    epochs = None if _same(run.settings.get("train.epochs"), unshrunk.get("train.epochs")) else \
        run.settings.get("train.epochs")
    overrides = dict(o.split("=", 1) for o in extra if "=" in o)
    for key, value in differing.items():
        if key in SHRUNK_KEYS:
            continue
        if isinstance(value, (list, dict)):
            return None
        overrides[key] = "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    return limit_train, epochs, tuple(f"{k}={v}" for k, v in overrides.items())


def _same(a: Any, b: Any) -> bool:
    if is_number(a) and is_number(b):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b

