"""A table's results in the paper's layout: Markdown (with the commands of its missing runs), LaTeX
(booktabs) and CSV (the same numbers, unrounded), each with its significance marks; and the
analysis table (the same grid for each quantity of the runs' analysis.json)."""
from __future__ import annotations

import csv
import io as _io
from pathlib import Path

from gnp.io import write_text

from gnp.tables.estimates import Cost
from gnp.tables.published import NOT_COVERED, published_value
from gnp.tables.quantities import analysis_options
from gnp.tables.runs import Run
from gnp.tables.spec import Source, Table, TableError
from gnp.tables.stats import (CONFIDENCE, SIGNIFICANCE, Results, Stat, Versus, best_methods, cell_format, cell_groups,
                              heatmap_grids)

DASH = "–"
DIFFERS, NOT_TESTED = "†", "n<2"        # marks of a method against its cell's best
INSIDE, OUTSIDE = "∈", "∉"              # a published value against our 95% interval


def format_stat(s: Stat, fmt: str) -> str:
    if s.n == 0:
        return DASH
    spread = f" ± {format(s.std, fmt)}" if s.std is not None else ""
    return f"{format(s.mean, fmt)}{spread} ({s.n})"


def format_published(value: float | None, ours: Stat) -> str:
    if value is None:
        return "n/a"
    diff = f" ({ours.mean - value:+.2f})" if ours.n else ""
    return f"{value:g}{diff}"


def versus_mark(versus: Versus | None) -> str:
    """"" (the best, or nothing to compare), " †" (more than seed noise), " n<2" (no test) or ""."""
    if versus is None:
        return ""
    if versus.p is None:
        return f" {NOT_TESTED}"
    return f" {DIFFERS}" if versus.differs else ""


def interval_mark(value: float | None, interval: tuple[float, float] | None, ours: Stat) -> str:
    """Whether a published value lies inside our 95% interval: " ∈", " ∉", " n<2" or ""."""
    if value is None or not ours.n:
        return ""
    if interval is None:
        return f" {NOT_TESTED}"
    return f" {INSIDE}" if interval[0] <= value <= interval[1] else f" {OUTSIDE}"


def legend(results: Results, what: str | None = None) -> str:
    """What the numbers and marks of a table mean (the same words in every format); `what`: what
    the numbers are (default: the quantity's label)."""
    t, q = results.table, results.quantity
    methods = " / ".join(m.label for m in t.methods.values())
    what = what or q.label[0].upper() + q.label[1:]
    text = (f"{what}, mean ± sample std over seeds (n seeds); each cell: {methods}. "
            f"Bold: the lowest mean of the cell. {DIFFERS}: the lowest mean is lower than this method's by more "
            f"than seed noise (Welch's t-test, unequal variances, two-sided p < {SIGNIFICANCE:g}); no mark: "
            f"within seed noise; {NOT_TESTED}: fewer than 2 seeds on one side, no test. {DASH}: no value yet.")
    if t.published and not q.in_analysis:
        text += (f" Published lines: their value (ours − theirs), {INSIDE} / {OUTSIDE} when it lies inside / "
                 f"outside our {100 * CONFIDENCE:g}% t interval of the mean (mean ± t · s/√n); n/a: not known; "
                 f"·: not in that source.")
    return text


def _columns(table: Table) -> list[tuple[str, str]]:
    return [(d, c) for d in table.datasets for c in table.columns]


def _sources_of(results: Results, row: str) -> list[Source]:
    if results.quantity.in_analysis:  # the published numbers are test errors
        return []
    return [s for s in results.table.published if s.rows is None or row in s.rows]


