"""SAM's sharpness and m-sharpness (gnp.analysis.sharpness) against a brute-force maximum: a tanh
network small enough to search (51 parameters, float64) trained near a minimum on 32 synthetic points,
its loss written out by hand, maximised over thousands of points on the sphere and by L-BFGS from many
starts. The closed-form cases (quadratics) are in test_analysis.py."""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.optimize import minimize

from gnp.analysis.__main__ import main
from gnp.analysis.objective import SubsetLoss
from gnp.analysis.sharpness import m_sharpness, sam_sharpness

WEIGHT_DECAY, RHO = 0.01, 0.3


@pytest.fixture(scope="module")
def trained():
    """A 4-6-3 tanh network trained near a minimum by 1000 steps of full-batch gradient descent on the
    cross-entropy plus 0.5 * wd * ||theta||^2; its points and labels."""
    torch.manual_seed(2)
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(32, 4, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (32,), generator=generator)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(1000):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y) + 0.5 * WEIGHT_DECAY * sum(p.pow(2).sum() for p in model.parameters())
        loss.backward()
        optimizer.step()
    return model, x, y


def _loss(model, x, y):
    """The analysis's loss in batches of 16, with the in-loss L2 term."""
    return SubsetLoss(model, list(zip(x.split(16), y.split(16))), l2=[(WEIGHT_DECAY, list(model.parameters()))])


def _oracle(model, x, y):
    """The same loss written out as a function of a batch of flat parameter vectors (K, P) -> (K,)."""
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(flat):
        w1, b1, w2, b2 = flat.split([24, 6, 18, 3], dim=1)
        hidden = torch.tanh(torch.einsum("kij,nj->kni", w1.reshape(-1, 6, 4), x) + b1[:, None])
        logits = torch.einsum("kij,knj->kni", w2.reshape(-1, 3, 6), hidden) + b2[:, None]
        ce = F.cross_entropy(logits.reshape(-1, 3), y.repeat(len(flat)), reduction="none").view(len(flat), -1)
        return ce.mean(1) + 0.5 * WEIGHT_DECAY * flat.pow(2).sum(1)

    return loss, theta


def _brute_force(loss, theta, rho, points=4000, starts=20, seed=0):
    """max over ||e|| = rho of loss(theta + e) - loss(theta): the best of `points` random points on the
    sphere and of L-BFGS on e = rho z / ||z|| (unconstrained in z) from `starts` random z."""
    rng = np.random.default_rng(seed)
    base = loss(theta[None]).item()
    z = torch.tensor(rng.standard_normal((points, len(theta))))
    with torch.no_grad():
        best = (loss(theta + rho * z / z.norm(dim=1, keepdim=True)).max() - base).item()

    def negative(z):
        z = torch.tensor(z, requires_grad=True)
        value = loss((theta + rho * z / z.norm())[None])[0]
        (grad,) = torch.autograd.grad(value, z)
        return -value.item(), -grad.numpy()

    for _ in range(starts):
        found = minimize(negative, rng.standard_normal(len(theta)), jac=True, method="L-BFGS-B",
                         options={"maxiter": 1000, "gtol": 1e-12, "ftol": 1e-15})
        best = max(best, -found.fun - base)
    return best


def _gradient(loss, flat):
    flat = flat.clone().requires_grad_()
    return torch.autograd.grad(loss(flat[None])[0], flat)[0]


def _old_fixed_point(loss, theta, rho, steps=5):
    """The estimate this module replaced: from SAM's e = rho g / ||g||, `steps` times
    e <- rho grad L(theta + e) / ||grad L(theta + e)||, the best gain seen."""
    base = loss(theta[None]).item()
    e, gains = torch.zeros_like(theta), []
    for _ in range(steps + 1):
        grad = _gradient(loss, theta + e)
        e = rho * grad / grad.norm()
        gains.append(loss((theta + e)[None]).item() - base)
    return max(gains)


