"""SAM's sharpness (Foret et al., ICLR 2021): max over ||e|| <= rho of L(theta + e) - L(theta), and
its m-sharpness, the same maximum taken per batch of m images and averaged over the batches (what
SAM minimises when each batch of m images perturbs on its own)."""
from __future__ import annotations

import torch

from gnp.analysis.objective import SubsetLoss, Vector
from gnp.methods import NORM_FLOOR, dot, global_norm as norm

STEPS, TOL, STARTS = 50, 0.01, 3  # the analysis's defaults: --ascent-steps, --ascent-tol, --sharpness-starts
_ARMIJO = 1e-4        # the share of its first-order increase a step must deliver to be accepted
_SHRINK = 0.25        # a rejected step is tried again this much shorter ...
_STALL = 1e-6         # ... until it is this much shorter than the first one tried from that point


def sam_sharpness(loss: SubsetLoss, rho: float, *, steps: int = STEPS, tol: float = TOL, starts: int = STARTS,
                  seed: int = 0) -> dict:
    """The largest L(theta + e) - L(theta) found on the sphere ||e|| = rho, where the maximum over the
    ball lies unless L has a maximum inside it. Gradient ascent on the sphere from `starts` points:
    SAM's own perturbation e = rho g / ||g||, then random ones (Gaussian directions drawn with `seed`);
    after each, a second ascent from the mirror image -e of the point it reached. Near a minimum
    L(theta + e) - L(theta) is mostly 0.5 e^T H e, whose maxima come in mirror pairs +-e that only
    L's odd terms tell apart: an ascent reaches one of the two, which one depends on its start, and
    the other may be much higher (on small networks near a minimum the lower was down to 0.66 of it).

    An ascent stops when it converged, when it stalled, or after `steps` trial points (each one pass of
    the gradient). Converged: the gradient at e is within `tol` of the sphere's normal,
    ||grad - (grad.e) e / rho^2|| <= tol ||grad||, the first-order condition of a maximum on the sphere
    (for a quadratic, a gain short of the maximum it approaches by at most about 2 tol of it). Every point tried is on
    the sphere, so `value` is a lower bound of the maximum. `first_order` is rho ||g||, the maximum to
    first order. The parameters end exactly as they were.

    Each of `ascents` says where it began (`from`: sam, random, or the mirror of the ascent before
    it), its best gain `value`, `steps` (trial points), `converged`, `rising` (stopped by the cap while
    its steps still raised the gain; neither flag: it stalled, no shorter step raised the gain) and
    `values`, the gains of the points it accepted (the SAM ascent's values[0]: SAM's perturbation).
    Passes of the gradient: 1 + the sum over the ascents of (steps + 1), at most 1 + 2 starts (cap + 1)."""
    generator = torch.Generator(loss.params[0].device).manual_seed(seed)
    return _sharpness(loss, rho, steps, tol, starts, generator)


def m_sharpness(loss: SubsetLoss, rho: float, m: int, *, steps: int = STEPS, tol: float = TOL,
                starts: int = STARTS, seed: int = 0) -> dict:
    """SAM's m-sharpness (Foret et al. 2021, section 4.1): the subset cut in order into batches of m
    images (the last one smaller when m does not divide it), the sharpness (`sam_sharpness`) of each
    batch's own loss, its mean cross-entropy plus the same L2 term, and their mean weighted by batch
    size, `value` = sum of n_b / N max over ||e_b|| <= rho of L_b(theta + e_b) - L_b(theta).
    `first_order` is the same mean of rho ||grad L_b||; `batches` holds each batch's numbers, its
    `steps` the trial points of all its ascents."""
    images, labels = (torch.cat(parts) for parts in zip(*loss.batches))
    per_pass = max(len(batch_labels) for _, batch_labels in loss.batches)  # memory as the loss was given
    l2 = [(coefficient, [p]) for coefficient, p in zip(loss.l2, loss.params) if coefficient]
    generator = torch.Generator(loss.params[0].device).manual_seed(seed)
    batches = []
    for x, y in zip(images.split(m), labels.split(m)):
        batch_loss = SubsetLoss(loss.model, list(zip(x.split(per_pass), y.split(per_pass))),
                                label_smoothing=loss.label_smoothing, l2=l2, on_pass=loss.on_pass)
        result = _sharpness(batch_loss, rho, steps, tol, starts, generator)
        batches.append({"size": len(y), "value": result["value"], "first_order": result["first_order"],
                        "steps": sum(a["steps"] for a in result["ascents"]), "converged": result["converged"],
                        "rising": result["rising"]})
    return {"value": sum(b["size"] * b["value"] for b in batches) / loss.size, "m": m, "rho": rho,
            "first_order": sum(b["size"] * b["first_order"] for b in batches) / loss.size,
            "ascent_steps": steps, "tol": tol, "starts": starts, "converged": all(b["converged"] for b in batches),
            "rising": any(b["rising"] for b in batches), "batches": batches}


