"""The paper's tables as data, and the tables back from finished runs.

A table (`conf/table/<name>.yaml`) is a grid: rows are models, columns are dataset x augmentation,
and every cell holds the same methods (SGD / SAM / GNP, ...), each trained with a few seeds. One
method of one cell is composed from the existing config groups plus a few overrides, so a recipe
lives in one place (`conf/model/*.yaml`) and a table only says which runs it needs:

    python train.py dataset=cifar10 model=wrn28_10 aug=cutout method=sam method.r=0.05 seed=0 \\
        hydra.run.dir=runs/cnn/cifar10/wrn28_10/cutout/sam/seed0

`make_plans` turns a table into these commands (scripts/reproduce.py prints and launches them),
`read_runs` reads runs back and `collect` groups the finished ones by cell and method, matching the
settings each run recorded (never its folder name); `render_*` write the paper's layout.
"""
from __future__ import annotations

import argparse
import csv
import inspect
import io as _io
import json
import math
import re
import shlex
import statistics
import sys
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import yaml

from gnp.data import DIGITS_TEST_SIZE
from gnp.models import MODELS
from gnp.runs import first_line
from gnp.training import RESUMABLE_CHANGES

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
TABLE_DIR = CONF / "table"
PUBLISHED_DIR = ROOT / "results" / "published"
BENCHMARK_DIR = ROOT / "results" / "benchmarks"

TRAIN_IMAGES = {"cifar10": 50_000, "cifar100": 50_000, "digits": 1_797 - DIGITS_TEST_SIZE}
# A run counts for a cell only if it recorded the cell's values of these settings (prefixes), and of
# every key the table's overrides set. Where and how a run was logged does not count.
RESULT_KEYS = ("dataset.name", "dataset.limit_train", "dataset.limit_test", "model", "aug", "method", "optimizer",
               "train.epochs", "train.batch_size", "train.warmup_epochs", "train.label_smoothing")
NOT_RESULT_KEYS = (*RESUMABLE_CHANGES, "seed", "hydra")
# summary.json fields and the config keys they record (runs without config.yaml, W&B summaries).
SUMMARY_SETTINGS = {
    "dataset": "dataset.name", "model": "model.name", "aug": "aug.name", "method": "method.name",
    "r": "method.r", "alpha": "method.alpha", "seed": "seed", "init_seed": "init_seed", "epochs": "train.epochs",
    "optimizer": "optimizer.name", "lr": "optimizer.lr", "batch_size": "train.batch_size",
    "warmup": "method.warmup", "warmup_epochs": "method.warmup_epochs", "gnp_probability": "method.gnp_probability",
}
SAFE_PATH = re.compile(r"^[\w./:+@-]+$")  # run directories go into Hydra overrides unquoted

_TABLE_KEYS = {"title", "note", "runnable", "reason", "seeds", "overrides", "datasets", "columns", "rows", "methods",
               "published", "heatmap"}
_ROW_KEYS = {"label", "augs", "overrides", "runnable", "reason"}
_METHOD_KEYS = {"label", "overrides", "datasets", "runnable", "reason"}
_SOURCE_KEYS = {"file", "label", "path", "methods", "rows", "note"}


class TableError(ValueError):
    """A table name, a table file or a runs folder is invalid; the message says what to change."""


# --- Table files ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Row:
    key: str                          # the model config: conf/model/<key>.yaml
    label: str
    augs: dict[str, str | None]       # column -> aug choice of this row (None: the model config's own)
    overrides: tuple[str, ...]
    reason: str | None                # why it cannot run yet; None: runnable


@dataclass(frozen=True)
class Method:
    key: str
    label: str
    overrides: tuple[str, ...]
    per_dataset: dict[str, tuple[str, ...]]
    reason: str | None


@dataclass(frozen=True)
class Source:
    """Published numbers: where in results/published/<file>.yaml each cell's value is."""
    file: str
    label: str
    path: str                         # dotted, with {model} {dataset} {column}
    methods: dict[str, str]           # our method -> its key in the file; others are not covered
    rows: tuple[str, ...] | None      # the rows it covers; None: all
    note: str | None


@dataclass(frozen=True)
class Table:
    name: str
    title: str
    note: str | None
    reason: str | None
    seeds: tuple[int, ...]
    overrides: tuple[str, ...]
    datasets: dict[str, str]          # key -> label, in column order
    columns: dict[str, str]
    rows: dict[str, Row]
    methods: dict[str, Method]
    published: tuple[Source, ...]
    heatmap: tuple[str, str] | None   # config keys of the heatmap's rows and columns


def table_names() -> list[str]:
    return sorted(p.stem for p in TABLE_DIR.glob("*.yaml"))


def load_table(name: str) -> Table:
    names = table_names()
    if name not in names:
        raise TableError(f"unknown table {name!r}; choose one of: {', '.join(names)}")
    return parse_table(name, yaml.safe_load((TABLE_DIR / f"{name}.yaml").read_text()))


