"""Loss landscapes (Li et al., NeurIPS 2018): the loss along filter-normalised random directions
around theta, in 1-D and 2-D, and along the straight line between two runs' weights; as numbers
and as figures (PNG and PDF)."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from gnp.analysis.objective import SubsetLoss, Vector  # noqa: E402
from gnp.figures import save_figure  # noqa: E402
from gnp.methods import NORM_FLOOR  # noqa: E402

DIRECTIONS = ("filter-normalised Gaussian directions (Li et al. 2018): each filter (output channel of a conv, "
              "row of a linear weight) scaled to the norm of the same filter of theta; parameters with fewer "
              "than 2 dimensions (biases, BatchNorm and LayerNorm) get zero")


def filter_normalized_direction(params: list[torch.Tensor], generator: torch.Generator) -> Vector:
    """A Gaussian direction, each filter (slice along dim 0) rescaled to the norm of the same filter of
    the parameter; zero for parameters with fewer than two dimensions."""
    direction = []
    for p in params:
        d = torch.randn(p.shape, generator=generator, device=p.device, dtype=p.dtype)
        if p.ndim < 2:
            d.zero_()
        else:
            filter_norms = p.detach().reshape(len(p), -1).norm(dim=1)
            d *= (filter_norms / d.reshape(len(d), -1).norm(dim=1).clamp_min(NORM_FLOOR)).view(-1, *[1] * (p.ndim - 1))
        direction.append(d)
    return direction


def coordinates(points: int, extent: float) -> list[float]:
    """`points` evenly spaced values over [-extent, extent]."""
    return np.linspace(-extent, extent, points).tolist()


def interpolation_coordinates(points: int) -> list[float]:
    """t in steps of 1 / (points - 1) from -0.5 to 1.5 (a little less for an even `points`), so that 0
    (run A) and 1 (run B) are sampled exactly."""
    half = (points - 1) // 2
    return [k / (points - 1) for k in range(-half, points + half)]


@torch.no_grad()
def surface(loss: SubsetLoss, directions: list[Vector], coords: list[float]) -> dict:
    """Loss and error (%) at theta + a d1 (one direction: a line over `coords`) or theta + a d1 + b d2
    (two: a grid, rows b, columns a); the parameters end exactly as they were."""
    grid = [[a] for a in coords] if len(directions) == 1 else [[a, b] for b in coords for a in coords]
    losses, errors = [], []
    with loss.moved() as theta:
        for point in grid:
            loss.set_params(theta, *zip(point, directions))
            value, error = loss.evaluate()
            losses.append(value)
            errors.append(error)
    shape = (len(coords),) * len(directions)
    return {"loss": _to_list(losses, shape), "error": _to_list(errors, shape)}


@torch.no_grad()
def interpolation(loss: SubsetLoss, model: nn.Module, other: dict[str, torch.Tensor], coords: list[float]) -> dict:
    """Loss and error (%) of (1 - t) * theta_A + t * theta_B for each t in `coords`: every floating-point
    entry of the state (parameters and BatchNorm running statistics) is interpolated, the running
    variances clamped at 0 (beyond the ends a line can take them below, and the loss to NaN).
    `model` holds theta_A and ends exactly as it was."""
    live = model.state_dict()
    own = {name: value.clone() for name, value in live.items()}
    ends = {name: other[name].to(value) for name, value in own.items() if value.is_floating_point()}
    losses, errors = [], []
    try:
        for t in coords:
            for name, end in ends.items():
                live[name].copy_(torch.lerp(own[name], end, t))
                if name.endswith("running_var"):
                    live[name].clamp_min_(0)
            value, error = loss.evaluate()
            losses.append(value)
            errors.append(error)
    finally:
        for name, value in live.items():
            value.copy_(own[name])
    return {"t": coords, "loss": _to_list(losses, (len(coords),)), "error": _to_list(errors, (len(coords),))}


def _to_list(values: list[torch.Tensor], shape: tuple[int, ...]) -> list:
    return torch.stack(values).to(torch.float64).cpu().reshape(shape).tolist()


# --- figures -------------------------------------------------------------------------------------

def plot_landscape(stem, title: str, landscape: dict) -> list:
    """The 1-D line and the 2-D contours side by side."""
    coords = np.array(landscape["coordinates"])
    fig, (line, contour) = plt.subplots(1, 2, figsize=(10, 4))
    line.plot(coords, landscape["1d"]["loss"], marker=".")
    line.set_xlabel("step along the direction d1 (α)")
    line.set_ylabel("training loss L(θ + α d1)")
    line.set_yscale("log")
    line.xaxis.set_major_locator(MaxNLocator(5))
    line.grid(alpha=0.3)
    grid = np.array(landscape["2d"]["loss"], dtype=float)
    # Log-spaced levels: the loss far from theta would otherwise take every level and hide the basin.
    low, high = np.nanmin(grid), np.nanmax(grid)
    log = 0 < low < high
    levels = np.geomspace(low, high, 20) if log else 20
    norm = LogNorm(low, high) if log else None
    filled = contour.contourf(coords, coords, grid, levels=levels, norm=norm, cmap="viridis")
    contour.contour(coords, coords, grid, levels=levels, norm=norm, colors="k", linewidths=0.3)
    contour.plot([0], [0], marker="+", color="white", markersize=12)
    fig.colorbar(filled, ax=contour, label="training loss L(θ + α d1 + β d2)", format="%.3g",
                 ticks=levels[::3] if log else None)
    contour.set_xlabel("α (along d1)")
    contour.set_ylabel("β (along d2)")
    fig.suptitle(f"{title}\nfilter-normalised random directions; loss on the analysis subset", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, stem)


def plot_interpolation(stem, title: str, result: dict) -> list:
    """Loss (left axis) and error (right axis) along the line from run A (t = 0) to run B (t = 1)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(result["t"], result["loss"], marker=".", color="C0", label="training loss")
    ax.set_xlabel("t: weights (1 - t) θ_A + t θ_B")
    ax.set_ylabel("training loss", color="C0")
    ax.set_yscale("log")  # far beyond the ends the loss grows by orders of magnitude
    for t, name in ((0, "A"), (1, "B")):
        ax.axvline(t, color="0.5", linewidth=0.8, linestyle="--")
        ax.annotate(name, (t, 1), xycoords=("data", "axes fraction"), ha="center", va="bottom")
    error = ax.twinx()
    error.plot(result["t"], result["error"], marker=".", color="C1", label="training error")
    error.set_ylabel("training error (%)", color="C1")
    ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, stem)
