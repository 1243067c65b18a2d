"""Finished runs grouped by cell and method, and their statistics over seeds."""
from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass
from typing import Iterable

from gnp.tables.plans import Cell, Plan
from gnp.tables.runs import TEST_ERROR, Run, matches
from gnp.tables.spec import Table


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
    ignored: Counter                  # unfinished runs by status, diverged and unreadable ones
    unreadable: list[str]             # each unreadable run's damaged file and what is wrong with it
    duplicates: int                   # finished runs of a seed already counted (e.g. a folder and W&B)
    other: int                        # finished runs that are in no cell of this table
    other_seeds: int                  # finished runs of a cell, of a seed the table (or --seeds) does not list

    def stat(self, cell: Cell) -> Stat:
        return stat([run.summary[TEST_ERROR] for run in self.runs[cell]])

    def devices(self, cells: Iterable[Cell]) -> list[str]:
        return sorted({str(run.summary.get("device")) for cell in cells for run in self.runs[cell]})


def collect(table: Table, plans: list[Plan], runs: Iterable[Run]) -> Results:
    by_cell: dict[Cell, list[Run]] = {plan.cell: [] for plan in plans}
    ignored, unreadable, duplicates, other, other_seeds = Counter(), [], 0, 0, 0
    runnable = [plan for plan in plans if plan.expected is not None]
    for run in runs:
        if run.status != "finished":
            ignored[run.status] += 1
            if run.problem:
                unreadable.append(run.problem)
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
    return Results(table, plans, by_cell, ignored, unreadable, duplicates, other, other_seeds)


def describe_counts(results: Results) -> str:
    """How many runs the table uses, and every run it leaves out, by reason (damaged files named)."""
    used = sum(len(r) for r in results.runs.values())
    left_out = []
    unfinished = {s: n for s, n in results.ignored.items() if s not in ("diverged", "unreadable")}
    if unfinished:
        parts = ", ".join(f"{n} {s}" for s, n in sorted(unfinished.items()))
        left_out.append(f"{sum(unfinished.values())} not finished ({parts})")
    if results.ignored["diverged"]:
        left_out.append(f"{results.ignored['diverged']} diverged")
    if results.unreadable:
        left_out.append(f"{len(results.unreadable)} unreadable ({'; '.join(results.unreadable)})")
    text = f"{used} finished runs used" + (f"; left out: {', '.join(left_out)}" if left_out else "")
    if results.duplicates:
        text += f"; {results.duplicates} duplicate runs of a seed already counted"
    if results.other:
        text += f"; {results.other} finished runs belong to no cell of this table"
    if results.other_seeds:
        text += f"; {results.other_seeds} finished runs of seeds this table does not list (--seeds adds them)"
    return text


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


def heatmap_grids(results: Results):
    """For each cell of a heatmap table: its plans arranged by the two heatmap keys."""
    t = results.table
    if not t.heatmap:
        return
    for key, plans in cell_groups(results).items():
        at = {(p.config[t.heatmap[0]], p.config[t.heatmap[1]]): p for p in plans.values() if p.config}
        if at:
            yield key, plans, sorted({k[0] for k in at}), sorted({k[1] for k in at}), at

