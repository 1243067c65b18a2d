"""The authors' switches and the fast paths through the real training loop, each against an
independent oracle: weight EMA (closed-form recurrence), init_seed, decay_norm_and_bias, the metrics
the official code logs, GR warmup as logged, channels_last and torch.compile against eager, float16
resumed exactly."""
import copy
import functools
import json

import pytest
import torch
import torch.nn.functional as F

from conftest import compose_config, signal_at_step, tiny_model
from gnp.config import ConfigError
from gnp.methods import GNP, Method, Plain
from gnp.models import build_model
from gnp.training import Stopped, build_optimizer, build_parts, train

# A narrow ResNet-18 (BatchNorm) on a few real digits: 4 steps per epoch.
TINY = ("dataset=digits", "aug=none", "optimizer.lr=0.05", "dataset.limit_train=128", "dataset.limit_test=64",
        "train.batch_size=32", "train.epochs=1", "wandb.mode=disabled", "device=cpu")
WRN = (*tiny_model("wrn28_10"), "model.dropout=0.3")  # dropout: random draws per pass
TIMING = {"seconds", "images_per_second", "wall_seconds"}


def _config(*overrides):
    """The tiny digits run; a ResNet-18 of width 2 unless the overrides choose another model."""
    model = () if any(o.startswith("model=") for o in overrides) else ("model.width=2",)
    return compose_config(*TINY, *model, *overrides)


def _run(run_dir, *overrides):
    return train(_config(*overrides), run_dir)


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _record_states(monkeypatch):
    """The model's floating-point state before the first step and after every step."""
    states = []
    original = Method.step

    def step_and_record(self, closure):
        snapshot = lambda: {k: v.detach().double().clone() for k, v in self.model.state_dict().items()  # noqa: E731
                            if v.is_floating_point()}
        if not states:
            states.append(snapshot())
        loss = original(self, closure)
        states.append(snapshot())
        return loss

    monkeypatch.setattr(Method, "step", step_and_record)
    return states


def test_weight_ema_follows_its_closed_form(tmp_path, monkeypatch):
    decay = 0.6
    states = _record_states(monkeypatch)
    summary = _run(tmp_path, f"train.ema_decay={decay}", "train.epochs=2")
    k = len(states) - 1
    assert k == 8
    ema = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["ema"]
    for name in states[0]:
        # ema_k = decay^k * x_0 + sum_i (1 - decay) * decay^(k - i) * x_i
        expected = decay ** k * states[0][name] + sum((1 - decay) * decay ** (k - i) * states[i][name]
                                                     for i in range(1, k + 1))
        torch.testing.assert_close(ema[name].double(), expected, rtol=1e-5, atol=1e-6)
    rows = _metrics(tmp_path)
    assert all("ema_test_error" in row and "ema_test_loss" in row for row in rows)
    assert summary.ema_test_error == rows[-1]["ema_test_error"]


def test_init_seed_sets_the_initial_weights_and_seed_the_rest():
    def initial(*overrides):
        parts = build_parts(_config(*overrides), _single_process())
        first_batch = next(iter(parts.train_loader.epoch(0)))[1]
        return parts.model.state_dict(), first_batch

    weights_a, batch_a = initial("seed=0", "init_seed=7")
    weights_b, batch_b = initial("seed=1", "init_seed=7")
    weights_c, _ = initial("seed=7")  # init_seed null: the seed
    assert all(torch.equal(weights_a[k], weights_b[k]) and torch.equal(weights_a[k], weights_c[k]) for k in weights_a)
    assert not torch.equal(batch_a, batch_b)  # the data order follows the seed
    weights_d, batch_d = initial("seed=0", "init_seed=8")
    assert not all(torch.equal(weights_a[k], weights_d[k]) for k in weights_a) and torch.equal(batch_a, batch_d)


def _single_process():
    from gnp.distributed import Context

    return Context(0, 1, torch.device("cpu"))


