"""The sharpness-aware family beside GNP (GSAM, GAM, LookSAM, FriendlySAM, WSAM, and ASAM's rule) against
independent implementations in float64: pytorch_optimizer's optimizers (a test-only dependency, pinned in the
dev extra) and a reference written here from GAM's algorithm; their state across steps, shards, DDP replicas,
float16 skips and a resume; the plug-in contract of gnp.methods as docs/methods.md states it."""
from __future__ import annotations

import copy
import io
import math
import os
import re

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad

import pytorch_optimizer.optimizer.sam as peer
from pytorch_optimizer.lr_scheduler.proportion import ProportionScheduler

from conftest import ROOT, compose_config, signal_at_step, start_replicas
from gnp.config import ConfigError, build_method
from gnp.methods import ASAM, GAM, GNP, GSAM, WSAM, FriendlySAM, LookSAM, SettingError, TwoPassMethod
from gnp.models import build_model
from gnp.training import Stopped
from test_method import _free_port, flat_params, make_batch, shard_closures, small_net
from test_training import RESUMABLE, TIMING, _cifar_run, _metrics, _without_timing

STEPS = 6
NEW = {"gsam": GSAM, "gam": GAM, "looksam": LookSAM, "friendlysam": FriendlySAM, "wsam": WSAM}


@pytest.fixture
def exact_peer_norm(monkeypatch):
    """pytorch_optimizer computes the global gradient norm of its perturbation in float32, whatever the dtype
    (`get_global_gradient_norm` casts the squared norms with .float()): in float64 the test uses the exact
    norm in its place, so that everything else the peer does is compared at float64 rounding."""
    def squared_norm(param_groups, device=None, *, weight_adaptive=False):
        assert not weight_adaptive or not any(g.get("adaptive") for g in param_groups)
        return torch.stack([p.grad.pow(2).sum() for g in param_groups for p in g["params"]
                            if p.grad is not None]).sum().reshape(1)
    monkeypatch.setattr(peer, "get_global_gradient_norm", squared_norm)


def _base(name: str, params, lr: float = 0.1) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    return torch.optim.AdamW(params, lr=lr / 10, weight_decay=0.3)


def _peer_base(name: str, lr: float = 0.1) -> tuple[type, dict]:
    """The same base optimizer as a class and its arguments, as pytorch_optimizer's wrappers build it."""
    return (torch.optim.SGD, dict(lr=lr, momentum=0.9)) if name == "sgd" else \
        (torch.optim.AdamW, dict(lr=lr / 10, weight_decay=0.3))


def _loss(model: nn.Module, x, y, l2: float = 0.0, scale: float = 1.0) -> torch.Tensor:
    """Cross-entropy plus the in-loss L2 term written out: what `l2` adds to each pass."""
    penalty = 0.5 * l2 * sum(p.pow(2).sum() for p in model.parameters()) if l2 else 0.0
    return scale * (F.cross_entropy(model(x), y) + penalty)


def _train_ours(method, base: str, steps: int = STEPS, lr: float = 0.1, scale: float = 1.0, **settings) -> torch.Tensor:
    model = small_net(seed=3)
    optimizer = _base(base, model.parameters(), lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    opt = method(model, optimizer, **settings)
    for step in range(steps):
        x, y = make_batch(step)
        opt.step(lambda: _loss(model, x, y, scale=scale))
        scheduler.step()
    return flat_params(model)


def _train_peer(build, base: str, steps: int = STEPS, lr: float = 0.1, l2: float = 0.0, scale: float = 1.0,
                first_pass: bool = True) -> torch.Tensor:
    """pytorch_optimizer's documented protocol: a closure that zeroes, computes the loss and backpropagates;
    the first pass before `step(closure)` where the optimizer asks for it."""
    model = small_net(seed=3)
    cls, kwargs = _peer_base(base, lr)
    opt = build(model, cls, kwargs)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt.base_optimizer, T_max=steps)
    for step in range(steps):
        x, y = make_batch(step)

        def closure():
            opt.zero_grad()
            loss = _loss(model, x, y, l2, scale)
            loss.backward()
            return loss
        if first_pass:
            closure()
        opt.step(closure)
        scheduler.step()
    return flat_params(model)


def _assert_equal(ours: torch.Tensor, theirs: torch.Tensor, start: torch.Tensor) -> None:
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-10)
    assert (ours - start).abs().max() > 1e-3  # the steps moved the parameters


START = flat_params(small_net(seed=3))