def _unchanged(model, before):
    return all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_the_sharpness_near_a_minimum_reaches_the_brute_force_maximum_where_the_old_estimate_fell_short(trained):
    model, x, y = trained
    oracle, theta = _oracle(model, x, y)
    maximum = _brute_force(oracle, theta, RHO)
    assert RHO * _gradient(oracle, theta).norm() < 0.01 * maximum  # near a minimum: first order is under 1%
    assert _old_fixed_point(oracle, theta, RHO) < 0.75 * maximum  # the gap this estimate closes

    before = [p.detach().clone() for p in model.parameters()]
    result = sam_sharpness(_loss(model, x, y), RHO)  # the defaults the analysis runs with
    assert 0.98 * maximum <= result["value"] <= maximum * (1 + 1e-9)  # a lower bound, within 2%
    assert result["converged"] and not result["rising"]
    ascents = result["ascents"]
    assert [a["from"] for a in ascents] == ["sam", "mirror", "random", "mirror", "random", "mirror"]
    assert all(a["value"] <= maximum * (1 + 1e-9) and a["values"] == sorted(a["values"]) for a in ascents)
    assert result["value"] == max(a["value"] for a in ascents)
    # From the old estimate's own start: the fixed point's 5 steps were short of a maximum this ascent reaches.
    e = RHO * _gradient(oracle, theta) / _gradient(oracle, theta).norm()
    assert ascents[0]["values"][0] == pytest.approx((oracle((theta + e)[None]) - oracle(theta[None])).item(), rel=1e-10)
    assert ascents[0]["value"] >= 0.98 * maximum and ascents[0]["steps"] <= 20
    assert _unchanged(model, before)


def test_an_ascent_cut_by_the_cap_is_reported_not_converged_and_still_rising(trained):
    model, x, y = trained
    before = [p.detach().clone() for p in model.parameters()]
    result = sam_sharpness(_loss(model, x, y), RHO, steps=1)
    assert not result["converged"] and result["rising"]
    sam = result["ascents"][0]
    assert sam["steps"] == 1 and not sam["converged"] and sam["rising"]
    assert all(a["steps"] <= 1 for a in result["ascents"])
    assert _unchanged(model, before)


def test_an_ascent_that_no_shorter_step_can_raise_stalls_and_is_not_rising():
    """A loss flat to rounding whose gradient is not (as in float32 near a maximum): every step is
    rejected until it is a millionth of the first one tried."""

    class Flat:
        params = [torch.zeros(3, dtype=torch.float64)]
        moved = SubsetLoss.moved
        set_params = SubsetLoss.set_params

        def gradient(self):  # never along e, the sphere's normal: a rotation about the third axis
            x = self.params[0]
            return torch.tensor(0.0, dtype=torch.float64), [torch.stack([1 - x[1], x[0], x[2]])]

    result = sam_sharpness(Flat(), 0.5, starts=1)
    sam, mirror = result["ascents"]
    assert not sam["converged"] and not sam["rising"] and sam["steps"] == 10  # 4^-10 < 1e-6 < 4^-9
    assert not result["converged"] and not result["rising"] and result["value"] == 0.0


def test_m_sharpness_is_the_size_weighted_mean_of_each_batchs_own_maximum(trained):
    model, x, y = trained
    before = [p.detach().clone() for p in model.parameters()]
    result = m_sharpness(_loss(model, x, y), RHO, 12)  # batches of 12, 12 and 8 across the loss's batches of 16
    assert [b["size"] for b in result["batches"]] == [12, 12, 8] and result["m"] == 12
    maxima, first_order = [], []
    for part in (slice(0, 12), slice(12, 24), slice(24, 32)):
        oracle, theta = _oracle(model, x[part], y[part])
        maxima.append(_brute_force(oracle, theta, RHO, points=1000, starts=10))
        first_order.append(RHO * _gradient(oracle, theta).norm().item())
    for batch, maximum, linear in zip(result["batches"], maxima, first_order):
        assert 0.98 * maximum <= batch["value"] <= maximum * (1 + 1e-9)
        assert batch["first_order"] == pytest.approx(linear, rel=1e-10)
    weights = np.array([12, 12, 8]) / 32
    assert result["value"] == pytest.approx(weights @ [b["value"] for b in result["batches"]], rel=1e-12)
    assert result["first_order"] == pytest.approx(weights @ first_order, rel=1e-10)
    # Each batch perturbs on its own: more than the sharpness of the whole set.
    assert result["value"] > sam_sharpness(_loss(model, x, y), RHO)["value"]
    assert _unchanged(model, before)


@pytest.mark.parametrize("argv,message", [
    (["--ascent-tol", "0"], "argument --ascent-tol: 0 is invalid: it must be a number > 0"),
    (["--ascent-tol", "1"], "--ascent-tol 1 is invalid: it must be below 1 (every point would count as converged)"),
    (["--sharpness-starts", "0"], "argument --sharpness-starts: 0 is invalid: it must be an integer >= 1"),
    (["--m-sharpness", "-4"], "argument --m-sharpness: -4 is invalid: it must be an integer >= 1"),
    (["--ascent-steps", "-1"], "--ascent-steps -1 is invalid: it must be 0 or more"),
])
def test_a_bad_sharpness_option_is_one_line(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit:
        main([str(tmp_path), *argv])
    err = capsys.readouterr().err.splitlines()
    assert exit.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
