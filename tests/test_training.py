"""End-to-end runs through the real config and training loop, on CPU, small enough for CI: outputs,
exact resume from any step, and the faults a long run meets (signals, NaN or inf anywhere, broken or
unfitting checkpoints, full disks, locks)."""
import errno
import json
import os
import signal
import stat
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import yaml
from omegaconf import OmegaConf

from conftest import compose_config, full_disk_after_the_first_checkpoint, signal_at_step, tiny_model
from gnp import distributed, io, training
from gnp.config import ConfigError
from gnp.data import load_dataset, write_synthetic_cifar
from gnp.models import build_model
from gnp.rundir import RunDirectoryBusy
from gnp.training import Diverged, Stopped, build, train

# A narrow ResNet-18 on a few generated images: seconds per epoch on a CPU.
TINY = ("device=cpu", "train.batch_size=16", "train.eval_batch_size=32", "wandb.mode=disabled")
SUMMARY_FIELDS = {"status", "error", "dataset", "model", "method", "method_settings", "aug", "seed", "init_seed",
                  "epochs", "num_parameters", "test_error", "best_test_error", "first_pass_loss", "perturbed_loss",
                  "wall_seconds", "images_per_second", "data_verified", "git_commit", "torch_version", "device",
                  "ema_test_error", "test_top5_error"}
METRIC_FIELDS = {"epoch", "lr", "first_pass_loss", "first_pass_error", "perturbed_loss", "perturbed_error", "g1_norm",
                 "final_grad_norm", "param_norm", "r", "alpha", "test_loss", "test_error", "seconds",
                 "images_per_second"}
TIMING = {"seconds", "images_per_second", "wall_seconds"}


def _cifar_run(root, run_dir, *overrides):
    """A run on generated CIFAR; a ResNet-18 of width 4 unless the overrides choose another model."""
    model = () if any(o.startswith("model=") for o in overrides) else ("model.width=4",)
    cfg = compose_config(f"dataset.root={root}", "dataset.verify=false", "train.epochs=1", *TINY, *model, *overrides)
    return cfg, train(cfg, run_dir).as_dict()  # as summary.json holds it


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _without_timing(rows):
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


@pytest.mark.parametrize("dataset,classes", [("cifar10", 10), ("cifar100", 100)])
def test_one_epoch_on_cifar_writes_every_output(tmp_path, cifar_root, dataset, classes):
    cfg, summary = _cifar_run(cifar_root, tmp_path / "run", f"dataset={dataset}", "method=gnp", "aug=basic")
    run = tmp_path / "run"
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk == summary and SUMMARY_FIELDS <= summary.keys() and summary["status"] == "finished"
    assert (summary["dataset"], summary["method"], summary["method_settings"]["r"], summary["method_settings"]["alpha"]) == (dataset, "gnp", 0.1, 0.8)
    assert summary["data_verified"] is False and summary["device"] == "cpu" and summary["epochs"] == 1
    assert summary["num_parameters"] == sum(p.numel() for p in build_model("resnet18", classes, width=4).parameters())
    rows = _metrics(run)
    top5 = {"test_top5_error"} if classes > 10 else set()
    assert len(rows) == 1 and rows[0].keys() == METRIC_FIELDS | top5 and rows[0]["epoch"] == 1
    assert rows[0]["lr"] == cfg.optimizer.lr and rows[0]["g1_norm"] > 0 and 0 < rows[0]["final_grad_norm"] <= 5.0
    assert (rows[0]["r"], rows[0]["alpha"]) == (0.1, 0.8)
    assert 0 <= rows[0]["test_error"] <= 100 and summary["test_error"] == rows[0]["test_error"]
    assert summary["test_top5_error"] == (rows[0]["test_top5_error"] if top5 else None)
    assert "dataset:\n  name: " + dataset in (run / "config.yaml").read_text()
    assert "epoch    1/1" in (run / "train.log").read_text()  # the console's epoch line, kept in the run
    assert not list(run.glob(".*.tmp"))  # atomic writes leave no temporaries
    assert not (run / ".lock").exists()  # a run that ended holds its directory no more
    assert stat.S_IMODE((run / "summary.json").stat().st_mode) == 0o666 & ~_umask()  # the user's umask, not 0600


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_logged_test_metrics_equal_a_recomputation_from_the_checkpoint(tmp_path, cifar_root):
    cfg, summary = _cifar_run(cifar_root, tmp_path / "run", "dataset=cifar100")
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    model = build_model("resnet18", 100, width=4)
    model.load_state_dict(state["model"])
    model.eval()
    # Independent of the loader: read the split, normalise by hand, one batch in float64.
    data = load_dataset("cifar100", cifar_root, verify=False)
    mean = torch.tensor(cfg.dataset.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.dataset.std).view(1, 3, 1, 1)
    with torch.no_grad():
        logits = model.double()(((data.test_images / 255 - mean) / std).double())
    loss = F.cross_entropy(logits, data.test_labels).item()
    error = 100 * (logits.argmax(1) != data.test_labels).double().mean().item()
    top5 = 100 * (logits.topk(5, 1).indices != data.test_labels[:, None]).all(1).double().mean().item()
    assert summary["test_error"] == pytest.approx(error, abs=1e-9)
    assert summary["test_top5_error"] == pytest.approx(top5, abs=1e-9)
    assert summary["test_loss"] == pytest.approx(loss, rel=1e-4)


