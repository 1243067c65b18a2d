"""The paper's tables and figures from finished runs, beside the published numbers.

    python scripts/make_tables.py runs --table cnn --out results/tables
    python scripts/make_tables.py runs                      # every table of conf/table/
    python scripts/make_tables.py --wandb ENTITY/PROJECT --table vit --wandb-log
    make tables [RUNS=folder]

Reads every run folder under the folders (and W&B runs with --wandb), keeps finished runs (a damaged
file leaves its run out, with one warning line), groups them by cell and method by the settings they
recorded, and writes <out>/<table>.md, .tex and .csv (mean ± sample std over seeds, n, the best
method in bold, published values and our difference) and figures into --figures (PNG and PDF).
Missing cells show a dash and the commands that fill them. A table no finished run counts for, or
one with fewer finished cells or runs than the file it would replace, is not written (--force).
"""
from __future__ import annotations

import dataclasses
import shlex
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
    parser.add_argument("--force", action="store_true",
                        help="write a table even if it has no finished run, or fewer finished cells or runs than "
                             "the file it replaces")
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
        if not runs:
            where = ", ".join([*args.run_dirs, *([f"W&B {args.wandb}"] if args.wandb else [])])
            warn(f"found no runs in {where} (a run is a folder with summary.json, checkpoint.pt or metrics.jsonl); "
                 f"nothing written")
            return 1
        for run in runs:
            if run.problem:
                warn(f"{run.problem}; the run is left out")
        made = [m for m in (make_table(name, runs, args) for name in args.table or tables.table_names()) if m]
    except tables.TableError as e:
        tables.fail(str(e))
    if args.wandb_log and made:
        log_to_wandb(args.wandb_log, made)
    return 0 if made else 1


def make_table(name: str, runs: list[tables.Run], args) -> tuple[str, list[str], list[list]] | None:
    """Write one table and its figures; None when it is not written (the warning says why)."""
    from gnp import figures  # matplotlib only when tables are made

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
    out, stem = Path(args.out), name + shrink.suffix
    if not any(results.runs.values()) and not args.force:
        warn(f"{stem}: no finished run counts for this table, nothing written ({counts})"
             + matching_hint(table, plans, runs, selection))
        return None
    reproduce = tables.reproduce_command(name, **selection)
    texts = {"md": tables.render_markdown(results, counts, reproduce), "tex": tables.render_latex(results),
             "csv": tables.render_csv(results)}
    if not args.force and (refusal := would_lose(out / f"{stem}.csv", texts["csv"])):
        warn(f"{stem}: not written: {refusal}; --force replaces it")
        return None
    for suffix, text in texts.items():
        io.write_text(out / f"{stem}.{suffix}", text)
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
