"""The methods (gnp.methods) against independent oracles: closed forms, torch.func formulas, double backward."""
from __future__ import annotations

import copy
import io
import math
import os
import random
import socket
from functools import partial

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.func import functional_call, grad

from conftest import start_replicas
from gnp import methods
from gnp.methods import ASAM, GNP, SAM, Method, Plain, TwoPassMethod

IN, HIDDEN, CLASSES = 6, 16, 3
# Behaviour that involves device state (random generators, kernels) is checked on CUDA too, if present.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def small_net(seed: int = 0, batchnorm: bool = False, dropout: float = 0.0,
              dtype: torch.dtype = torch.float64, device: str = "cpu") -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(IN, HIDDEN)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(HIDDEN))
    layers.append(nn.Tanh())
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers += [nn.Linear(HIDDEN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, CLASSES)]
    return nn.Sequential(*layers).to(device, dtype)


def make_batch(seed: int, n: int = 16, dtype: torch.dtype = torch.float64, device: str = "cpu"):
    g = torch.Generator().manual_seed(1000 + seed)
    x, y = torch.randn(n, IN, generator=g, dtype=dtype), torch.randint(0, CLASSES, (n,), generator=g)
    return x.to(device), y.to(device)


def closure_for(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    return lambda: F.cross_entropy(model(x), y)


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def reference_direction(model: nn.Module, x, y, r: float, alpha: float,
                        normalize: bool = True) -> torch.Tensor:
    """The first-order GNP direction written from its formula with torch.func, as a flat vector.

    Both passes use batch statistics (train mode) on throw-away copies of the buffers.
    """
    theta = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b.detach() for n, b in model.named_buffers()}

    def loss(params):
        fresh = {n: b.clone() for n, b in buffers.items()}
        return F.cross_entropy(functional_call(model, (params, fresh), (x,)), y)

    g1 = grad(loss)(theta)
    norm = torch.sqrt(sum(g.pow(2).sum() for g in g1.values()))
    g2 = grad(loss)({n: theta[n] + r * g1[n] / norm for n in theta})
    first = {n: g / norm for n, g in g1.items()} if normalize else g1
    return torch.cat([((1 - alpha) * first[n] + alpha * g2[n]).reshape(-1) for n in theta])


# --- arguments ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, name", [
    ({"r": -0.1}, "r"), ({"r": math.nan}, "r"), ({"alpha": 1.5}, "alpha"),
    ({"alpha": -0.1}, "alpha"), ({"l2": -1e-3}, "l2"), ({"max_grad_norm": 0.0}, "max_grad_norm"),
    ({"warmup": "linear", "warmup_steps": 5}, "warmup"), ({"warmup_steps": -1}, "warmup_steps"),
    ({"warmup": "r"}, "warmup_steps"), ({"warmup": "zero", "warmup_steps": 2.5}, "warmup_steps"),
    ({"two_pass_probability": 0.0}, "two_pass_probability"), ({"two_pass_probability": 1.5}, "two_pass_probability"),
    ({"seed": 1.5}, "seed"),
])
def test_invalid_arguments_are_rejected_by_name(kwargs, name):
    model = small_net()
    with pytest.raises(ValueError, match=rf"^{name}=") as error:
        GNP(model, torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)
    assert "\n" not in str(error.value)


def test_invalid_group_l2_is_rejected_by_name():
    model = small_net()
    base = torch.optim.SGD([{"params": model[0].parameters(), "l2": -1.0},
                            {"params": model[2].parameters()}, {"params": model[4].parameters()}], lr=0.1)
    with pytest.raises(ValueError, match=r"^param_groups\[0\]\['l2'\]=-1.0 is invalid"):
        GNP(model, base)


def test_exact_mode_refuses_a_grad_scaler():
    model = small_net()
    with pytest.raises(ValueError, match="^exact=True is invalid: exact must be False with a grad_scaler"):
        GNP(model, torch.optim.SGD(model.parameters(), lr=0.1), exact=True,
            grad_scaler=torch.amp.GradScaler("cpu"))
    # A disabled scaler (a float32 run built with GradScaler(enabled=False)) is no scaler.
    GNP(model, torch.optim.SGD(model.parameters(), lr=0.1), exact=True,
        grad_scaler=torch.amp.GradScaler("cpu", enabled=False))


def test_base_optimizer_must_be_a_torch_optimizer():
    model = small_net()
    with pytest.raises(TypeError, match="base_optimizer"):
        GNP(model, object())