def render_markdown(results: Results, counts: str, reproduce: str) -> str:
    """The paper's layout; `reproduce` is the scripts/reproduce.py command line of this selection."""
    t = results.table
    lines = [f"# {t.title}", ""]
    if t.note:
        lines += [t.note, ""]
    if t.reason:
        lines += [f"**Not runnable yet**: {t.reason}.", ""]
    lines += [legend(results).replace("Bold:", "**Bold**:"), "", *_markdown_grid(results)]
    notes = _notes(t)
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    lines += ["", f"Runs: {counts}."]
    devices = results.devices(results.runs)
    if devices:
        lines.append(f"Hardware: {', '.join(devices)}.")
    layouts = results.layouts(results.runs)
    if layouts and layouts != [1]:  # one shard a step, the plain single-device step, goes without saying
        lines.append(f"Layout: {' or '.join(map(str, layouts))} shards a step (train.shards; a cell's runs share one).")
    if t.heatmap:
        lines += ["", *_markdown_heatmaps(results)]
    lines += ["", *_markdown_missing(results, reproduce)]
    return "\n".join(lines).rstrip() + "\n"


def render_analysis_markdown(results: list[Results], counts: str) -> str:
    """The analysis table: the grid of the same cells and methods for each quantity (each of
    `results` reports one), and the runs that lack each."""
    t = results[0].table
    lines = [f"# Flatness of the trained models, for the runs of: {t.title}", ""]
    if t.note:
        lines += [t.note, ""]
    what = ("Each quantity of the runs' analysis.json (`python -m gnp.analysis RUN_DIR`: on a fixed subset of the "
            "training set, with the model in evaluation mode)")
    lines += [legend(results[0], what).replace("Bold:", "**Bold**:"), ""]
    made_with, problem = analysis_settings([run for runs in results[0].runs.values() for run in runs])
    lines += [" ".join(filter(None, [made_with, problem and f"**Not comparable**: {problem}."])), ""]
    for r in results:
        lines += [f"## {r.quantity.label} (`{r.quantity.name}`)", "", *_markdown_grid(r), ""]
        lacking = [run.source for runs in r.runs.values() for run in runs if r.quantity.value(run) is None]
        if lacking:
            lines += [f"{len(lacking)} finished runs have no {r.quantity.name}:", "", "```bash",
                      "python -m gnp.analysis " + " ".join(lacking), "```", ""]
    lines += [f"Runs: {counts}."]
    devices = results[0].devices(results[0].runs)
    if devices:
        lines.append(f"Hardware of the training runs: {', '.join(devices)}.")
    return "\n".join(lines).rstrip() + "\n"


def analysis_settings(runs: list[Run]) -> tuple[str, str | None]:
    """What the analyses of `runs` were made with, and the problem when they were made with other
    options (their values do not compare) or some did not record theirs."""
    shared, differing, unrecorded = analysis_options(runs)
    made_with = f"Analysed with `python -m gnp.analysis {' '.join(shared)}`." if shared else ""
    problems = [f"{option} " + ", ".join(f"{value} ({_runs(n)})" for value, n in counter.most_common())
                for option, counter in differing.items()]
    if unrecorded:
        problems.append(f"{_runs(unrecorded)} recorded no settings in analysis.json")
    if not problems:
        return made_with, None
    return made_with, (f"the analyses were made with other options: {'; '.join(problems)}; analyse every run "
                       f"with the same ones (python -m gnp.analysis redoes a run analysed with other settings)")


def _runs(n: int) -> str:
    return f"{n} run" if n == 1 else f"{n} runs"


