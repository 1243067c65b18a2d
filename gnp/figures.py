"""Figures of a table's runs (matplotlib, Agg backend), each written as PNG and PDF:

- `heatmap`: test error over a grid of two settings (alpha x r), annotated with mean and n;
- `curves`: training loss, test error and ||grad L(theta)|| per epoch for each method, the mean
  over seeds with a band from the lowest to the highest seed, and an inset of the last epochs'
  test error (where the methods differ by a percent or less);
- `gradient_norms`: ||grad L(theta)|| per epoch, one line per value of a sweep's first setting
  (alpha) and one panel per value of its second (r), as in the paper's gradient-norm figure;
- `scatter`: test error against each flatness quantity of analysis.json, one point per run;
- `densities`: the Hessian's spectral density of each run (analysis.json), the methods overlaid.

Every method or setting has its own marker and line style besides its colour, so that overlapping
lines and grey-scale prints stay apart. Each figure is built by a `*_figure` function (for tests)
and saved by the function of the same name.
"""
from __future__ import annotations

import io as _io
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from gnp import io  # noqa: E402
from gnp.tables import Stat  # noqa: E402
from gnp.tables.runs import EPOCH, FIRST_PASS_LOSS, G1_NORM, TEST_ERROR  # noqa: E402

CURVE_PANELS = ((FIRST_PASS_LOSS, "training loss at θ (first pass)"), (TEST_ERROR, "test error (%)"),
                (G1_NORM, "‖∇L(θ)‖, mean over the epoch"))
G1_LABEL = CURVE_PANELS[2][1]
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
LINE_STYLES = ("-", "--", "-.", ":")
INSET_MIN_EPOCHS = 3                  # fewer epochs: the whole curve is the ending
# A density's lowest value drawn, relative to its peak (its tails reach 0). A lone eigenvalue of a
# Hessian of n parameters has weight 1/n, so its peak is about 1/n of the bulk's: this keeps it in view
# up to a few billion parameters.
LOG_FLOOR = 1e-10


def style(i: int) -> dict:
    """The i-th series' look: colour, open marker and line style all differ from its neighbours'."""
    color = plt.get_cmap("tab10")(i % 10)
    return {"color": color, "marker": MARKERS[i % len(MARKERS)], "linestyle": LINE_STYLES[i % len(LINE_STYLES)],
            "markerfacecolor": "none", "markeredgecolor": color}


def heatmap(stem: Path, title: str, row_name: str, column_name: str, row_values: list, column_values: list,
            stats: dict[tuple, Stat]) -> list[Path]:
    """Mean test error of each (row value, column value); a cell without runs is grey with a dash."""
    means = np.array([[stats[r, c].mean if (r, c) in stats and stats[r, c].n else np.nan for c in column_values]
                      for r in row_values], dtype=float)
    fig, ax = plt.subplots(figsize=(1.6 * len(column_values) + 2.4, 1.1 * len(row_values) + 1.8))
    ax.set_facecolor("0.85")
    image = ax.imshow(np.ma.masked_invalid(means), cmap="viridis_r", aspect="auto")
    fig.colorbar(image, ax=ax, label="test error (%)")
    middle = (np.nanmin(means) + np.nanmax(means)) / 2 if np.isfinite(means).any() else 0.0
    for i, r in enumerate(row_values):
        for j, c in enumerate(column_values):
            mean = means[i, j]
            text = f"{mean:.2f}\nn={stats[r, c].n}" if np.isfinite(mean) else "–"
            dark = np.isfinite(mean) and mean > middle  # viridis_r is dark at high errors
            ax.text(j, i, text, ha="center", va="center", fontsize=9, color="white" if dark else "black")
    ax.set_xticks(range(len(column_values)), [f"{v:g}" for v in column_values])
    ax.set_yticks(range(len(row_values)), [f"{v:g}" for v in row_values])
    ax.set_xlabel(column_name)
    ax.set_ylabel(row_name)
    ax.set_title(title, fontsize=9)
    return save_figure(fig, stem)