def test_closure_must_return_a_loss():
    model = small_net()
    opt = GNP(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(TypeError, match="closure"):
        opt.step(lambda: "not a loss")


# --- the update ----------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("r, alpha, normalize", [(0.0, 0.8, True), (0.1, 0.0, False)])
def test_degenerate_settings_equal_the_base_optimizer(r, alpha, normalize, device):
    """r = 0, or alpha = 0 with the paper's formula, is the base optimizer, bit for bit."""
    model = small_net(batchnorm=True, dtype=torch.float32, device=device)
    reference = copy.deepcopy(model)
    sgd = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    opt = GNP(model, torch.optim.SGD(model.parameters(), **sgd),
              r=r, alpha=alpha, normalize_first_grad=normalize)
    base = torch.optim.SGD(reference.parameters(), **sgd)
    for step in range(3):
        x, y = make_batch(step, dtype=torch.float32, device=device)
        opt.step(closure_for(model, x, y))
        base.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        base.step()
    assert torch.equal(flat_params(model), flat_params(reference))
    for ours, theirs in zip(model.buffers(), reference.buffers()):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("r, alpha, normalize", [
    (0.05, 1.0, True),    # SAM
    (0.1, 0.8, True),     # official GNP
    (0.1, 0.8, False),    # the paper's formula
])
def test_step_follows_the_formula(r, alpha, normalize):
    """One step equals theta - lr * g with g from the formula (BatchNorm in train mode)."""
    model = small_net(batchnorm=True)
    x, y = make_batch(0)
    expected = flat_params(model) - 0.1 * reference_direction(model, x, y, r, alpha, normalize)
    opt = GNP(model, torch.optim.SGD(model.parameters(), lr=0.1),
              r=r, alpha=alpha, normalize_first_grad=normalize)
    opt.step(closure_for(model, x, y))
    torch.testing.assert_close(flat_params(model), expected, rtol=1e-12, atol=1e-12)


def test_sam_is_gnp_with_alpha_one_bit_for_bit():
    x, y = make_batch(0)
    steps = []
    for method in (lambda m, b: SAM(m, b, r=0.05), lambda m, b: GNP(m, b, r=0.05, alpha=1.0)):
        model = small_net(batchnorm=True, dropout=0.2)
        opt = method(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
        for step in range(3):
            torch.manual_seed(step)
            opt.step(closure_for(model, x, y))
        steps.append(flat_params(model))
    assert torch.equal(*steps)


def reference_asam_gradient(model: nn.Module, x, y, r: float, eta: float) -> torch.Tensor:
    """ASAM's gradient written from Kwon et al.'s formula with torch.func, as a flat vector:
    T = |theta| + eta (1 for biases), e = r T^2 g1 / ||T g1||, g = grad L(theta + e)."""
    theta = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b.detach() for n, b in model.named_buffers()}

    def loss(params):
        fresh = {n: b.clone() for n, b in buffers.items()}
        return F.cross_entropy(functional_call(model, (params, fresh), (x,)), y)

    g1 = grad(loss)(theta)
    t = {n: torch.ones_like(v) if n.endswith("bias") else v.abs() + eta for n, v in theta.items()}
    norm = torch.sqrt(sum((t[n] * g1[n]).pow(2).sum() for n in theta))
    g2 = grad(loss)({n: theta[n] + r * t[n] ** 2 * g1[n] / norm for n in theta})
    return torch.cat([g2[n].reshape(-1) for n in theta])


@pytest.mark.parametrize("r, eta", [(0.5, 0.01), (1.0, 0.0), (0.05, 0.1)])
def test_asam_step_follows_its_formula(r, eta):
    """One float64 step (BatchNorm in train mode) equals theta - lr * g with ASAM's g written by hand."""
    model = small_net(batchnorm=True)
    x, y = make_batch(3)
    expected = flat_params(model) - 0.1 * reference_asam_gradient(model, x, y, r, eta)
    opt = ASAM(model, torch.optim.SGD(model.parameters(), lr=0.1), r=r, eta=eta)
    opt.step(closure_for(model, x, y))
    torch.testing.assert_close(flat_params(model), expected, rtol=1e-12, atol=1e-12)
    assert opt.last_step.two_pass and opt.last_step.schedule == {"r": r}


def test_sam_and_asam_refuse_the_lambda_warmup_which_scales_alpha():
    model = small_net()
    for cls in (SAM, ASAM):
        with pytest.raises(ValueError, match=r"^warmup='lambda' is invalid: warmup must be one of none, r, zero"):
            cls(model, torch.optim.SGD(model.parameters(), lr=0.1), warmup="lambda", warmup_steps=3)
    GNP(model, torch.optim.SGD(model.parameters(), lr=0.1), warmup="lambda", warmup_steps=3)


def test_setting_names_follow_the_settings_each_class_passes_on():
    assert Plain.setting_names() == ["l2", "max_grad_norm", "grad_scaler"]
    assert SAM.setting_names() == ["r", "sync_perturbation", "warmup", "warmup_steps", "two_pass_probability", "seed",
                                   "l2", "max_grad_norm", "grad_scaler"]
    assert set(GNP.setting_names()) == set(SAM.setting_names()) | {"alpha", "normalize_first_grad", "exact"}
    assert set(ASAM.setting_names()) == set(SAM.setting_names()) | {"eta"}


def test_every_setting_of_every_method_has_a_meaning():
    """Each class says what each of its settings means (setting_help: a new setting without one fails here), and
    says nothing of a setting it does not take; a subclass's text is in force (WSAM's clip, GAM's warmups)."""
    classes = [cls for cls in map(methods.__dict__.get, methods.__all__)
               if isinstance(cls, type) and issubclass(cls, Method)]
    assert {Method, TwoPassMethod, Plain, SAM, GNP, ASAM} <= set(classes) and len(classes) == 11
    for cls in classes:
        meanings = cls.setting_meanings()
        assert set(meanings) == set(cls.setting_names()) and all(meanings.values()), cls.__name__
        if "warmup" in meanings:  # "...: none | r (r grows linearly) | zero (plain steps)" names each warmup taken
            listed = [option.split()[0] for option in meanings["warmup"].split(": ", 1)[1].split(" | ")]
            assert sorted(listed) == sorted(cls.warmups), cls.__name__
    assert methods.WSAM.setting_meanings()["max_grad_norm"] != SAM.setting_meanings()["max_grad_norm"]
    assert GNP.setting_meanings()["r"] == TwoPassMethod.setting_help["r"]


@pytest.mark.parametrize("build, expected", [
    (lambda m, b: Plain(m, b), 1.0),
    (lambda m, b: GNP(m, b), 2.0),
    (lambda m, b: GNP(m, b, r=0.0), 1.0),                                      # r = 0: plain training
    (lambda m, b: GNP(m, b, alpha=0.0), 1.0),                                  # the second pass has weight 0
    (lambda m, b: SAM(m, b, two_pass_probability=0.25), 1.25),                  # hybrid steps
    (lambda m, b: GNP(m, b, warmup="zero", warmup_steps=300), 1 + 700 / 1000),  # 300 plain steps of 1,000
    (lambda m, b: GNP(m, b, warmup="zero", warmup_steps=300, two_pass_probability=0.5), 1 + 0.5 * 700 / 1000),
    (lambda m, b: ASAM(m, b, warmup="r", warmup_steps=300), 2.0),               # an r warmup still takes two
])
def test_expected_passes_per_step_count_what_the_schedule_runs(build, expected):
    model = small_net()
    assert build(model, torch.optim.SGD(model.parameters(), lr=0.1)).expected_passes(1000) == pytest.approx(expected)


def test_a_new_method_is_a_direction_and_nothing_else():
    """A subclass of TwoPassMethod that says only its direction gets the whole step: it equals GNP's first
    pass + SAM's combination with that direction, here the unit vector of g1 (that is, SAM)."""
    class MySAM(TwoPassMethod):
        def __init__(self, model, base_optimizer, r=0.05, **settings):
            super().__init__(model, base_optimizer, r, **settings)

        def direction(self, params, g1, g1_norm):
            return [g / g1_norm for g in g1]

    x, y = make_batch(1)
    model = small_net(batchnorm=True)
    expected = flat_params(model) - 0.1 * reference_direction(model, x, y, 0.05, 1.0)
    MySAM(model, torch.optim.SGD(model.parameters(), lr=0.1)).step(closure_for(model, x, y))
    torch.testing.assert_close(flat_params(model), expected, rtol=1e-12, atol=1e-12)


class Quadratic(nn.Module):
    """L(theta) = 0.5 theta^T A theta + c^T theta, theta split over two parameters."""

    def __init__(self, A: torch.Tensor, c: torch.Tensor, theta: torch.Tensor):
        super().__init__()
        self.A, self.c = A, c
        self.head, self.tail = nn.Parameter(theta[:3].clone()), nn.Parameter(theta[3:].clone())

    def forward(self) -> torch.Tensor:
        theta = torch.cat([self.head, self.tail])
        return 0.5 * theta @ self.A @ theta + self.c @ theta


@pytest.mark.parametrize("l2, head_l2", [(0.0, None), (0.1, None), (0.1, 0.0), (0.1, 0.3)])
@pytest.mark.parametrize("mode", ["official", "paper", "exact"])
def test_quadratic_matches_closed_form(mode, l2, head_l2):
    """With Hessian H = A + diag(l2 per coordinate): g1 = H theta + c, g2 = g1 + r H g1 / ||g1||;
    exact = g1 + lambda H g1 / ||g1||. A head_l2 is the "l2" of the head's param group (the tail's
    group uses the wrapper's l2)."""
    g = torch.Generator().manual_seed(0)
    M = torch.randn(5, 5, generator=g, dtype=torch.float64)
    A, c = M @ M.T + torch.eye(5, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    theta = torch.randn(5, generator=g, dtype=torch.float64)
    r, alpha, lr = 0.3, 0.6, 0.05

    coordinate_l2 = [l2 if head_l2 is None else head_l2] * 3 + [l2] * 2
    H = A + torch.diag(torch.tensor(coordinate_l2, dtype=torch.float64))
    g1 = H @ theta + c
    n = g1.norm()
    g2 = g1 + r * H @ g1 / n
    direction = {
        "official": (1 - alpha) * g1 / n + alpha * g2,
        "paper": (1 - alpha) * g1 + alpha * g2,
        "exact": g1 + alpha * r * H @ g1 / n,
    }[mode]

    model = Quadratic(A, c, theta)
    groups = [{"params": [model.head]} if head_l2 is None else {"params": [model.head], "l2": head_l2},
              {"params": [model.tail]}]
    opt = GNP(model, torch.optim.SGD(groups, lr=lr), r=r, alpha=alpha,
              normalize_first_grad=mode == "official", l2=l2, exact=mode == "exact")
    opt.step(model)
    torch.testing.assert_close(flat_params(model), theta - lr * direction, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(opt.last_step.g1_norm, n, rtol=1e-12, atol=0)


def test_first_order_converges_linearly_to_exact():
    """lambda = alpha * r fixed: the first-order penalty gradient approaches double backward, error ~ r."""
    penalty, x, y = 1e-3, *make_batch(0, n=32)

    def update(**kwargs) -> torch.Tensor:
        model = small_net(seed=1)
        before = flat_params(model)
        opt = GNP(model, torch.optim.SGD(model.parameters(), lr=1.0),
                  normalize_first_grad=False, **kwargs)
        opt.step(closure_for(model, x, y))
        return before - flat_params(model)

    plain = update(r=0.0, alpha=0.0)
    exact = update(r=1.0, alpha=penalty, exact=True)
    errors = []
    for r in (1e-1, 1e-2, 1e-3):
        first_order = update(r=r, alpha=penalty / r)
        errors.append(((first_order - exact).norm() / (exact - plain).norm()).item())
    assert errors[0] < 0.5, errors
    for coarse, fine in zip(errors, errors[1:]):
        assert 5 < coarse / fine < 20, errors


# --- state: BatchNorm, randomness, checkpoints ---------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_batchnorm_statistics_come_from_the_first_pass_only(device):
    model = small_net(batchnorm=True, dtype=torch.float32, device=device)
    first_pass_only = copy.deepcopy(model)
    x, y = make_batch(0, dtype=torch.float32, device=device)
    first_pass_only(x)
    opt = GNP(model, torch.optim.SGD(model.parameters(), lr=0.1), r=0.5, alpha=0.8)
    opt.step(closure_for(model, x, y))
    bn, expected = model[1], first_pass_only[1]
    assert bn.num_batches_tracked.item() == 1
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(bn, name), getattr(expected, name)), name


@pytest.mark.parametrize("device", DEVICES)
def test_both_passes_share_dropout_masks(device):
    """alpha = 1 with a perturbation that rounds to zero runs two passes yet follows plain SGD.

    That holds only if pass 2 sees pass 1's dropout masks and the random state afterwards is
    the one a single pass leaves.
    """
    model = small_net(dropout=0.5, dtype=torch.float32, device=device)
    reference = copy.deepcopy(model)
    sgd = dict(lr=0.1, momentum=0.9)
    # r far below float32 resolution: theta + r * g1/||g1|| == theta, but the two-pass path runs.
    opt = GNP(model, torch.optim.SGD(model.parameters(), **sgd), r=1e-30, alpha=1.0)
    base = torch.optim.SGD(reference.parameters(), **sgd)
    torch.manual_seed(7)
    for step in range(4):
        x, y = make_batch(step, dtype=torch.float32, device=device)
        opt.step(closure_for(model, x, y))
    torch.manual_seed(7)
    for step in range(4):
        x, y = make_batch(step, dtype=torch.float32, device=device)
        base.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        base.step()
    assert torch.equal(flat_params(model), flat_params(reference))


def test_random_state_after_a_step_is_the_first_pass_state():
    """Even when the second pass draws more random numbers, the run continues from pass 1's state."""
    model = small_net()
    x, y = make_batch(0)
    calls = []

    def closure():
        calls.append(torch.rand(1))
        if len(calls) == 2:
            torch.rand(100)  # an extra draw in the perturbed pass only
        return F.cross_entropy(model(x), y)

    torch.manual_seed(3)
    GNP(model, torch.optim.SGD(model.parameters(), lr=0.1)).step(closure)
    after_step = torch.rand(1)
    torch.manual_seed(3)
    first_draw, after_one_pass = torch.rand(1), torch.rand(1)
    assert len(calls) == 2 and torch.equal(calls[0], first_draw) and torch.equal(calls[1], first_draw)
    assert torch.equal(after_step, after_one_pass)


def test_parameters_are_restored_bit_for_bit_after_the_perturbation():
    model = small_net(dtype=torch.float32)
    before = flat_params(model)
    x, y = make_batch(0, dtype=torch.float32)
    opt = GNP(model, torch.optim.SGD(model.parameters(), lr=0.0), r=0.5, alpha=0.8)
    opt.step(closure_for(model, x, y))
    assert torch.equal(flat_params(model), before)


def _trainer(name: str, model_state=None, opt_state=None, scheduler_state=None, **settings):
    model = small_net(seed=3)
    if model_state is not None:
        model.load_state_dict(model_state)
    if name == "sgd":
        base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    else:
        base = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.3)
    opt = GNP(model, base, **{**dict(r=0.1, alpha=0.8, l2=1e-3, max_grad_norm=5.0), **settings})
    scheduler = torch.optim.lr_scheduler.LambdaLR(base, lambda step: 1.0 / (1 + step))
    if opt_state is not None:
        opt.load_state_dict(opt_state)
        scheduler.load_state_dict(scheduler_state)
    return model, opt, scheduler


def _train(model, opt, scheduler, steps: range) -> list[tuple[float, float, bool]]:
    """Take the steps; return each step's (r, alpha, two passes)."""
    schedule = []
    for step in steps:
        x, y = make_batch(step)
        opt.step(closure_for(model, x, y))
        scheduler.step()
        schedule.append((opt.last_step.schedule['r'], opt.last_step.schedule['alpha'], opt.last_step.two_pass))
    return schedule


def _save_and_load(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer)


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_state_dict_round_trip_resumes_exactly(base):
    """k steps, save, load into fresh objects, k more steps == 2k uninterrupted steps."""
    k = 3
    uninterrupted = _trainer(base)
    _train(*uninterrupted, range(2 * k))

    first_half = _trainer(base)
    _train(*first_half, range(k))
    model, opt, scheduler = first_half
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                "scheduler": scheduler.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    resumed = _trainer(base, saved["model"], saved["opt"], saved["scheduler"])
    _train(*resumed, range(k, 2 * k))
    without_optimizer_state = _trainer(base, saved["model"])
    _train(*without_optimizer_state, range(k, 2 * k))

    assert torch.equal(flat_params(resumed[0]), flat_params(uninterrupted[0]))
    # The momentum buffers matter, so a resume that lost them would be caught.
    assert not torch.allclose(flat_params(without_optimizer_state[0]), flat_params(resumed[0]))


def test_load_state_dict_rejects_foreign_dicts():
    model = small_net()
    opt = GNP(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="base_optimizer"):
        opt.load_state_dict(torch.optim.SGD(model.parameters(), lr=0.1).state_dict())


# --- GR warmup ----------------------------------------------------------------------------------

@pytest.mark.parametrize("warmup", ["r", "lambda"])
def test_warmup_scales_r_or_alpha_linearly_from_step_zero(warmup):
    """Step k (from 0) uses f = min(1, k / W) on r or on alpha: the update follows the formula with them.

    At k = 0 an r warmup has r = 0 and still takes two passes (g2 = g1), a lambda warmup alpha = 0.
    """
    r, alpha, lr, warmup_steps = 0.2, 0.8, 0.1, 4
    model = small_net(batchnorm=True)
    opt = GNP(model, torch.optim.SGD(model.parameters(), lr=lr), r=r, alpha=alpha,
              warmup=warmup, warmup_steps=warmup_steps)
    for k in range(warmup_steps + 2):
        f = min(1.0, k / warmup_steps)
        r_k, alpha_k = (r * f, alpha) if warmup == "r" else (r, alpha * f)
        x, y = make_batch(k)
        expected = flat_params(model) - lr * reference_direction(model, x, y, r_k, alpha_k)
        opt.step(closure_for(model, x, y))
        torch.testing.assert_close(flat_params(model), expected, rtol=1e-12, atol=1e-12)
        assert (opt.last_step.schedule['r'], opt.last_step.schedule['alpha']) == pytest.approx((r_k, alpha_k), rel=1e-15, abs=0)
        assert opt.last_step.two_pass == (warmup == "r" or k > 0)


def test_zero_warmup_takes_base_optimizer_steps_then_gnp_steps():
    """W plain steps equal a plain torch loop bit for bit; then GNP continues from that state."""
    warmup_steps, sgd = 3, dict(lr=0.1, momentum=0.9, nesterov=True)
    model = small_net(batchnorm=True, dropout=0.3, dtype=torch.float32)
    reference = copy.deepcopy(model)
    opt = GNP(model, torch.optim.SGD(model.parameters(), **sgd), r=0.1, alpha=0.8,
              warmup="zero", warmup_steps=warmup_steps)
    batches = [make_batch(k, dtype=torch.float32) for k in range(warmup_steps + 2)]
    torch.manual_seed(0)
    for k, (x, y) in enumerate(batches):
        opt.step(closure_for(model, x, y))
        assert (opt.last_step.schedule['r'], opt.last_step.two_pass) == ((0.0, False) if k < warmup_steps else (0.1, True))
        if k == warmup_steps - 1:
            after_warmup = flat_params(model)

    base = torch.optim.SGD(reference.parameters(), **sgd)
    torch.manual_seed(0)
    for x, y in batches[:warmup_steps]:
        base.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        base.step()
    assert torch.equal(after_warmup, flat_params(reference))
    unwarmed = GNP(reference, base, r=0.1, alpha=0.8)
    for x, y in batches[warmup_steps:]:
        unwarmed.step(closure_for(reference, x, y))
    assert torch.equal(flat_params(model), flat_params(reference))


@pytest.mark.parametrize("warmup", ["r", "lambda"])
def test_steps_after_the_warmup_equal_unwarmed_gnp_steps(warmup):
    warmed = _trainer("sgd", warmup=warmup, warmup_steps=2)
    _train(*warmed, range(2))
    saved = _save_and_load({"model": warmed[0].state_dict(), "opt": warmed[1].state_dict(),
                            "scheduler": warmed[2].state_dict()})
    unwarmed = _trainer("sgd", saved["model"], saved["opt"], saved["scheduler"])
    assert _train(*warmed, range(2, 4)) == _train(*unwarmed, range(2, 4))
    assert torch.equal(flat_params(warmed[0]), flat_params(unwarmed[0]))


@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_resume_mid_warmup_with_hybrid_steps_is_exact(base):
    """The schedule of r and the hybrid draws survive a state_dict round trip, bit for bit."""
    settings = dict(warmup="r", warmup_steps=6, two_pass_probability=0.5, seed=11)
    uninterrupted = _trainer(base, **settings)
    schedule = _train(*uninterrupted, range(9))

    first_part = _trainer(base, **settings)
    resumed_schedule = _train(*first_part, range(3))
    model, opt, scheduler = first_part
    saved = _save_and_load({"model": model.state_dict(), "opt": opt.state_dict(),
                            "scheduler": scheduler.state_dict()})
    assert saved["opt"]["steps_taken"] == 3
    resumed = _trainer(base, saved["model"], saved["opt"], saved["scheduler"], **settings)
    resumed_schedule += _train(*resumed, range(3, 9))
    assert resumed_schedule == schedule
    assert torch.equal(flat_params(resumed[0]), flat_params(uninterrupted[0]))
    # Both kinds of steps occur, and a resume that lost the step count would differ.
    assert {two_pass for _, _, two_pass in schedule} == {True, False}
    restarted = _trainer(base, saved["model"], {**saved["opt"], "steps_taken": 0}, saved["scheduler"], **settings)
    assert _train(*restarted, range(3, 9)) != schedule[3:]


# --- hybrid steps -------------------------------------------------------------------------------

def test_hybrid_with_probability_one_is_gnp_bit_for_bit():
    gnp, hybrid = _trainer("sgd"), _trainer("sgd", two_pass_probability=1.0, seed=5)
    assert _train(*gnp, range(4)) == _train(*hybrid, range(4))
    assert torch.equal(flat_params(gnp[0]), flat_params(hybrid[0]))
    assert hybrid[1].last_step.two_pass


def test_hybrid_steps_are_gnp_or_plain_with_probability_p():
    """Each step is the GNP closed form or the plain gradient step; the GNP share binomially ~ p.

    |count - n p| < 6 sd fails with probability < 2e-9 for independent draws.
    """
    g = torch.Generator().manual_seed(1)
    M = torch.randn(5, 5, generator=g, dtype=torch.float64)
    A, c = M @ M.T / 5 + torch.eye(5, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    model = Quadratic(A, c, torch.randn(5, generator=g, dtype=torch.float64))
    r, alpha, lr, p, n = 0.1, 0.8, 0.01, 0.3, 600
    opt = GNP(model, torch.optim.SGD(model.parameters(), lr=lr), r=r, alpha=alpha,
              two_pass_probability=p, seed=2)
    count = 0
    for _ in range(n):
        theta = flat_params(model)
        g1 = A @ theta + c
        gnp_direction = (1 - alpha) * g1 / g1.norm() + alpha * (g1 + r * A @ g1 / g1.norm())
        opt.step(model)
        expected = theta - lr * (gnp_direction if opt.last_step.two_pass else g1)
        torch.testing.assert_close(flat_params(model), expected, rtol=1e-12, atol=1e-12)
        assert (opt.last_step.schedule['r'], opt.last_step.schedule['alpha']) == (r, alpha)
        count += opt.last_step.two_pass
    assert abs(count - n * p) < 6 * math.sqrt(n * p * (1 - p)), count


def test_hybrid_draws_depend_on_the_seed_and_leave_global_generators_alone():
    def hybrid(seed: int):
        model = small_net()
        x, y = make_batch(0)
        opt = GNP(model, torch.optim.SGD(model.parameters(), lr=0.1), two_pass_probability=0.5, seed=seed)

        def two_pass_sequence() -> list[bool]:
            sequence = []
            for _ in range(20):
                opt.step(closure_for(model, x, y))
                sequence.append(opt.last_step.two_pass)
            return sequence
        return two_pass_sequence

    first, again, other_seed = hybrid(0), hybrid(0), hybrid(1)
    torch.manual_seed(4)
    random.seed(4)
    python_state = random.getstate()
    sequence = first()
    after = torch.rand(3)
    assert random.getstate() == python_state
    torch.manual_seed(4)
    assert torch.equal(after, torch.rand(3))
    assert again() == sequence and other_seed() != sequence


# --- clipping, zero gradients, outputs, autocast -------------------------------------------------

def test_clipping_rescales_the_combined_gradient():
    x, y = make_batch(0)

    def update(max_grad_norm):
        model = small_net()
        before = flat_params(model)
        opt = GNP(model, torch.optim.SGD(model.parameters(), lr=1.0),
                  r=0.1, alpha=0.8, max_grad_norm=max_grad_norm)
        opt.step(closure_for(model, x, y))
        return before - flat_params(model)

    free = update(None)
    clip = 0.1 * free.norm().item()
    torch.testing.assert_close(update(clip), free * clip / free.norm(), rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(update(10 * free.norm().item()), free, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kwargs", [
    dict(r=0.1, alpha=0.8), dict(r=0.1, alpha=0.8, normalize_first_grad=False),
    dict(r=0.1, alpha=0.0), dict(r=0.1, alpha=0.8, exact=True),
])
def test_zero_gradient_gives_a_zero_step_not_nan(kwargs):
    model = small_net()
    before = flat_params(model)
    x, _ = make_batch(0)
    opt = GNP(model, torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)
    opt.step(lambda: (model(x) * 0).sum())
    assert torch.equal(flat_params(model), before)
    assert opt.last_step.g1_norm.item() == 0


def test_step_reports_the_first_pass():
    model = small_net(batchnorm=True)
    x, y = make_batch(0)
    probe = copy.deepcopy(model)
    logits = probe(x)
    loss = F.cross_entropy(logits, y)
    g1 = torch.autograd.grad(loss, list(probe.parameters()))
    opt = GNP(model, torch.optim.SGD(model.parameters(), lr=0.1), r=0.1, alpha=0.8)

    def closure():
        out = model(x)
        return F.cross_entropy(out, y), out

    returned = opt.step(closure)
    torch.testing.assert_close(returned, loss.detach(), rtol=1e-14, atol=0)
    torch.testing.assert_close(opt.last_step.first_pass_output, logits.detach(), rtol=1e-14, atol=0)
    assert not opt.last_step.first_pass_output.requires_grad and not returned.requires_grad
    torch.testing.assert_close(opt.last_step.g1_norm, torch.cat([g.reshape(-1) for g in g1]).norm())
    opt.step(closure_for(model, x, y))
    assert opt.last_step.first_pass_output is None


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_step_is_close_to_float32(device):
    x, y = make_batch(0, n=64, dtype=torch.float32, device=device)

    def update(bf16: bool) -> torch.Tensor:
        model = small_net(dtype=torch.float32, device=device)
        before = flat_params(model)
        opt = GNP(model, torch.optim.SGD(model.parameters(), lr=1.0), r=0.1, alpha=0.8)

        def closure():
            with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
                logits = model(x)
            return F.cross_entropy(logits.float(), y)

        opt.step(closure)
        return before - flat_params(model)

    low, full = update(True), update(False)
    assert torch.isfinite(low).all()
    assert ((low - full).norm() / full.norm()).item() < 0.05


def test_autocast_around_the_step_sees_the_perturbed_weights():
    """Autocast caches bf16 copies of the weights; pass 2 must not reuse pass 1's copies."""
    x, y = make_batch(0, n=64, dtype=torch.float32)

    def update(outer: bool) -> torch.Tensor:
        model = small_net(dtype=torch.float32)
        before = flat_params(model)
        opt = GNP(model, torch.optim.SGD(model.parameters(), lr=1.0), r=0.5, alpha=1.0)

        def closure():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not outer):
                return F.cross_entropy(model(x).float(), y)

        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=outer):
            opt.step(closure)
        return before - flat_params(model)

    outer, inner = update(outer=True), update(outer=False)
    # Backward under autocast rounds differently (0.5% here); stale weights would differ by ~65%.
    assert ((outer - inner).norm() / inner.norm()).item() < 0.05


