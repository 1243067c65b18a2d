"""A table's results in the paper's layout: Markdown (with the commands of its missing runs), LaTeX
(booktabs) and CSV (the same numbers, unrounded)."""
from __future__ import annotations

import csv
import io as _io

from gnp.tables.published import NOT_COVERED, published_value
from gnp.tables.spec import Source, Table
from gnp.tables.stats import Results, Stat, best_methods, cell_groups, heatmap_grids


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
                values = [(published_value(source, p.cell), results.stat(p.cell)) for p in (plans or {}).values()]
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
                    value = published_value(source, plans[m.key].cell) if m.key in plans else NOT_COVERED
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
            values = [published_value(src, c) for src in t.published if src.file == file]
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


def finished_counts(csv_text: str) -> tuple[int, int]:
    """(cells with a finished run, finished runs) of a table's CSV; for comparing a table with the
    file it would replace."""
    rows = list(csv.DictReader(_io.StringIO(csv_text)))
    ns = [int(row["n"]) for row in rows]
    return sum(n > 0 for n in ns), sum(ns)
