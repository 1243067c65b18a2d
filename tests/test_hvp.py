"""Hessian-vector products and trace estimators of the flatness analysis (gnp.analysis.objective,
gnp.analysis.hessian) against independent oracles: a dense float64 Hessian of the loss written out in one
pass, matrices of known trace and spectrum, and each product method against the other on networks too
large for a dense Hessian (BatchNorm in eval mode, ShakeDrop, attention)."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from gnp.analysis import hessian
from gnp.analysis.objective import DOUBLE_BACKWARD, FORWARD_OVER_REVERSE, SubsetLoss, flatten, unflatten
from gnp.models import build_model
from test_analysis import _one_pass_loss, _tiny_data, _tiny_loss, _tiny_model

METHODS = (DOUBLE_BACKWARD, FORWARD_OVER_REVERSE)


@pytest.fixture(scope="module")
def dense():
    """The tiny model of test_analysis (conv, BatchNorm in eval mode, ReLU, linear; float64), its data,
    and the dense Hessian of its loss (label smoothing, in-loss L2 on the weights) in one pass."""
    model = _tiny_model()
    images, labels = _tiny_data()
    oracle, theta = _one_pass_loss(model, images, labels)
    return model, images, labels, theta, torch.autograd.functional.hessian(oracle, theta)


def _loss(dense, method):
    model, images, labels, _, _ = dense
    loss = _tiny_loss(model, images, labels)  # batches of 16, 16 and 8
    loss.hvp_method = method
    return loss


def _random_vector(params, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in params]


# --- products ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", [*METHODS, "auto"])
def test_each_product_method_is_the_dense_hessian_times_the_vector(dense, method):
    loss, h = _loss(dense, method), dense[4]
    for seed in range(2):
        v = _random_vector(loss.params, seed)
        np.testing.assert_allclose(flatten(loss.hvp(v)).numpy(), (h @ flatten(v)).numpy(), rtol=1e-9, atol=1e-12)
    assert loss.hvp_count == 2  # the first product's choice of method is not counted
    choice = loss.hvp_choice
    if method == "auto":
        assert choice["method"] in METHODS and choice["reason"] == "faster on the first batch"
        assert set(choice["ms"]) == set(METHODS) and min(choice["ms"].values()) > 0
        assert choice["method"] == min(choice["ms"], key=choice["ms"].get)
    else:
        assert choice == {"method": method, "reason": "asked for", "ms": None}


@pytest.mark.parametrize("method", METHODS)
def test_products_taken_together_are_the_products_taken_alone(dense, method):
    loss, h = _loss(dense, method), dense[4]
    vectors = [_random_vector(loss.params, seed) for seed in range(3)]
    products = loss.hvps(vectors)
    assert loss.hvp_count == 3 and len(products) == 3
    for v, product in zip(vectors, products):
        np.testing.assert_allclose(flatten(product).numpy(), (h @ flatten(v)).numpy(), rtol=1e-9, atol=1e-12)


def _eval_network(name, seed=0, **options):
    """A network in eval mode, its BatchNorm statistics and affine parameters made non-trivial (as after
    training), in float64."""
    torch.manual_seed(seed)
    net = build_model(name, 10, **options).double().eval()
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return net


def _network_loss(net, method, images=6, batch=4, smoothing=0.1):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(images, 3, 32, 32, generator=generator, dtype=next(net.parameters()).dtype)
    y = torch.randint(0, 10, (images,), generator=generator)
    return SubsetLoss(net, list(zip(x.split(batch), y.split(batch))), label_smoothing=smoothing,
                      l2=[(1e-3, list(net.parameters()))], hvp_method=method)


@pytest.mark.parametrize("name,options", [
    ("resnet18", {"width": 2}),
    ("pyramidnet110", {"depth": 8, "alpha": 6, "shakedrop": 0.5}),  # ShakeDrop in eval: its expectation
    ("wrn28_10", {"depth": 10, "widen": 1}),
])
def test_the_two_methods_agree_on_networks(name, options):
    net = _eval_network(name, **options)
    losses = {method: _network_loss(net, method) for method in METHODS}
    v = _random_vector(losses[DOUBLE_BACKWARD].params)
    products = {method: flatten(loss.hvp(v)) for method, loss in losses.items()}
    assert losses[FORWARD_OVER_REVERSE].hvp_choice["method"] == FORWARD_OVER_REVERSE
    difference = products[FORWARD_OVER_REVERSE] - products[DOUBLE_BACKWARD]
    assert difference.norm() <= 1e-10 * products[DOUBLE_BACKWARD].norm()
    # A product along another vector is another vector: the comparison can fail.
    other = flatten(losses[DOUBLE_BACKWARD].hvp(_random_vector(losses[DOUBLE_BACKWARD].params, seed=1)))
    assert (other - products[DOUBLE_BACKWARD]).norm() > 0.1 * other.norm()


class _NoForwardMode(torch.autograd.Function):
    """tanh with a backward rule only, as a custom layer without a forward-mode rule has."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)