# --- float16 with a GradScaler ------------------------------------------------------------------

def _autocast_closure(model: nn.Module, x: torch.Tensor, y: torch.Tensor, fp16: bool):
    def closure():
        with torch.autocast(x.device.type, dtype=torch.float16, enabled=fp16):
            logits = model(x)
        return F.cross_entropy(logits.float(), y), logits
    return closure


def _scaled_trainer(init_scale: float = 2.0**16, growth_interval: int = 2000, device: str = "cpu", method=GNP,
                    **settings):
    """A float32 net with a spare parameter that only an injected overflow reaches."""
    model = small_net(batchnorm=True, dtype=torch.float32, device=device)
    spare = nn.Parameter(torch.ones(3, device=device))
    scaler = torch.amp.GradScaler(device, init_scale=init_scale, growth_interval=growth_interval)
    base = torch.optim.SGD([*model.parameters(), spare], lr=0.1, momentum=0.9)
    defaults = dict(r=0.1, alpha=0.8, l2=1e-3) if method is GNP else dict(r=0.1, l2=1e-3)
    opt = method(model, base, grad_scaler=scaler, **{**defaults, **settings})
    return model, spare, opt, scaler


def _overflowing_closure(model, spare, x, y, bad_pass: int | None):
    """float16 autocast; the loss of pass `bad_pass` of the step gets an inf through `spare` only."""
    calls = []

    def closure():
        calls.append(None)
        loss, logits = _autocast_closure(model, x, y, fp16=True)()
        if len(calls) == bad_pass:
            loss = loss + math.inf * spare.sum()
        return loss, logits
    return closure