def test_decay_norm_and_bias_false_leaves_biases_and_norm_weights_out_of_l2(tmp_path):
    model = build_model("resnet18", 10, width=2)
    x, y = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.arange(8)
    after = {}
    for decay_all in (True, False):
        cfg = compose_config("method=plain", "optimizer.lr=1", "optimizer.momentum=0", "optimizer.nesterov=false",
                             "method.max_grad_norm=null", "optimizer.weight_decay=0.1",
                             f"optimizer.decay_norm_and_bias={decay_all}")
        torch.manual_seed(0)
        net = build_model("resnet18", 10, width=2)
        net.load_state_dict(model.state_dict())
        base = build_optimizer(cfg.optimizer, net, torch.device("cpu"))
        opt = Plain(net, base, l2=0.1)
        opt.step(lambda: F.cross_entropy(net(x), y))
        after[decay_all] = dict(net.named_parameters())
    for name, p in model.named_parameters():
        # One SGD step of size 1: theta - g, where g holds 0.1 * theta only where L2 applies.
        difference = (after[False][name] - after[True][name]).detach()
        expected = 0.1 * p.detach() if p.ndim <= 1 else torch.zeros_like(p)
        torch.testing.assert_close(difference, expected, rtol=1e-5, atol=1e-7)


def test_logged_metrics_are_the_official_ones(tmp_path):
    _run(tmp_path / "sgd", "method=plain", "train.epochs=2")
    _run(tmp_path / "gnp", "method=gnp", "train.epochs=2")
    sgd, gnp = _metrics(tmp_path / "sgd"), _metrics(tmp_path / "gnp")
    # One pass: the "perturbed" pass is the first one. Two passes: the loss at the perturbed point differs.
    assert all(row["perturbed_loss"] == row["first_pass_loss"] and row["perturbed_error"] == row["first_pass_error"]
               for row in sgd)
    assert all(row["perturbed_loss"] != row["first_pass_loss"] for row in gnp)
    assert all(0 < row["final_grad_norm"] <= 5.0 for row in sgd + gnp)  # after the clip at 5
    state = torch.load(tmp_path / "gnp" / "checkpoint.pt", weights_only=False)["model"]
    model = build_model("resnet18", 10, width=2)
    model.load_state_dict(state)
    norm = torch.sqrt(sum((p.double() ** 2).sum() for p in model.parameters())).item()
    assert gnp[-1]["param_norm"] == pytest.approx(norm, rel=1e-6)


def test_gr_warmup_is_logged_as_the_closed_form(tmp_path):
    _run(tmp_path, "method=gnp", "method.warmup=r", "method.warmup_epochs=2", "train.epochs=3")
    rows = _metrics(tmp_path)
    steps, warmup_steps = 4, 8
    # r in force at each epoch's last step (steps count from 0): r * min(1, step / warmup_steps).
    expected = [0.1 * min(1.0, (e * steps + steps - 1) / warmup_steps) for e in range(3)]
    assert [row["r"] for row in rows] == pytest.approx(expected) and [row["alpha"] for row in rows] == [0.8] * 3


def test_a_gr_warmup_shorter_than_one_step_is_refused(tmp_path):
    # 4 steps per epoch: 0.1 epochs round to 0 warmup steps, which would make the warmup a no-op.
    with pytest.raises(ConfigError, match=r"method.warmup_epochs=0.1 is invalid: it rounds to 0 of the 4 steps per "
                                          r"epoch; use at least 0.25"):
        _run(tmp_path, "method=gnp", "method.warmup=r", "method.warmup_epochs=0.1")


def _fast_path_runs(root, tmp_path, *fast_path):
    """Two epochs of a WRN (BatchNorm, dropout) on generated CIFAR: eager NCHW float32, then with `fast_path`."""
    common = ("dataset=cifar10", f"dataset.root={root}", "dataset.verify=false", "dataset.limit_train=64",
              "train.batch_size=16", "train.eval_batch_size=25", "train.epochs=2", "train.channels_last=false", *WRN)
    _run(tmp_path / "eager", *common)
    _run(tmp_path / "fast", *common, *fast_path)
    return _metrics(tmp_path / "eager"), _metrics(tmp_path / "fast")