def _markdown_grid(results: Results) -> list[str]:
    t, grid = results.table, cell_groups(results)
    header = ["Model", ""] + [f"{t.datasets[d]} {t.columns[c]}" for d, c in _columns(t)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in t.rows.values():
        ours = [row.label, "ours"]
        for d, c in _columns(t):
            plans = grid.get((d, row.key, c))
            best = best_methods(results, d, row.key, c) if plans else set()
            fmt = cell_format(results, d, row.key, c)
            ours.append(" / ".join(_bold_md(format_stat(results.stat(p.cell), fmt), m in best)
                                   + versus_mark(results.versus_best(p.cell)) for m, p in plans.items())
                        if plans else "")
        lines.append("| " + " | ".join(ours) + " |")
        for source in _sources_of(results, row.key):
            line = ["", source.label]
            for d, c in _columns(t):
                plans = grid.get((d, row.key, c))
                line.append(" / ".join(_published_md(source, results, p.cell) for p in plans.values())
                            if plans else "")
            lines.append("| " + " | ".join(line) + " |")
    return lines


def _published_md(source: Source, results: Results, cell) -> str:
    value = published_value(source, cell)
    if value is NOT_COVERED:
        return "·"
    ours = results.stat(cell)
    return format_published(value, ours) + interval_mark(value, results.interval(cell), ours)


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
        fmt = cell_format(results, d, r, c)
        lines += [f"## {t.datasets[d]}, {t.rows[r].label}, {t.columns[c]}: {t.heatmap[0]} (rows) x {t.heatmap[1]} "
                  f"(columns)", "", "| | " + " | ".join(f"{v:g}" for v in col_values) + " |",
                  "|---|" + "---|" * len(col_values)]
        for rv in row_values:
            lines.append(f"| {rv:g} | " + " | ".join(format_stat(results.stat(at[rv, cv].cell), fmt)
                                                     if (rv, cv) in at else "" for cv in col_values) + " |")
        lines.append("")
    return lines


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
           rf"\caption{{{_tex(t.title)}. {_tex(legend(results))}}}",
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
        cells = [_tex(row.label), "ours"]
        for d, c in columns:
            plans = grid.get((d, row.key, c), {})
            best = best_methods(results, d, row.key, c) if plans else set()
            fmt = cell_format(results, d, row.key, c)
            for m in methods:
                if m.key not in plans:
                    cells.append("")
                    continue
                text = _tex(format_stat(results.stat(plans[m.key].cell), fmt))
                cells.append((rf"\textbf{{{text}}}" if m.key in best else text)
                             + _tex(versus_mark(results.versus_best(plans[m.key].cell))))
        out.append(" & ".join(cells) + r" \\")
        for source in _sources_of(results, row.key):
            cells = ["", _tex(source.label)]
            for d, c in columns:
                plans = grid.get((d, row.key, c), {})
                for m in methods:
                    value = published_value(source, plans[m.key].cell) if m.key in plans else NOT_COVERED
                    cells.append("" if value is NOT_COVERED else _tex(_published_md(source, results,
                                                                                    plans[m.key].cell)))
            out.append(" & ".join(cells) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}}", r"\end{table}"]
    return "\n".join(out) + "\n"


def _tex(text: str) -> str:
    text = text.replace("\\", r"\textbackslash{}")
    for char in "&%$#_{}":
        text = text.replace(char, "\\" + char)
    for plain, tex in (("–", "--"), ("−", "-"), ("±", r"$\pm$"), ("α", r"$\alpha$"), ("θ", r"$\theta$"),
                       ("∇", r"$\nabla$"), ("‖", r"$\|$"), ("√", r"$\surd$"), ("†", r"$^\dagger$"),
                       ("∈", r"$\in$"), ("∉", r"$\notin$"), ("<", r"$<$")):
        text = text.replace(plain, tex)
    return text


