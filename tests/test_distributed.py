"""train.py under torchrun: two CPU processes (gloo) give the single-process result."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT

# No BatchNorm, no dropout and no augmentation: then the only difference between one process with
# batch 32 and two with 16 each is the order of floating-point sums.
RUN = ["dataset=digits", "aug=none", "model=vit_ti", "model.depth=1", "model.dropout=0", "model.attn_dropout=0",
       "optimizer=sgd", "optimizer.lr=0.05", "train.epochs=2", "train.batch_size=32", "dataset.limit_train=256",
       "dataset.limit_test=100", "method=gnp", "method.sync_perturbation=true", "wandb.mode=disabled", "device=cpu"]


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_match_one(tmp_path):
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    for command, run_dir in [([sys.executable], tmp_path / "single"), (launch, tmp_path / "ddp")]:
        done = subprocess.run([*command, "train.py", *RUN, f"hydra.run.dir={run_dir}"], cwd=ROOT,
                              capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "ddp" / "summary.json").read_text())["world_size"] == 2
    assert done.stdout.count("test error") == 1  # only the main process reports
    for single, ddp in zip(_metrics(tmp_path / "single"), _metrics(tmp_path / "ddp"), strict=True):
        for key in ("train_loss", "train_error", "grad_norm", "test_loss", "test_error"):
            assert ddp[key] == pytest.approx(single[key], rel=1e-4, abs=1e-6), key