@pytest.mark.parametrize("alpha", [0.8, 1.0])
def test_fp16_with_a_scaler_tracks_float32(alpha):
    """float16 keeps 11 significant bits (unit roundoff 4.9e-4): three steps of a float16 forward
    and backward move the weights within 5e-3 (relative) of float32 (measured: 4e-4). A scale
    left in the gradient, or one unscaled twice, would be off by a factor 2^16."""
    x, y = make_batch(0, n=64, dtype=torch.float32)

    def update(fp16: bool) -> tuple[torch.Tensor, GNP]:
        model = small_net(batchnorm=True, dtype=torch.float32)
        before = flat_params(model)
        scaler = torch.amp.GradScaler("cpu") if fp16 else None
        opt = GNP(model, torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9), r=0.1,
                  alpha=alpha, l2=1e-3, max_grad_norm=5.0, grad_scaler=scaler)
        for _ in range(3):
            opt.step(_autocast_closure(model, x, y, fp16))
            assert opt.last_step.two_pass and not opt.last_step.skipped
        return before - flat_params(model), opt

    (low, opt), (full, _) = update(True), update(False)
    assert ((low - full).norm() / full.norm()).item() < 5e-3
    assert opt.grad_scaler.get_scale() == 2.0**16


@pytest.mark.parametrize("settings", [dict(r=0.1, alpha=0.8, max_grad_norm=0.05), dict(r=0.0),
                                      dict(r=0.1, alpha=1.0, normalize_first_grad=False, l2=0.0)])
