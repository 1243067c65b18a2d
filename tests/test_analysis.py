"""The flatness analysis of finished runs (gnp.analysis), against independent oracles: a dense
Hessian, a full-batch gradient in one pass, the closed-form sharpness of a quadratic, a loss
recomputed by hand; and end to end on real runs trained through train.py: the file's layout,
resume after a kill, files left untouched and every bad input as one line."""
import copy
import hashlib
import json
import math
import shutil
from contextlib import contextmanager

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from omegaconf import OmegaConf
from scipy.optimize import brentq

from conftest import compose_config, in_process, train_py
from gnp.analysis import AnalysisError, landscape, subset_loss
from gnp.analysis.__main__ import _describe, main
from gnp.analysis.hessian import hutchinson_trace, top_eigenvalues
from gnp.analysis.objective import SubsetLoss
from gnp.methods import global_norm as norm
from gnp.analysis.run import QUANTITIES, Analysis, Options, load_finished_run, trained_l2
from gnp.analysis.sharpness import sam_sharpness
from gnp.data import load_dataset
from gnp.models import build_model
from gnp.training import checkpointing

WEIGHT_DECAY, SMOOTHING = 0.01, 0.1


# --- a model small enough for a dense Hessian ----------------------------------------------------

def _tiny_model() -> nn.Module:
    """Conv, BatchNorm (eval mode, non-trivial running statistics), ReLU, linear: 290 parameters."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 4))
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.2, 0.2)
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].weight.uniform_(0.5, 1.5)
    return model.double().eval()


def _tiny_data(n=40):
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(n, 3, 6, 6, generator=generator, dtype=torch.float64)
    return images, torch.randint(0, 4, (n,), generator=generator)


def _tiny_loss(model, images, labels, batch_size=16):
    """The analysis's loss in batches of 16, 16 and 8 (uneven, so the weighting matters), with label
    smoothing and in-loss L2 on the weights only."""
    batches = list(zip(images.split(batch_size), labels.split(batch_size)))
    l2 = [(WEIGHT_DECAY, [p for p in model.parameters() if p.ndim > 1])]  # weights only, as decay_norm_and_bias=false
    return SubsetLoss(model, batches, label_smoothing=SMOOTHING, l2=l2)


def _one_pass_loss(model, images, labels):
    """The oracle: the same loss written out, as a function of the flattened parameters, in one pass."""
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    buffers = dict(model.named_buffers())

    def loss(flat):
        params = dict(zip(names, [piece.view(shape) for piece, shape in
                                  zip(flat.split([s.numel() for s in shapes]), shapes)]))
        logits = torch.func.functional_call(model, {**params, **buffers}, (images,))
        l2 = sum(p.pow(2).sum() for p in params.values() if p.ndim > 1)
        return F.cross_entropy(logits, labels, label_smoothing=SMOOTHING) + 0.5 * WEIGHT_DECAY * l2

    return loss, torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.fixture(scope="module")
def dense():
    model = _tiny_model()
    images, labels = _tiny_data()
    oracle, theta = _one_pass_loss(model, images, labels)
    hessian = torch.autograd.functional.hessian(oracle, theta).numpy()
    return model, images, labels, oracle, theta, hessian


def test_the_top_eigenvalues_match_a_dense_hessian(dense):
    model, images, labels, _, _, hessian = dense
    loss = _tiny_loss(model, images, labels)
    result = top_eigenvalues(loss, k=4, seed=0)
    exact = np.linalg.eigvalsh(hessian)[::-1][:4]
    np.testing.assert_allclose(result["values"], exact, rtol=1e-6)
    assert result["converged"] == 4 and max(result["residuals"]) < 1e-6
    assert result["hvp_count"] == loss.hvp_count > 4  # the Lanczos products and one check per eigenpair


def test_the_trace_estimate_is_within_three_standard_errors(dense):
    model, images, labels, _, _, hessian = dense
    exact = np.trace(hessian)
    for seed in range(5):
        result = hutchinson_trace(_tiny_loss(model, images, labels), samples=30, seed=seed)
        assert result["samples"] == 30 and result["stderr"] > 0
        assert abs(result["value"] - exact) < 3 * result["stderr"], (seed, result, exact)
    # A Rademacher vector's v^T H v: the estimate of one vector, by the dense matrix.
    loss = _tiny_loss(model, images, labels)
    v = [torch.randint(0, 2, p.shape, dtype=p.dtype).mul_(2).sub_(1) for p in loss.params]
    flat = torch.cat([x.reshape(-1) for x in v]).numpy()
    hv = torch.cat([x.reshape(-1) for x in loss.hvp(v)]).numpy()
    np.testing.assert_allclose(hv, hessian @ flat, rtol=1e-9, atol=1e-12)


def test_the_gradient_over_batches_is_the_full_batch_gradient(dense):
    model, images, labels, oracle, theta, _ = dense
    loss = _tiny_loss(model, images, labels)
    value, grad = loss.gradient()
    flat = theta.clone().requires_grad_()
    full = oracle(flat)
    (full_grad,) = torch.autograd.grad(full, flat)
    assert value.item() == pytest.approx(full.item(), rel=1e-12)
    assert loss.evaluate()[0].item() == pytest.approx(full.item(), rel=1e-12)
    assert norm(grad).item() == pytest.approx(full_grad.norm().item(), rel=1e-10)
    # A mean of per-batch norms is another (larger) number: the test tells them apart.
    per_batch = np.mean([norm(_tiny_loss(model, x, y, batch_size=len(y)).gradient()[1]).item()
                         for x, y in zip(images.split(16), labels.split(16))])
    assert abs(per_batch - full_grad.norm().item()) > 1e-3


# --- the in-loss L2 term -------------------------------------------------------------------------

@pytest.mark.parametrize("mode,decay_norm_and_bias", [("loss", True), ("loss", False), ("optimizer", True)])
def test_the_in_loss_l2_term_is_the_one_training_adds(mode, decay_norm_and_bias):
    """The run's own method, built as training builds it, gives the L2 term: checked by hand here."""
    cfg = compose_config("experiment=digits_demo", "model.width=2", f"optimizer.weight_decay_mode={mode}",
                         f"optimizer.decay_norm_and_bias={decay_norm_and_bias}")
    net = build_model("resnet18", 10, width=2).double().eval()
    groups = trained_l2(OmegaConf.to_container(cfg, resolve=True), net)

    # The analysis's loss is the hand-computed one: cross-entropy plus 0.5 * wd * ||theta||^2 when it applies.
    images = torch.randn(6, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    value, _ = SubsetLoss(net, [(images, labels)], l2=groups).evaluate()
    decayed = [p for p in net.parameters() if decay_norm_and_bias or p.ndim > 1]
    l2 = 0.5 * 5e-4 * sum(p.pow(2).sum() for p in decayed) if mode == "loss" else 0.0
    with torch.no_grad():
        expected = F.cross_entropy(net(images), labels) + l2
    assert value.item() == pytest.approx(float(expected), rel=1e-12)
    assert (mode == "loss") == bool(groups)


# --- SAM sharpness -------------------------------------------------------------------------------

class Quadratic:
    """L(x) = 0.5 x^T A x + b^T x with the interface sam_sharpness uses (SubsetLoss's)."""

    def __init__(self, a, b, x):
        self.a, self.b = torch.tensor(a), torch.tensor(b)
        self.params = [torch.tensor(x)]
        self.moved = SubsetLoss.moved.__get__(self)
        self.set_params = SubsetLoss.set_params.__get__(self)

    def evaluate(self):
        x = self.params[0]
        return 0.5 * x @ self.a @ x + self.b @ x, None

    def gradient(self):
        return self.evaluate()[0], [self.a @ self.params[0] + self.b]


def _quadratic(eigenvalues, seed=0):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((len(eigenvalues), len(eigenvalues))))
    return q @ np.diag(eigenvalues) @ q.T, rng.standard_normal(len(eigenvalues)), rng.standard_normal(len(eigenvalues))


