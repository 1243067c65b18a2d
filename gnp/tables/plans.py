"""The cells of a table and the runs that fill them: each method of each cell composed from the
config groups (as train.py would compose it), shrunk for a smoke test where asked, with its run
directories, its commands and the settings a run must have recorded to count for it."""
from __future__ import annotations

import json
import re
import shlex
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from gnp.schema import dotted
from gnp.console import first_line
from gnp.paths import CONF_DIR, ROOT, RUNS_DIR
from gnp.tables.spec import Table, TableError
from gnp.training import RESUMABLE_CHANGES

# A run counts for a cell only if it recorded the cell's values of these settings (prefixes), and of
# every key the table's overrides set. Where and how a run was logged does not count.
RESULT_KEYS = ("dataset.name", "dataset.limit_train", "dataset.limit_test", "model", "aug", "method", "optimizer",
               "train.epochs", "train.batch_size", "train.shards", "train.warmup_epochs", "train.label_smoothing")
NOT_RESULT_KEYS = (*RESUMABLE_CHANGES, "seed", "hydra")
SAFE_PATH = re.compile(r"^[\w./:+@-]+$")  # run directories go into Hydra overrides unquoted


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


def make_plans(table: Table, root: str | Path = RUNS_DIR, seeds: Iterable[int] | None = None, shrink: Shrink = Shrink(),
               extra: Iterable[str] = (), only: Iterable[Cell] | None = None) -> list[Plan]:
    """Every cell of `table` (or those of `only`) with its composed config and run directories under
    `root`/<table>."""
    root = Path(root).resolve()
    if not SAFE_PATH.match(str(root)):
        raise TableError(f"--root {root} contains spaces or other characters Hydra overrides cannot hold; "
                         f"choose another folder")
    seeds, extra = tuple(table.seeds if seeds is None else seeds), tuple(extra)
    base = root / (table.name + shrink.suffix)
    plans = []
    with _composer() as compose:
        defaults = compose(())
        for cell in cells(table) if only is None else only:
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


def composed(overrides: tuple[str, ...]) -> dict:
    """The flattened config of these overrides (composed once per process)."""
    if overrides not in _composed:
        with _composer() as compose:
            compose(overrides)
    return _composed[overrides]


@contextmanager
def _composer() -> Iterator[Callable[[tuple[str, ...]], dict]]:
    """Compose many configs under one Hydra initialisation, each validated as train.py would, and kept."""
    from omegaconf import OmegaConf

    from gnp.compose import composer

    with composer(validated=True) as compose:
        def compose_flat(overrides: tuple[str, ...]) -> dict:
            if overrides not in _composed:
                try:
                    cfg = compose(overrides)
                except Exception as e:  # Hydra's composition errors and ConfigError alike
                    raise TableError(f"the cell {' '.join(overrides)} does not compose: {first_line(e)}") from e
                _composed[overrides] = dotted(OmegaConf.to_container(cfg, resolve=True))
            return _composed[overrides]

        yield compose_flat


def _check_experiments(cell: Cell) -> None:
    # An optional default ignores an unknown choice silently, so `experiment=typo` would compose.
    for override in cell.overrides:
        if override.startswith("experiment=") and not (CONF_DIR / "experiment" / f"{override[11:]}.yaml").exists():
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


def display_path(path: Path) -> str:
    """Relative to the repository when inside it (commands are run from there), else absolute."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)

