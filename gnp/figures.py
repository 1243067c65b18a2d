"""Figures of a table's runs (matplotlib, Agg backend), each written as PNG and PDF:

- `heatmap`: test error over a grid of two settings (alpha x r), annotated with mean and n;
- `curves`: training loss, test error and ||grad L(theta)|| per epoch for each method, the mean
  over seeds with a band from the lowest to the highest seed.
"""
from __future__ import annotations

import io as _io
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
    return _save(fig, stem)


def curves(stem: Path, title: str, series: dict[str, list[list[dict]]]) -> list[Path]:
    """`series`: method label -> one list of metrics.jsonl rows per seed."""
    fig, axes = plt.subplots(1, len(CURVE_PANELS), figsize=(4.3 * len(CURVE_PANELS), 3.6))
    all_epochs = {row[EPOCH] for runs in series.values() for rows in runs for row in rows}
    for label, seeds in series.items():
        color = None
        for ax, (key, name) in zip(axes, CURVE_PANELS):
            epochs, mean, low, high = _mean_and_range(seeds, key)
            if not len(epochs):
                continue
            (line,) = ax.plot(epochs, mean, marker="." if len(epochs) < 20 else None, color=color,
                              label=f"{label} (n={len(seeds)})")
            color = line.get_color()
            if len(seeds) > 1 and len(epochs) > 1:
                ax.fill_between(epochs, low, high, color=color, alpha=0.2, linewidth=0)
            elif len(seeds) > 1:  # a single epoch: the range as a bar
                ax.vlines(epochs, low, high, color=color, alpha=0.5)
    for ax, (_, name) in zip(axes, CURVE_PANELS):
        ax.set_xlabel("epoch")
        if 0 < len(all_epochs) <= 10:  # few epochs: one tick each
            ax.set_xticks(sorted(all_epochs))
            ax.set_xlim(min(all_epochs) - 0.5, max(all_epochs) + 0.5)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title + "\nlines: mean over seeds; bands: lowest to highest seed", fontsize=9)
    fig.tight_layout()
    return _save(fig, stem)


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


def _save(fig, stem: Path) -> list[Path]:
    paths = []
    for fmt in ("png", "pdf"):
        buffer = _io.BytesIO()
        fig.savefig(buffer, format=fmt, dpi=150, bbox_inches="tight")
        path = stem.parent / f"{stem.name}.{fmt}"
        io.write_bytes(path, buffer.getvalue())
        paths.append(path)
    plt.close(fig)
    return paths