def test_sam_sharpness_of_an_isotropic_quadratic_is_its_closed_form():
    a, b, x = _quadratic([3.0] * 6)
    loss = Quadratic(a, b, x)
    g = np.linalg.norm(a @ x + b)
    closed_form = 0.2 * g + 0.5 * 3.0 * 0.2**2
    result = sam_sharpness(loss, rho=0.2, steps=5)
    assert result["value"] == pytest.approx(closed_form, rel=1e-12)
    sam = result["ascents"][0]
    assert sam["from"] == "sam" and sam["steps"] == 0  # SAM's perturbation is the maximum: no step to take
    assert sam["values"] == [pytest.approx(closed_form, rel=1e-12)]
    assert result["ascent_steps"] == 5 and result["converged"] and not result["rising"]
    assert result["first_order"] == pytest.approx(0.2 * g)
    assert np.array_equal(loss.params[0].numpy(), x)  # restored exactly


def test_sam_sharpness_of_a_general_quadratic_reaches_the_trust_region_maximum():
    eigenvalues = np.array([2.0, 1.5, 1.0, 0.7, 0.5])
    a, b, x = _quadratic(eigenvalues, seed=3)
    rho = 0.8
    # The maximum over ||e|| <= rho of g.e + 0.5 e.A.e: e = (mu I - A)^-1 g with mu > lambda_max, ||e|| = rho.
    w, q = np.linalg.eigh(a)
    gq = q.T @ (a @ x + b)
    mu = brentq(lambda m: np.linalg.norm(gq / (m - w)) - rho, w.max() + 1e-9, w.max() + 1e6)
    e = q @ (gq / (mu - w))
    closed_form = (a @ x + b) @ e + 0.5 * e @ a @ e
    result = sam_sharpness(Quadratic(a, b, x), rho=rho, steps=200, tol=1e-8, starts=1)
    assert result["value"] == pytest.approx(closed_form, rel=1e-8)
    assert result["value"] <= closed_form * (1 + 1e-12) and result["converged"]
    assert result["ascents"][0]["values"][0] < result["value"]  # the ascent added to SAM's first-order perturbation


