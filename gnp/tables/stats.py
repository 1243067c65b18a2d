"""Finished runs grouped by cell and method, and their statistics over seeds: mean ± sample std,
whether the best method of a cell is better than each other one by more than seed noise (Welch's
t-test), and the 95% t interval of a mean (is a published value inside it?)."""
from __future__ import annotations

import dataclasses
import math
import statistics
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Iterable

from gnp.rundir import Status
from gnp.tables.plans import Cell, Plan
from gnp.tables.quantities import TEST_ERROR_QUANTITY, Quantity
from gnp.tables.runs import SHARDS, Run, matches, run_shards
from gnp.tables.spec import Table

SIGNIFICANCE = 0.05                   # two-sided p below this: more than seed noise
CONFIDENCE = 0.95                     # of the t interval of a mean


@dataclass(frozen=True)
class Stat:
    mean: float | None
    std: float | None                 # sample standard deviation over seeds; None when n < 2
    n: int


def stat(values: list[float]) -> Stat:
    if not values:
        return Stat(None, None, 0)
    return Stat(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None, len(values))


def welch_p(a: list[float], b: list[float]) -> float | None:
    """Two-sided p-value of Welch's t-test (unequal variances) of the means of a and b; None when
    either has fewer than 2 values. Without any spread on both sides a difference is certain."""
    if len(a) < 2 or len(b) < 2:
        return None
    if statistics.variance(a) == statistics.variance(b) == 0:
        return 1.0 if statistics.fmean(a) == statistics.fmean(b) else 0.0
    from scipy.stats import ttest_ind  # scipy comes with scikit-learn

    with warnings.catch_warnings():  # one side without spread (equal values) is exact, not a precision loss
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(ttest_ind(a, b, equal_var=False).pvalue)


def t_interval(values: list[float]) -> tuple[float, float] | None:
    """The 95% t interval of the mean, mean ± t(0.975, n - 1) · s / √n; None when n < 2."""
    if len(values) < 2:
        return None
    from scipy.stats import t

    mean, half = statistics.fmean(values), 0.0
    if statistics.stdev(values) > 0:
        half = float(t.ppf(0.5 + CONFIDENCE / 2, len(values) - 1)) * statistics.stdev(values) / math.sqrt(len(values))
    return mean - half, mean + half


@dataclass(frozen=True)
class Versus:
    """One method of a cell against the cell's best (the lowest mean)."""
    p: float | None                   # Welch's p-value; None: n < 2 on one side
    best: str                         # the best method's key

    @property
    def differs(self) -> bool | None:
        return None if self.p is None else self.p < SIGNIFICANCE


@dataclass
class Results:
    table: Table
    plans: list[Plan]
    runs: dict[Cell, list[Run]]       # finished runs of each cell, one per seed
    ignored: Counter                  # unfinished runs by status, diverged and unreadable ones
    unreadable: list[str]             # each unreadable run's damaged file and what is wrong with it
    duplicates: int                   # finished runs of a seed already counted (e.g. a folder and W&B)
    other: int                        # finished runs that are in no cell of this table
    other_seeds: int                  # finished runs of a cell, of a seed the table (or --seeds) does not list
    other_layouts: Counter            # finished runs of a cell made with other train.shards, by their shards
    quantity: Quantity = TEST_ERROR_QUANTITY

    def of(self, quantity: Quantity) -> Results:
        """The same runs, reporting another quantity."""
        return dataclasses.replace(self, quantity=quantity)

    def values(self, cell: Cell) -> list[float]:
        """The quantity of each finished run of the cell that has it."""
        return [v for v in map(self.quantity.value, self.runs[cell]) if v is not None]

    def stat(self, cell: Cell) -> Stat:
        return stat(self.values(cell))

    def interval(self, cell: Cell) -> tuple[float, float] | None:
        return t_interval(self.values(cell))

    def versus_best(self, cell: Cell) -> Versus | None:
        """The cell's method against the best of its cell; None for the best itself, and when fewer
        than 2 methods of the cell have values."""
        group = {p.cell.method: p.cell for p in self.plans
                 if (p.cell.dataset, p.cell.row, p.cell.column) == (cell.dataset, cell.row, cell.column)}
        means = {m: self.stat(c).mean for m, c in group.items() if self.stat(c).n}
        if len(means) < 2 or cell.method not in means:
            return None
        best = min(means, key=means.get)
        if best == cell.method:
            return None
        return Versus(welch_p(self.values(group[best]), self.values(cell)), best)

    def devices(self, cells: Iterable[Cell]) -> list[str]:
        return sorted({str(run.summary.get("device")) for cell in cells for run in self.runs[cell]})

    def layouts(self, cells: Iterable[Cell]) -> list[int]:
        """The shards of a step (train.shards) of the cells' runs."""
        return sorted({run_shards(run) for cell in cells for run in self.runs[cell]})