def parse_table(name: str, raw: dict) -> Table:
    where = f"conf/table/{name}.yaml"
    _check_keys(where, raw, _TABLE_KEYS, required=("title", "seeds", "datasets", "columns", "rows", "methods"))
    columns = _labels(raw["columns"])
    rows = {}
    for key, spec in raw["rows"].items():
        spec = spec or {}
        _check_keys(f"{where}: row {key}", spec, _ROW_KEYS)
        augs = spec.get("augs", {c: c for c in columns})
        unknown = sorted(set(augs) - set(columns))
        if unknown:
            raise TableError(f"{where}: row {key}: augs names column(s) {', '.join(unknown)}; "
                             f"the columns are {', '.join(columns)}")
        rows[key] = Row(key, spec.get("label", key), dict(augs), tuple(spec.get("overrides", ())),
                        _reason(f"{where}: row {key}", spec))
    methods = {}
    for key, spec in raw["methods"].items():
        _check_keys(f"{where}: method {key}", spec, _METHOD_KEYS, required=("overrides",))
        if not re.fullmatch(r"[\w.-]+", key):
            raise TableError(f"{where}: method name {key!r} names run folders: use letters, digits, _ . -")
        per_dataset = {d: tuple(o) for d, o in (spec.get("datasets") or {}).items()}
        methods[key] = Method(key, spec.get("label", key), tuple(spec["overrides"]), per_dataset,
                              _reason(f"{where}: method {key}", spec))
    sources = []
    for spec in raw.get("published") or ():
        _check_keys(f"{where}: published", spec, _SOURCE_KEYS, required=("file", "label", "path", "methods"))
        sources.append(Source(spec["file"], spec["label"], spec["path"], dict(spec["methods"]),
                              tuple(spec["rows"]) if spec.get("rows") else None, spec.get("note")))
    heatmap = tuple(raw["heatmap"]) if raw.get("heatmap") else None
    if heatmap is not None and len(heatmap) != 2:
        raise TableError(f"{where}: heatmap must be [row key, column key], e.g. [method.alpha, method.r]")
    return Table(name, raw["title"], raw.get("note"), _reason(where, raw), tuple(int(s) for s in raw["seeds"]),
                 tuple(raw.get("overrides", ())), _labels(raw["datasets"]), columns, rows, methods, tuple(sources),
                 heatmap)


def _check_keys(where: str, spec: dict, allowed: set[str], required: Iterable[str] = ()) -> None:
    if not isinstance(spec, dict):
        raise TableError(f"{where}: expected a mapping, got {spec!r}")
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise TableError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
    missing = [k for k in required if k not in spec]
    if missing:
        raise TableError(f"{where}: missing key(s) {', '.join(missing)}")


def _labels(spec: dict | list) -> dict[str, str]:
    return dict(spec) if isinstance(spec, dict) else {key: key for key in spec}


def _reason(where: str, spec: dict) -> str | None:
    if spec.get("runnable", True):
        return None
    if not spec.get("reason"):
        raise TableError(f"{where}: runnable: false needs a reason: (what is missing)")
    return spec["reason"]


# --- Cells and the commands that fill them -------------------------------------------------------

@dataclass(frozen=True)
class Cell:
    """One method in one cell of a table: the runs that differ only in their seed."""
    table: str
    dataset: str
    row: str
    column: str
    method: str
    aug: str | None                   # the aug override (None: the model config's own)
    overrides: tuple[str, ...]
    reason: str | None                # why it cannot run yet; None: runnable


def cells(table: Table) -> list[Cell]:
    out = []
    for dataset in table.datasets:
        for row in table.rows.values():
            for column, aug in ((c, row.augs[c]) for c in table.columns if c in row.augs):
                for method in table.methods.values():
                    overrides = (*table.overrides, f"dataset={dataset}", f"model={row.key}",
                                 *([f"aug={aug}"] if aug else []), *row.overrides, *method.overrides,
                                 *method.per_dataset.get(dataset, ()))
                    reason = table.reason or row.reason or method.reason
                    out.append(Cell(table.name, dataset, row.key, column, method.key, aug, overrides, reason))
    return out


@dataclass(frozen=True)
class Shrink:
    """`--limit-train N --epochs E`: every cell made tiny, for a smoke test of a whole table."""
    limit_train: int | None = None
    epochs: int | None = None

    def __bool__(self) -> bool:
        return self.limit_train is not None or self.epochs is not None

    @property
    def suffix(self) -> str:
        """Smoke runs live beside the real ones, never in their folders."""
        parts = [f"{letter}{value}" for letter, value in (("n", self.limit_train), ("e", self.epochs)) if value]
        return "-smoke-" + "-".join(parts) if parts else ""

    def overrides(self, config: dict) -> list[str]:
        out = []
        if self.limit_train is not None:
            out += [f"dataset.limit_train={self.limit_train}", f"dataset.limit_test={self.limit_train}"]
            if config["train.batch_size"] > self.limit_train:
                out.append(f"train.batch_size={self.limit_train}")
        if self.epochs is not None:
            out.append(f"train.epochs={self.epochs}")
            if config["train.warmup_epochs"] >= self.epochs:  # the learning rate's warmup ends before the run
                out.append(f"train.warmup_epochs={self.epochs - 1}")
            if (config.get("method.warmup_epochs") or 0) > self.epochs:  # GR's may last the whole run, not longer
                out.append(f"method.warmup_epochs={self.epochs}")
        return out