@pytest.mark.slow
def test_digits_reaches_a_low_test_error(tmp_path):
    # Width 8 learns as well as the demo's 16 in 3 epochs (1.0% against 1.7%) at less than half the cost.
    cfg = compose_config("experiment=digits_demo", "method=plain", "train.epochs=3", "model.width=8",
                         "wandb.mode=disabled", "device=cpu")
    summary = train(cfg, tmp_path)
    assert summary.test_error < 15  # chance is 90%


def test_a_finished_run_started_again_returns_its_summary_without_training(tmp_path, cifar_root, monkeypatch):
    _, first = _cifar_run(cifar_root, tmp_path / "run")
    monkeypatch.setattr(training.Trainer, "train_epoch", lambda *a: pytest.fail("a finished run trained again"))
    _, again = _cifar_run(cifar_root, tmp_path / "run")
    assert {k: v for k, v in again.items() if k not in TIMING} == {k: v for k, v in first.items() if k not in TIMING}


# --- stopping and resuming at any step -------------------------------------------------------------

# Every random stream in play: augmentation draws (cutout), dropout, BatchNorm statistics, 4 steps per epoch.
RESUMABLE = (*tiny_model("wrn28_10"), "model.dropout=0.3", "aug=cutout", "dataset.limit_train=64", "train.epochs=2",
             "train.sync_every=1")


@pytest.mark.parametrize("method,options", [
    ("plain", ()), ("sam", ()), ("asam", ()), ("gnp", ()),
    ("gnp", ("train.channels_last=true", "train.ema_decay=0.9")),
    ("gnp", ("method.warmup=r", "method.warmup_epochs=2", "method.two_pass_probability=0.5")),  # stopped mid-warmup
    ("gnp", ("train.shards=4", "aug=cutout")),  # 4 shards of 4 images, each its own cutout hole, one after another
    ("sam", ("train.shards=2", "method.sync_perturbation=true")),
])
def test_a_run_stopped_mid_epoch_by_a_signal_resumes_to_the_uninterrupted_result(tmp_path, cifar_root, monkeypatch,
                                                                                 method, options):
    _, uninterrupted = _cifar_run(cifar_root, tmp_path / "a", *RESUMABLE, f"method={method}", *options)
    signal_at_step(monkeypatch, 6)  # the second of epoch 2's four steps
    with pytest.raises(Stopped) as stopped:
        _cifar_run(cifar_root, tmp_path / "b", *RESUMABLE, f"method={method}", *options)
    assert stopped.value.exit_code == 128 + signal.SIGTERM
    assert "stopped by SIGTERM at step 2/4 of epoch 2" in str(stopped.value)
    state = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    assert (state["epoch"], state["step"]) == (1, 2)
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["status"] == "stopped"
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handlers are given back
    monkeypatch.undo()
    _, resumed = _cifar_run(cifar_root, tmp_path / "b", *RESUMABLE, f"method={method}", *options)

    assert _without_timing(_metrics(tmp_path / "b")) == _without_timing(_metrics(tmp_path / "a"))
    assert {k: v for k, v in resumed.items() if k not in TIMING} == \
        {k: v for k, v in uninterrupted.items() if k not in TIMING}
    final = [torch.load(tmp_path / d / "checkpoint.pt", weights_only=False)["model"] for d in "ab"]
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])  # bitwise, buffers included


