"""End-to-end runs through the real config and training loop, on CPU, small enough for CI."""
import json

import pytest
import torch
import torch.nn.functional as F

from conftest import compose_config
from gnp import training
from gnp.data import load_dataset
from gnp.models import build_model
from gnp.training import train

# A narrow ResNet-18 on a few generated images: seconds per epoch on a CPU.
TINY = ("device=cpu", "model.width=4", "train.batch_size=16", "train.eval_batch_size=32", "wandb.mode=disabled")
SUMMARY_FIELDS = {"dataset", "model", "method", "aug", "r", "alpha", "seed", "epochs", "num_parameters",
                  "test_error", "best_test_error", "train_loss", "wall_seconds", "images_per_second",
                  "data_verified", "git_commit", "torch_version", "device"}
METRIC_FIELDS = {"epoch", "lr", "train_loss", "train_error", "grad_norm", "test_loss", "test_error", "seconds",
                 "images_per_second"}


def _cifar_run(root, run_dir, *overrides):
    cfg = compose_config(f"dataset.root={root}", "dataset.verify=false", "train.epochs=1", *TINY, *overrides)
    return cfg, train(cfg, run_dir)


@pytest.mark.parametrize("dataset,classes", [("cifar10", 10), ("cifar100", 100)])
def test_one_epoch_on_cifar_writes_every_output(tmp_path, cifar_root, dataset, classes):
    cfg, summary = _cifar_run(cifar_root, tmp_path / "run", f"dataset={dataset}", "method=gnp", "aug=basic")
    run = tmp_path / "run"
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk == summary and SUMMARY_FIELDS <= summary.keys()
    assert (summary["dataset"], summary["method"], summary["r"], summary["alpha"]) == (dataset, "gnp", 0.1, 0.8)
    assert summary["data_verified"] is False and summary["device"] == "cpu" and summary["epochs"] == 1
    assert summary["num_parameters"] == sum(p.numel() for p in build_model("resnet18", classes, width=4).parameters())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0].keys() == METRIC_FIELDS and rows[0]["epoch"] == 1
    assert rows[0]["lr"] == cfg.optimizer.lr and rows[0]["grad_norm"] > 0
    assert 0 <= rows[0]["test_error"] <= 100 and summary["test_error"] == rows[0]["test_error"]
    assert "dataset:\n  name: " + dataset in (run / "config.yaml").read_text()
    assert not list(run.glob(".*.tmp"))  # atomic writes leave no temporaries


def test_logged_test_metrics_equal_a_recomputation_from_the_checkpoint(tmp_path, cifar_root):
    cfg, summary = _cifar_run(cifar_root, tmp_path / "run")
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    model = build_model("resnet18", 10, width=4)
    model.load_state_dict(checkpoint["model"])
    model.eval()
    # Independent of the loader: read the split, normalise by hand, one batch in float64.
    data = load_dataset("cifar10", cifar_root, verify=False)
    mean = torch.tensor(cfg.dataset.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.dataset.std).view(1, 3, 1, 1)
    with torch.no_grad():
        logits = model.double()(((data.test_images / 255 - mean) / std).double())
    loss = F.cross_entropy(logits, data.test_labels).item()
    error = 100 * (logits.argmax(1) != data.test_labels).double().mean().item()
    assert summary["test_error"] == pytest.approx(error, abs=1e-9)
    assert summary["test_loss"] == pytest.approx(loss, rel=1e-4)


def test_digits_reaches_a_low_test_error(tmp_path):
    cfg = compose_config("experiment=digits_demo", "method=sgd", "train.epochs=3", "wandb.mode=disabled", "device=cpu")
    summary = train(cfg, tmp_path)
    assert summary["test_error"] < 15  # chance is 90%


class _Killed(Exception):
    pass


def test_a_killed_run_resumes_to_the_uninterrupted_result(tmp_path, cifar_root, monkeypatch):
    overrides = ("train.epochs=2", "method=gnp", "aug=cutout", "model.width=2")
    _, uninterrupted = _cifar_run(cifar_root, tmp_path / "a", *overrides)

    def kill_after_first_epoch(row, epochs):
        raise _Killed  # after the epoch's checkpoint is written, like a kill between epochs

    monkeypatch.setattr(training, "_print_epoch", kill_after_first_epoch)
    with pytest.raises(_Killed):
        _cifar_run(cifar_root, tmp_path / "b", *overrides)
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["epoch"] == 1
    monkeypatch.undo()
    _, resumed = _cifar_run(cifar_root, tmp_path / "b", *overrides)

    timing = {"seconds", "images_per_second"}
    strip = lambda path: [{k: v for k, v in json.loads(line).items() if k not in timing}  # noqa: E731
                          for line in (path / "metrics.jsonl").read_text().splitlines()]
    assert strip(tmp_path / "b") == strip(tmp_path / "a") and len(strip(tmp_path / "a")) == 2
    assert resumed["test_error"] == uninterrupted["test_error"]


def test_resuming_with_different_settings_is_refused(tmp_path, cifar_root):
    _cifar_run(cifar_root, tmp_path / "run")
    with pytest.raises(training.ConfigError, match=r"different run \(method.alpha: 0.8 -> 0.5\)"):
        _cifar_run(cifar_root, tmp_path / "run", "method.alpha=0.5")


def test_batch_larger_than_the_training_set_is_refused(tmp_path, cifar_root):
    with pytest.raises(training.ConfigError, match="train.batch_size=512 is invalid: larger than the training set"):
        _cifar_run(cifar_root, tmp_path / "run", "train.batch_size=512")