@dataclass
class Plan:
    """The runs of one cell: the same overrides, one run directory per seed."""
    cell: Cell
    overrides: tuple[str, ...]        # for every seed (without seed and run directory)
    directory: Path                   # seed s runs in directory / f"seed{s}"
    seeds: tuple[int, ...]
    config: dict | None               # the flattened composed config; None when the cell cannot run yet
    expected: dict | None             # settings a run must have recorded to count here
    # The default config: the value a run used for a key it does not record (it predates the key).
    defaults: dict = field(repr=False, default_factory=dict)

    def run_dir(self, seed: int) -> Path:
        return self.directory / f"seed{seed}"

    def command(self, seed: int) -> str:
        args = [*self.overrides, f"seed={seed}", f"hydra.run.dir={display_path(self.run_dir(seed))}"]
        return "python train.py " + " ".join(shlex.quote(a) for a in args)

    def multirun_args(self, seeds: Iterable[int], launcher: str) -> list[str]:
        """One Hydra multirun over the seeds, each job in its own run directory."""
        return ["train.py", "-m", *self.overrides, "seed=" + ",".join(str(s) for s in seeds),
                f"hydra/launcher={launcher}", f"hydra.sweep.dir={display_path(self.directory)}",
                "hydra.sweep.subdir=seed${seed}"]


def make_plans(table: Table, root: str | Path = "runs", seeds: Iterable[int] | None = None, shrink: Shrink = Shrink(),
               extra: Iterable[str] = ()) -> list[Plan]:
    """Every cell of `table` with its composed config and run directories under `root`/<table>."""
    root = Path(root).resolve()
    if not SAFE_PATH.match(str(root)):
        raise TableError(f"--root {root} contains spaces or other characters Hydra overrides cannot hold; "
                         f"choose another folder")
    seeds, extra = tuple(table.seeds if seeds is None else seeds), tuple(extra)
    base = root / (table.name + shrink.suffix)
    plans = []
    with _composer() as compose:
        defaults = compose(())
        for cell in cells(table):
            overrides, config = (*cell.overrides, *extra), None
            if cell.reason is None:
                _check_experiments(cell)
                config = compose(overrides)
                if shrink:
                    overrides = (*overrides, *shrink.overrides(config))
                    config = compose(overrides)
            aug = config["aug.name"] if config else (cell.aug or cell.column)
            directory = base / cell.dataset / cell.row / aug / cell.method
            expected = None if config is None else {k: v for k, v in config.items() if _pinned(k, overrides)}
            plans.append(Plan(cell, overrides, directory, seeds, config, expected, defaults))
    _check_distinct(table, plans)
    return plans


_composed: dict[tuple[str, ...], dict] = {}  # composing costs 0.1-0.4 s: each cell once per process


@contextmanager
def _composer() -> Iterator[Callable[[tuple[str, ...]], dict]]:
    """Compose many configs under one Hydra initialisation, each validated as train.py would."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from gnp.config import validate

    def compose_flat(overrides: tuple[str, ...]) -> dict:
        if overrides not in _composed:
            try:
                cfg = compose(config_name="config", overrides=list(overrides))
                validate(cfg)
            except Exception as e:  # Hydra's composition errors and ConfigError alike
                raise TableError(f"the cell {' '.join(overrides)} does not compose: {first_line(e)}") from e
            _composed[overrides] = flatten(OmegaConf.to_container(cfg, resolve=True))
        return _composed[overrides]

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield compose_flat


def _check_experiments(cell: Cell) -> None:
    # An optional default ignores an unknown choice silently, so `experiment=typo` would compose.
    for override in cell.overrides:
        if override.startswith("experiment=") and not (CONF / "experiment" / f"{override[11:]}.yaml").exists():
            raise TableError(f"conf/table/{cell.table}.yaml: {override}: conf/experiment/{override[11:]}.yaml "
                             f"does not exist; mark the table runnable: false with a reason until it does")


def _check_distinct(table: Table, plans: list[Plan]) -> None:
    seen: dict[str, Cell] = {}
    for plan in plans:
        if plan.expected is None:
            continue
        key = json.dumps(plan.expected, sort_keys=True)
        if key in seen:
            raise TableError(f"conf/table/{table.name}.yaml: methods {seen[key].method} and {plan.cell.method} of "
                             f"{plan.cell.dataset}/{plan.cell.row}/{plan.cell.column} have the same settings; "
                             f"runs could not tell them apart")
        seen[key] = plan.cell


def _pinned(key: str, overrides: Iterable[str]) -> bool:
    def under(prefixes: Iterable[str]) -> bool:
        return any(key == p or key.startswith(p + ".") for p in prefixes)

    if under(NOT_RESULT_KEYS):
        return False
    set_by_overrides = [o.split("=", 1)[0].lstrip("+~") for o in overrides if "=" in o]
    return under(RESULT_KEYS) or key in set_by_overrides


def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def display_path(path: Path) -> str:
    """Relative to the repository when inside it (commands are run from there), else absolute."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


