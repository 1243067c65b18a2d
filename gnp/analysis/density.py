"""The spectral density of the Hessian by stochastic Lanczos quadrature (Ghorbani, Krishnan and Xiao,
ICML 2019; PyHessian's `density`, Yao et al. 2020), as numbers and as a figure.

For each probe v (a Rademacher vector scaled to unit length), m Lanczos steps with full
reorthogonalisation give a tridiagonal T; its eigenvalues (Ritz values, the nodes) and the squared
first components of its eigenvectors (the weights, summing to 1) are the m-point Gauss quadrature of
the spectral measure (1/n) sum_i delta(lambda_i) as seen from v: sum_j w_j theta_j^k = v^T H^k v for
every k < 2m, whose expectation over v is tr(H^k) / n. The density is the average over the probes
of the nodes, each broadened by a Gaussian of standard deviation sigma, on a grid.
"""
from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from gnp.analysis.objective import SubsetLoss, flat_hvps  # noqa: E402
from gnp.figures import log_density, save_figure  # noqa: E402

GRID_POINTS = 2000
SIGMA = 1 / 400   # the broadening, as a fraction of the span of the nodes (the grid step is about sigma / 4.5)
MARGIN = 0.05     # the grid reaches this fraction of the span beyond the extreme nodes (20 sigma)


def hessian_density(loss: SubsetLoss, probes: int, steps: int, seed: int) -> dict:
    """The density on its grid, with the raw nodes and weights of each probe and the products used
    (probes x steps, fewer when a Krylov space closes early)."""
    quadrature = lanczos_quadrature(loss, probes, steps, seed)
    return {**broaden(quadrature["nodes"], quadrature["weights"]), **quadrature}


def lanczos_quadrature(loss: SubsetLoss, probes: int, steps: int, seed: int) -> dict:
    """Each probe's Gauss quadrature nodes (Ritz values, ascending) and weights. A probe stops early
    when its Krylov space is invariant (the residual is at rounding level): its quadrature is then
    exact. `steps` above the number of parameters n is n."""
    if probes < 1 or steps < 1:
        raise ValueError(f"{probes} probes of {steps} Lanczos steps are too few: each must be at least 1")
    params = loss.params
    size = sum(p.numel() for p in params)
    device, dtype = params[0].device, params[0].dtype
    try:
        basis = torch.empty(min(steps, size), size, device=device, dtype=dtype)  # the Lanczos vectors, kept
    except torch.cuda.OutOfMemoryError:
        gib = min(steps, size) * size * dtype.itemsize / 2**30
        raise ValueError(f"--density-steps {steps}: the Lanczos vectors ({steps} x {size} parameters, {gib:.1f} GiB) "
                         f"do not fit on {device}: lower --density-steps") from None
    generator = torch.Generator(device).manual_seed(seed)
    start, nodes, weights = loss.hvp_count, [], []
    for _ in range(probes):
        probe = torch.randint(0, 2, (size,), generator=generator, device=device, dtype=dtype).mul_(2).sub_(1)
        alphas, betas = _lanczos(loss, probe / math.sqrt(size), basis)
        theta, vectors = np.linalg.eigh(np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1))
        nodes.append(theta.tolist())
        weights.append((vectors[0] ** 2).tolist())
    return {"probes": probes, "steps": steps, "parameters": size, "nodes": nodes, "weights": weights,
            "hvp_count": loss.hvp_count - start}


def _lanczos(loss: SubsetLoss, v: torch.Tensor, basis: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The diagonal (alpha) and off-diagonal (beta) of T after up to len(basis) steps from the unit
    vector v, each new vector orthogonalised against all earlier ones."""
    # A residual this close to rounding ends the probe; one a little above it only adds nodes of
    # negligible weight, so the bar is low and resolves the bulk of the spectrum in float32 too.
    breakdown = 100 * torch.finfo(v.dtype).eps
    alphas, betas = [], []
    for j in range(len(basis)):
        basis[j] = v
        w = flat_hvps(loss, v[None])[0]
        alphas.append(torch.dot(v, w).item())
        kept = basis[: j + 1]
        for _ in range(2):  # classical Gram-Schmidt twice: orthogonal to working precision
            w -= kept.T @ (kept @ w)
        beta = torch.linalg.vector_norm(w).item()
        scale = max(map(abs, alphas + betas))  # a lower bound of ||H||
        if j + 1 == len(basis) or beta <= breakdown * scale:
            break
        betas.append(beta)
        v = w / beta
    return np.array(alphas), np.array(betas)


def broaden(nodes: list[list[float]], weights: list[list[float]], points: int = GRID_POINTS) -> dict:
    """The average over probes of sum_j w_j N(t; theta_j, sigma^2) on `points` evenly spaced t, from
    MARGIN of the span below the lowest node to as far above the highest; it integrates to 1 (to
    within the Gaussians' tails beyond the grid, 20 sigma away)."""
    theta = np.concatenate([np.asarray(n, dtype=float) for n in nodes])
    w = np.concatenate([np.asarray(x, dtype=float) for x in weights]) / len(nodes)
    low, high = theta.min(), theta.max()
    span = (high - low) or max(abs(high), 1.0)  # one distinct node: a span of its own size
    sigma = SIGMA * span
    grid = np.linspace(low - MARGIN * span, high + MARGIN * span, points)
    z = (grid[:, None] - theta[None, :]) / sigma
    density = (np.exp(-0.5 * z**2) * w).sum(axis=1) / (sigma * math.sqrt(2 * math.pi))
    return {"sigma": float(sigma), "grid": grid.tolist(), "density": density.tolist()}


# --- figure --------------------------------------------------------------------------------------

def plot_density(stem, title: str, result: dict) -> list:
    """The density on a log scale, as PyHessian draws it."""
    fig, ax = plt.subplots(figsize=(6, 4))
    log_density(ax, result["grid"], result["density"], color="C0")
    ax.set_xlabel("eigenvalue of the Hessian")
    ax.set_ylabel("density (log scale)")
    ax.grid(alpha=0.3)
    fig.suptitle(f"{title}\nstochastic Lanczos quadrature: {result['probes']} probes x {result['steps']} steps, "
                 f"Gaussian broadening sigma {result['sigma']:.3g}", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, stem)