# --- GSAM ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("r_min, l2", [(None, 0.0), (0.02, 0.0), (0.02, 1e-3)])
def test_gsam_equals_pytorch_optimizers_gsam(exact_peer_norm, base, r_min, l2):
    """Their rho scheduler, ProportionScheduler(max_lr=lr_0, min_lr=0), is r_min; their closure's loss holds
    the L2 term that `l2` adds; their perturb_eps is 0 (this floors norms at 1e-12 instead)."""
    r, alpha, lr = 0.1, 0.3, 0.1
    model = small_net(seed=3)
    optimizer = _base(base, model.parameters(), lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=STEPS)
    rho = ProportionScheduler(scheduler, max_lr=optimizer.param_groups[0]["lr"], min_lr=0.0, max_value=r,
                              min_value=r if r_min is None else r_min)
    opt = peer.GSAM(model.parameters(), optimizer, model, rho, alpha=alpha, perturb_eps=0.0)
    for step in range(STEPS):
        x, y = make_batch(step)
        opt.set_closure(lambda out, target: F.cross_entropy(out, target) + (
            0.5 * l2 * sum(p.pow(2).sum() for p in model.parameters())), x, y)
        opt.step()
        scheduler.step()
        opt.update_rho_t()
    ours = _train_ours(GSAM, base, r=r, alpha=alpha, r_min=r_min, l2=l2)
    _assert_equal(ours, flat_params(model), START)


def test_gsams_radius_follows_the_learning_rate_from_r_to_r_min():
    model = small_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / 4)
    opt = GSAM(model, optimizer, r=0.1, r_min=0.02, alpha=0.3)
    radii = []
    for step in range(4):
        x, y = make_batch(step)
        opt.step(lambda: F.cross_entropy(model(x), y))
        radii.append(opt.last_step.schedule["r"])
        scheduler.step()
    assert radii == pytest.approx([0.02 + 0.08 * (1 - k / 4) for k in range(4)], rel=1e-12)
    assert opt.last_step.schedule["alpha"] == 0.3


# --- WSAM ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("decoupled", [True, False])
def test_wsam_equals_pytorch_optimizers_wsam(exact_peer_norm, base, decoupled):
    """No clipping on either side (theirs clips g2 before the combination, ours the gradient handed to the
    base optimizer); their eps is 0."""
    theirs = _train_peer(lambda model, cls, kwargs: peer.WSAM(model, model.parameters(), cls, rho=0.05, gamma=0.8,
                                                               decouple=decoupled, eps=0.0, **kwargs),
                         base, l2=1e-3, first_pass=False)
    ours = _train_ours(WSAM, base, r=0.05, gamma=0.8, decoupled=decoupled, l2=1e-3)
    _assert_equal(ours, theirs, START)


@pytest.mark.parametrize("gamma", [0.2, 0.5])
def test_wsam_without_decoupling_is_gnps_paper_formula_with_alpha_gamma_over_one_minus_gamma(gamma):
    common = dict(r=0.05, l2=1e-3, max_grad_norm=5.0)
    wsam = _train_ours(WSAM, "sgd", gamma=gamma, decoupled=False, **common)
    gnp = _train_ours(GNP, "sgd", alpha=gamma / (1 - gamma), normalize_first_grad=False, **common)
    assert torch.equal(wsam, gnp)


# --- LookSAM ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_layerwise_looksam_equals_pytorch_optimizers_looksam(exact_peer_norm, base):
    """Theirs adds 1e-8 to each ||g_v|| of the steps in between (ours floors norms at 1e-12): the loss is
    scaled by 1e6 and the learning rate by 1e-6 (AdamW's eps by 1e6), the same trajectory, where that 1e-8 is
    below float64 rounding of the result. k = 3 over 6 steps: two SAM steps, four in between."""
    scale = 1e6
    cls, kwargs = (torch.optim.SGD, dict(lr=0.1 / scale, momentum=0.9)) if base == "sgd" else \
        (torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.3, eps=1e-8 * scale))
    theirs = _train_peer(lambda model, *_: peer.LookSAM(model.parameters(), cls, rho=0.1, k=3, alpha=0.7,
                                                         perturb_eps=0.0, **kwargs), base, scale=scale)
    model = small_net(seed=3)
    optimizer = cls(model.parameters(), **kwargs)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=STEPS)
    opt = LookSAM(model, optimizer, r=0.1, k=3, alpha=0.7, layerwise=True)
    passes = []
    for step in range(STEPS):
        x, y = make_batch(step)
        opt.step(lambda: _loss(model, x, y, scale=scale))
        scheduler.step()
        passes.append(opt.last_step.passes)
    assert passes == [2, 1, 1, 2, 1, 1]
    _assert_equal(flat_params(model), theirs, START)