def test_scaling_without_autocast_changes_nothing(settings):
    """Loss scales are powers of two, so a float32 step with a scaler equals one without, bit for bit."""
    def run(scaler) -> torch.Tensor:
        model = small_net(batchnorm=True, dtype=torch.float32)
        opt = GNP(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                  **{"l2": 1e-3, **settings}, grad_scaler=scaler)
        for step in range(3):
            x, y = make_batch(step, dtype=torch.float32)
            opt.step(closure_for(model, x, y))
        return flat_params(model)

    assert torch.equal(run(torch.amp.GradScaler("cpu")), run(None))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad_pass, method, settings", [(1, GNP, {"alpha": 0.8}), (1, GNP, {"alpha": 1.0}),
                                                        (2, GNP, {"alpha": 0.8}), (2, GNP, {"alpha": 1.0}),
                                                        (1, SAM, {"l2": 0.0}), (2, SAM, {"l2": 0.0}),
                                                        (1, ASAM, {"l2": 0.0}), (2, ASAM, {"l2": 0.0})])
def test_fp16_overflow_in_either_pass_skips_the_step(bad_pass, method, settings, device):
    """An inf in one pass leaves parameters and optimizer state untouched and halves the scale once.

    The inf reaches only a spare parameter, which the second pass does not use: with bad_pass = 1 and
    no L2 term (which would bring the spare's NaN perturbation into g2), SAM's and ASAM's g = g2 is
    finite, and the skip must come from the first pass.
    """
    model, spare, opt, scaler = _scaled_trainer(device=device, method=method, **settings)
    x, y = make_batch(0, n=32, dtype=torch.float32, device=device)
    opt.step(_overflowing_closure(model, spare, x, y, bad_pass=None))  # creates the momentum buffers
    params, spare_before = flat_params(model), spare.detach().clone()
    state, stats = copy.deepcopy(opt.base_optimizer.state_dict()), [b.clone() for b in model.buffers()]

    opt.step(_overflowing_closure(model, spare, x, y, bad_pass=bad_pass))
    assert opt.last_step.skipped.item() and opt.last_step.two_pass and opt.steps_taken == 2
    assert torch.equal(flat_params(model), params) and torch.equal(spare.detach(), spare_before)
    after = opt.base_optimizer.state_dict()
    for key, buffers in state["state"].items():
        assert torch.equal(after["state"][key]["momentum_buffer"], buffers["momentum_buffer"])
    assert scaler.get_scale() == 2.0**15
    # Pass 1's BatchNorm update stands, as in any skipped GradScaler step.
    assert model[1].num_batches_tracked.item() == stats[2].item() + 1

    opt.step(_overflowing_closure(model, spare, x, y, bad_pass=None))
    assert not opt.last_step.skipped.item() and not torch.equal(flat_params(model), params)
    assert scaler.get_scale() == 2.0**15