def collect(table: Table, plans: list[Plan], runs: Iterable[Run], quantity: Quantity = TEST_ERROR_QUANTITY) -> Results:
    """The finished runs of each cell: one run a seed, of one layout. A cell whose plan fixes train.shards
    takes that layout; one whose plan says auto, the layout most of its runs have (the fewer shards on a
    tie). Runs of a cell's other layouts are counted apart, never pooled with it."""
    by_cell: dict[Cell, list[Run]] = {plan.cell: [] for plan in plans}
    ignored, unreadable, duplicates, other, other_seeds, other_layouts = Counter(), [], 0, 0, 0, Counter()
    runnable = [plan for plan in plans if plan.expected is not None]
    for run in runs:
        if run.status != Status.FINISHED:
            ignored[run.status] += 1
            if run.problem:
                unreadable.append(run.problem)
            continue
        plan = next((p for p in runnable if not matches(run, p, layout=False)), None)
        if plan is None:
            other += 1
        elif run.seed not in plan.seeds:
            other_seeds += 1
        else:
            by_cell[plan.cell].append(run)
    for plan in runnable:
        layouts = Counter(map(run_shards, by_cell[plan.cell]))
        wanted = plan.expected.get(SHARDS, "auto")
        if wanted == "auto" and layouts:
            wanted = min(layouts, key=lambda shards: (-layouts[shards], shards))
        kept = []
        for run in by_cell[plan.cell]:
            if run_shards(run) != wanted:
                other_layouts[run_shards(run)] += 1
            elif any(r.seed == run.seed for r in kept):
                duplicates += 1
            else:
                kept.append(run)
        by_cell[plan.cell] = kept
    return Results(table, plans, by_cell, ignored, unreadable, duplicates, other, other_seeds, other_layouts, quantity)


def describe_counts(results: Results) -> str:
    """How many runs the table uses, and every run it leaves out, by reason (damaged files named)."""
    used = sum(len(r) for r in results.runs.values())
    left_out = []
    unfinished = {s: n for s, n in results.ignored.items() if s not in (Status.DIVERGED, "unreadable")}
    if unfinished:
        parts = ", ".join(f"{n} {s}" for s, n in sorted(unfinished.items()))
        left_out.append(f"{sum(unfinished.values())} not finished ({parts})")
    if results.ignored[Status.DIVERGED]:
        left_out.append(f"{results.ignored[Status.DIVERGED]} diverged")
    if results.unreadable:
        left_out.append(f"{len(results.unreadable)} unreadable ({'; '.join(results.unreadable)})")
    text = f"{used} finished runs used" + (f"; left out: {', '.join(left_out)}" if left_out else "")
    if results.duplicates:
        text += f"; {results.duplicates} duplicate runs of a seed already counted"
    if results.other:
        text += f"; {results.other} finished runs belong to no cell of this table"
    if results.other_seeds:
        text += f"; {results.other_seeds} finished runs of seeds this table does not list (--seeds adds them)"
    if results.other_layouts:
        layouts = ", ".join(f"train.shards={shards}: {n}" for shards, n in sorted(results.other_layouts.items()))
        text += (f"; {sum(results.other_layouts.values())} finished runs of another layout than their cell's, counted "
                 f"apart ({layouts})")
    return text


def best_methods(results: Results, dataset: str, row: str, column: str) -> set[str]:
    """The methods of a cell with the lowest mean (at the printed precision); none when < 2 have runs."""
    shown = {p.cell.method: results.stat(p.cell) for p in results.plans
             if (p.cell.dataset, p.cell.row, p.cell.column) == (dataset, row, column)}
    fmt = cell_format(results, dataset, row, column)
    means = {m: float(format(s.mean, fmt)) for m, s in shown.items() if s.n}
    if len(means) < 2:
        return set()
    low = min(means.values())
    return {m for m, v in means.items() if v == low}


def cell_format(results: Results, dataset: str, row: str, column: str) -> str:
    """How a cell's means and stds are printed, the same for each of its methods: the quantity's own format,
    else fixed decimals that show the cell's smallest positive std to 2 significant digits, and never more
    than 4 significant digits of its largest mean (3 when no std is positive)."""
    if results.quantity.fmt is not None:
        return results.quantity.fmt
    stats = [results.stat(p.cell) for p in results.plans if (p.cell.dataset, p.cell.row, p.cell.column)
             == (dataset, row, column) and results.stat(p.cell).n]
    largest = max((abs(s.mean) for s in stats if s.mean), default=0.0)
    stds = [s.std for s in stats if s.std]
    decimals = [1 - math.floor(math.log10(min(stds)))] if stds else []
    if largest:
        decimals.append((3 if stds else 2) - math.floor(math.log10(largest)))
    return f".{max(min(decimals, default=2), 0)}f"


def cell_groups(results: Results) -> dict[tuple[str, str, str], dict[str, Plan]]:
    """(dataset, row, column) -> method -> plan, in table order."""
    grid: dict[tuple[str, str, str], dict[str, Plan]] = {}
    for plan in results.plans:
        c = plan.cell
        grid.setdefault((c.dataset, c.row, c.column), {})[c.method] = plan
    return grid


def heatmap_grids(results: Results):
    """For each cell of a heatmap table: its plans arranged by the two heatmap keys."""
    t = results.table
    if not t.heatmap:
        return
    for key, plans in cell_groups(results).items():
        at = {(p.config[t.heatmap[0]], p.config[t.heatmap[1]]): p for p in plans.values() if p.config}
        if at:
            yield key, plans, sorted({k[0] for k in at}), sorted({k[1] for k in at}), at