def _flat_grad(model: nn.Module, theta: torch.Tensor, x, y, l2: float = 0.0) -> torch.Tensor:
    """The gradient of the loss (and 0.5 * l2 * ||theta||^2) at the flat parameter vector theta."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]

    def loss(flat):
        params, offset = {}, 0
        for name, shape in zip(names, shapes):
            params[name] = flat[offset: offset + shape.numel()].reshape(shape)
            offset += shape.numel()
        return F.cross_entropy(functional_call(model, params, (x,)), y) + 0.5 * l2 * flat.pow(2).sum()
    return grad(loss)(theta)


def _sgd_reference(direction_of, steps: int = STEPS, lr: float = 0.1, momentum: float = 0.9) -> torch.Tensor:
    """SGD with momentum (torch's convention, constant lr) on the flat vector, with the step's gradient
    `direction_of(model, theta, step)` written from a method's formulas."""
    model = small_net(seed=3)
    theta, buffer = flat_params(model).clone(), None
    for step in range(steps):
        g = direction_of(model, theta, step)
        buffer = g if buffer is None else momentum * buffer + g
        theta = theta - lr * buffer
    return theta


def _train_ours_constant_lr(method, steps: int = STEPS, **settings) -> torch.Tensor:
    model = small_net(seed=3)
    opt = method(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), **settings)
    for step in range(steps):
        x, y = make_batch(step)
        opt.step(lambda: F.cross_entropy(model(x), y))
    return flat_params(model)


def test_looksam_follows_the_papers_algorithm_on_the_whole_gradient():
    r, k, alpha, l2 = 0.1, 3, 0.7, 1e-3
    kept = {}

    def direction(model, theta, step):
        x, y = make_batch(step)
        g1 = _flat_grad(model, theta, x, y, l2)
        if step % k == 0:
            g2 = _flat_grad(model, theta + r * g1 / g1.norm(), x, y, l2)
            unit = g1 / g1.norm()
            kept["g_v"] = g2 - (g2 @ unit) * unit
            return g2
        return g1 + alpha * g1.norm() / kept["g_v"].norm() * kept["g_v"]
    reference = _sgd_reference(direction)
    _assert_equal(_train_ours_constant_lr(LookSAM, r=r, k=k, alpha=alpha, l2=l2), reference, START)


# --- FriendlySAM --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("base", ["sgd", "adamw"])
@pytest.mark.parametrize("sigma, lmbda", [(1.0, 0.6), (0.5, 0.9)])
def test_friendlysam_equals_pytorch_optimizers_friendlysam(exact_peer_norm, base, sigma, lmbda):
    theirs = _train_peer(lambda model, cls, kwargs: peer.FriendlySAM(
        model.parameters(), cls, rho=0.2, sigma=sigma, lmbda=lmbda, perturb_eps=0.0, **kwargs), base, l2=1e-3)
    ours = _train_ours(FriendlySAM, base, r=0.2, sigma=sigma, lmbda=lmbda, l2=1e-3)
    _assert_equal(ours, theirs, START)


# --- GAM ----------------------------------------------------------------------------------------------------

def test_gam_equals_a_float64_reference_of_the_authors_algorithm():
    """Written from the accelerated algorithm as xxgege/GAM computes it (gam.py: perturb_weights,
    grad_norm_ascent, gradient_decompose), with exact norms where theirs adds 1e-12."""
    r, r_norm, beta0, beta1, gamma, l2 = 0.03, 0.2, 0.5, 0.6, 0.03, 1e-3

    def direction(model, theta, step):
        x, y = make_batch(step)
        g0 = _flat_grad(model, theta, x, y, l2)
        e0 = r * g0 / g0.norm()
        g1 = _flat_grad(model, theta + e0, x, y, l2)
        ascent = g1 - g0
        e12 = r_norm * ascent / ascent.norm()
        g2 = _flat_grad(model, theta + e12, x, y, l2)
        g3 = _flat_grad(model, theta + e12 + r * g2 / g2.norm(), x, y, l2)
        pro_m = g0 + abs(1 - beta0) * g2
        g = beta1 * g1 + (1 - beta1) * g3
        cosine = (pro_m @ g) / (g.norm() * pro_m.norm())
        vertical = pro_m - cosine * pro_m.norm() * g / g.norm()
        return g - gamma * vertical
    reference = _sgd_reference(direction)
    model = small_net(seed=3)
    opt = GAM(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), r=r, r_norm=r_norm, beta0=beta0,
              beta1=beta1, gamma=gamma, l2=l2)
    for step in range(STEPS):
        x, y = make_batch(step)
        opt.step(lambda: F.cross_entropy(model(x), y))
        assert opt.last_step.passes == 4
    _assert_equal(flat_params(model), reference, START)
    assert opt.expected_passes(100) == 4


