"""The paper's tables and figures from finished runs, beside the published numbers.

    python scripts/make_tables.py runs --table cnn --out results/tables
    python scripts/make_tables.py runs                      # every table of conf/table/
    python scripts/make_tables.py --wandb ENTITY/PROJECT --table vit --wandb-log
    python scripts/make_tables.py runs/digits --table digits --analysis    # + flatness (analysis.json)
    make tables [RUNS=folder]

Reads every run folder under the folders (and W&B runs with --wandb), keeps finished runs (a damaged
file leaves its run out, with one warning line), groups them by cell and method by the settings they
recorded, and writes <out>/<table>.md, .tex and .csv (mean ± sample std over seeds, n, the best
method in bold, published values and our difference) and figures into --figures (PNG and PDF).
Missing cells show a dash and the commands that fill them; each method is marked against its cell's
best (Welch's t-test) and each published value against our 95% interval. A table no finished run
counts for, or one with fewer finished cells or runs than the file it would replace, is not written
(--force). --analysis adds <table>-analysis.* with the quantities of the runs' analysis.json, and
per cell the figures of those quantities and of the Hessian's spectral densities of its runs.
"""
from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from pathlib import Path

from gnp import io, tables
from gnp.console import first_line
from gnp.tracking import resolve_wandb_mode


def main(argv: list[str] | None = None) -> int:
    parser = tables.ArgumentParser(prog="make_tables.py", description=__doc__.split("\n")[0])
    parser.add_argument("run_dirs", nargs="*", metavar="RUN_DIR", help="folders searched for runs")
    parser.add_argument("--table", action="append", choices=tables.table_names(),
                        help="a table of conf/table/ (repeatable; default: all)")
    parser.add_argument("--out", default="results/tables", help="folder of the tables (default: results/tables)")
    parser.add_argument("--figures", default="results/figures", help="folder of the figures (default: results/figures)")
    parser.add_argument("--force", action="store_true",
                        help="write a table even if it has no finished run, or fewer finished cells or runs than "
                             "the file it replaces")
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT", help="also read the runs of this W&B project")
    parser.add_argument("--wandb-log", nargs="?", const="gnp", metavar="[ENTITY/]PROJECT",
                        help="log each table to W&B as a wandb.Table (default project: gnp)")
    parser.add_argument("--analysis", action="store_true",
                        help="also the analysis table <table>-analysis.* and a scatter figure of test error against "
                             "each quantity of the runs' analysis.json (python -m gnp.analysis)")
    parser.add_argument("--quantity", action="append", type=_quantities, metavar="NAME[,NAME]",
                        help="the analysis quantities (repeatable; implies --analysis; default: those the runs have): "
                             + ", ".join(tables.ANALYSIS_QUANTITIES))
    tables.add_selection_arguments(parser)
    args = parser.parse_args(argv)
    if not args.run_dirs and not args.wandb:
        tables.fail("no runs to read: name a folder (e.g. runs) or --wandb ENTITY/PROJECT")
    args.quantity = list(dict.fromkeys(q for qs in args.quantity or () for q in qs))
    args.analysis = args.analysis or bool(args.quantity)

    try:
        runs = tables.read_runs(args.run_dirs)
        if args.wandb:
            runs += tables.read_wandb_runs(args.wandb)
        if not runs:
            where = ", ".join([*args.run_dirs, *([f"W&B {args.wandb}"] if args.wandb else [])])
            warn(f"found no runs in {where} (a run is a folder with summary.json, checkpoint.pt or metrics.jsonl); "
                 f"nothing written")
            return 1
        for run in runs:
            if run.problem:
                warn(f"{run.problem}; the run is left out")
            if run.analysis_problem and args.analysis:
                warn(f"{run.analysis_problem}; the run's analysis quantities are left out")
        made = [m for m in (make_table(name, runs, args) for name in args.table or tables.table_names()) if m]
    except (tables.TableError, io.OutputError) as e:  # a table or figure that cannot be written, too
        tables.fail(str(e))
    if args.wandb_log and made:
        log_to_wandb(args.wandb_log, made)
    return 0 if made else 1