def test_timed_checkpoints_within_epochs_change_nothing_and_a_kill_after_one_resumes_exactly(
        tmp_path, cifar_root, monkeypatch):
    _, uninterrupted = _cifar_run(cifar_root, tmp_path / "a", *RESUMABLE, "method=gnp")
    saved = []
    original = training.Checkpoints.write

    def write_then_maybe_die(self, state):
        original(self, state)
        saved.append((state["epoch"], state["step"]))
        if saved[-1] == (1, 3):
            raise KeyboardInterrupt  # killed right after a checkpoint within epoch 2

    monkeypatch.setattr(training.Checkpoints, "write", write_then_maybe_die)
    with pytest.raises(KeyboardInterrupt):
        _cifar_run(cifar_root, tmp_path / "b", *RESUMABLE, "method=gnp", "train.checkpoint_minutes=1e-9")
    assert saved == [(0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2), (1, 3)]  # every step: the time is always due
    monkeypatch.undo()
    _, resumed = _cifar_run(cifar_root, tmp_path / "b", *RESUMABLE, "method=gnp", "train.checkpoint_minutes=1e-9")
    assert _without_timing(_metrics(tmp_path / "b")) == _without_timing(_metrics(tmp_path / "a"))
    assert resumed["test_loss"] == uninterrupted["test_loss"]


def test_a_signal_in_the_last_epochs_last_steps_lets_the_run_finish(tmp_path, cifar_root, monkeypatch):
    signal_at_step(monkeypatch, 8)  # the last step of the last epoch: nothing is left to resume
    _, summary = _cifar_run(cifar_root, tmp_path / "run", *RESUMABLE, "train.sync_every=25")
    assert summary["status"] == "finished" and summary["epochs_completed"] == 2
    monkeypatch.undo()
    _, again = _cifar_run(cifar_root, tmp_path / "run", *RESUMABLE, "train.sync_every=25")
    assert again == json.loads((tmp_path / "run" / "summary.json").read_text()) == summary


def test_a_second_ctrl_c_stops_at_once(tmp_path, cifar_root, monkeypatch):
    calls = signal_at_step(monkeypatch, 2, signal.SIGINT, times=2)
    with pytest.raises(KeyboardInterrupt):
        _cifar_run(cifar_root, tmp_path / "run", "train.epochs=2")
    assert calls["n"] == 2 and not (tmp_path / "run" / "checkpoint.pt").exists()
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "stopped"


def test_resuming_with_different_settings_is_refused_and_the_run_is_left_as_it_was(tmp_path, cifar_root):
    _cifar_run(cifar_root, tmp_path / "run")
    def outputs():  # but train.log, which records the refusal too
        return {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file() and p.name != "train.log"}

    before = outputs()
    with pytest.raises(ConfigError, match=r"different run \(method.alpha: 0.8 -> 0.5\)"):
        _cifar_run(cifar_root, tmp_path / "run", "method.alpha=0.5")
    assert outputs() == before
    assert json.loads(before["summary.json"])["status"] == "finished"


def test_the_shards_a_run_resolves_to_are_recorded_and_resume_compares_them(tmp_path, cifar_root):
    """train.shards=auto is one shard per process, written as the number; a run with 2 shards is another
    run, refused as such; an explicit 1 is the same run as auto in one process."""
    cfg, summary = _cifar_run(cifar_root, tmp_path / "run")
    assert cfg.train.shards == "auto" and summary["shards"] == 1 and summary["world_size"] == 1
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["train"]["shards"] == 1
    with pytest.raises(ConfigError, match=r"different run \(train.shards: 1 -> 2\)"):
        _cifar_run(cifar_root, tmp_path / "run", "train.shards=2")
    _, again = _cifar_run(cifar_root, tmp_path / "run", "train.shards=1")
    assert again == summary


def test_a_shard_per_process_that_the_processes_cannot_share_is_refused_before_training(tmp_path, cifar_root):
    """3 shards for 2 processes; the check runs when the processes are known (here a context of 2 that
    needs no process group: the check comes first)."""
    cfg = compose_config(f"dataset.root={cifar_root}", "dataset.verify=false", *TINY, "model.width=4",
                         "train.batch_size=24", "train.shards=3")
    with pytest.raises(ConfigError, match=r"^train.shards=3 is invalid: each of the 2 processes takes an equal number "
                                          r"of shards; use a multiple of 2, or train.shards=auto"):
        build.build_parts(cfg, distributed.Context(0, 2, torch.device("cpu")))