# --- state across steps: resume, shards, DDP, float16 skips ---------------------------------------------------

STATEFUL = [(LookSAM, dict(r=0.1, k=3)), (FriendlySAM, dict(r=0.2, lmbda=0.6)), (WSAM, dict(r=0.05)),
            (GSAM, dict(r=0.1, r_min=0.02)), (GAM, {})]


def _stepper(method, settings: dict, state=None, model_state=None):
    model = small_net(seed=3)
    if model_state is not None:
        model.load_state_dict(model_state)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=2 * STEPS)
    opt = method(model, optimizer, **settings)
    if state is not None:
        opt.load_state_dict(state["opt"])
        scheduler.load_state_dict(state["scheduler"])
    return model, opt, scheduler


def _steps(model, opt, scheduler, steps: range) -> None:
    for step in steps:
        x, y = make_batch(step)
        opt.step(lambda: F.cross_entropy(model(x), y))
        scheduler.step()


@pytest.mark.parametrize("method, settings", STATEFUL)
def test_a_resumed_method_continues_bit_for_bit(method, settings):
    """4 steps, save, load into fresh objects, 4 more == 8 uninterrupted (mid-cycle of LookSAM's k = 3);
    without the method's own state (the stored g_v, the average) the resumed steps differ."""
    uninterrupted = _stepper(method, settings)
    _steps(*uninterrupted, range(8))
    first = _stepper(method, settings)
    _steps(*first, range(4))
    buffer = io.BytesIO()
    torch.save({"model": first[0].state_dict(), "opt": first[1].state_dict(), "scheduler": first[2].state_dict()},
               buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    resumed = _stepper(method, settings, saved, saved["model"])
    _steps(*resumed, range(4, 8))
    assert torch.equal(flat_params(resumed[0]), flat_params(uninterrupted[0]))
    own = {k for k in saved["opt"] if k not in ("base_optimizer", "steps_taken")}
    assert own == {LookSAM: {"orthogonal"}, FriendlySAM: {"average"}}.get(method, set())
    if own:
        forgetful = _stepper(method, settings, {**saved, "opt": {k: v for k, v in saved["opt"].items()
                                                                 if k not in own}}, saved["model"])
        _steps(*forgetful, range(4, 8))
        assert not torch.allclose(flat_params(forgetful[0]), flat_params(resumed[0]), rtol=1e-9, atol=0)


@pytest.mark.parametrize("method, settings", STATEFUL + [
    (FriendlySAM, dict(r=0.2, lmbda=0.6, sync_perturbation=True)), (WSAM, dict(r=0.05, sync_perturbation=True)),
    (GSAM, dict(r=0.1, r_min=0.02, sync_perturbation=True))])
def test_two_equal_shards_take_the_step_of_one(method, settings):
    """Each shard's own quantities are the batch's, so their mean is too: state kept across steps (g_v, the
    average, the sharpness step) must be the mean over the shards, not their sum or the last one's."""
    results = []
    for shards in (1, 2):
        model, opt, scheduler = _stepper(method, settings)
        for step in range(5):
            x, y = make_batch(step)
            closure = lambda: F.cross_entropy(model(x), y)  # noqa: E731
            opt.step([closure] * shards if shards > 1 else closure)
            scheduler.step()
        results.append(flat_params(model))
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=1e-13)


SHARDED = [(LookSAM, dict(r=0.1, k=2)), (FriendlySAM, dict(r=0.2, lmbda=0.6)), (WSAM, dict(r=0.05)),
           (GSAM, dict(r=0.1)), (GAM, {}), (FriendlySAM, dict(r=0.2, lmbda=0.6, sync_perturbation=True)),
           (WSAM, dict(r=0.05, sync_perturbation=True))]
DDP_STEPS = 4


