"""The paper's tables as data, and the tables back from finished runs.

A table (`conf/table/<name>.yaml`) is a grid: rows are models, columns are dataset x augmentation,
and every cell holds the same methods (SGD / SAM / GNP, ...), each trained with a few seeds. One
method of one cell is composed from the existing config groups plus a few overrides, so a recipe
lives in one place (`conf/model/*.yaml`) and a table only says which runs it needs:

    python train.py dataset=cifar10 model=wrn28_10 aug=cutout method=sam method.r=0.05 seed=0 \\
        hydra.run.dir=runs/cnn/cifar10/wrn28_10/cutout/sam/seed0

One room per concern, in the order the data flows:

    spec       conf/table/*.yaml parsed into a Table
    plans      the cells, their composed configs, run directories and commands (make_plans)
    runs       run directories and W&B runs read back, and matched to plans by their settings
    quantities what a table reports of a run: its test error, or a quantity of its analysis.json
    stats      finished runs grouped by cell and method (collect), statistics and significance over seeds
    published  the published numbers of a cell
    estimates  measured throughput and the time of a run
    render     Markdown, LaTeX and CSV in the paper's layout
    cli        the options and errors scripts/reproduce.py and scripts/make_tables.py share
"""
from gnp.tables.cli import (ArgumentParser, add_selection_arguments, fail, reproduce_command,  # noqa: F401
                            selection, selection_flags)
from gnp.tables.estimates import (BENCHMARK_DIR, Cost, Estimate, Throughput, duration, estimate,  # noqa: F401
                                  read_throughput)
from gnp.tables.plans import Cell, Plan, Shrink, cells, composed, display_path, make_plans  # noqa: F401
from gnp.tables.published import NOT_COVERED, PUBLISHED_DIR, published_value  # noqa: F401
from gnp.tables.quantities import ANALYSIS_QUANTITIES, TEST_ERROR_QUANTITY, Quantity, hessian_density  # noqa: F401
from gnp.tables.render import (analysis_settings, cost_markdown, csv_rows, finished_counts, marked,  # noqa: F401
                               render_analysis_markdown, render_csv, render_latex, render_markdown, replace_marked,
                               rewrite_marked)
from gnp.tables.runs import LAUNCH, Run, matching_options, read_run, read_runs, read_wandb_runs, run_state  # noqa: F401
from gnp.tables.spec import TABLE_DIR, Table, TableError, load_table, table_names  # noqa: F401
from gnp.tables.stats import (Results, Stat, Versus, best_methods, cell_groups, collect,  # noqa: F401
                              describe_counts, heatmap_grids, stat, t_interval, welch_p)