def test_sam_sharpness_of_a_network_is_first_order_at_small_radius_and_leaves_the_weights(dense):
    model, images, labels, *_ = dense
    loss = _tiny_loss(model, images, labels)
    before = [p.clone() for p in model.parameters()]
    result = sam_sharpness(loss, rho=1e-4, steps=2, starts=1)
    assert result["value"] / result["first_order"] == pytest.approx(1.0, abs=1e-2)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


# --- landscapes ------------------------------------------------------------------------------------

def test_filter_normalisation_gives_each_filter_the_norm_of_the_weights_filter():
    net = build_model("resnet18", 10, width=2)
    params = list(net.parameters())
    direction = landscape.filter_normalized_direction(params, torch.Generator().manual_seed(0))
    kinds = set()
    for p, d in zip(params, direction):
        if p.ndim < 2:
            assert torch.count_nonzero(d) == 0  # biases and BatchNorm
            kinds.add("zero")
        else:
            for w_filter, d_filter in zip(p.detach(), d):  # output channels of a conv, rows of a linear weight
                assert d_filter.norm().item() == pytest.approx(w_filter.norm().item(), rel=1e-5)
            assert not torch.allclose(d / d.norm(), p / p.norm())  # a random direction, not theta
            kinds.add(p.ndim)
    assert kinds == {"zero", 2, 4}


def test_a_surface_is_the_loss_at_each_point_and_leaves_the_weights(dense):
    model, images, labels, oracle, theta, _ = dense
    loss = _tiny_loss(model, images, labels)
    generator = torch.Generator().manual_seed(0)
    d1, d2 = (landscape.filter_normalized_direction(loss.params, generator) for _ in range(2))
    coords = landscape.coordinates(3, 0.5)
    grid = landscape.surface(loss, [d1, d2], coords)["loss"]
    flat = [torch.cat([x.reshape(-1) for x in d]) for d in (d1, d2)]
    for i, beta in enumerate(coords):
        for j, alpha in enumerate(coords):
            assert grid[i][j] == pytest.approx(oracle(theta + alpha * flat[0] + beta * flat[1]).item(), rel=1e-12)
    assert torch.equal(torch.cat([p.detach().reshape(-1) for p in model.parameters()]), theta)
    assert landscape.interpolation_coordinates(5) == [-0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5]


