"""The Hessian of a run's loss through Hessian-vector products: its largest eigenvalues by Lanczos
(ARPACK's implicitly restarted Lanczos, `scipy.sparse.linalg.eigsh`, over a `LinearOperator`) and its
trace by Hutchinson's estimator with Rademacher vectors."""
from __future__ import annotations

import math

import numpy as np
import torch
from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

from gnp.analysis.objective import SubsetLoss, dot, flatten, unflatten

# ARPACK's convergence test: each Ritz value's residual estimate within tol * |value|. float32
# products carry rounding noise of 1e-6 relative or more, so asking for much less would not converge.
LANCZOS_TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
LANCZOS_RESTARTS = 100  # ARPACK iterations at most (each costs about ncv - k products)


def top_eigenvalues(loss: SubsetLoss, k: int, seed: int, tol: float | None = None) -> dict:
    """The k largest (algebraic) eigenvalues of the Hessian, largest first, with each eigenpair's
    residual ||Hv - lambda v|| / |lambda| (one more product each) and the products used in all.
    Eigenpairs ARPACK did not converge are left out ("converged" < k)."""
    params = loss.params
    size = sum(p.numel() for p in params)
    if not 0 < k < size:
        raise ValueError(f"--top-k {k} is invalid: it must lie between 1 and {size - 1}, one less than the "
                         f"model's {size} parameters")
    device, dtype = params[0].device, params[0].dtype
    tol = LANCZOS_TOL[dtype] if tol is None else tol

    def matvec(x: np.ndarray) -> np.ndarray:
        vector = unflatten(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64).reshape(-1))
                           .to(device=device, dtype=dtype), params)
        return flatten(loss.hvp(vector)).to(torch.float64).cpu().numpy()

    start = loss.hvp_count
    operator = LinearOperator((size, size), matvec=matvec, dtype=np.float64)
    v0 = np.random.default_rng(seed).standard_normal(size)
    try:
        values, vectors = eigsh(operator, k=k, which="LA", v0=v0, tol=tol, maxiter=LANCZOS_RESTARTS)
    except ArpackNoConvergence as e:
        values, vectors = e.eigenvalues, e.eigenvectors
    order = np.argsort(values)[::-1]
    values, vectors = values[order], vectors[:, order]
    residuals = [float(np.linalg.norm(matvec(v) - value * v) / abs(value)) if value else math.inf
                 for value, v in zip(values, vectors.T)]
    return {"values": [float(v) for v in values], "residuals": residuals, "hvp_count": loss.hvp_count - start,
            "converged": len(values), "tol": tol}


def hutchinson_trace(loss: SubsetLoss, samples: int, seed: int) -> dict:
    """tr(H) ~ mean of v^T H v over `samples` Rademacher vectors v (entries +-1, drawn on the
    parameters' device from `seed`), with the standard error sample std / sqrt(samples)."""
    if samples < 2:
        raise ValueError(f"{samples} Hutchinson samples are too few: a standard error needs at least 2")
    params = loss.params
    generator = torch.Generator(params[0].device).manual_seed(seed)
    estimates = []
    for _ in range(samples):
        vector = [torch.randint(0, 2, p.shape, generator=generator, device=p.device, dtype=p.dtype).mul_(2).sub_(1)
                  for p in params]
        estimates.append(dot(vector, loss.hvp(vector)))
    values = torch.stack(estimates).to(torch.float64).cpu()  # the one read from the device
    return {"value": values.mean().item(), "stderr": (values.std() / math.sqrt(samples)).item(),
            "samples": samples}