def _sharded_run(method, settings, rank: int | None = None, world_size: int = 2) -> torch.Tensor:
    """DDP_STEPS steps of batches of 16: on one process as 2 shards, or as replica `rank` of 2 (its half)."""
    net = small_net(seed=5)
    model = nn.parallel.DistributedDataParallel(net) if rank is not None else net
    opt = method(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), **settings)
    for step in range(DDP_STEPS):
        x, y = make_batch(step)
        if rank is None:
            opt.step(shard_closures(model, x, y, shards=world_size))
        else:
            half = slice(rank * len(x) // world_size, (rank + 1) * len(x) // world_size)
            opt.step(lambda: F.cross_entropy(model(x[half]), y[half]))
    return flat_params(net)


def _ddp_family_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        torch.save([_sharded_run(method, settings, rank) for method, settings in SHARDED],
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ddp_replicas_take_the_step_of_two_shards_on_one_process(tmp_path):
    """k shards of a step on one process are k devices: each shard perturbs with its own g1 (or, synced, the
    batch perturbs once) and the state kept across steps is one for the batch, the same on every replica."""
    start_replicas(_ddp_family_worker, (2, _free_port(), str(tmp_path)), 2)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    for index, (method, settings) in enumerate(SHARDED):
        name = f"{method.__name__} {settings}"
        assert torch.equal(ranks[0][index], ranks[1][index]), f"{name}: replicas diverged"
        torch.testing.assert_close(ranks[0][index], _sharded_run(method, settings), rtol=0, atol=1e-12, msg=name)


def _overflow_on_call(closure, bad_call: int):
    calls = []

    def overflowing():
        calls.append(None)
        loss = closure()
        return loss * math.inf if len(calls) == bad_call else loss
    return overflowing


@pytest.mark.parametrize("method, settings, bad_step, bad_pass", [
    (LookSAM, dict(r=0.1, k=2), 0, 2), (LookSAM, dict(r=0.1, k=2), 2, 1), (FriendlySAM, dict(r=0.2), 0, 1),
    (FriendlySAM, dict(r=0.2), 2, 2), (WSAM, dict(r=0.05), 1, 2), (GAM, {}, 1, 3)])
def test_a_skipped_float16_step_leaves_the_parameters_and_the_kept_state_as_they_were(method, settings, bad_step,
                                                                                       bad_pass):
    """A GradScaler without autocast (float64, so the scaling is exact); an inf in one pass of one step."""
    model = small_net(seed=3)
    opt = method(model, torch.optim.SGD(model.parameters(), lr=0.1), grad_scaler=torch.amp.GradScaler("cpu"),
                 **settings)
    state = {LookSAM: "orthogonal", FriendlySAM: "average"}.get(method)
    for step in range(4):
        x, y = make_batch(step)
        closure = lambda: F.cross_entropy(model(x), y)  # noqa: E731
        before = flat_params(model), copy.deepcopy(getattr(opt, state)) if state else None
        opt.step(_overflow_on_call(closure, bad_pass) if step == bad_step else closure)
        assert opt.last_step.skipped.item() == (step == bad_step)
        if step == bad_step:
            assert torch.equal(flat_params(model), before[0])
            if state:
                kept = getattr(opt, state)
                assert (kept is None) == (before[1] is None)
                assert kept is None or all(torch.equal(a, b) for a, b in zip(kept, before[1]))
        assert torch.isfinite(flat_params(model)).all()


@pytest.mark.parametrize("method", sorted(NEW))
def test_a_run_of_each_new_method_stopped_mid_epoch_resumes_to_the_uninterrupted_result(tmp_path, cifar_root,
                                                                                       monkeypatch, method):
    """The training loop's resume test (tests/test_training.py) for each new method: stopped at step 6 of 8,
    mid-cycle for LookSAM with k = 4."""
    options = (f"method={method}", *(("method.k=4",) if method == "looksam" else ()))
    _, uninterrupted = _cifar_run(cifar_root, tmp_path / "a", *RESUMABLE, *options)
    signal_at_step(monkeypatch, 6)
    with pytest.raises(Stopped):
        _cifar_run(cifar_root, tmp_path / "b", *RESUMABLE, *options)
    monkeypatch.undo()
    _, resumed = _cifar_run(cifar_root, tmp_path / "b", *RESUMABLE, *options)
    assert _without_timing(_metrics(tmp_path / "b")) == _without_timing(_metrics(tmp_path / "a"))
    assert {k: v for k, v in resumed.items() if k not in TIMING} == \
        {k: v for k, v in uninterrupted.items() if k not in TIMING}
    assert resumed["status"] == "finished" and resumed["method"] == method


# --- refusals and the plug-in contract --------------------------------------------------------------------------

@pytest.mark.parametrize("method, settings, name", [
    (LookSAM, dict(sync_perturbation=True), "sync_perturbation"), (LookSAM, dict(two_pass_probability=0.5),
                                                                   "two_pass_probability"),
    (LookSAM, dict(k=0), "k"), (GAM, dict(sync_perturbation=True), "sync_perturbation"),
    (GAM, dict(warmup="r", warmup_steps=2), "warmup"), (GSAM, dict(r=0.1, r_min=0.2), "r_min"),
    (WSAM, dict(gamma=1.0), "gamma"), (FriendlySAM, dict(lmbda=1.0), "lmbda"), (GSAM, dict(alpha=-1), "alpha")])
def test_settings_a_method_cannot_take_are_refused_by_name(method, settings, name):
    model = small_net()
    with pytest.raises(SettingError) as refused:
        method(model, torch.optim.SGD(model.parameters(), lr=0.1), **settings)
    assert refused.value.name == name


def test_asam_scales_what_the_authors_scale_on_a_vit_leaving_cls_token_and_pos_embed_at_one():
    """SamsungLabs/ASAM scales a parameter when 'weight' is in its name: on a ViT, not the class token, the
    position embedding or the biases. Checked against the direction T^2 g1 / ||T g1|| written with T."""
    torch.manual_seed(0)
    model = build_model("vit_ti", 10, depth=1).double()
    opt = ASAM(model, torch.optim.SGD(model.parameters(), lr=0.1), r=0.5, eta=0.01)
    params = dict(model.named_parameters())
    g1 = [torch.randn_like(p) for p in params.values()]
    direction = opt.direction(list(params.values()), [g.clone() for g in g1], torch.tensor(1.0))
    scale = [p.detach().abs() + 0.01 if "weight" in name else torch.ones_like(p) for name, p in params.items()]
    t_g = [s * g for s, g in zip(scale, g1)]
    norm = torch.linalg.vector_norm(torch.cat([t.reshape(-1) for t in t_g]))
    for (name, p), s, tg, d in zip(params.items(), scale, t_g, direction):
        torch.testing.assert_close(d, s * tg / norm, rtol=1e-12, atol=0, msg=name)
    assert {"cls_token", "pos_embed"} <= set(params) and not any("weight" in n for n in ("cls_token", "pos_embed"))


class _NoDirection(TwoPassMethod):
    def __init__(self, model, base_optimizer, r=0.05, **settings):
        super().__init__(model, base_optimizer, r, **settings)


class _RefusesPlainly(TwoPassMethod):
    def __init__(self, model, base_optimizer, r=0.05, **settings):
        if r > 0.5:
            raise ValueError(f"r={r} is too large for this method\n(a second line)")
        super().__init__(model, base_optimizer, r, **settings)

    def direction(self, params, g1, g1_norm):
        return g1


@pytest.mark.parametrize("target, override, message", [
    ("test_family._NoDirection", "method.r=0.1",
     "method=mine (_NoDirection) refused its settings: _NoDirection defines no direction(params, g1, g1_norm)"),
    ("test_family._RefusesPlainly", "method.r=0.9",
     "method=mine (_RefusesPlainly) refused its settings: r=0.9 is too large for this method"),
])
def test_a_plug_in_that_breaks_the_contract_or_refuses_a_setting_is_one_line_naming_it(target, override, message):
    cfg = compose_config("method=sam", f"method._target_={target}", "method.name=mine", override,
                         "optimizer.weight_decay_mode=optimizer")
    model = small_net()
    with pytest.raises(ConfigError) as refused:
        build_method(cfg, model, torch.optim.SGD(model.parameters(), lr=0.1), 10)
    assert str(refused.value).startswith(message) and "\n" not in str(refused.value)


def test_every_python_block_of_readme_and_docs_runs_as_printed(tmp_path, monkeypatch):
    """The examples of README.md and docs/*.md (the library in one's own loop, a method of one's own) run as
    they are printed."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    blocks = [(page, block) for page in pages
              for block in re.findall(r"```python\n(.*?)```", page.read_text(), re.DOTALL)]
    assert len(blocks) >= 3 and {page.name for page, _ in blocks} >= {"README.md", "methods.md"}
    monkeypatch.chdir(tmp_path)
    for page, block in blocks:
        exec(compile(block, str(page.relative_to(ROOT)), "exec"), {"__name__": "docs_example"})