def test_the_line_between_two_states_clamps_the_running_variances_it_extrapolates_below_zero(dense):
    model, images, labels, _, _, _ = dense
    other = {name: value.clone() for name, value in model.state_dict().items()}
    other["1.running_var"] = model[1].running_var / 4  # at t = 1.5: 1.5 * v/4 - 0.5 * v < 0
    other["0.weight"] = model[0].weight * 0.9
    before = {name: value.clone() for name, value in model.state_dict().items()}
    line = landscape.interpolation(_tiny_loss(model, images, labels), model, other, [0.5, 1.5])
    for t, value in zip((0.5, 1.5), line["loss"]):
        state = {name: torch.lerp(before[name], other[name], t) if before[name].is_floating_point() else before[name]
                 for name in before}
        assert (state["1.running_var"] < 0).all() == (t == 1.5)
        state["1.running_var"] = state["1.running_var"].clamp_min(0)
        oracle = copy.deepcopy(model)
        oracle.load_state_dict(state)
        weights = [p for p in oracle.parameters() if p.ndim > 1]
        expected = F.cross_entropy(oracle(images), labels, label_smoothing=SMOOTHING) + \
            0.5 * WEIGHT_DECAY * sum(p.pow(2).sum() for p in weights)
        assert math.isfinite(value) and value == pytest.approx(expected.item(), rel=1e-12)
    assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items())


# --- end to end: runs trained through train.py ---------------------------------------------------

# 32 training images: the analysis's subset is the whole training set, in one batch (a product over
# several batches is tested above: these are about the command).
TRAIN = ("experiment=digits_demo", "model.width=2", "dataset.limit_train=32", "dataset.limit_test=32",
         "train.batch_size=16", "train.epochs=1", "wandb.mode=disabled", "device=cpu")