def curves(stem: Path, title: str, series: dict[str, list[list[dict]]]) -> list[Path]:
    """`series`: method label -> one list of metrics.jsonl rows per seed."""
    return save_figure(curves_figure(title, series), stem)


def curves_figure(title: str, series: dict[str, list[list[dict]]]):
    fig, axes = plt.subplots(1, len(CURVE_PANELS), figsize=(4.3 * len(CURVE_PANELS), 3.6))
    all_epochs = sorted({row[EPOCH] for runs in series.values() for rows in runs for row in rows})
    last = all_epochs[-max(2, math.ceil(len(all_epochs) / 4)):] if len(all_epochs) >= INSET_MIN_EPOCHS else []
    panels = {key: ax for ax, (key, _) in zip(axes, CURVE_PANELS)}
    inset = panels[TEST_ERROR].inset_axes([0.42, 0.42, 0.55, 0.53]) if last else None
    for i, (label, seeds) in enumerate(series.items()):
        for key, ax in panels.items():
            _mean_line(ax, seeds, key, style(i), f"{label} (n={len(seeds)})")
        if inset is not None:
            _mean_line(inset, [[row for row in rows if row[EPOCH] >= last[0]] for rows in seeds], TEST_ERROR,
                       style(i), None)
    for ax, (_, name) in zip(axes, CURVE_PANELS):
        ax.set_xlabel("epoch")
        _epoch_ticks(ax, all_epochs)
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    if inset is not None:
        inset.set_xticks(last)
        inset.set_title(f"last {len(last)} epochs", fontsize=7)
        inset.tick_params(labelsize=7)
        inset.grid(alpha=0.3)
    next((ax for ax in axes if ax.get_lines()), axes[0]).legend(fontsize=8)
    fig.suptitle(title + "\nlines: mean over seeds; bands: lowest to highest seed", fontsize=9)
    fig.tight_layout()
    return fig


def gradient_norms(stem: Path, title: str, row_name: str, column_name: str,
                   series: dict[float, dict[float, list[list[dict]]]]) -> list[Path]:
    """`series`: column value (r) -> row value (alpha) -> one list of metrics.jsonl rows per seed."""
    return save_figure(gradient_norms_figure(title, row_name, column_name, series), stem)


def gradient_norms_figure(title: str, row_name: str, column_name: str,
                          series: dict[float, dict[float, list[list[dict]]]]):
    columns = sorted(series)
    fig, axes = plt.subplots(1, len(columns), figsize=(4.3 * len(columns), 3.6), sharey=True, squeeze=False)
    row_values = sorted({v for lines in series.values() for v in lines})
    epochs = sorted({row[EPOCH] for lines in series.values() for runs in lines.values() for rows in runs
                     for row in rows})
    for ax, column in zip(axes[0], columns):
        for value, seeds in sorted(series[column].items()):
            _mean_line(ax, seeds, G1_NORM, style(row_values.index(value)), f"{row_name} {value:g} (n={len(seeds)})")
        ax.set_title(f"{column_name} {column:g}", fontsize=9)
        ax.set_xlabel("epoch")
        _epoch_ticks(ax, epochs)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel(G1_LABEL)
    fig.suptitle(f"‖∇L(θ)‖ over training, one line per {row_name}, one panel per {column_name}\n{title}\n"
                 "lines: mean over seeds; bands: lowest to highest seed", fontsize=9)
    fig.tight_layout()
    return fig


def scatter(stem: Path, title: str, panels: list[tuple[str, dict[str, list[tuple[float, float]]]]]) -> list[Path]:
    """`panels`: (quantity label, method label -> one (quantity, test error) point per run)."""
    return save_figure(scatter_figure(title, panels), stem)