def test_float64_runs_in_float64_end_to_end(tmp_path, cifar_root):
    cfg, summary = _cifar_run(cifar_root, tmp_path / "run", "precision=fp64")
    assert summary["precision"] == "fp64" and summary["status"] == "finished"
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert {v.dtype for v in state["model"].values() if v.is_floating_point()} == {torch.float64}


def test_batch_larger_than_the_training_set_is_refused(tmp_path, cifar_root):
    with pytest.raises(ConfigError, match="train.batch_size=512 is invalid: larger than the training set"):
        _cifar_run(cifar_root, tmp_path / "run", "train.batch_size=512")


# --- faults ---------------------------------------------------------------------------------------

def test_a_diverging_run_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, cifar_root, monkeypatch):
    real_build = build.build_model

    def poisoned_after_one_epoch(*args, **kwargs):
        model = real_build(*args, **kwargs)
        calls = {"n": 0}

        def hook(module, inputs, output):
            calls["n"] += module.training
            return output * float("nan") if calls["n"] > 2 * 8 else output  # from the 3rd GNP step of epoch 2

        model.register_forward_hook(hook)
        return model

    monkeypatch.setattr(build, "build_model", poisoned_after_one_epoch)
    with pytest.raises(Diverged, match=r"^the loss became NaN or infinite at step 3/6 of epoch 2; the last good "
                                       r"checkpoint, .*checkpoint.pt, is kept. Lower optimizer.lr$"):
        _cifar_run(cifar_root, tmp_path / "run", "train.epochs=3", "train.sync_every=100", "dataset.limit_train=96")
    run = tmp_path / "run"
    assert torch.load(run / "checkpoint.pt", weights_only=False)["epoch"] == 1  # no NaN step saved after it
    summary = json.loads((run / "summary.json").read_text())  # strict JSON: json.loads accepts NaN, so check
    assert summary["status"] == "diverged" and summary["test_error"] is None and "NaN" in summary["error"]
    assert "NaN" not in (run / "summary.json").read_text().replace("NaN or infinite", "")