def csv_rows(results: Results) -> tuple[list[str], list[list]]:
    """One row per method and cell: the numbers of the Markdown and LaTeX tables, unrounded, with the
    p-value against the cell's best and our 95% interval."""
    t = results.table
    sources = list(dict.fromkeys(s.file for s in t.published)) if not results.quantity.in_analysis else []
    header = ["table", "quantity", "model", "dataset", "column", "aug", "method", "mean", "std", "n", "best",
              "p_vs_best", "differs_from_best", "ci95_low", "ci95_high", "device"]
    header += [name for s in sources for name in (s, f"{s}_diff", f"{s}_in_ci95")]
    rows = []
    for plan in results.plans:
        c = plan.cell
        s, versus, interval = results.stat(c), results.versus_best(c), results.interval(c)
        best = c.method in best_methods(results, c.dataset, c.row, c.column)
        differs = "" if versus is None else NOT_TESTED if versus.p is None else versus.differs
        row = [t.name, results.quantity.name, c.row, c.dataset, c.column,
               plan.config["aug.name"] if plan.config else (c.aug or c.column), c.method, s.mean, s.std, s.n, best,
               versus.p if versus else None, differs, *(interval or (None, None)), ";".join(results.devices([c]))]
        for file in sources:
            values = [published_value(src, c) for src in t.published if src.file == file]
            value = next((v for v in values if v is not NOT_COVERED), NOT_COVERED)
            if value is NOT_COVERED:
                row += ["", "", ""]
            elif value is None:
                row += ["n/a", "", ""]
            else:
                inside = interval_mark(value, interval, s).strip()
                row += [value, s.mean - value if s.n else "", {INSIDE: True, OUTSIDE: False}.get(inside, inside)]
        rows.append(["" if v is None else v for v in row])
    return header, rows


def render_csv(results: Results | list[Results]) -> str:
    """The CSV of a table, or of an analysis table (one block of rows per quantity)."""
    blocks = [csv_rows(r) for r in (results if isinstance(results, list) else [results])]
    buffer = _io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(blocks[0][0])
    for _, rows in blocks:
        writer.writerows(rows)
    return buffer.getvalue()


def finished_counts(csv_text: str) -> tuple[int, int]:
    """(cells with a finished run, finished runs) of a table's CSV; for comparing a table with the
    file it would replace."""
    rows = list(csv.DictReader(_io.StringIO(csv_text)))
    ns = [int(row["n"]) for row in rows]
    return sum(n > 0 for n in ns), sum(ns)


def cost_markdown(costs: list[tuple[str, int, Cost]]) -> str:
    """The cost table of docs/tables.md: per table (name, runs, the Cost of all its runs), the GPU-hours
    extrapolated from measured step times and the upper bounds from start-up epochs, on what, and
    what is unknown."""
    lines = ["| table | runs | hours (measured step times, extrapolated) | at most (from a start-up epoch) | "
             "unknown |", "|---|---|---|---|---|"]
    for name, runs, cost in costs:
        def hours(upper: bool) -> str:
            spent = [(device, h) for (device, bound), h in sorted(cost.hours.items()) if bound == upper]
            return "; ".join(f"{h:,.1f} {'h' if device.startswith('cpu') else 'GPU-hours'} on {device}"
                             for device, h in spent) or "–"
        unknown = "; ".join(f"{n} runs: {why}" for why, n in sorted(cost.unknown_runs.items())) or "–"
        lines.append(f"| `{name}` | {runs} | {hours(False)} | {hours(True)} | {unknown} |")
    return "\n".join(lines)


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """The lines of a Markdown table."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def replace_marked(text: str, begin: str, end: str, block: str, name: str = "the text") -> str:
    """`text` (of the file `name`) with what lies between the lines `begin` and `end` replaced by `block`."""
    start, stop = text.find(begin + "\n"), text.find("\n" + end)
    if start < 0 or stop < start:
        raise TableError(f"{name} has no {begin!r} and {end!r} lines around the block to generate")
    return text[: start + len(begin) + 1] + block + text[stop:]


def rewrite_marked(path: Path, begin: str, end: str, block: str) -> bool:
    """Replace what lies between the lines `begin` and `end` of the file at `path` by `block` (an atomic
    write, only when it differs); whether it changed."""
    text = path.read_text()
    updated = replace_marked(text, begin, end, block, str(path))
    if updated != text:
        write_text(path, updated)
    return updated != text


def marked(text: str, begin: str, end: str) -> str:
    """What lies between the lines `begin` and `end` of `text` ("" without them)."""
    start, stop = text.find(begin + "\n"), text.find("\n" + end)
    return text[start + len(begin) + 1: stop] if 0 <= start < stop else ""