class _Tanh(nn.Module):
    def forward(self, x):
        return _NoForwardMode.apply(x)


def test_a_model_without_forward_mode_falls_back_to_double_backward():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 8), _Tanh(), nn.Linear(8, 10)).double()
    reference = _network_loss(net, DOUBLE_BACKWARD)
    auto = _network_loss(net, "auto")
    v = _random_vector(auto.params)
    torch.testing.assert_close(flatten(auto.hvp(v)), flatten(reference.hvp(v)), rtol=1e-12, atol=1e-14)
    assert auto.hvp_choice["method"] == DOUBLE_BACKWARD and auto.hvp_choice["reason"].startswith("no forward mode (")
    with pytest.raises(ValueError, match=r"^--hvp forward-over-reverse cannot differentiate this model \(.*\): use "
                                         r"--hvp double-backward or auto$"):
        _network_loss(net, FORWARD_OVER_REVERSE).hvp(v)


def test_a_vision_transformer_falls_back_to_double_backward():
    """timm's fused attention (scaled_dot_product_attention) has no forward-mode rule on the CPU."""
    torch.manual_seed(0)
    net = build_model("vit_ti", 10, depth=1).eval()
    loss = _network_loss(net, "auto", images=2, batch=2)
    loss.hvp(_random_vector(loss.params))
    assert loss.hvp_choice["method"] == DOUBLE_BACKWARD and "no forward mode" in loss.hvp_choice["reason"]


def test_the_loss_as_a_function_of_the_parameters_is_the_loss(dense):
    loss, h = _loss(dense, "auto"), dense[4]
    theta = [p.detach().clone() for p in loss.params]
    value = loss.loss_fn(theta)
    assert value.item() == pytest.approx(loss.evaluate()[0].item(), rel=1e-13)
    # torch.func differentiates it: its Hessian is the dense one.
    flat = flatten(theta)
    by_func = torch.func.hessian(lambda x: loss.loss_fn(unflatten(x, loss.params)))(flat)
    torch.testing.assert_close(by_func, h, rtol=1e-9, atol=1e-12)
    # At other parameters it is the loss there, and the model's own parameters are left alone.
    moved = [t + 0.1 * v for t, v in zip(theta, _random_vector(theta))]
    assert loss.loss_fn(moved).item() != pytest.approx(value.item(), rel=1e-6)
    assert all(torch.equal(p, t) for p, t in zip(loss.params, theta))


# --- the trace ---------------------------------------------------------------------------------------

def _symmetric(eigenvalues, seed=0):
    """Q diag(eigenvalues) Q^T with a random orthogonal Q, in float64."""
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=generator, dtype=torch.float64))
    return q @ torch.diag(torch.as_tensor(eigenvalues, dtype=torch.float64)) @ q.T


def _hessian_like(size=300, seed=0):
    """A spectrum like a network's Hessian: a few large positive outliers, then a bulk near zero of both
    signs (Ghorbani et al. 2019; Papyan 2019)."""
    rng = np.random.default_rng(seed)
    outliers = 50.0 * np.arange(1, 11) ** -1.0
    bulk = rng.normal(0.05, 0.2, size - len(outliers))
    return _symmetric(np.concatenate([outliers, bulk]), seed)


