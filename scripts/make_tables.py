"""The paper's tables and figures from finished runs, beside the published numbers.

    python scripts/make_tables.py runs --table cnn --out results/tables
    python scripts/make_tables.py runs                      # every table of conf/table/
    python scripts/make_tables.py --wandb ENTITY/PROJECT --table vit --wandb-log
    make tables [RUNS=folder]

Reads every summary.json under the folders (and W&B runs with --wandb), keeps finished runs, groups
them by cell and method by the settings they recorded, and writes <out>/<table>.md, .tex and .csv
(mean ± sample std over seeds, n, the best method in bold, published values and our difference)
and figures into --figures (PNG and PDF). Missing cells show a dash and the commands that fill them.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from gnp import io, tables
from gnp.runs import first_line
from gnp.tracking import resolve_wandb_mode


def main(argv: list[str] | None = None) -> int:
    parser = tables.ArgumentParser(prog="make_tables.py", description=__doc__.split("\n")[0])
    parser.add_argument("run_dirs", nargs="*", metavar="RUN_DIR", help="folders searched for runs")
    parser.add_argument("--table", action="append", choices=tables.table_names(),
                        help="a table of conf/table/ (repeatable; default: all)")
    parser.add_argument("--out", default="results/tables", help="folder of the tables (default: results/tables)")
    parser.add_argument("--figures", default="results/figures", help="folder of the figures (default: results/figures)")
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT", help="also read the runs of this W&B project")
    parser.add_argument("--wandb-log", nargs="?", const="gnp", metavar="[ENTITY/]PROJECT",
                        help="log each table to W&B as a wandb.Table (default project: gnp)")
    tables.add_selection_arguments(parser)
    args = parser.parse_args(argv)
    if not args.run_dirs and not args.wandb:
        tables.fail("no runs to read: name a folder (e.g. runs) or --wandb ENTITY/PROJECT")

    try:
        runs = tables.read_runs(args.run_dirs)
        if args.wandb:
            runs += tables.read_wandb_runs(args.wandb)
        made = [make_table(name, runs, args) for name in args.table or tables.table_names()]
    except tables.TableError as e:
        tables.fail(str(e))
    if args.wandb_log:
        log_to_wandb(args.wandb_log, made)
    return 0


def make_table(name: str, runs: list[tables.Run], args) -> tuple[str, list[str], list[list]]:
    from gnp import figures  # matplotlib only when tables are made

    table, selection = tables.load_table(name), tables.selection(args)
    shrink = selection["shrink"]
    # A smoke test's tables, and tables of cells with extra overrides, say so in their title (row labels
    # such as "width 16" are the table's); a smoke test's files never replace the real ones.
    changes = [f"smoke test {shrink.suffix.removeprefix('-smoke-')}"] * bool(shrink) + list(selection["extra"])
    if changes:
        table = dataclasses.replace(table, title=f"{table.title} [{'; '.join(changes)}]")
    results = tables.collect(table, tables.make_plans(table, **selection), runs)
    counts = tables.describe_counts(results)
    out, stem = Path(args.out), name + shrink.suffix
    reproduce = tables.reproduce_command(name, **selection)
    io.write_text(out / f"{stem}.md", tables.render_markdown(results, counts, reproduce))
    io.write_text(out / f"{stem}.tex", tables.render_latex(results))
    io.write_text(out / f"{stem}.csv", tables.render_csv(results))
    written = []
    for (dataset, row, column), plans in tables.cell_groups(results).items():
        cells = [p.cell for p in plans.values()]
        if not any(results.runs[c] for c in cells):
            continue
        title = figure_title(results, dataset, row, column, cells)
        series = {table.methods[c.method].label: [run.metrics() for run in results.runs[c]]
                  for c in cells if results.runs[c]}
        written += figures.curves(Path(args.figures) / f"{stem}_{dataset}_{row}_{column}_curves", title, series)
    for (dataset, row, column), plans, row_values, column_values, at in tables.heatmap_grids(results):
        stats = {key: results.stat(plan.cell) for key, plan in at.items()}
        if any(s.n for s in stats.values()):
            title = figure_title(results, dataset, row, column, [p.cell for p in plans.values()])
            path = Path(args.figures) / f"{stem}_{dataset}_{row}_{column}_heatmap"
            written += figures.heatmap(path, title, *table.heatmap, row_values, column_values, stats)
    print(f"{stem}: {counts}\n  wrote {out / stem}.md, .tex, .csv" + (f" and {len(written)} figure files in "
                                                                        f"{args.figures}/" if written else ""))
    return (name, *tables.csv_rows(results))


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