# --- Runs ----------------------------------------------------------------------------------------

@dataclass
class Run:
    source: str                       # a run directory, or wandb:ENTITY/PROJECT/ID
    status: str                       # finished, diverged, stopped, failed, running, no summary, ...
    settings: dict                    # the flattened config, with the summary's fields on top
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
    status = _status(summary) if summary_path.exists() else "no summary"
    return Run(str(directory), status, _settings(config, summary), summary,
               lambda: _read_jsonl(directory / "metrics.jsonl"))


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
        if status == "finished" and "test_error" not in summary:
            status = "no summary"
        runs.append(Run(f"wandb:{path}/{api_run.id}", status, _settings(flatten(dict(api_run.config)), summary),
                        summary, lambda r=api_run: [row for row in r.scan_history() if "epoch" in row]))
    return runs


def _status(summary: dict) -> str:
    status = summary.get("status") or "finished"  # older runs have no status and count as finished
    if status == "finished" and not _is_number(summary.get("test_error")):
        return "no test error"
    return status


def _settings(config: dict, summary: dict) -> dict:
    settings = dict(config)
    settings.update({key: summary[field] for field, key in SUMMARY_SETTINGS.items() if field in summary})
    return settings


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
    if _is_number(a) and _is_number(b):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# --- Runs grouped by cell ------------------------------------------------------------------------

@dataclass(frozen=True)
class Stat:
    mean: float | None
    std: float | None                 # sample standard deviation over seeds; None when n < 2
    n: int


def stat(values: list[float]) -> Stat:
    if not values:
        return Stat(None, None, 0)
    return Stat(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None, len(values))


@dataclass
class Results:
    table: Table
    plans: list[Plan]
    runs: dict[Cell, list[Run]]       # finished runs of each cell, one per seed
    ignored: Counter                  # unfinished runs by status, and diverged ones
    duplicates: int                   # finished runs of a seed already counted (e.g. a folder and W&B)
    other: int                        # finished runs that are in no cell of this table
    other_seeds: int                  # finished runs of a cell, of a seed the table (or --seeds) does not list

    def stat(self, cell: Cell) -> Stat:
        return stat([run.summary["test_error"] for run in self.runs[cell]])

    def devices(self, cells: Iterable[Cell]) -> list[str]:
        return sorted({str(run.summary.get("device")) for cell in cells for run in self.runs[cell]})


def collect(table: Table, plans: list[Plan], runs: Iterable[Run]) -> Results:
    by_cell: dict[Cell, list[Run]] = {plan.cell: [] for plan in plans}
    ignored, duplicates, other, other_seeds = Counter(), 0, 0, 0
    runnable = [plan for plan in plans if plan.expected is not None]
    for run in runs:
        if run.status != "finished":
            ignored[run.status] += 1
            continue
        plan = next((p for p in runnable if not matches(run, p)), None)
        if plan is None:
            other += 1
        elif run.seed not in plan.seeds:
            other_seeds += 1
        elif any(r.seed == run.seed for r in by_cell[plan.cell]):
            duplicates += 1
        else:
            by_cell[plan.cell].append(run)
    return Results(table, plans, by_cell, ignored, duplicates, other, other_seeds)


def describe_counts(results: Results) -> str:
    used = sum(len(r) for r in results.runs.values())
    text = f"{used} finished runs used"
    unfinished = {s: n for s, n in results.ignored.items() if s != "diverged"}
    if unfinished:
        parts = ", ".join(f"{n} {s}" for s, n in sorted(unfinished.items()))
        text += f"; ignored {sum(unfinished.values())} not finished ({parts})"
    if results.ignored["diverged"]:
        text += f"; ignored {results.ignored['diverged']} diverged"
    if results.duplicates:
        text += f"; {results.duplicates} duplicate runs of a seed already counted"
    if results.other:
        text += f"; {results.other} finished runs belong to no cell of this table"
    if results.other_seeds:
        text += f"; {results.other_seeds} finished runs of seeds this table does not list (--seeds adds them)"
    return text


# --- Published numbers ---------------------------------------------------------------------------

NOT_COVERED = object()  # the source does not report this method or row at all