def _repeat(estimator, matrix, samples, repeats, seed=0):
    generator = torch.Generator().manual_seed(seed)
    results = [estimator(lambda rows: rows @ matrix, len(matrix), samples, generator, dtype=torch.float64)
               for _ in range(repeats)]
    return np.array([r["value"] for r in results]), np.array([r["stderr"] for r in results]), results


@pytest.mark.parametrize("estimator", [hessian.hutchpp, hessian.hutchinson])
def test_each_trace_estimator_is_unbiased_with_a_calibrated_standard_error(estimator):
    matrix = _hessian_like()
    exact = torch.trace(matrix).item()
    values, errors, _ = _repeat(estimator, matrix, samples=12, repeats=1000)
    spread = values.std(ddof=1)
    assert abs(values.mean() - exact) < 4 * spread / math.sqrt(len(values)), (values.mean(), exact)
    # The standard error it reports is the spread of its estimates: its square is unbiased for the variance.
    assert 0.8 < np.mean(errors**2) / spread**2 < 1.25, (np.mean(errors**2), spread**2)


def test_hutchpp_with_n_products_is_closer_than_hutchinson_with_3n_on_a_hessian_like_spectrum():
    matrix = _hessian_like()
    exact = torch.trace(matrix).item()
    n, repeats = 30, 200
    pp, _, results = _repeat(hessian.hutchpp, matrix, n, repeats)
    hutchinson, _, _ = _repeat(hessian.hutchinson, matrix, 3 * n, repeats, seed=1)
    assert {(r["subspace"], r["remainder_samples"]) for r in results} == {(10, 10)}
    pp_error, hutchinson_error = np.mean((pp - exact) ** 2), np.mean((hutchinson - exact) ** 2)
    # 5 to 8 times smaller over seeds; each mean squared error is known to about 10% at 200 repeats.
    assert pp_error < hutchinson_error / 2, (pp_error, hutchinson_error)


def test_hutchpp_is_exact_when_the_basis_holds_the_whole_range():
    """A rank-3 matrix: the sketch of 3 products spans its range, so the remainder is zero."""
    matrix = _symmetric([5.0, -2.0, 1.0] + [0.0] * 17)
    generator = torch.Generator().manual_seed(0)
    result = hessian.hutchpp(lambda rows: rows @ matrix, 20, 9, generator, dtype=torch.float64)
    assert result["subspace"] == 3 and result["value"] == pytest.approx(4.0, abs=1e-10)
    assert result["stderr"] == pytest.approx(0.0, abs=1e-10)


def test_few_products_leave_at_least_two_for_the_remainder():
    matrix = _symmetric(np.linspace(1, 2, 20))
    generator = torch.Generator().manual_seed(0)
    shapes = {n: hessian.hutchpp(lambda rows: rows @ matrix, 20, n, generator, dtype=torch.float64) for n in (2, 3, 4, 6, 33)}
    assert {n: (r["subspace"], r["remainder_samples"]) for n, r in shapes.items()} == {
        2: (0, 2), 3: (0, 3), 4: (1, 2), 6: (2, 2), 33: (11, 11)}
    with pytest.raises(ValueError, match="a standard error needs at least 2"):
        hessian.hutchpp(lambda rows: rows @ matrix, 20, 1, generator)


@pytest.mark.parametrize("estimator", [hessian.hutchpp, hessian.hutchinson])
def test_an_estimate_does_not_depend_on_how_many_products_are_taken_together(estimator):
    matrix = _hessian_like()
    estimates = [estimator(lambda rows: rows @ matrix, len(matrix), 14, torch.Generator().manual_seed(3),
                           dtype=torch.float64, block=block) for block in (1, 4, 14)]
    for other in estimates[1:]:
        assert other == pytest.approx(estimates[0], rel=1e-10)


@pytest.mark.parametrize("method", hessian.TRACE_METHODS)
def test_the_trace_of_a_network_hessian_is_within_three_standard_errors(dense, method):
    exact = torch.trace(dense[4]).item()
    for seed in range(4):
        loss = _loss(dense, "auto")
        result = hessian.trace(loss, method, 30, seed)
        assert result["method"] == method and result["hvp_count"] == loss.hvp_count == 30
        assert result["stderr"] > 0 and abs(result["value"] - exact) < 3 * result["stderr"], (seed, result, exact)