def scatter_figure(title: str, panels: list[tuple[str, dict[str, list[tuple[float, float]]]]]):
    """One panel per quantity, at most 3 to a row, all sharing the test error axis."""
    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.0 * columns, 3.3 * rows + 0.5), sharey=True, squeeze=False)
    methods = list(dict.fromkeys(m for _, points in panels for m in points))
    for ax, (label, points) in zip(axes.flat, panels):
        for method, xy in points.items():
            s = style(methods.index(method))
            ax.plot([x for x, _ in xy], [y for _, y in xy], linestyle="none", marker=s["marker"], color=s["color"],
                    markerfacecolor="none", markersize=7, label=f"{method} ({len(xy)} runs)")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(panels):]:
        fig.delaxes(ax)
    for row in axes:
        row[0].set_ylabel("test error (%)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Test error against each analysis quantity, one point per run\n{title}", fontsize=9)
    fig.tight_layout()
    return fig


def densities(stem: Path, title: str, series: dict[str, list[tuple[list[float], list[float]]]]) -> list[Path]:
    """`series`: method label -> one (grid, density) per run."""
    return save_figure(densities_figure(title, series), stem)


def densities_figure(title: str, series: dict[str, list[tuple[list[float], list[float]]]]):
    """One line per run on a shared log axis, each method in its own colour and line style."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, (label, curves) in enumerate(series.items()):
        look = style(i)
        for j, (grid, density) in enumerate(curves):
            log_density(ax, grid, density, color=look["color"], linestyle=look["linestyle"], linewidth=1,
                        label=f"{label} ({len(curves)} run{'s' * (len(curves) > 1)})" if j == 0 else None)
    ax.set_xlabel("eigenvalue of the Hessian")
    ax.set_ylabel("density (log scale)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle(f"Spectral density of the Hessian (stochastic Lanczos quadrature), one line per run\n{title}",
                 fontsize=9)
    fig.tight_layout()
    return fig


def log_density(ax, grid: list[float], density: list[float], **look) -> None:
    """A density on a log axis, its tails cut at LOG_FLOOR times its peak."""
    density = np.asarray(density, dtype=float)
    ax.semilogy(grid, np.maximum(density, LOG_FLOOR * density.max()), **look)


def _mean_line(ax, seeds: list[list[dict]], key: str, look: dict, label: str | None) -> None:
    """The mean over seeds of `key` per epoch, with the range of the seeds as a band (or a bar)."""
    epochs, mean, low, high = _mean_and_range(seeds, key)
    if not len(epochs):
        return
    ax.plot(epochs, mean, label=label, **look)
    if len(seeds) > 1 and len(epochs) > 1:
        ax.fill_between(epochs, low, high, color=look["color"], alpha=0.15, linewidth=0)
    elif len(seeds) > 1:  # a single epoch: the range as a bar
        ax.vlines(epochs, low, high, color=look["color"], alpha=0.5)


def _epoch_ticks(ax, epochs: list[int]) -> None:
    if 0 < len(epochs) <= 10:  # few epochs: one tick each
        ax.set_xticks(epochs)
        ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _mean_and_range(seeds: list[list[dict]], key: str):
    by_epoch: dict[int, list[float]] = {}
    for rows in seeds:
        for row in rows:
            value = row.get(key)
            if value is not None:
                by_epoch.setdefault(row[EPOCH], []).append(value)
    epochs = sorted(by_epoch)
    values = [by_epoch[e] for e in epochs]
    return (np.array(epochs), np.array([np.mean(v) for v in values]), np.array([min(v) for v in values]),
            np.array([max(v) for v in values]))


def save_figure(fig, stem: Path) -> list[Path]:
    """Write `fig` as <stem>.png and <stem>.pdf (atomically) and close it; returns the two paths."""
    paths = []
    for fmt in ("png", "pdf"):
        buffer = _io.BytesIO()
        fig.savefig(buffer, format=fmt, dpi=150, bbox_inches="tight")
        path = stem.parent / f"{stem.name}.{fmt}"
        io.write_bytes(path, buffer.getvalue())
        paths.append(path)
    plt.close(fig)
    return paths
