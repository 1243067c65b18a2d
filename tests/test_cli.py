"""A user's mistakes through train.py: each is one line that names the key, value or file and the
fix, with a documented exit status, no traceback and no run directory left behind; run directories
checked before Hydra writes into them; failed writes and interrupted sweeps said as they can be acted on."""
import errno
import functools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import (ROOT, TINY_DIGITS, Forked, compose_config, full_disk_after_the_first_checkpoint, in_process,
                      signal_at_step, train_py)
from gnp import cli, rundir
from gnp.rundir import Hold
from gnp.training import train

DIGITS = (*TINY_DIGITS, "dataset.limit_train=128", "dataset.limit_test=64", "train.batch_size=32")  # 4 steps an epoch


def _check(capsys, *argv):
    """The command line's check, in process: its exit status and the lines it printed."""
    with pytest.raises(SystemExit) as done:
        cli.check_command_line(list(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return done.value.code, err.strip().splitlines()


@pytest.mark.parametrize("argv,message", [
    (["train.epoch=3"], "train.epoch is not a config key: did you mean train.epochs?"),
    (["+train.epoch=3"], "train.epoch is not a config key: did you mean train.epochs?"),
    (["+method.raduis=0.1"], "method.raduis is not a key of method=gnp (GNP); its keys: method._target_, method.name, "
                              "method.r, method.alpha, "),
    (["optimizer.momentun=0.5"], "optimizer.momentum?"),
    (["+optimizer.betas=[0.9,0.99]"], "optimizer.betas is not a config key"),  # SGD has no betas
    (["+wandb.projct=x"], "wandb.projct is not a config key: did you mean wandb.project?"),
    (["+dataset.limit_trian=5"], "dataset.limit_trian is not a config key: did you mean dataset.limit_train?"),
    (["+sed=1"], "sed is not a config key: did you mean seed?"),
    (["model.widht=3"], "model.widht is not a config key: did you mean model.width?"),
    (["+model.depth=20"], "model 'resnet18' has no option(s) depth; its options are: width"),
    (["+aug.cutot_size=8"], "aug has no option(s) cutot_size"),
    (["+train.epochs=3"], "train.epochs exists already: set it without the + (train.epochs=3)"),
    (["method=gpn"], "method=gpn is not a choice of method: choose one of asam, friendlysam, gam, gnp, gnp_warmup, gsam, "
                       "looksam, plain, sam, wsam"),
    (["method=sgd"], "method=sgd is now method=plain: one pass per step with the base optimizer, whatever it is"),
    (["model=resnet18", "model=resnet20"], "model=resnet20 is not a choice of model: choose one of pyramidnet110, "
                                           "pyramidnet272, resnet101, resnet18, vit, vit_b, vit_s, vit_ti, wrn28_10"),
    (["device=gpu"], "device='gpu' is invalid: choose auto (a GPU when there is one), cpu, cuda or cuda:N"),
    (["method.alpha=2"], "method.alpha=2 is invalid: alpha must be a number in [0, 1] (1 is SAM, 0 the base optimizer)"),
])
def test_a_mistake_on_the_command_line_is_one_line_with_the_fix(capsys, argv, message):
    code, lines = _check(capsys, *argv)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]


def test_the_unknown_key_check_covers_every_config_section(capsys):
    for section in ("train", "wandb", "dataset", "optimizer"):
        code, lines = _check(capsys, f"+{section}.no_such_key=1")
        assert code == 2 and f"{section}.no_such_key is not a config key" in lines[0]
    code, lines = _check(capsys, "+method.no_such_key=1")  # a method's keys are its class's
    assert code == 2 and "method.no_such_key is not a key of method=gnp (GNP)" in lines[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_asking_for_a_gpu_without_one(capsys):
    code, lines = _check(capsys, "device=cuda")
    assert code == 2 and lines == ["error: device=cuda is not available: no CUDA device is visible; "
                                   "use device=auto or device=cpu"]


def test_a_sweep_job_whose_batch_outgrows_the_training_set_is_listed_before_the_first_job(capsys):
    code, lines = _check(capsys, "-m", "train.batch_size=32,128", "dataset.limit_train=64")
    assert code == 2 and lines == [
        "error: job 1 (train.batch_size=128 dataset.limit_train=64): train.batch_size=128 is invalid: larger than "
        "the training set (64 images); lower it or raise dataset.limit_train",
        "error: 1 of 2 jobs are invalid; no job was started",
    ]


def test_wandb_online_without_credentials(capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    code, lines = _check(capsys, "wandb.mode=online")
    assert code == 2 and lines == ["error: wandb.mode=online needs W&B credentials: run `wandb login` or set "
                                   "WANDB_API_KEY, or log locally with wandb.mode=offline"]
    # A sweep bound for a cluster is not judged by this machine's GPU or credentials.
    cli.check_command_line(["wandb.mode=online", "device=cuda", "hydra/launcher=slurm", "-m", "seed=0,1"])


def test_a_sweep_with_bad_values_fails_before_its_first_job(capsys):
    code, lines = _check(capsys, "-m", "method.alpha=0.5,2", "seed=0,1")
    assert code == 2 and lines == [
        "error: job 2 (method.alpha=2 seed=0): method.alpha=2 is invalid: alpha must be a number in [0, 1] (1 is SAM, 0 the base optimizer)",
        "error: job 3 (method.alpha=2 seed=1): method.alpha=2 is invalid: alpha must be a number in [0, 1] (1 is SAM, 0 the base optimizer)",
        "error: 2 of 4 jobs are invalid; no job was started",
    ]


@pytest.mark.parametrize("valid, mistaken, message", [
    (["-m", "method=plain,sam,gnp,asam", "seed=range(0,3)", "hydra.sweep.dir=x"],
     ["-m", "method=plain,sam,gnp,asma", "seed=range(0,3)", "hydra.sweep.dir=x"], "method=asma is not a choice"),
    (["model=vit_s", "method.alpha=0.5", "model.drop_path_rate=0.1"],
     ["model=vit_s", "method.alpha=1.5", "model.drop_path_rate=0.1"], "method.alpha=1.5 is invalid"),
    # --cfg prints the config: it must compose (one line, not Hydra's traceback), its values are not judged
    (["--cfg", "job", "method=sam", "train.epochs=0"], ["--cfg", "job", "methd=sam"], "methd is not a config key"),
    (["--info", "defaults", "model=vit"], ["--info", "defaults", "model=vitt"], "model=vitt is not a choice of model"),
])
def test_valid_commands_pass_the_check_and_the_same_with_one_mistake_does_not(capsys, valid, mistaken, message):
    assert cli.check_command_line(valid) is None and capsys.readouterr() == ("", "")
    code, lines = _check(capsys, *mistaken)
    assert code == 2 and len(lines) >= 1 and message in lines[0]


def test_what_hydra_expands_or_prints_without_a_config_is_left_to_it(capsys):
    # A sweep that expands against the config (glob) is checked job by job as each starts; help has no config.
    for argv in (["-m", "model=glob(resnet*)", "seed=0,1"], ["--help", "no=such key"], ["--hydra-help"]):
        assert cli.check_command_line(argv) is None and capsys.readouterr() == ("", "")


def _one_error_line(done, status: int) -> str:
    assert done.returncode == status, done.stderr[-2000:]
    assert "Traceback" not in done.stderr + done.stdout
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, done.stderr
    return errors[0]


def test_a_config_that_does_not_compose_is_said_before_torch_is_imported():
    """The first check of train.py needs Hydra alone: -X importtime lists every module the process imported."""
    done = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / "train.py"), "train.epoch=3"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert done.returncode == 2 and errors == ["error: train.epoch is not a config key: did you mean train.epochs?"]
    imported = [line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time")]
    assert "hydra" in imported and "torch" not in imported


def test_typos_and_missing_data_leave_no_run_directory(tmp_path):
    typo = train_py("train.epoch=3", f"hydra.run.dir={tmp_path / 'typo'}")
    assert "did you mean train.epochs?" in _one_error_line(typo, 2) and not (tmp_path / "typo").exists()
    (tmp_path / "empty").mkdir()
    missing = train_py(f"dataset.root={tmp_path / 'empty'}", "device=cpu", "wandb.mode=disabled",
                       f"hydra.run.dir={tmp_path / 'run'}")
    line = _one_error_line(missing, 2)
    assert f"CIFAR10 was not found in {tmp_path / 'empty'}" in line and "cifar-10-python.tar.gz" in line
    assert not (tmp_path / "run").exists()
    # The default layout, outputs/<dataset>/<model>/<method>/<time>: its new folders go too, outputs/ stays.
    (tmp_path / "work" / "outputs" / "cifar10").mkdir(parents=True)
    (tmp_path / "work" / "outputs" / "cifar10" / "earlier_run").mkdir()
    missing = train_py(f"dataset.root={tmp_path / 'empty'}", "device=cpu", "wandb.mode=disabled", cwd=tmp_path / "work")
    _one_error_line(missing, 2)
    assert [p.name for p in (tmp_path / "work").rglob("*")] == ["outputs", "cifar10", "earlier_run"]


def test_a_broken_checkpoint_or_a_busy_directory_is_one_line(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"")
    broken = train_py(*DIGITS, f"hydra.run.dir={tmp_path / 'run'}")
    assert f"{tmp_path / 'run' / 'checkpoint.pt'} is unreadable" in _one_error_line(broken, 2)
    assert (tmp_path / "run" / "checkpoint.pt").exists()  # never deleted for the user
    # Another run is training there: refused before Hydra rewrites its record (it trained with seed 0).
    record = {name: f"- seed=0 ({name})\n" for name in ("config.yaml", "hydra.yaml", "overrides.yaml")}
    (tmp_path / "busy" / ".hydra").mkdir(parents=True)
    for name, text in record.items():
        (tmp_path / "busy" / ".hydra" / name).write_text(text)
    with Hold(tmp_path / "busy"):
        busy = train_py(*DIGITS, "seed=1", f"hydra.run.dir={tmp_path / 'busy'}")
    assert _one_error_line(busy, 2) == f"error: {tmp_path / 'busy'} is in use by another run (PID {os.getpid()}); " \
                                       f"wait for it to end, or start this one in another directory (hydra.run.dir=...)"
    assert {p.name: p.read_text() for p in (tmp_path / "busy" / ".hydra").iterdir()} == record
    # The same for a sweep: one of its jobs is running.
    sweep = tmp_path / "sweep"
    with Hold(sweep / "1"):
        busy = train_py("-m", *DIGITS, "seed=0,1", f"hydra.sweep.dir={sweep}")
    assert f"error: {sweep / '1'} is in use by another run (PID {os.getpid()}); wait for it to end, or start this " \
           f"one in another directory (hydra.sweep.dir=...)" == _one_error_line(busy, 2)
    assert sorted(p.name for p in sweep.iterdir()) == ["1"]  # no multirun.yaml, no job started


@pytest.mark.parametrize("where,reason", [
    ("file/run", "{tmp}/file is a file, not a folder. Choose another directory with hydra.run.dir=..."),
    pytest.param("/proc/gnp-run", "making a folder in /proc fails (No such file or directory). Choose a writable "
                                  "directory with hydra.run.dir=...",
                 marks=pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")),
])
def test_a_run_directory_that_cannot_be_made_is_one_line_before_hydra_writes(tmp_path, where, reason):
    (tmp_path / "file").write_text("a regular file")
    run = tmp_path / where
    done = train_py(*DIGITS, f"hydra.run.dir={run}")
    assert _one_error_line(done, 2) == f"error: cannot use {run} as the run directory: {reason.format(tmp=tmp_path)}"
    assert (tmp_path / "file").read_text() == "a regular file"


def test_a_read_only_file_system_is_one_line(tmp_path, capsys, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(rundir.tempfile, "mkdtemp", read_only)  # what making a folder there answers
    for argv, option in ([f"hydra.run.dir={tmp_path / 'run'}"], "hydra.run.dir"), \
            (["-m", "seed=0,1", f"hydra.sweep.dir={tmp_path / 'sweep'}"], "hydra.sweep.dir"):
        code, lines = _check_run_directory(capsys, *argv)
        what = "run" if option == "hydra.run.dir" else "sweep"
        assert code == 2 and lines == [f"error: cannot use {tmp_path / what} as the {what} directory: making a folder "
                                       f"in {tmp_path} fails (Read-only file system). Choose a writable directory "
                                       f"with {option}=..."]
    assert list(tmp_path.iterdir()) == []


def _check_run_directory(capsys, *argv):
    with pytest.raises(SystemExit) as done:
        cli.check_run_directory(list(argv))
    return done.value.code, capsys.readouterr().err.strip().splitlines()


def test_another_runs_settings_are_refused_before_hydra_rewrites_that_runs_record(tmp_path):
    run = tmp_path / "run"
    first = train_py(*DIGITS, "train.epochs=1", f"hydra.run.dir={run}")
    assert first.returncode == 0, first.stderr[-2000:]
    record = {p.name: p.read_bytes() for p in (run / ".hydra").iterdir()}
    other = train_py(*DIGITS, "train.epochs=1", "seed=1", f"hydra.run.dir={run}")
    assert _one_error_line(other, 2) == f"error: {run} holds a checkpoint of a different run (seed: 0 -> 1). Resume " \
                                        f"with the same settings, or start a new run in another directory " \
                                        f"(hydra.run.dir=...)."
    assert {p.name: p.read_bytes() for p in (run / ".hydra").iterdir()} == record


def test_a_diverging_run_exits_3_and_its_summary_says_diverged(tmp_path):
    done = train_py(*DIGITS, "optimizer.lr=1e6", "method.max_grad_norm=null", f"hydra.run.dir={tmp_path}")
    assert re.search(r"became NaN or infinite (at|between) step", _one_error_line(done, 3))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["test_error"] is None


@pytest.mark.slow
def test_ctrl_c_checkpoints_and_prints_how_to_resume(tmp_path):
    run = tmp_path / "run"
    process = Forked("train.py", *DIGITS, "train.epochs=50", "train.sync_every=1", f"hydra.run.dir={run}")
    deadline = time.monotonic() + 120
    while not (run / "metrics.jsonl").exists() and time.monotonic() < deadline:  # well into training
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130 and "Traceback" not in out + err, err
    last = (out + err).strip().splitlines()[-1]
    # Mid-epoch or, when the signal lands on an epoch's last step, at its end: either way a checkpoint.
    assert re.match(r"stopped by SIGINT at (step \d+|the end of epoch \d+)", last), last
    assert "Resume: python train.py " in last
    assert last.endswith(f"hydra.run.dir={run}")
    assert json.loads((run / "summary.json").read_text())["status"] == "stopped"
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    assert state["epoch"] >= 1 and "stopped by SIGINT" in (run / "train.log").read_text()


def test_a_sweep_reports_every_failed_job_and_goes_on(tmp_path):
    (tmp_path / "empty").mkdir()
    done = train_py("-m", "dataset=digits,cifar10", f"dataset.root={tmp_path / 'empty'}", "model.width=2",
                    "train.epochs=1", "dataset.limit_train=64", "dataset.limit_test=32", "train.batch_size=32",
                    "wandb.mode=disabled", "device=cpu", "aug=none", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert done.returncode == 1 and "Traceback" not in done.stderr + done.stdout, done.stderr[-2000:]
    assert "job 1 failed: CIFAR10 was not found" in done.stdout + done.stderr
    summary = json.loads((tmp_path / "sweep" / "sweep_summary.json").read_text())
    statuses = sorted(job["status"] for job in summary["jobs"])
    assert statuses == ["failed", "finished"]


SIGN_SAM = '''"""A method of a user's own, outside the package: SAM along sign(g1) / sqrt(n) instead of g1 / ||g1||."""
import torch

from gnp.methods import TwoPassMethod


class SignSAM(TwoPassMethod):
    def __init__(self, model, base_optimizer, r=0.05, **settings):
        super().__init__(model, base_optimizer, r, **settings)

    def direction(self, params, g1, g1_norm):
        signs = torch._foreach_sign(g1)
        torch._foreach_div_(signs, sum(s.numel() for s in signs) ** 0.5)
        return signs
'''


def test_a_method_of_ones_own_is_a_python_file_and_a_yaml_outside_the_package(tmp_path, monkeypatch):
    (tmp_path / "sign_sam.py").write_text(SIGN_SAM)
    (tmp_path / "conf" / "method").mkdir(parents=True)
    (tmp_path / "conf" / "method" / "sign_sam.yaml").write_text(
        "_target_: sign_sam.SignSAM\nname: sign_sam\nr: 0.02\nmax_grad_norm: 5.0\n")
    monkeypatch.syspath_prepend(tmp_path)  # as PYTHONPATH=<that folder> would
    monkeypatch.delitem(sys.modules, "sign_sam", raising=False)
    search = f"hydra.searchpath=[file://{tmp_path / 'conf'}]"
    # With 4 shards in one process: the shards come with the machinery, not with the method's code.
    done = train_py(search, *DIGITS, "method=sign_sam", "train.epochs=1", "train.shards=4",
                    f"hydra.run.dir={tmp_path / 'run'}")
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["status"], summary["method"], summary["method_settings"], summary["shards"]) == (
        "finished", "sign_sam", {"r": 0.02, "max_grad_norm": 5.0}, 4)
    (epoch,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert epoch["r"] == 0.02 and epoch["perturbed_loss"] != epoch["first_pass_loss"]  # its two passes ran
    # Its settings are checked by its class before anything runs.
    bad = train_py(search, *DIGITS, "method=sign_sam", "method.r=-1", f"hydra.run.dir={tmp_path / 'bad'}")
    assert _one_error_line(bad, 2) == "error: method.r=-1 is invalid: r must be a finite number >= 0 (0 trains with " \
                                      "the base optimizer alone)"
    assert not (tmp_path / "bad").exists()


def test_a_failed_write_is_one_line_with_the_path_and_the_os_reason_whichever_layer_raised_it(tmp_path, monkeypatch):
    # A checkpoint on a disk that fills up: torch's zip writer raises its own RuntimeError after the ENOSPC.
    with monkeypatch.context() as patch:
        full_disk_after_the_first_checkpoint(patch.setattr)
        done = train_py(*DIGITS, "train.epochs=2", f"hydra.run.dir={tmp_path / 'run'}")
    assert _one_error_line(done, 2) == f"error: cannot write {tmp_path / 'run' / 'checkpoint.pt'}: No space left on " \
                                       f"device. Free space or choose a writable folder; the previous checkpoint.pt " \
                                       f"is unchanged."
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["epoch"] == 1
    # Tables and figures where a folder cannot be made.
    from test_tables import DIGITS as DIGITS_CELL, DIGITS_METHODS, make_tables, write_run

    write_run(tmp_path / "runs" / "plain", DIGITS_CELL + DIGITS_METHODS["plain"], 0, 2.0)
    (tmp_path / "file").write_text("a regular file")
    for option in ("--out", "--figures"):
        folders = {"--out": tmp_path / "tables", "--figures": tmp_path / "figures", option: tmp_path / "file" / "x"}
        argv = [str(tmp_path / "runs"), "--table", "digits", *(f"{k}={v}" for k, v in folders.items())]
        made = in_process(functools.partial(make_tables.main, argv), ["scripts/make_tables.py", *argv])
        line = _one_error_line(made, 2)
        assert line.startswith(f"error: cannot write {tmp_path / 'file' / 'x'}/") and ": Not a directory." in line


def _read_only_after_the_first_epoch(setattr) -> None:
    """Once the first epoch is recorded, every write into the run directory fails as on a file system that
    turned read-only (root ignores a folder's permissions, so the failure is injected where the OS would
    report it)."""
    written, real_mkstemp, real_unlink = [], tempfile.mkstemp, Path.unlink

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    def mkstemp(*args, dir=None, **kwargs):
        if written and dir is not None:
            read_only()
        if str(kwargs.get("prefix", "")).startswith(".metrics.jsonl."):
            written.append(dir)
        return real_mkstemp(*args, dir=dir, **kwargs)

    def unlink(self, *args, **kwargs):
        if written and self.name == rundir.LOCK:
            read_only()
        return real_unlink(self, *args, **kwargs)

    setattr(tempfile, "mkstemp", mkstemp)
    setattr(Path, "unlink", unlink)


def test_a_run_directory_that_turns_read_only_while_training_is_one_line(tmp_path, monkeypatch):
    """The checkpoint after the first epoch's record fails; the run's own end (summary, lock) cannot be
    written either, and neither hides the first failure: one line, exit status 2."""
    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        _read_only_after_the_first_epoch(patch.setattr)
        done = train_py(*DIGITS, "train.epochs=2", f"hydra.run.dir={run}")
    line = _one_error_line(done, 2)
    assert line.startswith(f"error: cannot write {run / 'checkpoint.pt'}: Read-only file system."), line
    assert "Traceback" not in done.stderr + done.stdout
    assert f"cannot write {run / 'summary.json'}" in done.stdout + done.stderr  # said, as a warning


def test_a_checkpoint_of_another_model_is_one_line_naming_the_tensor(tmp_path):
    narrow = compose_config(*DIGITS, "train.epochs=1")
    train(narrow, tmp_path / "narrow")
    state = torch.load(tmp_path / "narrow" / "checkpoint.pt", weights_only=False)
    state["config"] = OmegaConf.to_container(compose_config(*DIGITS, "model.width=4", "train.epochs=2"), resolve=True)
    (tmp_path / "wide").mkdir()
    torch.save(state, tmp_path / "wide" / "checkpoint.pt")
    done = train_py(*DIGITS, "model.width=4", "train.epochs=2", f"hydra.run.dir={tmp_path / 'wide'}")
    assert _one_error_line(done, 2) == (
        f"error: {tmp_path / 'wide' / 'checkpoint.pt'} does not fit this model: conv1.weight has shape [2, 3, 3, 3] "
        f"there and [4, 3, 3, 3] in this model (it was made by another model or another version of its code). Move "
        f"it away to start this run afresh, or resume from another run directory (hydra.run.dir=...).")


@pytest.mark.slow
def test_a_signal_after_the_final_line_leaves_a_finished_runs_exit_status_alone(tmp_path):
    process = Forked("train.py", *DIGITS, "train.epochs=1", f"hydra.run.dir={tmp_path}")
    for line in process.stdout:
        if line.startswith("test error"):
            break
    while process.poll() is None:  # SIGTERM after SIGTERM, as a scheduler ending a job may send them
        try:
            process.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            break
        time.sleep(0.002)
    process.communicate(timeout=120)
    assert process.returncode == 0
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "finished"


@pytest.mark.parametrize("step,times,name,status,says", [
    (2, 2, "SIGINT", 130, "interrupted at once, without a checkpoint at this step. Resume the sweep (its finished "
                          "jobs are kept; this one starts again): "),
    (4, 1, "SIGTERM", 143, "received SIGTERM in the last steps of job 0: it finished, and the sweep stops here. "
                           "Resume: "),
])
def test_a_stopped_sweep_prints_a_command_that_resumes_it_as_printed(tmp_path, monkeypatch, step, times, name, status,
                                                                     says):
    sweep = ["-m", *DIGITS, "train.epochs=1", "seed=0,1", "hydra.sweep.subdir=seed${seed}",
             f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    with monkeypatch.context() as patch:  # the signal during job 0 (4 steps), as a scheduler or a Ctrl-C sends it
        signal_at_step(patch, step, getattr(signal, name), times)
        done = train_py(*sweep)
    assert done.returncode == status, done.stderr[-2000:]
    last = (done.stdout + done.stderr).strip().splitlines()[-1]
    assert last.startswith(says) and "Traceback" not in done.stdout + done.stderr, last
    command = shlex.split(last.removeprefix(says))
    assert command[:3] == ["python", str(ROOT / "train.py"), "-m"] and "hydra.sweep.subdir=seed${seed}" in command
    assert not (tmp_path / "sweep" / "seed1").exists()  # the sweep stopped at job 0
    again = train_py(*command[2:], cwd=tmp_path)  # the printed command, from another folder
    assert again.returncode == 0, again.stderr[-2000:]
    for seed in (0, 1):
        assert json.loads((tmp_path / "sweep" / f"seed{seed}" / "summary.json").read_text())["status"] == "finished"