@pytest.mark.parametrize("name,options", [("resnet18", {"width": 4}), ("wrn28_10", {"depth": 10, "widen": 1}),
                                          ("pyramidnet272", {"depth": 11, "alpha": 6, "shakedrop": 0.0})])
def test_a_channels_last_step_equals_the_nchw_step(name, options):
    # In float64, where the order of sums cannot matter: what is checked is that the NHWC model, NHWC
    # batch and the step's in-place arithmetic on NHWC parameters compute the same step. (In float32 on
    # the CPU, BatchNorm's NHWC kernel is the less accurate one, see use_channels_last.)
    torch.manual_seed(0)
    reference = build_model(name, 10, **options).double()
    x = torch.randn(8, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.arange(8) % 10
    after = []
    for memory_format in (torch.contiguous_format, torch.channels_last):
        net = copy.deepcopy(reference).to(memory_format=memory_format)
        base = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True)
        opt = GNP(net, base, r=0.1, alpha=0.8, l2=1e-3, max_grad_norm=5.0)
        batch = x.contiguous(memory_format=memory_format)
        for _ in range(2):
            opt.step(lambda: F.cross_entropy(net(batch), y))
        after.append(net.state_dict())
    for key in after[0]:
        torch.testing.assert_close(after[1][key], after[0][key], rtol=1e-10, atol=1e-12)


@pytest.mark.slow
def test_compiled_steps_equal_the_eager_steps_and_compile_once(tmp_path, cifar_root, monkeypatch):
    import torch._dynamo

    # Inductor's code generation takes minutes on 2 CPU cores; the aot_eager backend traces the same
    # graphs (forward, backward, train and eval modes) and runs them without generating code.
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager, compiled = _fast_path_runs(cifar_root, tmp_path, "train.compile=true")
    graphs_two_epochs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    _fast_path_runs(cifar_root, tmp_path / "one_epoch", "train.epochs=1", "train.compile=true")
    # The second epoch compiles nothing: both passes of every step, train and eval reuse the graphs.
    assert graphs_two_epochs == torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    for a, b in zip(eager, compiled, strict=True):
        for key in ("perturbed_loss", "first_pass_loss", "g1_norm", "final_grad_norm", "test_loss", "test_error"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), key  # same dropout draws under compile


def test_a_float16_run_resumes_exactly_with_its_loss_scale(tmp_path, monkeypatch, capsys):
    common = ("precision=fp16", "train.epochs=2", "train.sync_every=1")
    scaler_states = []  # the uninterrupted run's loss-scale state after each step
    original = Method.step

    def step_and_record(self, closure):
        loss = original(self, closure)
        scaler_states.append(copy.deepcopy(self.grad_scaler.state_dict()))
        return loss

    monkeypatch.setattr(Method, "step", step_and_record)
    _run(tmp_path / "a", *common)
    monkeypatch.undo()
    # It trains, with one line that says how much slower float16 is on the CPU and what to choose instead.
    (warning,) = [line for line in capsys.readouterr().out.splitlines() if "precision=fp16" in line]
    assert warning.startswith("precision=fp16 on the CPU trains about 70 times slower than fp32") and \
        "use precision=fp32" in warning
    signal_at_step(monkeypatch, 6)
    with pytest.raises(Stopped):
        _run(tmp_path / "b", *common)
    monkeypatch.undo()
    saved = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["optimizer"]
    # The checkpoint holds the loss scale's state after the 6 steps taken, not a fresh scaler's.
    assert saved["grad_scaler"] == scaler_states[5] != torch.amp.GradScaler("cpu").state_dict()
    _run(tmp_path / "b", *common)
    strip = lambda rows: [{k: v for k, v in row.items() if k not in TIMING} for row in rows]  # noqa: E731
    assert strip(_metrics(tmp_path / "b")) == strip(_metrics(tmp_path / "a"))