def _every_tensor(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _every_tensor(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _every_tensor(item)


def _diverged_summary(run_dir):
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["test_error"] is None
    return summary


@pytest.fixture
def two_threads():
    """Two of torch's threads in this process for the test's duration. At lr 30 training is chaotic: which number
    overflows first follows the order of the sums, which follows the thread count; with one thread the loss
    overflows at the same step as the BatchNorm statistics."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


# Two runs of the fault report that went on to the end as "finished": BatchNorm statistics that overflow
# to inf while the training loss stays finite, and a test loss that is NaN.
@pytest.mark.usefixtures("two_threads")
@pytest.mark.parametrize("overrides,what", [
    (("optimizer.lr=30", "method.max_grad_norm=null", "optimizer.weight_decay=0", "train.epochs=2"),
     r"the BatchNorm statistics \(layers\.\S+\.running_var\) became NaN or infinite between step 1 and step 20/20 "
     r"of epoch 1; no checkpoint was written yet. Lower optimizer.lr, or clip the gradient"),
    (("optimizer.lr=300", "dataset.limit_train=32", "train.epochs=6"),
     r"the test loss became NaN or infinite at the end of epoch 1; no checkpoint was written yet. Lower optimizer.lr$"),
])
@pytest.mark.slow
def test_non_finite_batchnorm_statistics_or_test_losses_are_a_divergence(tmp_path, overrides, what):
    root = tmp_path / "data"
    write_synthetic_cifar(root, "cifar10", n_train=640, n_test=64)
    with pytest.raises(Diverged, match=what):
        _cifar_run(root, tmp_path / "run", "model.width=8", "train.batch_size=32", "train.eval_batch_size=64",
                   *overrides)
    assert not (tmp_path / "run" / "checkpoint.pt").exists() and "NaN or infinite" in _diverged_summary(
        tmp_path / "run")["error"]


def _poisoned_batchnorm(monkeypatch, at_step: int):
    """Make the first BatchNorm layer's running variance inf at training step `at_step` (one pass per step),
    leaving the loss finite: training normalises with the batch's own statistics."""
    real_build = build.build_model

    def build_model(*args, **kwargs):
        model = real_build(*args, **kwargs)
        norm = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
        calls = {"n": 0}

        def poison(module, inputs):
            calls["n"] += module.training
            if calls["n"] == at_step:
                module.running_var[0] = float("inf")

        norm.register_forward_pre_hook(poison)
        return model

    monkeypatch.setattr(build, "build_model", build_model)


def test_non_finite_state_stops_the_run_before_a_checkpoint_could_keep_it(tmp_path, cifar_root, monkeypatch):
    _poisoned_batchnorm(monkeypatch, at_step=8)  # the second step of epoch 2
    saved = []
    original = training.Checkpoints.write
    monkeypatch.setattr(training.Checkpoints, "write",
                        lambda self, state: (saved.append((state["epoch"], state["step"])), original(self, state)))
    # A timed checkpoint at every read of the flags (every 3 steps), and a weight average that follows the model.
    with pytest.raises(Diverged, match=r"^the BatchNorm statistics \(bn1.running_var\) became NaN or infinite between "
                                       r"step 1 and step 3/6 of epoch 2; the last good checkpoint, .* is kept"):
        _cifar_run(cifar_root, tmp_path / "run", "method=plain", "dataset.limit_train=96", "train.epochs=2",
                   "train.sync_every=3", "train.checkpoint_minutes=1e-9", "train.ema_decay=0.5")
    assert saved == [(0, 3), (1, 0)]  # none after the step that went non-finite
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    tensors = list(_every_tensor(state))
    assert len(tensors) > 100 and all(torch.isfinite(t).all() for t in tensors if t.is_floating_point())
    _diverged_summary(tmp_path / "run")


def test_a_divergence_that_shows_first_in_the_test_loss_is_one(tmp_path, cifar_root, monkeypatch):
    real_build = build.build_model
    evaluations = {"n": 0}

    def nan_when_evaluated_after_epoch_1(*args, **kwargs):
        model = real_build(*args, **kwargs)

        def hook(module, inputs, output):
            evaluations["n"] += not module.training
            return output * float("nan") if evaluations["n"] > 1 and not module.training else output

        model.register_forward_hook(hook)
        return model

    monkeypatch.setattr(build, "build_model", nan_when_evaluated_after_epoch_1)
    with pytest.raises(Diverged, match=r"^the test loss became NaN or infinite at the end of epoch 2; the last good "
                                       r"checkpoint, .* is kept"):
        _cifar_run(cifar_root, tmp_path / "run", "train.epochs=3", "train.eval_batch_size=100")
    run = tmp_path / "run"
    assert torch.load(run / "checkpoint.pt", weights_only=False)["epoch"] == 1 and len(_metrics(run)) == 1
    _diverged_summary(run)


def test_json_outputs_are_strict():
    text = io.dumps({"a": float("nan"), "b": [float("inf"), 1.5], "c": {"d": -float("inf")}})
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in JSON")) == \
        {"a": None, "b": [None, 1.5], "c": {"d": None}}


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated zip", b"\x80\x02}q\x00."])
def test_a_broken_checkpoint_names_the_file_and_the_fix(tmp_path, cifar_root, content):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.pt").write_bytes(content)
    with pytest.raises(training.CheckpointError, match=r"run/checkpoint.pt is (unreadable|not a checkpoint).*"
                                                         r"Move it away to start this run afresh"):
        _cifar_run(cifar_root, tmp_path / "run")


def test_a_checkpoint_that_does_not_fit_the_model_names_the_first_tensor_and_the_fix(tmp_path, cifar_root):
    _cifar_run(cifar_root, tmp_path / "narrow", "model.width=4")
    wide = compose_config(f"dataset.root={cifar_root}", "dataset.verify=false", *TINY, "model.width=8",
                          "train.epochs=2")
    # The same settings but other tensors: what a change to the model's code, or a copied file, makes.
    state = torch.load(tmp_path / "narrow" / "checkpoint.pt", weights_only=False)
    state["config"] = OmegaConf.to_container(wide, resolve=True)
    (tmp_path / "wide").mkdir()
    torch.save(state, tmp_path / "wide" / "checkpoint.pt")
    with pytest.raises(training.CheckpointError, match=r"wide/checkpoint.pt does not fit this model: conv1.weight "
                                                         r"has shape \[4, 3, 3, 3\] there and \[8, 3, 3, 3\] in this "
                                                         r"model .*Move it away to start this run afresh"):
        train(wide, tmp_path / "wide")
    assert torch.equal(torch.load(tmp_path / "wide" / "checkpoint.pt", weights_only=False)["model"]["conv1.weight"],
                       state["model"]["conv1.weight"])  # left as it was


def test_a_foreign_checkpoint_is_refused(tmp_path, cifar_root):
    (tmp_path / "run").mkdir()
    torch.save({"model": {}}, tmp_path / "run" / "checkpoint.pt")
    with pytest.raises(training.CheckpointError, match="is not a checkpoint of this version of gnp"):
        _cifar_run(cifar_root, tmp_path / "run")


def test_one_run_per_directory_and_a_dead_holder_does_not_block(tmp_path, cifar_root):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from gnp.rundir import Hold; "
                               "Hold(sys.argv[1]).__enter__(); print('held', flush=True); time.sleep(600)",
                               str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirectoryBusy, match=rf"{run} is in use by another run \(PID {holder.pid}\)"):
            _cifar_run(cifar_root, run)
    finally:
        holder.kill()
        holder.wait()
    # The lock file of a process that died is still there, but nobody holds the lock.
    assert (run / ".lock").read_text().strip() == str(holder.pid)
    _, summary = _cifar_run(cifar_root, run)
    assert summary["status"] == "finished" and not (run / ".lock").exists()