def published(source: Source, cell: Cell) -> float | None | object:
    """The source's value for the cell: a number, None (n/a: not known) or NOT_COVERED."""
    if (source.rows and cell.row not in source.rows) or cell.method not in source.methods:
        return NOT_COVERED
    node: Any = _published_file(source.file)
    for part in source.path.format(model=cell.row, dataset=cell.dataset, column=cell.column).split("."):
        node = node.get(part) if isinstance(node, dict) else None
    value = node.get(source.methods[cell.method]) if isinstance(node, dict) else None
    return float(value) if _is_number(value) else None


_published_cache: dict[str, dict] = {}


def _published_file(name: str) -> dict:
    if name not in _published_cache:
        path = PUBLISHED_DIR / f"{name}.yaml"
        if not path.exists():
            raise TableError(f"{path} does not exist; the table's published: entries name files in {PUBLISHED_DIR}")
        _published_cache[name] = yaml.safe_load(path.read_text()) or {}
    return _published_cache[name]


# --- Time estimates from measured throughput -----------------------------------------------------

@dataclass(frozen=True)
class Throughput:
    model: str                        # at its builder's default options
    method: str                       # sgd, sam or gnp
    images_per_second: float
    device: str
    how: str                          # what was measured, in words
    upper_bound: bool = False         # a start-up epoch: slower than steady state


def read_throughput(folder: Path = BENCHMARK_DIR) -> list[Throughput]:
    """Measured training speed in results/benchmarks/*.json. All the tables' knowledge of those
    files' formats is here, so that a new format changes only this function. Only measurements of a
    model at its builder's default options count: a shrunk model says nothing about the full one."""
    out = []
    for path in sorted(Path(folder).glob("*.json")):
        data = json.loads(path.read_text())
        if data.get("format") == "gnp-benchmark/1":  # scripts/benchmark.py
            env = data["environment"]
            device = env["device_name"] if env["device"] != "cpu" else f"cpu ({env['cpu_threads']} threads)"
            for m in data["models"]:  # steady-state step times, median over interleaved rounds
                for method in ("sgd", "sam", "gnp"):
                    if method in m["variants"] and not m["options"]:
                        out.append(Throughput(m["model"], method, m["variants"][method]["images_per_second"], device,
                                              f"{path.name}: median step time at batch {m['batch_size']} "
                                              f"({m['main_label']})"))
            for run in data.get("checks", {}).get("runs", []):  # one short first epoch of the real loop
                if run["ok"] and not run["options"]:
                    out.append(Throughput(run["model"], run["method"], run["images_per_second"], device,
                                          f"{path.name}: a short first epoch at batch {run['batch_size']} with "
                                          "start-up", upper_bound=True))
            continue
        # The formats of the scripts it replaced (files measured on earlier commits).
        device = data.get("device_name", "?") if data.get("device") != "cpu" else \
            f"cpu ({data.get('cpu_threads', '?')} threads)"
        if "main" in data and "model" in data:  # the former benchmark_step.py: steady-state step times
            batch = data["main"]["batch_size"]
            for method, m in data["main"]["methods"].items():
                if method in ("sgd", "sam", "gnp"):
                    out.append(Throughput(data["model"], method, batch * 1000 / m["step_ms"], device,
                                          f"{path.name}: step time at batch {batch}"))
        for model, m in (data.get("models") or {}).items():  # the former cuda_check.py: one short first epoch
            s = m["summary"]
            out.append(Throughput(model, s["method"], m["last_epoch"]["images_per_second"], device,
                                  f"{path.name}: a short first epoch at batch {s['batch_size']} with start-up",
                                  upper_bound=True))
    return out


@dataclass(frozen=True)
class Estimate:
    seconds: float | None             # None: unknown
    device: str | None
    how: str
    upper_bound: bool = False         # from a start-up epoch: the run is likely faster


def estimate(plan: Plan, throughputs: list[Throughput], finished: list[Run]) -> Estimate:
    """Time of one run of the plan: from its finished seeds if any, else from measured throughput."""
    times = [r.summary["wall_seconds"] for r in finished if _is_number(r.summary.get("wall_seconds"))]
    if times:
        device = str(finished[0].summary.get("device"))
        return Estimate(statistics.fmean(times), device, f"measured: {len(times)} finished seed(s) of this cell")
    if plan.config is None:
        return Estimate(None, None, "unknown: the cell cannot run yet")
    c = plan.config
    model, method = c["model.name"], c["method.name"]
    if not _default_model_options(c):
        return Estimate(None, None, f"unknown: no measurement of {model} with these options")
    candidates = sorted((t for t in throughputs if t.model == model and not t.device.startswith("cpu")),
                        key=lambda t: (t.upper_bound, t.method != method))
    if not candidates:
        return Estimate(None, None, f"unknown: no measurement of {model} in results/benchmarks/")
    best = candidates[0]
    cost = _relative_cost(throughputs, best, method)
    if cost is None:
        return Estimate(None, None, f"unknown: {model} measured with {best.method} only, and no SGD : GNP ratio")
    scaled = f", scaled from {best.method} by the measured SGD : GNP step ratio" if cost != 1 else ""
    bound = " (an upper bound)" if best.upper_bound else ""
    return Estimate(c["train.epochs"] * _images_per_epoch(c) * cost / best.images_per_second, best.device,
                    f"extrapolated to {c['train.epochs']} epochs from {best.how}, {model} {best.method}{scaled}; "
                    f"training steps only{bound}", best.upper_bound)


