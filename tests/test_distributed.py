"""train.py in several processes (gloo, CPU): under torchrun two processes give the single-process result,
on one node or two, and the death of one stops the other; a run stopped mid-epoch resumes exactly and every
replica evaluates one model, the one saved; a run's result depends on its train.shards, never on the number of
processes that take them. Where torchrun itself is not the subject, the replicas are forked from the test
with the environment torchrun gives them (a new Python would first spend seconds importing torch)."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, Forked, start_replicas, train_py
from gnp.compose import compose_config
from gnp.data import load_dataset
from gnp.models import build_model
from gnp.training import train

pytestmark = pytest.mark.slow  # every test starts processes

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
TIMING = {"seconds", "images_per_second", "wall_seconds"}
# No BatchNorm, no dropout and no augmentation: then the only difference between one process with
# batch 32 and two with 16 each is the order of floating-point sums.
RUN = ["dataset=digits", "aug=none", "model=vit_ti", "model.depth=1", "model.dropout=0", "model.attn_dropout=0",
       "optimizer=sgd", "optimizer.lr=0.05", "train.epochs=2", "train.batch_size=32", "dataset.limit_train=128",
       "dataset.limit_test=100", "method=gnp", "method.sync_perturbation=true", "wandb.mode=disabled", "device=cpu"]


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _strip(rows):
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(overrides, run_dir) -> list[str]:
    return [*TORCHRUN, "--standalone", "--nproc_per_node=2", "train.py", *overrides, f"hydra.run.dir={run_dir}"]


def _environment(world_size: int, rank: int, port: int) -> dict[str, str]:
    """Replica `rank`'s environment, as torchrun (or srun with the rendezvous's address) sets it."""
    return dict(WORLD_SIZE=str(world_size), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port))


def _join(world_size: int, rank: int, port: int) -> None:
    """Make this (forked) process replica `rank` of `world_size`."""
    os.environ.update(_environment(world_size, rank, port))
    if world_size == 1:
        for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
            del os.environ[key]


def _forked_train_py(*overrides: str) -> list[Forked]:
    """`train.py OVERRIDES` in two replicas forked from this process, as torchrun would start them."""
    port = _free_port()
    torchrun = {"TORCHELASTIC_RUN_ID": "test", "LOCAL_WORLD_SIZE": "2"}
    return [Forked("train.py", *overrides, env=os.environ | _environment(2, rank, port) | torchrun)
            for rank in range(2)]


def test_two_processes_match_one_on_one_node_or_two(tmp_path):
    single = train_py(*RUN, f"hydra.run.dir={tmp_path / 'single'}")  # in this process
    assert single.returncode == 0, single.stderr[-3000:]
    done = subprocess.run(_torchrun(RUN, tmp_path / "ddp"), cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("test error") == 1  # only the main process reports
    # Two "nodes" of one process each, as `torchrun --nnodes=2` on two machines; each composes its own
    # timestamped run directory, and the main process's is the one both use.
    rendezvous = ["--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d",
                  f"--rdzv-endpoint=127.0.0.1:{_free_port()}", "--rdzv-id=gnp-test"]
    nodes = [subprocess.Popen([*TORCHRUN, *rendezvous, "train.py", *RUN,
                               f"hydra.run.dir={tmp_path}/nodes/" + "${now:%H-%M-%S-%f}"], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for node in nodes:
        _, err = node.communicate(timeout=240)
        assert node.returncode == 0, err[-3000:]
    (nodes_dir,) = (tmp_path / "nodes").iterdir()  # one run directory, not one per node
    assert json.loads((tmp_path / "ddp" / "summary.json").read_text())["world_size"] == 2
    assert json.loads((nodes_dir / "summary.json").read_text())["world_size"] == 2
    for single, ddp, two_nodes in zip(_metrics(tmp_path / "single"), _metrics(tmp_path / "ddp"), _metrics(nodes_dir),
                                      strict=True):
        for key in ("perturbed_loss", "perturbed_error", "final_grad_norm", "test_loss", "test_error"):
            assert ddp[key] == pytest.approx(single[key], rel=1e-4, abs=1e-6), key
            assert two_nodes[key] == pytest.approx(single[key], rel=1e-4, abs=1e-6), key


# BatchNorm whose statistics differ between replicas (each perturbs and normalises its own shard),
# cutout draws, 8 steps per epoch (room for the signal to land mid-epoch on a busy machine).
def _bn_run(root, method) -> list[str]:
    return ["model=resnet18", "model.width=4", "aug=cutout", f"method={method}", f"dataset.root={root}",
            "dataset.verify=false", "dataset.limit_train=128", "train.batch_size=16", "train.eval_batch_size=25",
            "train.epochs=3", "train.sync_every=1", "wandb.mode=disabled", "device=cpu"]


def _replica(rank: int, overrides: list[str], run_dir: str, port: int) -> None:
    _join(2, rank, port)
    train(compose_config(*overrides), Path(run_dir))


def _children(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _wait_for_checkpoint(run_dir, epoch: int, step: int, replicas: list[Forked], seconds=180):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and all(replica.poll() is None for replica in replicas):
        try:
            state = torch.load(run_dir / "checkpoint.pt", weights_only=False)
            if (state["epoch"], state["step"]) >= (epoch, step):
                return
        except (FileNotFoundError, RuntimeError, EOFError):
            pass  # not written yet
        time.sleep(0.05)
    pytest.fail(f"no checkpoint at epoch {epoch} step {step}: " + "".join(
        replica.stderr.read()[-3000:] for replica in replicas if replica.poll() is not None))


@pytest.mark.parametrize("method", ["plain", "gnp"])
def test_ddp_run_stopped_mid_epoch_resumes_exactly_and_evaluates_the_saved_model(tmp_path, cifar_root, method):
    # Both runs in two replicas forked from this process, with torchrun's environment: the uninterrupted one,
    # and the stopped and resumed one, train.py itself with a checkpoint at every step.
    start_replicas(_replica, (_bn_run(cifar_root, method), str(tmp_path / "a"), _free_port()), 2)
    run = [*_bn_run(cifar_root, method), "train.checkpoint_minutes=1e-9", f"hydra.run.dir={tmp_path / 'b'}"]
    stopped = _forked_train_py(*run)
    _wait_for_checkpoint(tmp_path / "b", 1, 1, stopped)
    # The signal reaches one process only (as a scheduler may deliver it): both agree to stop.
    stopped[1].send_signal(signal.SIGUSR1)
    printed = [replica.communicate(timeout=120) for replica in stopped]
    out, err = printed[0]  # the main process's
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["status"] == "stopped" and "stopped by SIGUSR1 at step" in summary["error"], summary["error"]
    assert "Resume: torchrun <the same options> train.py " in (out + err).strip().splitlines()[-1], out + err
    resumed = _forked_train_py(*run)
    printed = [replica.communicate(timeout=300) for replica in resumed]
    assert [replica.returncode for replica in resumed] == [0, 0], [err[-3000:] for _, err in printed]
    out, _ = printed[0]
    assert "Resuming" in out and "of epoch 2" in out

    assert _strip(_metrics(tmp_path / "b")) == _strip(_metrics(tmp_path / "a"))
    states = [torch.load(tmp_path / d / "checkpoint.pt", weights_only=False) for d in "ab"]
    assert all(torch.equal(states[0]["model"][k], states[1]["model"][k]) for k in states[0]["model"])
    own = states[0]["replica_stats"]
    assert own.shape[0] == 2 and not torch.equal(own[0], own[1])  # the replicas' statistics differ...

    # ...and both evaluated the saved model, whose statistics are their average: recompute its test
    # numbers in one process, in float64, independently of the loader.
    model = build_model("resnet18", 10, width=4)
    model.load_state_dict(states[0]["model"])
    data = load_dataset("cifar10", cifar_root, verify=False)
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)
    with torch.no_grad():
        logits = model.double().eval()(((data.test_images / 255 - mean) / std).double())
    logged = _metrics(tmp_path / "a")[-1]
    assert logged["test_error"] == pytest.approx(100 * (logits.argmax(1) != data.test_labels).double().mean().item(),
                                                 abs=1e-9)
    assert logged["test_loss"] == pytest.approx(F.cross_entropy(logits, data.test_labels).item(), rel=1e-4)


@pytest.mark.parametrize("failing", [0, 1])
def test_a_failure_of_one_process_alone_stops_the_others_and_is_printed_once(tmp_path, cifar_root, failing):
    # Two processes started by hand, as srun would (train.py forked from this process); the data of one of them
    # is missing (a node-local folder, say). The main process loads first; the other fails after it, on its own.
    (tmp_path / "empty").mkdir()
    port = _free_port()
    processes = [Forked("train.py", "dataset.verify=false", "device=cpu", "wandb.mode=disabled",
                        f"dataset.root={tmp_path / 'empty' if rank == failing else cifar_root}",
                        f"hydra.run.dir={tmp_path / 'run'}", env=os.environ | _environment(2, rank, port))
                 for rank in range(2)]
    errors = [p.communicate(timeout=180)[1] for p in processes]
    assert [p.returncode for p in processes] == [2, 2]
    assert "Traceback" not in "".join(errors), "".join(errors)
    lines = [[line for line in err.splitlines() if line.startswith("error: ")] for err in errors]
    who = "" if failing == 0 else f"process {failing}: "
    (own,) = lines[failing]
    assert own.startswith(f"error: {who}CIFAR10 was not found"), own
    other = lines[1 - failing]
    if failing == 0:
        assert other == []  # the main process speaks for the run
    else:
        assert len(other) == 1 and "another process of this run failed" in other[0]


def _rank_of(pid: int) -> int:
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return int(next(v for v in environ if v.startswith(b"RANK=")).partition(b"=")[2])


@pytest.mark.parametrize("victim", [1, 0])
def test_when_one_process_dies_the_other_stops_with_one_line_and_records_which(tmp_path, victim):
    run = tmp_path / "run"
    torchrun = subprocess.Popen(_torchrun(["experiment=digits_demo", "model.width=2", "dataset.limit_train=256",
                                           "dataset.limit_test=64", "train.batch_size=32", "train.epochs=50",
                                           "train.sync_every=1", "wandb.mode=disabled", "device=cpu"], run),
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not (run / "metrics.jsonl").exists() and time.monotonic() < deadline:  # well into training
        time.sleep(0.1)
    processes = {_rank_of(pid): pid for pid in _children(torchrun.pid)}
    os.kill(processes[victim], signal.SIGKILL)  # as the kernel's OOM killer, or a node that goes away
    out, err = torchrun.communicate(timeout=180)
    survivor = 1 - victim
    (line,) = [line for line in err.splitlines() if line.startswith("error: ")]
    who = "" if survivor == 0 else f"process {survivor}: "
    assert line.startswith(f"error: {who}process {victim} (PID {processes[victim]}) died (") and \
        "; this process stopped too. Resume: torchrun <the same options> train.py " in line, line
    # torchrun reports its children with a traceback of its own; none comes from the training code.
    assert "gnp/" not in err and 'train.py", line' not in err, err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"].startswith(f"ProcessDied: process {victim} (PID ")
    assert summary["epochs_completed"] >= 1


# --- the layout: train.shards on 1, 2 or 4 processes ------------------------------------------------

# float64 (precision=fp64): in float32 a narrow ResNet's BatchNorm over 4-image shards amplifies the
# rounding of another summation order (another thread count) to 1e-4 within a step, which would hide
# what this test looks for; in float64 the layouts agree to 1e-13.
LAYOUT_RUN = ("dataset=digits", "precision=fp64", "train.shards=4",
              "train.batch_size=16", "dataset.limit_train=64", "dataset.limit_test=50", "train.eval_batch_size=50",
              "train.epochs=2", "optimizer.lr=0.05", "wandb.mode=disabled", "device=cpu", "train.progress=false")
LAYOUT_JOBS = {method: (f"method={method}", "model.width=4", "aug=cutout") for method in ("plain", "sam", "asam", "gnp")}
# ShakeDrop's gates and coefficients, AutoAugment, mixup and the batch's cutout hole: every draw of a shard.
LAYOUT_JOBS["gnp shakedrop"] = ("method=gnp", "model=pyramidnet272", "model.depth=11", "model.alpha=8",
                                "aug=autoaugment_mixcut", "dataset.limit_train=32", "train.epochs=1")
# (processes, the ranks of the 4 spawned ones that run them): two layouts run at once in the second round.
LAYOUTS = {4: (0, 1, 2, 3), 2: (0, 1), 1: (2,)}


def _layout_worker(rank: int, root: str, ports: dict) -> None:
    for world_size, members in LAYOUTS.items():
        if rank not in members:
            continue
        for name, overrides in LAYOUT_JOBS.items():
            _join(world_size, members.index(rank), ports[world_size, name])
            train(compose_config(*LAYOUT_RUN, *overrides), Path(root) / f"{name} on {world_size}")


def test_a_run_depends_on_its_shards_never_on_the_processes_that_take_them(tmp_path):
    """train.shards=4 on 1, 2 and 4 processes (each process taking 4, 2 or 1 shards one after another):
    the same weights, running statistics and metrics, for every method and for a model whose shards
    draw random numbers (ShakeDrop), augmented per shard."""
    ports = {(w, name): _free_port() for w in LAYOUTS for name in LAYOUT_JOBS}
    start_replicas(_layout_worker, (str(tmp_path), ports), 4)
    for name in LAYOUT_JOBS:
        runs = {w: tmp_path / f"{name} on {w}" for w in LAYOUTS}
        summaries = {w: json.loads((run / "summary.json").read_text()) for w, run in runs.items()}
        assert {w: (s["status"], s["shards"], s["world_size"]) for w, s in summaries.items()} == \
            {w: ("finished", 4, w) for w in LAYOUTS}, name
        metrics = {w: _strip(_metrics(run)) for w, run in runs.items()}
        states = {w: torch.load(run / "checkpoint.pt", weights_only=False)["model"] for w, run in runs.items()}
        for w in (2, 4):
            for one, other in zip(metrics[1], metrics[w], strict=True):
                assert one.keys() == other.keys()
                for key in one:
                    assert other[key] == pytest.approx(one[key], rel=1e-9, abs=1e-9), (name, w, key)
            for key, value in states[1].items():  # the weights and the (averaged) running statistics
                torch.testing.assert_close(states[w][key], value, rtol=1e-9, atol=1e-11, msg=f"{name} {w}: {key}")
    # Another number of shards is another step: the layouts above agree because they are one method.
    one_shard = tmp_path / "one shard"
    train(compose_config(*LAYOUT_RUN, *LAYOUT_JOBS["gnp"], "train.shards=1"), one_shard)
    assert _metrics(one_shard)[-1]["perturbed_loss"] != pytest.approx(_metrics(tmp_path / "gnp on 1")[-1]["perturbed_loss"],
                                                                      rel=1e-3)