def make_table(name: str, runs: list[tables.Run], args) -> tuple[str, list[str], list[list]] | None:
    """Write one table and its figures (and its analysis table with --analysis); the table's CSV
    rows, or None when it is not written (the warning says why)."""
    table, selection = tables.load_table(name), tables.selection(args)
    shrink = selection["shrink"]
    # A smoke test's tables, and tables of cells with extra overrides, say so in their title (row labels
    # such as "width 16" are the table's); a smoke test's files never replace the real ones.
    changes = [f"smoke test {shrink.suffix.removeprefix('-smoke-')}"] * bool(shrink) + list(selection["extra"])
    if changes:
        table = dataclasses.replace(table, title=f"{table.title} [{'; '.join(changes)}]")
    plans = tables.make_plans(table, **selection)
    results = tables.collect(table, plans, runs)
    counts = tables.describe_counts(results)
    stem = name + shrink.suffix
    if not any(results.runs.values()) and not args.force:
        warn(f"{stem}: no finished run counts for this table, nothing written ({counts})"
             + matching_hint(table, plans, runs, selection))
        return None
    reproduce = tables.reproduce_command(name, **selection)
    written = write_table(stem, args, tables.render_markdown(results, counts, reproduce),
                          tables.render_latex(results), tables.render_csv(results))
    if written:
        figures = table_figures(results, stem, Path(args.figures))
        print(f"{stem}: {counts}\n  wrote {written}" + (f" and {len(figures)} figure files in {args.figures}/"
                                                         if figures else ""))
    if args.analysis:
        make_analysis(results, stem, counts, args)
    return (name, *tables.csv_rows(results)) if written else None


def write_table(stem: str, args, md: str, tex: str, csv_text: str) -> str | None:
    """Write <out>/<stem>.md, .tex and .csv unless that would lose results (then warn); what was
    written, or None."""
    out = Path(args.out)
    if not args.force and (refusal := would_lose(out / f"{stem}.csv", csv_text)):
        warn(f"{stem}: not written: {refusal}; --force replaces it")
        return None
    for suffix, text in (("md", md), ("tex", tex), ("csv", csv_text)):
        io.write_text(out / f"{stem}.{suffix}", text)
    return f"{out / stem}.md, .tex, .csv"


def table_figures(results: tables.Results, stem: str, folder: Path) -> list[Path]:
    """Per cell: the curves of its methods; for a sweep (a table with a heatmap): the heatmap of test
    error and the gradient norm per epoch, one line per value of the sweep's first setting."""
    from gnp import figures  # matplotlib only when tables are made

    table, written = results.table, []
    for (dataset, row, column), plans in tables.cell_groups(results).items():
        cells = [p.cell for p in plans.values()]
        if not any(results.runs[c] for c in cells):
            continue
        title = figure_title(results, dataset, row, column, cells)
        series = {table.methods[c.method].label: [run.metrics() for run in results.runs[c]]
                  for c in cells if results.runs[c]}
        written += figures.curves(folder / f"{stem}_{dataset}_{row}_{column}_curves", title, series)
    for (dataset, row, column), plans, row_values, column_values, at in tables.heatmap_grids(results):
        stats = {key: results.stat(plan.cell) for key, plan in at.items()}
        if not any(s.n for s in stats.values()):
            continue
        title = figure_title(results, dataset, row, column, [p.cell for p in plans.values()])
        base = f"{stem}_{dataset}_{row}_{column}"
        written += figures.heatmap(folder / f"{base}_heatmap", title, *table.heatmap, row_values, column_values,
                                   stats)
        norms: dict = {}
        for (row_value, column_value), plan in at.items():
            if results.runs[plan.cell]:
                norms.setdefault(column_value, {})[row_value] = [run.metrics() for run in results.runs[plan.cell]]
        written += figures.gradient_norms(folder / f"{base}_g1_norm", title, *table.heatmap, norms)
    return written