def _relative_cost(throughputs: list[Throughput], measured: Throughput, method: str) -> float | None:
    """Time of a `method` step over the measured method's step: SAM and GNP both take two passes."""
    two_pass = ("sam", "gnp")
    if (measured.method in two_pass) == (method in two_pass):
        return 1.0
    ratios = []  # GNP step time / SGD step time, on the same device
    for sgd in (t for t in throughputs if t.device == measured.device and t.method == "sgd"):
        ratios += [sgd.images_per_second / t.images_per_second for t in throughputs
                   if (t.device, t.model, t.how, t.method) == (sgd.device, sgd.model, sgd.how, "gnp")]
    if not ratios:
        return None
    ratio = statistics.fmean(ratios)
    return 1 / ratio if method not in two_pass else ratio


def _images_per_epoch(config: dict) -> int:
    n = TRAIN_IMAGES[config["dataset.name"]]
    if config.get("dataset.limit_train") is not None:
        n = min(n, config["dataset.limit_train"])
    batch = config["train.batch_size"]
    return n // batch * batch  # the last partial batch is dropped


def _default_model_options(config: dict) -> bool:
    options = {k[6:]: v for k, v in config.items() if k.startswith("model.") and k != "model.name"}
    signature = inspect.signature(MODELS[config["model.name"]]).parameters
    return all(signature[k].default == v for k, v in options.items() if k in signature)


# --- Rendering: the paper's layout ---------------------------------------------------------------

DASH = "–"


def format_stat(s: Stat) -> str:
    if s.n == 0:
        return DASH
    spread = f" ± {s.std:.2f}" if s.std is not None else ""
    return f"{s.mean:.2f}{spread} ({s.n})"


def format_published(value: float | None, ours: Stat) -> str:
    if value is None:
        return "n/a"
    diff = f" ({ours.mean - value:+.2f})" if ours.n else ""
    return f"{value:g}{diff}"


def best_methods(results: Results, dataset: str, row: str, column: str) -> set[str]:
    """The methods of a cell with the lowest mean (at the printed precision); none when < 2 have runs."""
    means = {p.cell.method: round(results.stat(p.cell).mean, 2) for p in results.plans
             if (p.cell.dataset, p.cell.row, p.cell.column) == (dataset, row, column) and results.runs[p.cell]}
    if len(means) < 2:
        return set()
    low = min(means.values())
    return {m for m, v in means.items() if v == low}


def cell_groups(results: Results) -> dict[tuple[str, str, str], dict[str, Plan]]:
    """(dataset, row, column) -> method -> plan, in table order."""
    grid: dict[tuple[str, str, str], dict[str, Plan]] = {}
    for plan in results.plans:
        c = plan.cell
        grid.setdefault((c.dataset, c.row, c.column), {})[c.method] = plan
    return grid


def _columns(table: Table) -> list[tuple[str, str]]:
    return [(d, c) for d in table.datasets for c in table.columns]


def _sources_of(table: Table, row: str) -> list[Source]:
    return [s for s in table.published if s.rows is None or row in s.rows]


def render_markdown(results: Results, counts: str, reproduce: str) -> str:
    """The paper's layout; `reproduce` is the scripts/reproduce.py command line of this selection."""
    t, grid = results.table, cell_groups(results)
    methods = " / ".join(m.label for m in t.methods.values())
    lines = [f"# {t.title}", ""]
    if t.note:
        lines += [t.note, ""]
    if t.reason:
        lines += [f"**Not runnable yet**: {t.reason}.", ""]
    lines += [f"Test error (%), mean ± sample std over seeds (n seeds); each cell: {methods}. **Bold**: the "
              f"lowest mean of the cell. {DASH}: no finished run yet (commands below). Published lines: their "
              f"value (ours − theirs); n/a: not known; ·: not in that source.", ""]
    header = ["Model", ""] + [f"{t.datasets[d]} {t.columns[c]}" for d, c in _columns(t)]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in t.rows.values():
        ours = [row.label, "ours"]
        for d, c in _columns(t):
            plans = grid.get((d, row.key, c))
            best = best_methods(results, d, row.key, c) if plans else set()
            ours.append(" / ".join(_bold_md(format_stat(results.stat(p.cell)), m in best)
                                   for m, p in plans.items()) if plans else "")
        lines.append("| " + " | ".join(ours) + " |")
        for source in _sources_of(t, row.key):
            line = ["", source.label]
            for d, c in _columns(t):
                plans = grid.get((d, row.key, c))
                values = [(published(source, p.cell), results.stat(p.cell)) for p in (plans or {}).values()]
                line.append(" / ".join("·" if v is NOT_COVERED else format_published(v, s) for v, s in values)
                            if plans else "")
            lines.append("| " + " | ".join(line) + " |")
    notes = _notes(t)
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    lines += ["", f"Runs: {counts}."]
    devices = results.devices(results.runs)
    if devices:
        lines.append(f"Hardware: {', '.join(devices)}.")
    if t.heatmap:
        lines += ["", *_markdown_heatmaps(results)]
    lines += ["", *_markdown_missing(results, reproduce)]
    return "\n".join(lines).rstrip() + "\n"