def _sharpness(loss: SubsetLoss, rho: float, steps: int, tol: float, starts: int,
               generator: torch.Generator) -> dict:
    with loss.moved() as theta:
        base, grad = loss.gradient()
        ascents = []
        for start in range(starts):
            direction = [torch.randn(p.shape, generator=generator, device=p.device, dtype=p.dtype)
                         for p in theta] if start else grad
            e, ascent = _ascend(loss, theta, base, torch._foreach_mul(direction, rho / _norm(direction)), rho,
                                steps, tol)
            _, mirrored = _ascend(loss, theta, base, torch._foreach_neg(e), rho, steps, tol)
            ascents += [{"from": "random" if start else "sam", **ascent}, {"from": "mirror", **mirrored}]
    return {"value": max(a["value"] for a in ascents), "rho": rho, "first_order": rho * norm(grad).item(),
            "ascent_steps": steps, "tol": tol, "starts": starts, "converged": all(a["converged"] for a in ascents),
            "rising": any(a["rising"] for a in ascents), "ascents": ascents}


def _ascend(loss: SubsetLoss, theta: Vector, base: torch.Tensor, e: Vector, rho: float, steps: int,
            tol: float) -> tuple[Vector, dict]:
    """Gradient ascent on the sphere from e: e <- rho (e + a t) / ||e + a t||, t the gradient's
    component tangent to the sphere at e; the point reached and the ascent's record.

    Not SAM's fixed point e <- rho grad / ||grad||: that is the power method on the Hessian in
    disguise, whose gains near a minimum creep up at the rate of the Hessian's eigenvalue gap (they
    look flat long before they converge), and which can cycle where L is not convex (it did not
    converge in 200 steps on 1 of 36 small networks and radii). The step a is Barzilai and Borwein's
    (the secant of the last two points: on those networks 0.55 to 1.1 times the fixed point's passes,
    0.8 the median), and a backtracking (Armijo) line search makes every accepted step raise the
    gain, so the ascent cannot cycle and converges to a stationary point. The first step tried is
    the fixed point's own."""
    loss.set_params(theta, (1.0, e))
    value, grad = loss.gradient()
    gain = best = (value - base).item()
    t = _tangent(grad, e, rho)
    values, taken, stalled = [gain], 0, False
    converged = _converged(t, grad, tol)
    step = first = _first_step(grad, e, rho, fallback=rho / _norm(t))
    while not converged and not stalled and taken < steps:
        moved = torch._foreach_add(e, t, alpha=step)
        trial = torch._foreach_mul(moved, rho / _norm(moved))
        loss.set_params(theta, (1.0, trial))
        value, trial_grad = loss.gradient()
        taken += 1
        trial_gain = (value - base).item()
        best = max(best, trial_gain)  # a rejected point is on the sphere too
        if trial_gain < gain + _ARMIJO * step * dot(t, t).item():
            step *= _SHRINK
            stalled = step < _STALL * first
            continue
        trial_t = _tangent(trial_grad, trial, rho)
        s = torch._foreach_sub(trial, e)
        secant = dot(s, torch._foreach_sub(t, trial_t)).item()  # > 0 where L is concave along s
        e, t, grad, gain = trial, trial_t, trial_grad, trial_gain
        values.append(gain)
        converged = _converged(t, grad, tol)
        step = first = dot(s, s).item() / secant if secant > 0 else _first_step(grad, e, rho, fallback=2 * step)
    return e, {"value": best, "steps": taken, "converged": converged, "rising": not converged and not stalled,
               "values": values}


def _first_step(grad: Vector, e: Vector, rho: float, fallback: float) -> float:
    """The step a that lands e + a t on rho grad / ||grad||, SAM's fixed point (a = rho^2 / grad.e),
    where the gradient points out of the sphere; else `fallback`."""
    outward = dot(grad, e).item()
    return rho**2 / outward if outward > 0 else fallback


def _converged(t: Vector, grad: Vector, tol: float) -> bool:
    return norm(t).item() <= tol * norm(grad).item()


def _tangent(grad: Vector, e: Vector, rho: float) -> Vector:
    """grad less its component along e: its part in the sphere's tangent space at e."""
    return torch._foreach_add(grad, e, alpha=-dot(grad, e).item() / rho**2)


def _norm(vector: Vector) -> float:
    return max(norm(vector).item(), NORM_FLOOR)