def test_scaler_state_round_trips_through_state_dict():
    """With growth every 2 clean steps, the growth tracker decides the scale after the resume."""
    def trainer(state=None):
        model, spare, opt, scaler = _scaled_trainer(init_scale=2.0**10 if state else 2.0**16, growth_interval=2)
        if state is not None:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
        return model, spare, opt, scaler

    def train(model, spare, opt, scaler, steps, bad_steps=()) -> list[float]:
        scales = []
        for step in steps:
            x, y = make_batch(step, n=32, dtype=torch.float32)
            opt.step(_overflowing_closure(model, spare, x, y, bad_pass=2 if step in bad_steps else None))
            scales.append(scaler.get_scale())
        return scales

    uninterrupted = trainer()
    scales = train(*uninterrupted, range(5), bad_steps={1})
    assert scales == [2.0**16, 2.0**15, 2.0**15, 2.0**16, 2.0**16]

    first_part = trainer()
    train(*first_part, range(3), bad_steps={1})
    model, _, opt, _ = first_part
    saved = _save_and_load({"model": model.state_dict(), "opt": opt.state_dict()})
    assert saved["opt"]["grad_scaler"]["scale"] == 2.0**15 and saved["opt"]["grad_scaler"]["_growth_tracker"] == 1
    resumed = trainer(saved)
    assert train(*resumed, range(3, 5)) == scales[3:]
    assert torch.equal(flat_params(resumed[0]), flat_params(uninterrupted[0]))

    with pytest.raises(ValueError, match="grad_scaler"):
        trainer()[2].load_state_dict({"base_optimizer": saved["opt"]["base_optimizer"], "steps_taken": 3})


# --- per-step metrics ---------------------------------------------------------------------------

def test_perturbed_loss_and_output_are_those_at_the_perturbed_point():
    """Recomputed with torch.func in float64: L and logits at theta + r g1 / ||g1|| (batch statistics)."""
    r = 0.3
    model = small_net(batchnorm=True)
    x, y = make_batch(0)
    theta = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}

    def logits_at(params):
        return functional_call(model, (params, {n: b.clone() for n, b in buffers.items()}), (x,))

    g1 = grad(lambda params: F.cross_entropy(logits_at(params), y))(theta)
    norm = torch.sqrt(sum(g.pow(2).sum() for g in g1.values()))
    perturbed_logits = logits_at({n: theta[n] + r * g1[n] / norm for n in theta})

    def closure():
        logits = model(x)
        return F.cross_entropy(logits, y), logits

    opt = GNP(model, torch.optim.SGD(model.parameters(), lr=0.1), r=r, alpha=0.8)
    loss = opt.step(closure)
    torch.testing.assert_close(opt.last_step.perturbed_output, perturbed_logits, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(opt.last_step.perturbed_loss, F.cross_entropy(perturbed_logits, y), rtol=1e-12, atol=0)
    assert not opt.last_step.perturbed_loss.requires_grad and not opt.last_step.perturbed_output.requires_grad
    assert opt.last_step.perturbed_loss.item() > loss.item()  # uphill: the perturbation follows the gradient

    plain = GNP(model, torch.optim.SGD(model.parameters(), lr=0.1), r=0.0)
    loss = plain.step(closure)
    assert plain.last_step.perturbed_loss is loss and plain.last_step.perturbed_output is plain.last_step.first_pass_output
    assert not plain.last_step.two_pass and (plain.last_step.schedule['r'], plain.last_step.schedule['alpha']) == (0.0, 0.8)


@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("clip", [False, True])
def test_final_grad_norm_is_the_norm_the_base_optimizer_received(clip, scaled):
    """Plain SGD with lr = 1 moves the weights by exactly the gradient it received."""
    x, y = make_batch(0)

    def step(max_grad_norm):
        model = small_net()
        before = flat_params(model)
        scaler = torch.amp.GradScaler("cpu") if scaled else None
        opt = GNP(model, torch.optim.SGD(model.parameters(), lr=1.0), r=0.1, alpha=0.8,
                  l2=1e-2, max_grad_norm=max_grad_norm, grad_scaler=scaler)
        opt.step(closure_for(model, x, y))
        return (before - flat_params(model)).norm(), opt

    free_norm, _ = step(None)
    received, opt = step(0.5 * free_norm.item() if clip else None)
    torch.testing.assert_close(opt.last_step.final_grad_norm, received, rtol=1e-10, atol=0)
    if clip:
        torch.testing.assert_close(received, 0.5 * free_norm, rtol=1e-5, atol=0)
    assert opt.last_step.skipped.dtype == torch.bool and not opt.last_step.skipped.item()


# --- shards: one step over several shards of its batch ---------------------------------------------

SHARDS = 4


def shard_closures(model: nn.Module, x: torch.Tensor, y: torch.Tensor, shards: int = SHARDS) -> list:
    """One closure per shard, each returning (loss, logits)."""
    def closure(xs, ys):
        logits = model(xs)
        return F.cross_entropy(logits, ys), logits
    return [partial(closure, xs, ys) for xs, ys in zip(x.tensor_split(shards), y.tensor_split(shards))]


def reference_synced_direction(model: nn.Module, x, y, r: float, alpha: float, shards: int = SHARDS) -> torch.Tensor:
    """GNP with one perturbation for the whole batch, written with torch.func: g1 and g2 the means of the
    shards' gradients (each shard normalised with its own batch statistics)."""
    theta = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b.detach() for n, b in model.named_buffers()}

    def mean_gradient(params):
        grads = []
        for xs, ys in zip(x.tensor_split(shards), y.tensor_split(shards)):
            def loss(p, xs=xs, ys=ys):
                fresh = {n: b.clone() for n, b in buffers.items()}
                return F.cross_entropy(functional_call(model, (p, fresh), (xs,)), ys)
            grads.append(grad(loss)(params))
        return {n: torch.stack([g[n] for g in grads]).mean(0) for n in params}

    g1 = mean_gradient(theta)
    norm = torch.sqrt(sum(g.pow(2).sum() for g in g1.values()))
    g2 = mean_gradient({n: theta[n] + r * g1[n] / norm for n in theta})
    return torch.cat([((1 - alpha) * g1[n] / norm + alpha * g2[n]).reshape(-1) for n in theta])