def _bold_md(text: str, bold: bool) -> str:
    return f"**{text}**" if bold else text


def _notes(t: Table) -> list[str]:
    notes = []
    for row in t.rows.values():
        for column, aug in row.augs.items():
            if aug != column:
                trained = f"aug={aug}" if aug else f"its recipe's own augmentation (conf/model/{row.key}.yaml)"
                notes.append(f"{row.label}: the {t.columns[column]} column is trained with {trained}.")
    notes += [f"{s.label}: {s.note}" for s in t.published if s.note]
    return notes


def _markdown_heatmaps(results: Results) -> list[str]:
    t = results.table
    lines = []
    for (d, r, c), plans, row_values, col_values, at in heatmap_grids(results):
        lines += [f"## {t.datasets[d]}, {t.rows[r].label}, {t.columns[c]}: {t.heatmap[0]} (rows) x {t.heatmap[1]} "
                  f"(columns)", "", "| | " + " | ".join(f"{v:g}" for v in col_values) + " |",
                  "|---|" + "---|" * len(col_values)]
        for rv in row_values:
            lines.append(f"| {rv:g} | " + " | ".join(format_stat(results.stat(at[rv, cv].cell)) if (rv, cv) in at
                                                     else "" for cv in col_values) + " |")
        lines.append("")
    return lines


def heatmap_grids(results: Results):
    """For each cell of a heatmap table: its plans arranged by the two heatmap keys."""
    t = results.table
    if not t.heatmap:
        return
    for key, plans in cell_groups(results).items():
        at = {(p.config[t.heatmap[0]], p.config[t.heatmap[1]]): p for p in plans.values() if p.config}
        if at:
            yield key, plans, sorted({k[0] for k in at}), sorted({k[1] for k in at}), at


def _markdown_missing(results: Results, reproduce: str) -> list[str]:
    waiting = [(p, [s for s in p.seeds if not any(r.seed == s for r in results.runs[p.cell])]) for p in results.plans]
    waiting = [(p, seeds) for p, seeds in waiting if seeds]
    if not waiting:
        return ["All runs of this table are finished."]
    n = sum(len(seeds) for _, seeds in waiting)
    lines = [f"## Missing runs ({n})", "",
             f"`{reproduce} --launch` runs them all (finished ones are "
             f"skipped, interrupted ones resume); one at a time:", "", "<details><summary>commands</summary>", ""]
    for plan, seeds in waiting:
        c = plan.cell
        blocked = f" (not runnable yet: {c.reason})" if c.reason else ""
        lines += [f"{c.dataset} / {c.row} / {c.column} / {c.method}{blocked}:", "", "```bash",
                  *[plan.command(s) for s in seeds], "```", ""]
    return lines + ["</details>"]


def render_latex(results: Results) -> str:
    t, grid = results.table, cell_groups(results)
    columns = _columns(t)
    methods = list(t.methods.values())
    k = len(methods)
    out = [f"% {t.title}. Generated by scripts/make_tables.py; do not edit.", r"\begin{table}[t]", r"\centering",
           rf"\caption{{{_tex(t.title)}. Test error (\%), mean $\pm$ sample std over seeds (n).}}",
           r"\resizebox{\textwidth}{!}{%", rf"\begin{{tabular}}{{ll{'c' * k * len(columns)}}}", r"\toprule"]
    first = 3
    spans = []
    for d in t.datasets:
        width = k * len(t.columns)
        spans.append((rf"\multicolumn{{{width}}}{{c}}{{{_tex(t.datasets[d])}}}", first, first + width - 1))
        first += width
    out.append(" & & " + " & ".join(s for s, _, _ in spans) + r" \\")
    out.append("".join(rf"\cmidrule(lr){{{a}-{b}}}" for _, a, b in spans))
    out.append(" & & " + " & ".join(rf"\multicolumn{{{k}}}{{c}}{{{_tex(t.columns[c])}}}" for _, c in columns) + r" \\")
    out.append("Model & & " + " & ".join(_tex(m.label) for _ in columns for m in methods) + r" \\")
    out.append(r"\midrule")
    for row in t.rows.values():
        cells = [row.label, "ours"]
        for d, c in columns:
            plans = grid.get((d, row.key, c), {})
            best = best_methods(results, d, row.key, c) if plans else set()
            for m in methods:
                text = _tex_stat(results.stat(plans[m.key].cell)) if m.key in plans else ""
                cells.append(rf"\textbf{{{text}}}" if m.key in best else text)
        out.append(" & ".join(_tex(cells[0]) if i == 0 else x for i, x in enumerate(cells)) + r" \\")
        for source in _sources_of(t, row.key):
            cells = ["", _tex(source.label)]
            for d, c in columns:
                plans = grid.get((d, row.key, c), {})
                for m in methods:
                    value = published(source, plans[m.key].cell) if m.key in plans else NOT_COVERED
                    cells.append("" if value is NOT_COVERED else
                                 _tex(format_published(value, results.stat(plans[m.key].cell))))
            out.append(" & ".join(cells) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}}", r"\end{table}"]
    return "\n".join(out) + "\n"