def make_analysis(results: tables.Results, stem: str, counts: str, args) -> None:
    """<stem>-analysis.{md,tex,csv}: the same cells for each analysis quantity, and per cell a scatter
    of test error against each quantity, one point per run, and the Hessian's spectral densities of its
    runs that have one (python -m gnp.analysis --density), the methods overlaid."""
    from gnp import figures

    runs = [run for cell_runs in results.runs.values() for run in cell_runs]
    names = args.quantity or [n for n in tables.ANALYSIS_QUANTITIES if any((r.analysis or {}).get(n) is not None
                                                                           for r in runs)]
    if not names:
        warn(f"{stem}: none of its {len(runs)} finished runs has an analysis.json; no analysis table written "
             f"(python -m gnp.analysis RUN_DIR ... computes them)")
        return
    per_quantity = [results.of(tables.ANALYSIS_QUANTITIES[n]) for n in names]
    if not any(r.stat(c).n for r in per_quantity for c in r.runs) and not args.force:
        warn(f"{stem}: no finished run has {', '.join(names)} in its analysis.json; no analysis table written")
        return
    _, problem = tables.analysis_settings(runs)
    if problem:
        warn(f"{stem}-analysis: {problem}")
    written = write_table(f"{stem}-analysis", args, tables.render_analysis_markdown(per_quantity, counts),
                          "\n".join(tables.render_latex(r) for r in per_quantity), tables.render_csv(per_quantity))
    if not written:
        return
    paths = []
    for (dataset, row, column), plans in tables.cell_groups(results).items():
        cells = [p.cell for p in plans.values()]
        panels = []
        for r in per_quantity:
            points = {results.table.methods[c.method].label: [
                (r.quantity.value(run), results.quantity.value(run)) for run in results.runs[c]
                if r.quantity.value(run) is not None] for c in cells}
            panels.append((r.quantity.label, {m: xy for m, xy in points.items() if xy}))
        if any(points for _, points in panels):
            title = figure_title(results, dataset, row, column, cells)
            paths += figures.scatter(Path(args.figures) / f"{stem}_{dataset}_{row}_{column}_flatness", title,
                                     [(label, points) for label, points in panels if points])
        densities = {results.table.methods[c.method].label: [d for run in results.runs[c]
                                                             if (d := tables.hessian_density(run))] for c in cells}
        if any(densities.values()):
            title = figure_title(results, dataset, row, column, cells)
            paths += figures.densities(Path(args.figures) / f"{stem}_{dataset}_{row}_{column}_density", title,
                                       {method: curves for method, curves in densities.items() if curves})
    print(f"{stem}-analysis: {', '.join(names)}\n  wrote {written}"
          + (f" and {len(paths)} figure files in {args.figures}/" if paths else ""))


def _quantities(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in tables.ANALYSIS_QUANTITIES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown quantity {', '.join(unknown) or repr(text)}; choose from "
                                         f"{', '.join(tables.ANALYSIS_QUANTITIES)}")
    return names


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def matching_hint(table: tables.Table, plans: list[tables.Plan], runs: list[tables.Run], selection: dict) -> str:
    """"; N of them would count with: FLAGS" when other options would match finished runs found."""
    found = tables.matching_options(table, plans, runs, **selection)
    if found is None:
        return ""
    n, options = found
    flags = tables.selection_flags(options["shrink"], options["extra"], options["seeds"])
    current = tables.selection_flags(selection["shrink"], selection["extra"], selection["seeds"])
    dropped = [flag for flag in current if flag.startswith("--") and flag not in flags]
    without = f" (without {', '.join(dict.fromkeys(dropped))})" if dropped else ""
    return f"; {n} of the finished runs found would count with: {shlex.join(flags) or 'no options'}{without}"


def would_lose(path: Path, new_csv: str) -> str | None:
    """Why the table at `path` (its CSV) must not be replaced by `new_csv`: it holds more finished
    cells or runs, or what it holds cannot be told. None: it may be replaced."""
    siblings = [path.with_suffix(s) for s in (".md", ".tex", ".csv")]
    if not any(p.exists() for p in siblings):
        return None
    try:
        old = tables.finished_counts(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, KeyError) as e:
        return f"cannot tell how many finished cells {path} holds ({first_line(e)})"
    new = tables.finished_counts(new_csv)
    if new[0] < old[0] or new[1] < old[1]:
        return (f"{path} holds {old[0]} finished cells ({old[1]} runs), these runs give {new[0]} ({new[1]} runs)")
    return None


def figure_title(results: tables.Results, dataset: str, row: str, column: str, cells: list[tables.Cell]) -> str:
    t = results.table
    seeds = sorted({len(results.runs[c]) for c in cells if results.runs[c]})
    n = f"{seeds[0]}" if len(seeds) == 1 else f"{seeds[0]}-{seeds[-1]}"
    n += " seed" if seeds == [1] else " seeds"
    return (f"{t.title}\n{t.datasets[dataset]} · {t.rows[row].label} · {t.columns[column]} · "
            f"{n} per method · {', '.join(results.devices(cells))}")


def log_to_wandb(project_path: str, made: list[tuple[str, list[str], list[list]]]) -> None:
    import wandb

    entity, _, project = project_path.rpartition("/")
    mode = resolve_wandb_mode("auto")
    try:
        run = wandb.init(project=project, entity=entity or None, job_type="tables", name="tables", mode=mode)
        run.log({f"tables/{name}": wandb.Table(columns=header, data=rows, allow_mixed_types=True)
                 for name, header, rows in made})
        run.finish()
    except (wandb.errors.Error, OSError, TimeoutError) as e:
        tables.fail(f"W&B could not log the tables ({first_line(e)}); check the network and `wandb login`")
    where = "" if mode == "online" else f" offline (upload with: wandb sync {run.dir.removesuffix('/files')})"
    print(f"logged {len(made)} tables to W&B project {project_path}{where}")


if __name__ == "__main__":
    sys.exit(main())