def shard_mean(reference, model: nn.Module, x, y, *args, shards: int = SHARDS) -> torch.Tensor:
    """The mean over the shards of a one-batch reference gradient."""
    return torch.stack([reference(model, xs, ys, *args)
                        for xs, ys in zip(x.tensor_split(shards), y.tensor_split(shards))]).mean(0)


def plain_gradient_of(model: nn.Module, x, y) -> torch.Tensor:
    theta = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b.detach() for n, b in model.named_buffers()}

    def loss(params):
        fresh = {n: b.clone() for n, b in buffers.items()}
        return F.cross_entropy(functional_call(model, (params, fresh), (x,)), y)
    g = grad(loss)(theta)
    return torch.cat([g[n].reshape(-1) for n in theta])


@pytest.mark.parametrize("method, settings, reference, args", [
    (GNP, dict(r=0.1, alpha=0.8), reference_direction, (0.1, 0.8)),
    (GNP, dict(r=0.1, alpha=0.8, normalize_first_grad=False), reference_direction, (0.1, 0.8, False)),
    (SAM, dict(r=0.05), reference_direction, (0.05, 1.0)),
    (ASAM, dict(r=0.5, eta=0.01), reference_asam_gradient, (0.5, 0.01)),
    (Plain, dict(), plain_gradient_of, ()),
])
def test_a_step_of_shards_is_the_mean_of_each_shards_own_step(method, settings, reference, args):
    """Each shard perturbs with its own g1 and normalises with its own batch statistics (BatchNorm in
    train mode); the step takes the mean of the shards' gradients, each written from its formula."""
    model = small_net(batchnorm=True)
    x, y = make_batch(0, n=16)
    expected = flat_params(model) - 0.1 * shard_mean(reference, model, x, y, *args)
    with torch.no_grad():  # each shard's first pass
        logits = torch.cat([copy.deepcopy(model)(xs) for xs in x.tensor_split(SHARDS)])
    opt = method(model, torch.optim.SGD(model.parameters(), lr=0.1), **settings)
    loss = opt.step(shard_closures(model, x, y))
    torch.testing.assert_close(flat_params(model), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(opt.last_step.first_pass_output, logits, rtol=1e-12, atol=1e-12)
    expected_loss = torch.stack([F.cross_entropy(logits_s, ys) for logits_s, ys in
                                 zip(logits.tensor_split(SHARDS), y.tensor_split(SHARDS))]).mean()
    torch.testing.assert_close(loss, expected_loss, rtol=1e-12, atol=0)
    # The shards differ: their mean is not the full batch's step.
    assert not torch.allclose(expected, flat_params(small_net(batchnorm=True)) - 0.1 * reference(model, x, y, *args))


@pytest.mark.parametrize("batchnorm", [True, False])
def test_a_synced_perturbation_is_one_for_the_whole_batch_of_shards(batchnorm):
    """sync_perturbation: the mean g1 of the shards, one perturbation, the mean g2. Without BatchNorm
    that is the full batch's step exactly."""
    model = small_net(batchnorm=batchnorm)
    x, y = make_batch(0, n=16)
    if batchnorm:
        expected = flat_params(model) - 0.1 * reference_synced_direction(model, x, y, 0.1, 0.8)
    else:
        expected = flat_params(model) - 0.1 * reference_direction(model, x, y, 0.1, 0.8)
    opt = GNP(model, torch.optim.SGD(model.parameters(), lr=0.1), r=0.1, alpha=0.8, sync_perturbation=True)
    opt.step(shard_closures(model, x, y))
    torch.testing.assert_close(flat_params(model), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method, settings", [(Plain, {}), (GNP, dict(r=0.5, alpha=0.8)),
                                              (GNP, dict(r=0.5, alpha=0.8, sync_perturbation=True))])
def test_running_statistics_after_a_step_of_shards_are_the_mean_of_each_shards_update(method, settings):
    """What k devices' running statistics average to: each shard's first pass updates them from where the
    step found them (momentum 0.1: the update is linear); the perturbed passes' updates are dropped."""
    model = small_net(batchnorm=True)
    x, y = make_batch(0, n=16)
    model(x)  # running statistics that are not the initial ones
    updated = []
    for xs in x.tensor_split(SHARDS):
        shard = copy.deepcopy(model)
        shard(xs)
        updated.append(shard[1])
    opt = method(model, torch.optim.SGD(model.parameters(), lr=0.1), **settings)
    opt.step(shard_closures(model, x, y))
    bn = model[1]
    for name in ("running_mean", "running_var"):
        expected = torch.stack([getattr(u, name) for u in updated]).mean(0)
        torch.testing.assert_close(getattr(bn, name), expected, rtol=1e-14, atol=1e-15, msg=name)
    assert bn.num_batches_tracked.item() == 2  # once per step, as on every device


def test_g1_norm_of_shards_is_each_shards_own_for_two_passes_and_the_steps_for_one():
    """A two-pass step reports the mean of the norms its shards' perturbations divide by; a one-pass step
    the norm of its gradient (the shards' mean): so neither depends on how the shards are laid out."""
    x, y = make_batch(4, n=16)
    shard_norms = torch.stack([plain_gradient_of(small_net(batchnorm=True), xs, ys).norm()
                               for xs, ys in zip(x.tensor_split(SHARDS), y.tensor_split(SHARDS))])
    for method, expected in ((GNP, shard_norms.mean()),
                             (Plain, shard_mean(plain_gradient_of, small_net(batchnorm=True), x, y).norm())):
        model = small_net(batchnorm=True)
        opt = method(model, torch.optim.SGD(model.parameters(), lr=0.1))
        opt.step(shard_closures(model, x, y))
        torch.testing.assert_close(opt.last_step.g1_norm, expected, rtol=1e-12, atol=0)


def test_a_list_of_one_closure_is_the_plain_step_bit_for_bit():
    steps = []
    for as_list in (False, True):
        model = small_net(batchnorm=True, dropout=0.3)
        opt = GNP(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), r=0.1, alpha=0.8, l2=1e-3)
        for step in range(3):
            x, y = make_batch(step)
            torch.manual_seed(step)
            closure = closure_for(model, x, y)
            opt.step([closure] if as_list else closure)
        steps.append([flat_params(model), *model.buffers()])
    assert all(torch.equal(a, b) for a, b in zip(*steps))


def test_a_method_that_says_only_its_direction_takes_steps_of_shards():
    """A plug-in gets the shards without code of its own: here SAM written as a direction alone."""
    class MySAM(TwoPassMethod):
        def __init__(self, model, base_optimizer, r=0.05, **settings):
            super().__init__(model, base_optimizer, r, **settings)

        def direction(self, params, g1, g1_norm):
            return [g / g1_norm for g in g1]

    model = small_net(batchnorm=True)
    x, y = make_batch(2, n=16)
    expected = flat_params(model) - 0.1 * shard_mean(reference_direction, model, x, y, 0.05, 1.0)
    MySAM(model, torch.optim.SGD(model.parameters(), lr=0.1)).step(shard_closures(model, x, y))
    torch.testing.assert_close(flat_params(model), expected, rtol=1e-12, atol=1e-12)