def _tex_stat(s: Stat) -> str:
    if s.n == 0:
        return "--"
    spread = rf" $\pm$ {s.std:.2f}" if s.std is not None else ""
    return f"{s.mean:.2f}{spread} ({s.n})"


def _tex(text: str) -> str:
    text = text.replace("\\", r"\textbackslash{}")
    for char in "&%$#_{}":
        text = text.replace(char, "\\" + char)
    return text.replace("–", "--").replace("−", "-").replace("α", r"$\alpha$")


def csv_rows(results: Results) -> tuple[list[str], list[list]]:
    """One row per method and cell: the numbers of the Markdown and LaTeX tables, unrounded."""
    t = results.table
    sources = list(dict.fromkeys(s.file for s in t.published))
    header = ["table", "model", "dataset", "column", "aug", "method", "mean", "std", "n", "best", "device"]
    header += [name for s in sources for name in (s, f"{s}_diff")]
    rows = []
    for plan in results.plans:
        c = plan.cell
        s = results.stat(c)
        best = c.method in best_methods(results, c.dataset, c.row, c.column)
        row = [t.name, c.row, c.dataset, c.column, plan.config["aug.name"] if plan.config else (c.aug or c.column),
               c.method, s.mean, s.std, s.n, best, ";".join(results.devices([c]))]
        for file in sources:
            values = [published(src, c) for src in t.published if src.file == file]
            value = next((v for v in values if v is not NOT_COVERED), NOT_COVERED)
            if value is NOT_COVERED:
                row += ["", ""]
            elif value is None:
                row += ["n/a", ""]
            else:
                row += [value, s.mean - value if s.n else ""]
        rows.append(["" if v is None else v for v in row])
    return header, rows


def render_csv(results: Results) -> str:
    header, rows = csv_rows(results)
    buffer = _io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


# --- Command-line helpers shared by the scripts ---------------------------------------------------

class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line, and list the options when a flag is unknown."""

    def error(self, message: str):
        if message.startswith("unrecognized arguments"):
            options = sorted({s for a in self._actions for s in a.option_strings if s.startswith("--")})
            message += f"; options: {', '.join(options)}"
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_selection_arguments(parser: argparse.ArgumentParser) -> None:
    """The options both scripts share: where runs go, and a smoke-test shrink of every cell."""
    parser.add_argument("--root", default="runs", help="folder of the table's run directories (default: runs)")
    parser.add_argument("--seeds", type=_seeds, help="comma-separated seeds instead of the table's, e.g. 0,1,2,3")
    parser.add_argument("--limit-train", type=_positive, metavar="N",
                        help="smoke test: N training (and test) images per run (runs go to <root>/<table>-smoke-...)")
    parser.add_argument("--epochs", type=_positive, metavar="E", help="smoke test: E epochs per run")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="one more Hydra override for every cell (repeatable), e.g. model.width=4")


def selection(args: argparse.Namespace) -> dict:
    """make_plans' keyword arguments from the shared options."""
    bad = [o for o in args.override if "=" not in o]
    if bad:
        fail(f"--override {bad[0]!r}: expected KEY=VALUE, e.g. --override model.width=4")
    return {"root": args.root, "seeds": args.seeds, "shrink": Shrink(args.limit_train, args.epochs),
            "extra": tuple(args.override)}


def reproduce_command(table: str, root: str, shrink: Shrink, extra: Iterable[str], seeds=None) -> str:
    """The scripts/reproduce.py command line of a selection (without --launch)."""
    flags = [table]
    if root != "runs":
        flags += ["--root", root]
    if seeds is not None:
        flags += ["--seeds", ",".join(map(str, seeds))]
    if shrink.limit_train is not None:
        flags += ["--limit-train", str(shrink.limit_train)]
    if shrink.epochs is not None:
        flags += ["--epochs", str(shrink.epochs)]
    for override in extra:
        flags += ["--override", override]
    return "python scripts/reproduce.py " + shlex.join(flags)


def _seeds(text: str) -> tuple[int, ...]:
    parts = text.split(",")
    if not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers >= 0, e.g. 0,1,2")
    return tuple(int(p) for p in parts)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 1")
    return int(text)


def fail(message: str) -> None:
    """End a script with a one-line error."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)