FAST = ("--subset", "32", "--batch-size", "32", "--top-k", "2", "--trace-samples", "3", "--ascent-steps", "2")
LAYOUT = {"format", "quantities", "details", "settings", "loss", "run", "environment", "notes"}
SCALARS = {"train_loss", "train_cross_entropy", "train_l2", "train_error", "train_grad_norm", "hessian_top_eigenvalue",
           "hessian_trace", "hessian_trace_l2", "sam_sharpness"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two finished runs of the same model (GNP and plain SGD), trained through train.py (in this process),
    once for the module."""
    root = tmp_path_factory.mktemp("runs")
    for method in ("gnp", "plain"):
        done = train_py(*TRAIN, f"method={method}", f"hydra.run.dir={root / method}")
        assert done.returncode == 0, done.stderr[-2000:]
    return root


@pytest.fixture
def run(runs, tmp_path):
    """A fresh copy of the GNP run."""
    return _copy(runs / "gnp", tmp_path / "gnp")


def _copy(source, target):
    shutil.copytree(source, target)
    return target


def _hashes(folder):
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def _strict(text):
    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # a hang guard: every quantity, a landscape and an interpolation, minutes on a busy CPU
def test_the_command_writes_analysis_json_and_changes_nothing_else(runs, run):
    before = _hashes(run)
    done = in_process(main, ["gnp.analysis", str(run), *FAST, "--landscape", "--landscape-points", "3", "--between",
                             str(run), str(runs / "plain")])
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "1 analysed, 0 up to date, 0 skipped"
    record = _strict((run / "analysis.json").read_text())
    assert record.keys() == LAYOUT and record["format"] == "gnp-analysis/1"
    assert record["quantities"].keys() == SCALARS
    d = record["details"]
    assert d.keys() == {"hessian_top_eigenvalues", "hessian_trace", "sam_sharpness", "landscape", "interpolation"}
    eig = d["hessian_top_eigenvalues"]
    assert len(eig["values"]) == len(eig["residuals"]) == 2 and eig["hvp_count"] > 2
    assert record["quantities"]["hessian_top_eigenvalue"] == eig["values"][0] >= eig["values"][1]
    assert d["hessian_trace"]["samples"] == 3 and d["hessian_trace"]["stderr"] >= 0
    assert d["sam_sharpness"]["rho"] == 0.1 and d["sam_sharpness"]["ascent_steps"] == 2  # the run's method.r
    assert record["settings"]["subset"] == 32 and record["settings"]["dtype"] == "float32"
    assert record["settings"]["between"] == {"run": str((runs / "plain").resolve()), "points": 3}
    assert record["loss"] == "cross-entropy + 0.5 * 0.0005 * ||theta||^2 (in-loss L2 over all parameters)"
    summary = json.loads((run / "summary.json").read_text())
    assert record["run"] == {"dir": str(run), "epoch": 1, "test_error": summary["test_error"]}
    assert record["environment"]["device"] == "cpu" and record["environment"]["torch_version"] == torch.__version__

    # train_loss recomputed independently: the whole (limited) training set, normalised by hand.
    config = yaml.safe_load((run / "config.yaml").read_text())
    net = build_model("resnet18", 10, width=2)
    net.load_state_dict(checkpointing.load(run)["model"])
    data = load_dataset("digits", limit_train=32)
    mean, std = torch.tensor(config["dataset"]["mean"]), torch.tensor(config["dataset"]["std"])
    images = (data.train_images.float() / 255 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    with torch.no_grad():
        logits = net.eval()(images)
        l2 = 0.5 * 5e-4 * sum(p.pow(2).sum() for p in net.parameters())
        expected = F.cross_entropy(logits, data.train_labels) + l2
        error = 100 * (logits.argmax(1) != data.train_labels).float().mean()
    assert record["quantities"]["train_loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert record["quantities"]["train_l2"] == pytest.approx(l2.item(), rel=1e-5)
    assert record["quantities"]["train_cross_entropy"] == pytest.approx((expected - l2).item(), rel=1e-4)
    parameters = sum(p.numel() for p in net.parameters())
    assert record["quantities"]["hessian_trace_l2"] == pytest.approx(5e-4 * parameters)  # c * I on every parameter
    # The printed line says what each number holds.
    line = done.stdout.strip().splitlines()[-2]
    q = record["quantities"]
    assert (f"train loss {q['train_loss']:.4g} (cross-entropy {q['train_cross_entropy']:.4g} + in-loss L2 "
            f"{q['train_l2']:.4g})") in line, line
    assert f"tr(H) {q['hessian_trace']:.4g} ({q['hessian_trace_l2']:.4g} of it the in-loss L2 term's)" in line, line
    assert (f"sharpness {q['sam_sharpness']:.4g} at rho 0.1 (first order rho*|grad L| "
            f"{d['sam_sharpness']['first_order']:.4g})") in line, line
    assert record["quantities"]["train_error"] == pytest.approx(error.item(), abs=1e-4)

    # The landscape and the interpolation: numbers, and figures as PNG and PDF.
    scape, line = d["landscape"], d["interpolation"]
    assert np.array(scape["2d"]["loss"]).shape == (3, 3) and len(scape["1d"]["loss"]) == 3
    assert scape["2d"]["loss"][1][1] == pytest.approx(record["quantities"]["train_loss"], rel=1e-5)  # the centre
    assert line["t"] == [-0.5, 0.0, 0.5, 1.0, 1.5]
    assert line["loss"][1] == pytest.approx(record["quantities"]["train_loss"], rel=1e-5)
    other = build_model("resnet18", 10, width=2)
    other.load_state_dict(checkpointing.load(runs / "plain")["model"])  # t = 1: run B's weights, on A's loss
    with torch.no_grad():
        at_b = F.cross_entropy(other.eval()(images), data.train_labels) + \
            0.5 * 5e-4 * sum(p.pow(2).sum() for p in other.parameters())
    assert line["loss"][3] == pytest.approx(at_b.item(), rel=1e-5)
    for name in ("analysis_landscape", "analysis_interpolation"):
        for suffix in (".png", ".pdf"):
            assert (run / (name + suffix)).stat().st_size > 1000
    after = _hashes(run)
    new = {p for p in after if p.name.startswith("analysis")}
    assert {p.name for p in new} == {"analysis.json", "analysis_landscape.png", "analysis_landscape.pdf",
                                     "analysis_interpolation.png", "analysis_interpolation.pdf"}
    assert {p: h for p, h in after.items() if p not in new} == before

    # The same command again has nothing to do.
    written = (run / "analysis.json").read_bytes()
    assert main([str(run), *FAST, "--landscape", "--landscape-points", "3", "--between", str(run),
                 str(runs / "plain")]) == 0
    assert (run / "analysis.json").read_bytes() == written


@contextmanager
def _counting(monkeypatch, fail_at=None):
    """Count the quantities computed; the one named `fail_at` dies as a killed process would."""
    calls = []
    for name in QUANTITIES:
        original = getattr(Analysis, name)

        def counted(self, name=name, original=original):
            calls.append(name)
            if name == fail_at:
                raise KeyboardInterrupt
            return original(self)
        monkeypatch.setattr(Analysis, name, counted)
    yield calls
    monkeypatch.undo()


def test_a_killed_analysis_resumes_with_what_it_had(run, monkeypatch):
    only = ["--only", "train_loss,train_error,train_grad_norm,hessian_trace,sam_sharpness"]  # Lanczos is tested above
    with _counting(monkeypatch, fail_at="hessian_trace") as calls, pytest.raises(KeyboardInterrupt):
        main([str(run), *FAST, *only])
    assert calls == ["train_loss", "train_error", "train_grad_norm", "hessian_trace"]
    assert not (run / "analysis.json").exists()
    partial = _strict((run / "analysis.partial.json").read_text())
    assert set(partial["done"]) == {"train_loss", "train_error", "train_grad_norm"}

    with _counting(monkeypatch) as calls:
        assert main([str(run), *FAST, *only]) == 0
    assert calls == ["hessian_trace", "sam_sharpness"]  # the cached three are reused
    record = _strict((run / "analysis.json").read_text())
    assert record["quantities"].keys() == SCALARS - {"hessian_top_eigenvalue"}
    assert record["quantities"]["train_grad_norm"] == partial["done"]["train_grad_norm"]["quantities"][
        "train_grad_norm"]
    assert not (run / "analysis.partial.json").exists()

    # Other settings start afresh, even from a cache.
    with _counting(monkeypatch, fail_at="train_grad_norm"), pytest.raises(KeyboardInterrupt):
        main([str(run), *FAST, *only, "--seed", "1"])
    with _counting(monkeypatch) as calls:
        assert main([str(run), *FAST, "--seed", "2", "--only", "train_loss,sam_sharpness"]) == 0
    assert calls == ["train_loss", "sam_sharpness"]
    assert _strict((run / "analysis.json").read_text())["quantities"].keys() == {
        "train_loss", "train_cross_entropy", "train_l2", "sam_sharpness"}


def test_the_sharpness_options_are_settings_and_m_sharpness_joins_the_quantities(run, capsys):
    sharp = ["--only", "sam_sharpness", "--m-sharpness", "16", "--sharpness-starts", "1"]
    assert main([str(run), *FAST, *sharp, "--ascent-steps", "1"]) == 0
    out, _ = _lines(capsys)
    assert out[0].endswith("sharpness still rising at --ascent-steps 1 (a lower bound: raise it) -> "
                           f"{run / 'analysis.json'}")
    record = _strict((run / "analysis.json").read_text())
    assert record["quantities"].keys() == {"sam_sharpness", "m_sharpness"}
    m = record["details"]["m_sharpness"]
    assert m["m"] == 16 and [b["size"] for b in m["batches"]] == [16, 16] and m["rising"] and not m["converged"]
    assert record["quantities"]["m_sharpness"] == m["value"] == pytest.approx(
        (m["batches"][0]["value"] + m["batches"][1]["value"]) / 2)
    assert len(record["details"]["sam_sharpness"]["ascents"]) == 2  # SAM's start and its mirror
    s = record["settings"]
    assert (s["ascent_steps"], s["ascent_tol"], s["sharpness_starts"], s["m_sharpness"]) == (1, 0.01, 1, 16)
    # Another tolerance is another analysis, not an up-to-date one.
    assert main([str(run), *FAST, *sharp, "--ascent-steps", "1"]) == 0
    assert _lines(capsys)[0][0].endswith("is up to date (made with the same settings)")
    assert main([str(run), *FAST, *sharp, "--ascent-steps", "1", "--ascent-tol", "0.5"]) == 0
    assert "up to date" not in _lines(capsys)[0][0]
    assert _strict((run / "analysis.json").read_text())["settings"]["ascent_tol"] == 0.5


def test_the_printed_line_says_whether_the_cap_cut_the_best_ascent_or_only_lower_ones():
    def ascent(value, rising):
        return {"from": "sam", "value": value, "steps": 50, "converged": not rising, "rising": rising}

    sharpness = {"value": 0.59, "rho": 0.05, "first_order": 0.014, "ascent_steps": 50, "rising": True,
                 "ascents": [ascent(0.59, False), ascent(0.41, True), ascent(0.413, True)]}
    record = {"quantities": {"sam_sharpness": 0.59}, "details": {"sam_sharpness": sharpness},
              "settings": {"ascent_steps": 50}, "run": {"dir": "run"}}
    line = _describe(record)
    assert line.endswith("sharpness 0.59 at rho 0.05 (first order rho*|grad L| 0.014), 2 of 3 ascents still rising "
                         "at --ascent-steps 50, at 0.413 or less below the best 0.59 -> run/analysis.json"), line
    sharpness["ascents"][0]["rising"] = True  # the best one too: the value is a lower bound
    assert _describe(record).endswith("(first order rho*|grad L| 0.014), sharpness still rising at --ascent-steps 50 "
                                      "(a lower bound: raise it) -> run/analysis.json")


def test_the_public_loss_is_the_one_the_analysis_recorded(run):
    assert main([str(run), *FAST, "--only", "train_loss,hessian_trace", "--trace-samples", "9"]) == 0
    record = _strict((run / "analysis.json").read_text())
    loss = subset_loss(run, subset=32, batch_size=32, seed=0)
    assert loss.size == 32 and [len(labels) for _, labels in loss.batches] == [32]
    assert loss.names == [name for name, _ in loss.model.named_parameters()] and not loss.model.training
    value = loss.loss_fn([p.detach() for p in loss.params])
    assert value.item() == pytest.approx(record["quantities"]["train_loss"], rel=1e-6)
    trace = record["details"]["hessian_trace"]  # the default estimator, Hutch++: a third of 9 for the basis
    assert (trace["method"], trace["samples"], trace["subspace"], trace["remainder_samples"], trace["hvp_count"]) == (
        "hutch++", 9, 3, 3, 9)
    assert trace["hvp"]["method"] in ("double-backward", "forward-over-reverse")
    assert {k: record["settings"][k] for k in ("trace_method", "trace_samples", "hvp_method")} == {
        "trace_method": "hutch++", "trace_samples": 9, "hvp_method": "auto"}
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "status": "failed"}))
    with pytest.raises(AnalysisError, match="did not finish \\(status failed\\): there is nothing to analyse"):
        subset_loss(run)


def test_the_file_names_the_commit_checked_out_when_the_analysis_began(run, monkeypatch):
    head = {"commit": "a" * 40}
    monkeypatch.setattr("gnp.analysis.run.git_commit", lambda: head["commit"])
    train_loss = Analysis.train_loss

    def checkout_meanwhile(analysis):  # changes HEAD, not the code that is running
        head["commit"] = "b" * 40
        return train_loss(analysis)

    monkeypatch.setattr(Analysis, "train_loss", checkout_meanwhile)
    assert main([str(run), *FAST, "--only", "train_loss,train_grad_norm"]) == 0
    assert _strict((run / "analysis.json").read_text())["environment"]["commit"] == "a" * 40


def _lines(capsys):
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    return captured.out.strip().splitlines(), captured.err.strip().splitlines()


def test_bad_input_is_one_line_each_and_the_good_runs_are_still_analysed(runs, tmp_path, capsys):
    def copy(name, change):
        target = _copy(runs / "gnp", tmp_path / name)
        change(target)
        return target

    def status(value):
        def change(target):
            summary = json.loads((target / "summary.json").read_text())
            (target / "summary.json").write_text(json.dumps({**summary, "status": value}))
        return change

    def other_model(target):
        config = yaml.safe_load((target / "config.yaml").read_text())
        config["model"]["width"] = 3
        (target / "config.yaml").write_text(yaml.safe_dump(config))

    good = copy("good", lambda target: None)
    no_checkpoint = copy("no_checkpoint", lambda target: (target / "checkpoint.pt").unlink())
    stopped, diverged = copy("stopped", status("stopped")), copy("diverged", status("diverged"))
    no_summary = copy("running", lambda target: (target / "summary.json").unlink())
    wrong_model = copy("wrong_model", other_model)
    (tmp_path / "empty").mkdir()
    args = [str(p) for p in (no_checkpoint, stopped, diverged, no_summary, wrong_model, tmp_path / "empty",
                             tmp_path / "nowhere", good)]
    assert main([*args, *FAST, "--only", "train_loss"]) == 2
    out, err = _lines(capsys)
    assert err == [
        f"error: {tmp_path / 'empty'} is not a run directory (no config.yaml) and holds none: give a run directory "
        f"that train.py wrote (its hydra.run.dir) or a folder of them",
        f"error: {tmp_path / 'nowhere'} does not exist: give a run directory that train.py wrote (its hydra.run.dir)",
        f"error: {no_checkpoint} has no checkpoint.pt: the analysis needs the run's final weights; restore the file "
        f"or train the run again",
        f"error: {wrong_model / 'checkpoint.pt'} holds another model than {wrong_model}'s resnet18(width=3): its "
        f"conv1.weight has shape [2, 3, 3, 3], not [3, 3, 3, 3]. Give runs of the same model",
    ]
    assert out[:4] == [f"{stopped}: skipped, the run did not finish (status stopped)",
                       f"{diverged}: skipped, the run did not finish (status diverged)",
                       f"{no_summary}: skipped, the run did not finish (status no summary)",
                       f"{good}: train loss " + out[3].split("train loss ")[1]]
    assert out[4] == "1 analysed, 0 up to date, 3 skipped (1 diverged, 1 no summary, 1 stopped), 4 with errors"
    assert (good / "analysis.json").exists()

    # A folder of runs: each run under it; skipped ones alone exit 0.
    assert main([str(tmp_path), *FAST, "--only", "train_loss"]) == 2  # the broken copies are still there
    shutil.rmtree(no_checkpoint)
    shutil.rmtree(wrong_model)
    capsys.readouterr()
    assert main([str(stopped), str(diverged)]) == 0
    assert _lines(capsys)[0][-1] == "0 analysed, 0 up to date, 2 skipped (1 diverged, 1 stopped)"


def test_a_summary_without_a_status_is_damaged_not_finished(run, capsys):
    summary = json.loads((run / "summary.json").read_text())
    del summary["status"]
    (run / "summary.json").write_text(json.dumps(summary))
    assert main([str(run), *FAST, "--only", "train_loss"]) == 2
    _, err = _lines(capsys)
    assert err == [f"error: {run / 'summary.json'}: has no status (finished, diverged, stopped, failed): restore it, "
                   f"or train the run again"]
    assert not (run / "analysis.json").exists()


def test_a_figure_title_names_the_run_and_its_method_settings(runs):
    options = Options(subset=32, batch_size=32)
    titles = {method: Analysis(load_finished_run(runs / method), options, torch.device("cpu")).title()
              for method in ("gnp", "plain")}
    assert titles == {"gnp": f"digits resnet18 gnp r=0.1 alpha=0.8 seed 0: {runs / 'gnp'}",
                      "plain": f"digits resnet18 plain seed 0: {runs / 'plain'}"}


def test_a_run_trained_in_bfloat16_is_analysed_in_float32_with_a_note(run, capsys):
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "precision": "bf16"}))  # as a CUDA run records it
    assert main([str(run), *FAST, "--only", "train_loss"]) == 0
    record = _strict((run / "analysis.json").read_text())
    assert record["notes"] == ["trained with bf16 autocast; analysed in float32"]
    assert record["settings"]["dtype"] == "float32"


@pytest.mark.parametrize("argv,message", [
    (["--only", "train_loss,sharpness"], "--only train_loss,sharpness: unknown quantity sharpness; choose from "
                                         + ", ".join(QUANTITIES)),
    (["--subset", "33"], "--subset 33 is larger than the training set of {run} (32 images): use --subset 32 or less"),
    (["--top-k", "0"], "argument --top-k: 0 is invalid: it must be an integer >= 1"),
    (["--trace-samples", "1"], "--trace-samples 1 is invalid: a standard error needs at least 2"),
    (["--m-sharpness", "33"], "--m-sharpness 33 is larger than the subset (32 images): use --m-sharpness 32 or less"),
    (["--trace-method", "xtrace"],
     "argument --trace-method: invalid choice: 'xtrace' (choose from 'hutch++', 'hutchinson')"),
    (["--device", "tpu"], "--device tpu is invalid: choose auto, cpu, cuda or cuda:N"),
    (["--between", "{run}", "{run}/nowhere"], "--between: {run}/nowhere is not a run directory (no config.yaml)"),
])
def test_a_bad_option_is_one_line(run, capsys, argv, message):
    argv = [a.format(run=run) for a in argv]
    try:
        status = main([str(run), *argv])
    except SystemExit as e:  # the command line's own checks, before any run is read
        status = e.code
    _, err = _lines(capsys)
    assert status == 2 and len(err) == 1 and err[0].startswith("error: ") and message.format(run=run) in err[0], err
    assert not (run / "analysis.json").exists()