def test_exact_mode_averages_each_shards_exact_gradient_and_refuses_a_synced_perturbation():
    model = small_net()
    x, y = make_batch(0, n=16)
    per_shard = []
    for xs, ys in zip(x.tensor_split(SHARDS), y.tensor_split(SHARDS)):  # one exact step of each shard, lr 1
        shard = copy.deepcopy(model)
        GNP(shard, torch.optim.SGD(shard.parameters(), lr=1.0), exact=True).step(closure_for(shard, xs, ys))
        per_shard.append(flat_params(model) - flat_params(shard))
    GNP(model, torch.optim.SGD(model.parameters(), lr=1.0), exact=True).step(shard_closures(model, x, y))
    torch.testing.assert_close(flat_params(model), flat_params(small_net()) - torch.stack(per_shard).mean(0),
                               rtol=1e-12, atol=1e-12)
    synced = GNP(model, torch.optim.SGD(model.parameters(), lr=1.0), exact=True, sync_perturbation=True)
    with pytest.raises(ValueError, match=r"^sync_perturbation=True is invalid: sync_perturbation must be False with "
                                         r"exact=True and several shards"):
        synced.step(shard_closures(model, x, y))


@pytest.mark.parametrize("method", [GNP, SAM])
def test_an_fp16_overflow_in_one_shard_skips_the_step(method):
    model, spare, opt, scaler = _scaled_trainer(method=method, l2=0.0)
    x, y = make_batch(0, n=32, dtype=torch.float32)
    params = flat_params(model)
    shards = [_overflowing_closure(model, spare, xs, ys, bad_pass=2 if i == 2 else None)
              for i, (xs, ys) in enumerate(zip(x.tensor_split(SHARDS), y.tensor_split(SHARDS)))]
    opt.step(shards)
    assert opt.last_step.skipped.item() and torch.equal(flat_params(model), params)
    assert scaler.get_scale() == 2.0**15


def test_a_step_needs_at_least_one_closure():
    model = small_net()
    with pytest.raises(ValueError, match="step needs a closure"):
        GNP(model, torch.optim.SGD(model.parameters(), lr=0.1)).step([])


# --- DDP (gloo, 2 processes on CPU) --------------------------------------------------------------

DDP_SETTINGS = {"synced": dict(r=0.05, alpha=0.8, sync_perturbation=True),
                "local": dict(r=0.05, alpha=0.8, sync_perturbation=False, max_grad_norm=0.1),
                "plain": dict(r=0.0, alpha=0.0, normalize_first_grad=False)}
# Settings run again with a GradScaler (float64, so exact), and where (rank, step) a second pass overflows.
DDP_SCALED = {"local scaled": ("local", None), "plain scaled": ("plain", None), "overflow": ("local", (1, 0))}
DDP_SETTINGS.update({name: DDP_SETTINGS[like] for name, (like, _) in DDP_SCALED.items()})
# Settings run again with 2 shards on each replica: the step of 4 shards.
DDP_SHARDED = {"local 2 shards": "local", "synced 2 shards": "synced", "plain 2 shards": "plain"}
DDP_SETTINGS.update({name: DDP_SETTINGS[like] for name, like in DDP_SHARDED.items()})
DDP_STEPS, DDP_LR = 2, 0.1


def _ddp_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world_size)
    try:
        results = {}
        for name, settings in DDP_SETTINGS.items():
            model = nn.parallel.DistributedDataParallel(small_net(seed=5))
            synced_buckets: list[int] = []
            model.register_comm_hook(synced_buckets, _count_and_allreduce)
            scaler = torch.amp.GradScaler("cpu") if name in DDP_SCALED else None
            opt = GNP(model, torch.optim.SGD(model.parameters(), lr=DDP_LR), **settings,
                      grad_scaler=scaler)
            skipped = []
            for step in range(DDP_STEPS):
                x, y = make_batch(step)
                shard = slice(rank * len(x) // world_size, (rank + 1) * len(x) // world_size)
                closure = closure_for(model, x[shard], y[shard])
                if name in DDP_SHARDED:
                    closure = shard_closures(model, x[shard], y[shard], shards=2)
                if name in DDP_SCALED and DDP_SCALED[name][1] == (rank, step):
                    closure = _inf_in_second_pass(closure)
                opt.step(closure)
                skipped.append(opt.last_step.skipped.item())
            results[name] = flat_params(model.module)
            results[name + " synced passes"] = len(synced_buckets)
            results[name + " skipped"] = skipped
            results[name + " scale"] = scaler.get_scale() if scaler else None
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _inf_in_second_pass(closure):
    calls = []

    def overflowing():
        calls.append(None)
        loss = closure()
        return loss * math.inf if len(calls) == 2 else loss
    return overflowing


def _count_and_allreduce(calls, bucket):  # unannotated: DDP rejects string annotations
    """DDP's own gradient averaging, counted: one call per bucket of a synchronised backward."""
    calls.append(bucket.index())
    return allreduce_hook(None, bucket)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_oracle(settings: dict, shards: int, skipped_step: int | None = None) -> torch.Tensor:
    """The expected parameters: full-batch formula (synced, plain) or mean of per-shard formulas,
    then clipped."""
    model = small_net(seed=5)
    for step in range(DDP_STEPS):
        if step == skipped_step:
            continue
        x, y = make_batch(step)
        formula = (settings["r"], settings["alpha"], settings.get("normalize_first_grad", True))
        if settings.get("sync_perturbation", True):
            direction = reference_direction(model, x, y, *formula)
        else:
            direction = torch.stack([
                reference_direction(model, xs, ys, *formula)
                for xs, ys in zip(x.chunk(shards), y.chunk(shards))
            ]).mean(0)
        if settings.get("max_grad_norm"):  # clip the averaged gradient, as torch does
            assert direction.norm() > settings["max_grad_norm"], "clipping must bind to be tested"
            direction = direction * settings["max_grad_norm"] / (direction.norm() + 1e-6)
        with torch.no_grad():
            new = flat_params(model) - DDP_LR * direction
            torch.nn.utils.vector_to_parameters(new, model.parameters())
    return flat_params(model)


@pytest.mark.slow
def test_ddp_matches_full_batch_and_per_shard_oracles(tmp_path):
    world_size = 2
    start_replicas(_ddp_worker, (world_size, _free_port(), str(tmp_path)), world_size)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(world_size)]
    # An overflow on one replica skips the step on every replica (and halves every scale once).
    oracles = {name: _ddp_oracle(settings, world_size * (2 if name in DDP_SHARDED else 1),
                                 skipped_step=0 if name == "overflow" else None)
               for name, settings in DDP_SETTINGS.items()}
    scales = {name: 2.0**15 if name == "overflow" else 2.0**16 if name in DDP_SCALED else None for name in DDP_SETTINGS}
    for name in DDP_SETTINGS:
        assert torch.equal(ranks[0][name], ranks[1][name]), f"{name}: replicas diverged"
        torch.testing.assert_close(ranks[0][name], oracles[name], rtol=1e-10, atol=1e-12, msg=name)
        assert ranks[0][name + " skipped"] == ranks[1][name + " skipped"] == [name == "overflow", False], name
        assert ranks[0][name + " scale"] == ranks[1][name + " scale"] == scales[name], name
    # DDP synchronises only the first pass, and only where it is shared (one bucket here) by a replica's
    # only shard; the perturbed pass, and every pass of several shards, stays local, averaged once afterwards.
    expected_synced = {"synced": DDP_STEPS, "local": 0, "plain": DDP_STEPS,
                       "local scaled": 0, "plain scaled": DDP_STEPS, "overflow": 0,
                       "local 2 shards": 0, "synced 2 shards": 0, "plain 2 shards": 0}
    assert {name: ranks[0][name + " synced passes"] for name in DDP_SETTINGS} == expected_synced
    # The two perturbation modes, and 2 and 4 shards, must be distinguishable for the test to mean anything.
    assert not torch.allclose(oracles["synced"], oracles["local"], rtol=1e-6, atol=0)
    assert not torch.allclose(oracles["local 2 shards"], oracles["local"], rtol=1e-6, atol=0)