def test_temporaries_of_interrupted_writes_are_removed_at_start(tmp_path, cifar_root):
    (tmp_path / "run").mkdir()
    orphan = tmp_path / "run" / ".checkpoint.pt.abc123.tmp"
    orphan.write_bytes(b"x" * 1000)
    _cifar_run(cifar_root, tmp_path / "run")
    assert not orphan.exists()


def test_a_full_disk_names_the_file_and_keeps_the_last_checkpoint(tmp_path, cifar_root, monkeypatch):
    writes = {"n": 0}
    real_fsync = os.fsync

    def disk_full_after_the_first_epoch(fd):  # config.yaml, then epoch 1's checkpoint and metrics fit
        writes["n"] += 1
        if writes["n"] > 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(io.os, "fsync", disk_full_after_the_first_epoch)
    with pytest.raises(io.OutputError, match=r"cannot write .*run/checkpoint.pt: No space left on device\. "
                                             r"Free space or choose a writable folder"):
        _cifar_run(cifar_root, tmp_path / "run", "train.epochs=2")
    run = tmp_path / "run"
    assert torch.load(run / "checkpoint.pt", weights_only=False)["epoch"] == 1  # the last good one, intact
    assert not list(run.glob(".*.tmp"))


def test_torchs_own_error_for_a_full_disk_is_one_line_with_the_os_reason(tmp_path, cifar_root, monkeypatch):
    full_disk_after_the_first_checkpoint(monkeypatch.setattr)
    with pytest.raises(io.OutputError, match=r"cannot write .*run/checkpoint.pt: No space left on device\.") as raised:
        _cifar_run(cifar_root, tmp_path / "run", "train.epochs=2")
    assert "unexpected pos" in str(raised.value.__cause__)  # torch's zip writer raised it, after the ENOSPC
    run = tmp_path / "run"
    assert torch.load(run / "checkpoint.pt", weights_only=False)["epoch"] == 1  # the last good one, intact
    assert not list(run.glob(".*.tmp"))
    assert json.loads((run / "summary.json").read_text())["status"] == "failed"


def test_an_unusable_run_directory_is_one_clear_error(tmp_path, cifar_root):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(io.OutputError, match=r"cannot use .*file/run as the run directory: Not a directory"):
        _cifar_run(cifar_root, tmp_path / "file" / "run")


def test_channels_last_on_the_cpu_is_refused_for_a_model_that_would_hang_onednn(tmp_path, cifar_root):
    # A ResNet-18 of width 4 has strided 1x1 shortcuts of 4 and 8 input channels (oneDNN issue #6035);
    # the WRN of 16 channels a stage has none, and the resume tests train it channels_last.
    assert build.onednn_nhwc_hazard(build_model("wrn28_10", 10, depth=10, widen=1)) is None
    hazard = build.onednn_nhwc_hazard(build_model("resnet18", 10, width=4))
    assert hazard is not None and "strided 1x1 convolution of 4 input channels" in hazard
    with pytest.raises(ConfigError, match=r"^train.channels_last=true on the CPU: layer \S+ is a strided 1x1 "
                                          r"convolution of 4 input channels.*use train.channels_last=false$"):
        _cifar_run(cifar_root, tmp_path / "run", "train.channels_last=true")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
