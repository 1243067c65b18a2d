"""The Hessian of a run's loss through Hessian-vector products: its largest eigenvalues by Lanczos
(ARPACK's implicitly restarted Lanczos, `scipy.sparse.linalg.eigsh`, over a `LinearOperator`) and its
trace by Hutch++ (Meyer, Musco, Musco and Woodruff, SOSA 2021) or Hutchinson's estimator, both with
Rademacher vectors."""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

from gnp.analysis.objective import SubsetLoss, flat_hvps

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
        row = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64).reshape(1, -1)).to(device=device, dtype=dtype)
        return flat_hvps(loss, row)[0].to(torch.float64).cpu().numpy()

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


# --- the trace ------------------------------------------------------------------------------------

HUTCHPP, HUTCHINSON = "hutch++", "hutchinson"
TRACE_METHODS = (HUTCHPP, HUTCHINSON)
# Products each estimator takes by default. On the Hessians of trained networks, whose few large eigenvalues
# make most of Hutchinson's variance, Hutch++ reached Hutchinson's standard error with 4-22% of its products
# (digits runs); on an untrained network of flat spectrum with about as many (README: Flatness).
TRACE_SAMPLES = {HUTCHPP: 33, HUTCHINSON: 100}
# Products computed together in one pass over the batches (SubsetLoss.hvps): the forward pass and the first
# backward pass are shared, at the cost of that many times the second pass's memory.
PRODUCTS_PER_PASS = 4

Matmat = Callable[[torch.Tensor], torch.Tensor]  # vectors as the rows of an (m, size) matrix to A times each


def trace(loss: SubsetLoss, method: str, samples: int, seed: int, block: int = PRODUCTS_PER_PASS) -> dict:
    """tr(H) by `method` (TRACE_METHODS) with `samples` Hessian-vector products, `block` at a time, with its
    standard error."""
    params = loss.params
    size = sum(p.numel() for p in params)
    generator = torch.Generator(params[0].device).manual_seed(seed)
    estimate = {HUTCHPP: hutchpp, HUTCHINSON: hutchinson}[method]
    start = loss.hvp_count
    result = estimate(lambda rows: flat_hvps(loss, rows), size, samples, generator, dtype=params[0].dtype,
                      block=block)
    return {"method": method, **result, "hvp_count": loss.hvp_count - start}


def hutchinson(matmat: Matmat, size: int, samples: int, generator: torch.Generator, *,
               dtype: torch.dtype = torch.float32, block: int = PRODUCTS_PER_PASS) -> dict:
    """tr(A) ~ mean of v^T A v over `samples` Rademacher vectors v (entries +-1, drawn on the generator's
    device), with the standard error sample std / sqrt(samples); `block` products at a time."""
    if samples < 2:
        raise ValueError(f"{samples} Hutchinson samples are too few: a standard error needs at least 2")
    values = torch.cat([_quadratic_forms(matmat, _rademacher(m, size, generator, dtype))
                        for m in _blocks(samples, block)]).to(torch.float64).cpu()  # the one read from the device
    return {"value": values.mean().item(), "stderr": (values.std() / math.sqrt(samples)).item(),
            "samples": samples}


def hutchpp(matmat: Matmat, size: int, samples: int, generator: torch.Generator, *,
            dtype: torch.dtype = torch.float32, block: int = PRODUCTS_PER_PASS) -> dict:
    """tr(A) by Hutch++ with `samples` products of A, `block` at a time: k = samples // 3 of them, on
    Rademacher vectors S, give an orthonormal basis Q of AS; k more give tr(Q^T A Q) exactly; the rest
    estimate the trace of the remainder, tr((I - QQ^T) A (I - QQ^T)), by Hutchinson with Rademacher vectors
    projected off Q. A smaller k leaves at least 2 for the remainder (3 products or fewer: k = 0,
    Hutchinson's estimator).

    Given Q, the estimate's mean is tr(A) whatever Q is, so Q adds no variance of its own: the remainder's
    sample variance over its count is an unbiased estimate of the whole estimate's variance, and `stderr`
    is its square root."""
    if samples < 2:
        raise ValueError(f"{samples} Hutch++ samples are too few: a standard error needs at least 2")
    k = min(samples // 3, (samples - 2) // 2, size)
    basis, subspace = None, 0.0
    if k:
        sketch = torch.cat([matmat(_rademacher(m, size, generator, dtype)) for m in _blocks(k, block)])
        basis = torch.linalg.qr(sketch.T).Q.T.contiguous()  # (k, size): orthonormal rows spanning the sketch
        subspace = torch.cat([_quadratic_forms(matmat, rows) for rows in basis.split(block)]).sum()
        subspace = subspace.to(torch.float64).item()
    remainder = []
    for m in _blocks(samples - 2 * k, block):
        v = _rademacher(m, size, generator, dtype)
        if basis is not None:
            v -= (v @ basis.T) @ basis
        remainder.append(_quadratic_forms(matmat, v))
    values = torch.cat(remainder).to(torch.float64).cpu()
    return {"value": subspace + values.mean().item(), "stderr": (values.std() / math.sqrt(len(values))).item(),
            "samples": samples, "subspace": k, "subspace_trace": subspace, "remainder_samples": len(values)}


def hutchinson_trace(loss: SubsetLoss, samples: int, seed: int) -> dict:
    """Hutchinson's estimate of tr(H) with `samples` products (`trace` with HUTCHINSON)."""
    return trace(loss, HUTCHINSON, samples, seed)


def _blocks(count: int, block: int) -> list[int]:
    """`count` split into parts of `block` and a smaller last one."""
    return [min(block, count - start) for start in range(0, count, block)]


def _rademacher(count: int, size: int, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """`count` Rademacher vectors as rows, drawn one after another (the same whatever the blocks)."""
    return torch.randint(0, 2, (count, size), generator=generator, device=generator.device,
                         dtype=dtype).mul_(2).sub_(1)


def _quadratic_forms(matmat: Matmat, rows: torch.Tensor) -> torch.Tensor:
    """v^T A v for each row v."""
    return (rows * matmat(rows)).sum(1)
