"""Weights & Biases: offline runs hold the results table, failures still close the run, and `auto`
picks online only when credentials exist."""
import json

import pytest
import wandb

from conftest import QUICK_DIGITS, compose_config
from gnp import training
from gnp.tracking import TABLE_COLUMNS, resolve_wandb_mode
from gnp.training import train

QUICK = (*QUICK_DIGITS, "wandb.mode=offline")


def _offline_run(run_dir):
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    return runs[0]


def test_offline_run_holds_the_results_table(tmp_path):
    summary = train(compose_config(*QUICK), tmp_path).as_dict()
    (table,) = _offline_run(tmp_path).glob("files/media/table/results_*.table.json")
    content = json.loads(table.read_text())
    settings = [f"method.{k}" for k in summary["method_settings"]]
    assert content["columns"] == [*TABLE_COLUMNS, *settings] and settings == ["method.max_grad_norm"]  # plain's one
    assert content["data"] == [[*(summary[c] for c in TABLE_COLUMNS), *summary["method_settings"].values()]]
    assert wandb.run is None  # finished


def test_a_failed_run_is_finished_and_the_next_run_proceeds(tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(training.Trainer, "train_epoch", crash)
    with pytest.raises(RuntimeError, match="boom"):
        train(compose_config(*QUICK), tmp_path / "failed")
    assert wandb.run is None
    assert _offline_run(tmp_path / "failed").is_dir()
    failed = json.loads((tmp_path / "failed" / "summary.json").read_text())
    assert (failed["status"], failed["error"], failed["test_error"]) == ("failed", "RuntimeError: boom", None)
    monkeypatch.undo()
    train(compose_config(*QUICK, "seed=1"), tmp_path / "next")  # a sweep's next job
    assert (tmp_path / "next" / "summary.json").is_file()


def test_auto_mode_is_online_only_with_credentials(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert resolve_wandb_mode("auto") == "offline"  # no netrc file at all
    (tmp_path / "netrc").write_text("machine example.org login user password secret\n")
    assert resolve_wandb_mode("auto") == "offline"
    (tmp_path / "netrc").write_text("machine api.wandb.ai login user password secret\n")
    assert resolve_wandb_mode("auto") == "online"
    (tmp_path / "netrc").unlink()
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_wandb_mode("auto") == "online"
    assert resolve_wandb_mode("disabled") == "disabled" and resolve_wandb_mode("offline") == "offline"
