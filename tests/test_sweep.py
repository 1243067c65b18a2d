"""Sweeps: the summary written when a multirun ends, the `parallel` launcher, SLURM's local twin, W&B sweep files.

The summary is checked on job directories made here (as the training loop leaves them), then wired up in
real tiny multiruns of train.py on the digits task. The launcher's failure and Ctrl-C paths run a small
Hydra app made here, which starts in a second (no torch).
"""
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import astuple
from datetime import datetime
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra._internal.callbacks import Callbacks
from hydra._internal.utils import run_and_report
from omegaconf import OmegaConf

from conftest import QUICK_DIGITS, ROOT, Forked, compose_config, train_py
from gnp import distributed, sweep
from hydra_plugins.gnp_parallel_launcher.parallel_launcher import Slot, last_error_line, make_slots

TRACEBACK = textwrap.dedent("""\
    Traceback (most recent call last):
      File "train.py", line 20, in main
    RuntimeError: CUDA out of memory

    Set the environment variable HYDRA_FULL_ERROR=1 for a complete stack trace.
    """)


def _strict_json(path: Path):
    def no_constants(name):
        raise ValueError(f"{path} holds {name}")
    return json.loads(path.read_text(), parse_constant=no_constants)


def _multirun_config(sweep_dir: Path, task: list[str], sweeper=sweep.BASIC_SWEEPER, params=None):
    """The parts of a multirun's config the summary reads, as Hydra composes them."""
    return OmegaConf.create({"hydra": {
        "sweep": {"dir": str(sweep_dir), "subdir": "${hydra.job.num}"},
        "sweeper": {"_target_": sweeper, "max_batch_size": None, "params": params},
        "overrides": {"task": task, "hydra": ["hydra.mode=MULTIRUN"]},
        "output_subdir": ".hydra",
        "callbacks": {"sweep_summary": {"_target_": "gnp.sweep.SweepSummary"}},
    }})


def _job_dir(sweep_dir: Path, name: str, overrides: list[str], summary: dict | None = None, log: str | None = None):
    """A job's run directory as Hydra and the training loop leave it."""
    path = sweep_dir / name
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if summary is not None:
        (path / "summary.json").write_text(json.dumps(summary))
    if log is not None:
        (path / "launcher.log").write_text(log)


def _table(text: str) -> list[list[str]]:
    """The rows of the printed markdown table, as lists of cells, without the header and the rule."""
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[1:]]


def test_summary_lists_every_job_sorted_by_test_error_with_failures_last_and_ends_the_sweep(tmp_path, capsys):
    sweep_dir = tmp_path / "sweep"
    task = ["method.alpha=0.5,0.8,1.0", "seed=0,1,2", "method=gnp"]
    # Job k of BasicSweeper's expansion is alpha (0.5, 0.8, 1.0)[k // 3], seed k % 3.
    jobs = {
        0: {"test_error": 4.0},  # no status: a damaged summary, never taken as finished
        1: {"status": "finished", "test_error": 2.5, "error": None},
        2: {"status": "failed", "test_error": None, "error": "ValueError: method.alpha=2 is invalid"},
        3: {"status": "diverged", "test_error": None, "error": "training loss became nan in epoch 3"},
        4: {"status": "stopped", "test_error": None, "error": None},
        5: None,  # started, no summary.json: its launcher.log says why
        6: {"status": "finished", "test_error": 3.0, "error": None},
        8: {"status": "finished", "test_error": 2.5, "error": None},  # ties with job 1: by job number
    }  # job 7 never started
    for k, summary in jobs.items():
        overrides = [f"method.alpha={(0.5, 0.8, 1.0)[k // 3]}", f"seed={k % 3}", "method=gnp"]
        _job_dir(sweep_dir, str(k), overrides, summary, log=TRACEBACK if summary is None else None)
    _job_dir(sweep_dir, "9", ["method.alpha=2.0", "seed=0", "method=gnp"], {"status": "finished", "test_error": 1.0})
    config = _multirun_config(sweep_dir, task)

    # Through Hydra's own callback machinery, which turns an Exception raised by a callback into a warning.
    with pytest.raises(SystemExit) as ended:
        run_and_report(lambda: Callbacks(config).on_multirun_end(config=config))
    message = str(ended.value.code)  # not an int: Python prints it and exits with status 1
    assert message == (f"error: 5 of 9 jobs of the sweep did not finish (1 stopped, 1 failed, 2 did not finish, "
                       f"1 did not start); see {sweep_dir / 'sweep_summary.md'}")

    printed = capsys.readouterr().out
    rows = _table(printed)
    assert [row[0] for row in rows] == ["1", "8", "6", "3", "4", "2", "0", "5", "7"]  # job 9 is another sweep's
    assert rows[0] == ["1", "0.5", "1", "finished", "2.50"]
    assert [row[3] for row in rows] == ["finished"] * 3 + ["diverged", "stopped", "failed", "did not finish",
                                                           "did not finish", "did not start"]
    assert [row[4] for row in rows] == ["2.50", "2.50", "3.00", "", "", "", "", "", ""]
    assert re.search(r"^\| job \| alpha \| seed \| status +\| test error \(%\) \|$", printed, re.M)
    assert "- job 2 (alpha=0.5 seed=2), failed: ValueError: method.alpha=2 is invalid" in printed
    assert "- job 3 (alpha=0.8 seed=0), diverged: training loss became nan in epoch 3" in printed
    assert "- job 5 (alpha=0.8 seed=2), did not finish: RuntimeError: CUDA out of memory" in printed
    assert f"- job 0 (alpha=0.5 seed=0), did not finish: unreadable {sweep_dir / '0' / 'summary.json'}: has no " \
           f"status" in printed
    assert printed.rstrip().endswith(
        "9 jobs: 3 finished, 1 diverged, 1 stopped, 1 failed, 2 did not finish, 1 did not start")
    assert (sweep_dir / "sweep_summary.md").read_text() + "\n" == printed

    written = _strict_json(sweep_dir / "sweep_summary.json")
    assert written["swept"] == ["method.alpha", "seed"] and written["complete"] is False
    assert written["counts"] == {"finished": 3, "diverged": 1, "stopped": 1, "failed": 1, "did not finish": 2,
                                 "did not start": 1}
    assert [job["number"] for job in written["jobs"]] == [1, 8, 6, 3, 4, 2, 0, 5, 7]
    assert written["jobs"][0] == {"job": "1", "number": 1, "dir": str(sweep_dir / "1"), "status": "finished",
                                  "overrides": {"method.alpha": "0.5", "seed": "1"}, "test_error": 2.5, "error": None}
    assert written["jobs"][-1]["dir"] is None and written["jobs"][-1]["overrides"] == {"method.alpha": "1.0",
                                                                                         "seed": "1"}


def test_a_complete_sweep_ends_normally_and_reads_the_sweepers_params(tmp_path, capsys):
    sweep_dir = tmp_path / "sweep"
    for seed, error in [(0, 7.25), (1, 6.5)]:
        _job_dir(sweep_dir, str(seed), [f"seed={seed}", "method.alpha=0.5"],
                 {"status": "finished", "test_error": error})
    _job_dir(sweep_dir, "2", ["seed=2", "method.alpha=0.5"], {"status": "diverged", "test_error": None})
    # The swept key comes from hydra.sweeper.params, the fixed one from the command line.
    jobs = sweep.report(_multirun_config(sweep_dir, ["method.alpha=0.5"], params={"seed": "0,1,2"}))
    assert [(job.number, job.status, job.test_error) for job in jobs] == [(1, "finished", 6.5), (0, "finished", 7.25),
                                                                          (2, "diverged", None)]
    assert _table(capsys.readouterr().out)[0] == ["1", "1", "finished", "6.50"]
    assert _strict_json(sweep_dir / "sweep_summary.json")["complete"] is True


def test_another_sweepers_jobs_are_listed_by_what_differs_between_them(tmp_path, capsys):
    sweep_dir = tmp_path / "sweep"
    _job_dir(sweep_dir, "0", ["optimizer.lr=0.1", "seed=0"], {"status": "finished", "test_error": 5.0})
    _job_dir(sweep_dir, "1", ["optimizer.lr=0.05", "seed=0"], {"status": "finished", "test_error": 4.0})
    config = _multirun_config(sweep_dir, ["seed=0"], sweeper="hydra_plugins.hydra_optuna_sweeper.OptunaSweeper")
    jobs = sweep.report(config)
    assert [(job.number, job.overrides) for job in jobs] == [(None, {"optimizer.lr": "0.05"}),
                                                              (None, {"optimizer.lr": "0.1"})]
    assert _table(capsys.readouterr().out) == [["1", "0.05", "finished", "4.00"], ["0", "0.1", "finished", "5.00"]]


def test_the_summary_of_a_sweep_directory_can_be_printed_again(tmp_path, capsys):
    sweep_dir = tmp_path / "sweep"
    _job_dir(sweep_dir, "0", ["seed=0"], {"status": "finished", "test_error": 5.0})
    config = _multirun_config(sweep_dir, ["seed=0,1"])
    config.hydra.sweep.dir = "multirun/${now:%Y-%m-%d_%H-%M-%S}"  # as Hydra saves multirun.yaml
    OmegaConf.save(config, sweep_dir / "multirun.yaml")
    with pytest.raises(SystemExit, match="1 of 2 jobs of the sweep did not finish"):
        sweep.main([str(sweep_dir)])
    assert _table(capsys.readouterr().out) == [["0", "0", "finished", "5.00"], ["1", "1", "did not start", ""]]
    with pytest.raises(SystemExit, match="multirun.yaml does not exist"):
        sweep.main([str(tmp_path)])


def test_a_jobs_last_error_line_comes_from_its_latest_attempt(tmp_path):
    log = tmp_path / "launcher.log"
    log.write_text("[launcher] start: job 0 on slot 0 (cpu), 2026-01-01T00:00:00.000\n[launcher] command: x\n"
                   "ValueError: first attempt\n[launcher] end: exit status 1 after 1.0 s\n"
                   "[launcher] start: job 0 on slot 1 (cpu), 2026-01-01T00:01:00.000\n[launcher] command: x\n"
                   + TRACEBACK + "[launcher] end: exit status 1 after 2.0 s\n")
    assert last_error_line(log) == "RuntimeError: CUDA out of memory"
    log.write_text("[launcher] start: job 0 on slot 0 (cpu)\n[launcher] end: killed\n")
    assert last_error_line(log) is None


def test_slots_cover_each_device_jobs_per_device_times(monkeypatch):
    # Compared as tuples: Hydra's plugin scan may load the launcher's module a second time.
    assert [astuple(s) for s in make_slots(["cpu", "cpu"], 1)] == [(0, "cpu"), (1, "cpu")]
    assert [slot.device for slot in make_slots([0, 1], 2)] == ["0", "0", "1", "1"]
    assert str(make_slots([3], 1)[0]) == "slot 0 (cuda 3)" and str(Slot(2, "cpu")) == "slot 2 (cpu)"
    # auto: the CUDA_VISIBLE_DEVICES entries of the devices this process sees, or one CPU slot.
    import torch
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4, 6")
    assert [slot.device for slot in make_slots("auto", 2)] == ["4", "4", "6", "6"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert [slot.device for slot in make_slots("auto", 1)] == ["0", "1"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert [astuple(s) for s in make_slots("auto", 3)] == [(0, "cpu"), (1, "cpu"), (2, "cpu")]


@pytest.mark.parametrize("devices,jobs_per_device,message", [
    (2, 1, r"hydra.launcher.devices=2 is invalid: use auto, or a list"),
    ([], 1, r"hydra.launcher.devices=\[\] is invalid"),
    ([0, -1], 1, r"hydra.launcher.devices contains -1, not a device"),
    (["0,1"], 1, r"contains '0,1', not a device: use auto, or a list of CUDA device ids and/or cpu"),
    ([0], 0, r"hydra.launcher.jobs_per_device=0 is invalid: use a whole number >= 1"),
])
def test_bad_launcher_settings_name_the_key_and_the_fix(devices, jobs_per_device, message):
    with pytest.raises(ValueError, match=message):
        make_slots(devices, jobs_per_device)


# A Hydra app that behaves as its `job` override says, recording what it saw in its run directory.
FAKE_APP = '''
import json, os, signal, sys, time
from pathlib import Path
import hydra
from hydra.core.hydra_config import HydraConfig

def wait_for(path, seconds=20):
    deadline = time.monotonic() + seconds
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return path.exists()

@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg):
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    shared = run_dir.parent
    (shared / f"started_{cfg.job}_{cfg.n}").touch()
    record = {"pid": os.getpid(), "device": cfg.device, "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
              "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}
    if cfg.job in ("ok", "crash"):  # each waits until the other has started: they overlap or one times out
        record["saw_other"] = wait_for(shared / f"started_{'crash' if cfg.job == 'ok' else 'ok'}_{cfg.n}")
    (run_dir / "record.json").write_text(json.dumps(record))
    if cfg.job == "ok":
        (run_dir / "summary.json").write_text(json.dumps({"status": "finished", "test_error": 1.5}))
    elif cfg.job == "crash":
        raise RuntimeError("boom")
    elif cfg.job == "recorded":  # a failure the run records itself, as train.py does
        (run_dir / "summary.json").write_text(json.dumps({"status": "failed", "error": "ValueError: bad value"}))
        print("error: ValueError: bad value", file=sys.stderr)
        sys.exit(2)
    elif cfg.job == "sleep":
        def stop(signum, frame):
            with open(run_dir / "signals", "a") as f:
                f.write(signal.Signals(signum).name + "\\n")
            sys.exit(75)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)
        (run_dir / "ready").touch()
        time.sleep(60)

main()
'''


@pytest.fixture
def fake_app(tmp_path):
    (tmp_path / "app" / "conf").mkdir(parents=True)
    (tmp_path / "app" / "app.py").write_text(FAKE_APP)
    (tmp_path / "app" / "conf" / "config.yaml").write_text("job: ok\nn: 0\ndevice: auto\n")
    return tmp_path / "app" / "app.py"


def _env():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("OMP_NUM_THREADS", None)  # the parallel launcher shares the cores out when it is unset
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def _parallel(app, sweep_dir, *overrides):
    return [sys.executable, str(app), "-m", "hydra/launcher=base_parallel", "hydra.launcher.devices=[cpu,cpu]",
            f"hydra.sweep.dir={sweep_dir}", *overrides]


def test_parallel_launcher_runs_jobs_at_once_on_distinct_slots_and_reports_each_failure(tmp_path, fake_app):
    sweep_dir = tmp_path / "sweep"
    done = subprocess.run(_parallel(fake_app, sweep_dir, "job=ok,crash,recorded"), cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=120)
    output = done.stdout + done.stderr
    records = [json.loads((sweep_dir / str(k) / "record.json").read_text()) for k in range(3)]
    assert records[0]["saw_other"] and records[1]["saw_other"]  # ok and crash ran at the same time
    threads = str(max(1, len(os.sched_getaffinity(0)) // 2))
    assert all(r["device"] == "cpu" and r["CUDA_VISIBLE_DEVICES"] == "" and r["OMP_NUM_THREADS"] == threads
               for r in records)
    assert len({r["pid"] for r in records}) == 3
    logs = [(sweep_dir / str(k) / "launcher.log").read_text() for k in range(3)]
    slots = [re.search(r"^\[launcher\] start: job \d on (slot \d \(cpu\))", log) for log in logs]
    assert {slots[0][1], slots[1][1]} == {"slot 0 (cpu)", "slot 1 (cpu)"} and slots[2][1] in {slots[0][1], slots[1][1]}
    # The run that recorded its failure is a result of the sweep (the sweep goes on, as in-process);
    # the one that crashed without a summary fails the sweep, in one line, after every job has run.
    assert re.search(r"#2 ended on slot \d \(cpu\) after \d+ s: failed, exit status 2: error: ValueError: bad value",
                     output)
    assert done.returncode == 1
    assert (f"\njob 1 (job=crash) failed on {slots[1][1]} with exit status 1: RuntimeError: boom "
            f"(log: {sweep_dir / '1' / 'launcher.log'})\n") in done.stderr
    assert "Traceback" not in done.stderr


def test_ctrl_c_reaches_each_running_job_once_and_the_launcher_waits_for_them(tmp_path, fake_app):
    sweep_dir = tmp_path / "sweep"
    launcher = subprocess.Popen(_parallel(fake_app, sweep_dir, "job=sleep", "n=0,1,2"), cwd=tmp_path, env=_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 60
    while not all((sweep_dir / str(k) / "ready").exists() for k in (0, 1)) and time.monotonic() < deadline:
        time.sleep(0.1)
    os.killpg(launcher.pid, signal.SIGINT)  # what a Ctrl-C in its terminal does
    output, _ = launcher.communicate(timeout=60)
    assert launcher.returncode == 128 + signal.SIGINT, output
    for k in (0, 1):
        assert (sweep_dir / str(k) / "signals").read_text() == "SIGINT\n"  # once: the jobs have their own session
        pid = json.loads((sweep_dir / str(k) / "record.json").read_text())["pid"]
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not (sweep_dir / "2").exists()
    assert "Jobs that did not start: 2. Resume the sweep with the same command and hydra.sweep.dir=" in output


def _train_multirun(tmp_path, monkeypatch, *overrides):
    """train.py -m in this process, with the environment of _env() (which a launcher's jobs inherit)."""
    monkeypatch.setenv("PYTHONPATH", _env()["PYTHONPATH"])
    for variable in ("OMP_NUM_THREADS", "HYDRA_FULL_ERROR"):
        monkeypatch.delenv(variable, raising=False)
    sweep_dir = tmp_path / "sweep"
    done = train_py("-m", *QUICK_DIGITS, f"hydra.sweep.dir={sweep_dir}", *overrides, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    return sweep_dir, done.stdout


def _check_summary(sweep_dir, printed, numbers):
    """The printed summary lists every job as finished, with the test error its summary.json holds."""
    written = _strict_json(sweep_dir / "sweep_summary.json")
    assert sorted(job["number"] for job in written["jobs"]) == numbers and written["complete"]
    for job in written["jobs"]:
        summary = json.loads((sweep_dir / job["job"] / "summary.json").read_text())
        assert job["status"] == "finished" and job["test_error"] == summary["test_error"]
    assert (sweep_dir / "sweep_summary.md").read_text() in printed
    assert f"{len(numbers)} jobs: {len(numbers)} finished" in printed


@pytest.mark.slow
def test_a_multirun_of_train_py_ends_with_its_summary(tmp_path, monkeypatch):
    sweep_dir, printed = _train_multirun(tmp_path, monkeypatch, "device=cpu", "seed=0,1")
    _check_summary(sweep_dir, printed, [0, 1])
    assert sorted(row[1] for row in _table(printed)) == ["0", "1"]  # the swept seed
    _check_wandb_group(sweep_dir, [0, 1])


def _check_wandb_group(sweep_dir: Path, numbers: list[int]) -> None:
    """The jobs of one sweep form one W&B group, named after its directory."""
    for k in numbers:
        wandb = yaml.safe_load((sweep_dir / str(k) / "config.yaml").read_text())["wandb"]
        assert wandb["group"] == f"multirun-{sweep_dir.name}" and "multirun" in wandb["tags"]


@pytest.mark.slow
def test_parallel_launcher_trains_two_digits_jobs_at_once_on_two_cpu_slots(tmp_path, monkeypatch):
    sweep_dir, printed = _train_multirun(tmp_path, monkeypatch, "hydra/launcher=parallel",
                                         "hydra.launcher.devices=[cpu,cpu]", "seed=0,1")
    _check_summary(sweep_dir, printed, [0, 1])
    spans = []
    for k in (0, 1):
        log = (sweep_dir / str(k) / "launcher.log").read_text()
        start = re.search(r"^\[launcher\] start: job \d on (slot \d) \(cpu\), (\S+)$", log, re.M)
        end = re.search(r"^\[launcher\] end: exit status 0 after \S+ s, (\S+)$", log, re.M)
        spans.append((start[1], datetime.fromisoformat(start[2]), datetime.fromisoformat(end[1])))
        assert "device: cpu" in (sweep_dir / str(k) / "config.yaml").read_text()
    assert spans[0][0] != spans[1][0]  # distinct slots
    _check_wandb_group(sweep_dir, [0, 1])  # each job is a single run of its own, started by the launcher
    assert spans[0][1] < spans[1][2] and spans[1][1] < spans[0][2]  # each started before the other ended


def _submitit_task(sweep_dir: Path) -> int | None:
    """The PID of the process that runs the submitted job (submitit starts it under its controller)."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue  # the process ended meanwhile
        if b"submitit.core._submit" in args and any(str(sweep_dir).encode() in a for a in args):
            return int(cmdline.parent.name)
    return None


# Guards against a hang only: the waits inside scale with the time the uninterrupted run took on this machine.
@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_a_preempted_submitit_job_checkpoints_is_requeued_and_ends_as_if_uninterrupted(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason='needs pip install -e ".[slurm]"')
    # 16 steps per epoch: the signal, sent once the first epoch is done, lands well before the last.
    run = [*QUICK_DIGITS, "train.epochs=4", "dataset.limit_train=512", "train.batch_size=32", "train.sync_every=1",
           "device=cpu", "seed=3"]
    started = time.monotonic()
    uninterrupted = train_py(*run, f"hydra.run.dir={tmp_path / 'a'}", cwd=tmp_path)  # in this process
    assert uninterrupted.returncode == 0, uninterrupted.stderr
    # The sweep trains the same run, plus a checkpoint, a requeue and a resume: a few times as long at most.
    patience = 120 + 5 * (time.monotonic() - started)
    # The job runs in its own process, as on SLURM; SIGUSR1 stands for SLURM's warning before a time limit. It
    # takes this process's number of threads, for the same sums as the uninterrupted run.
    sweep_dir = tmp_path / "sweep"
    env = {**_env(), "SUBMITIT_PREEMPT_SIGNAL": "USR1", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    sweep = Forked(str(ROOT / "train.py"), "-m", *run, "hydra/launcher=submitit_local", f"hydra.sweep.dir={sweep_dir}",
                   cwd=tmp_path, env=env)
    deadline = time.monotonic() + patience
    while not (sweep_dir / "0" / "metrics.jsonl").exists() and time.monotonic() < deadline:
        time.sleep(0.05)  # until the first epoch is done
    os.kill(_submitit_task(sweep_dir), signal.SIGUSR1)
    printed, errors = sweep.communicate(timeout=patience)
    assert sweep.returncode == 0, printed + errors
    log = (sweep_dir / "0" / "train.log").read_text()
    assert "received SIGUSR1" in log and "Resuming" in log  # checkpointed, requeued, resumed
    def without_timing(run_dir):
        return [{k: v for k, v in json.loads(line).items() if k not in ("seconds", "images_per_second")}
                for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    assert without_timing(sweep_dir / "0") == without_timing(tmp_path / "a")
    _check_summary(sweep_dir, printed, [0])


@pytest.mark.parametrize("overrides,lines", [
    (["hydra.launcher.nodes=2"], ["--nodes=2", "--gpus-per-node=8", "--ntasks-per-node=8"]),
    (["hydra.launcher.gpus_per_node=1", "hydra.launcher.partition=gpu"],
     ["--nodes=1", "--gpus-per-node=1", "--ntasks-per-node=1", "--partition=gpu"]),
])
def test_slurm_launcher_asks_for_one_task_per_gpu_a_warning_signal_and_requeue(tmp_path, monkeypatch, overrides, lines):
    submitit = pytest.importorskip("submitit", reason='needs pip install -e ".[slurm]"')
    from hydra.utils import instantiate

    (tmp_path / "srun").write_text("#!/bin/sh\n")  # submitit looks for srun before it writes anything
    (tmp_path / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")

    class Submitted(Exception):
        pass

    def capture(executor, function, *arguments):  # the sbatch script, instead of submitting it
        slurm = executor._executor
        raise Submitted(slurm._make_submission_file_text("COMMAND", "0"), slurm.max_num_timeout)

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", capture)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        config = compose("config", [f"hydra.sweep.dir={tmp_path / 'sweep'}", "hydra.job.name=train",
                                    "hydra/launcher=slurm", *overrides], return_hydra_config=True)
    launcher = instantiate(config.hydra.launcher)
    launcher.config = config
    with pytest.raises(Submitted) as submitted:
        launcher.launch([["seed=0"]], initial_job_idx=0)
    sbatch, max_num_timeout = submitted.value.args
    flags = {line.removeprefix("#SBATCH ") for line in sbatch.splitlines() if line.startswith("#SBATCH ")}
    assert set(lines) | {"--signal=USR2@180", "--requeue", "--time=1440", "--mem=128GB", "--cpus-per-task=8"} <= flags
    assert max_num_timeout == 3


SLURM_TASK_9_OF_2_NODES = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "16", "SLURM_JOB_NUM_NODES": "2",
                           "SLURM_NODEID": "1", "SLURM_PROCID": "9", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_TASKS": "16",
                           "SLURM_JOB_NODELIST": "gpu[07-08]"}


def test_ddp_settings_of_a_slurm_task_come_from_submitit(monkeypatch):
    pytest.importorskip("submitit", reason='needs pip install -e ".[slurm]"')
    # Task 9 of a 2-node x 8-GPU job: the second task on the second node.
    for name, value in {"SUBMITIT_EXECUTOR": "slurm", **SLURM_TASK_9_OF_2_NODES}.items():
        monkeypatch.setenv(name, value)
    assert distributed.detect_launch() == distributed.Launch(9, 1, 16, "gpu07", 20000 + 4242 % 12768)


def test_ddp_settings_of_an_srun_task_come_from_slurms_environment(monkeypatch):
    monkeypatch.setenv("PATH", "")  # no scontrol: the node list is expanded by hand
    assert distributed.detect_launch(SLURM_TASK_9_OF_2_NODES) == \
        distributed.Launch(9, 1, 16, "gpu07", 20000 + 4242 % 12768)
    assert distributed.detect_launch({"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "0", **SLURM_TASK_9_OF_2_NODES}) \
        == distributed.Launch(2, 0, 4)  # torchrun inside a SLURM job: torchrun's variables win
    assert distributed.detect_launch({}) == distributed.Launch(0, 0, 1)
    # The batch script itself sees the allocation's 16 tasks but is one process, not a replica.
    batch_script = {k: v for k, v in SLURM_TASK_9_OF_2_NODES.items() if k != "SLURM_STEP_NUM_TASKS"}
    assert distributed.detect_launch(batch_script) == distributed.Launch(0, 0, 1)


@pytest.mark.parametrize("name", ["alpha_r_grid", "bayes_alpha_r_lr"])
def test_wandb_sweep_commands_compose_with_the_real_config(name, monkeypatch):
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    spec = yaml.safe_load((ROOT / "scripts" / "wandb_sweeps" / f"{name}.yaml").read_text())
    assert spec["program"] == "train.py" and spec["metric"] == {"name": "test_error", "goal": "minimize"}
    assert spec["command"][:3] == ["${env}", "${interpreter}", "${program}"]
    assert spec["command"][-1] == "${args_no_hyphens}"
    # One point of the search, turned into arguments as the W&B agent does.
    point = {key: p["values"][-1] if "values" in p else p["max"] for key, p in spec["parameters"].items()}
    agent_command = {"args": {key: {"value": value} for key, value in point.items()}}
    args = create_sweep_command_args(agent_command)["args_no_hyphens"]
    monkeypatch.setenv("WANDB_SWEEP_ID", "sweep7")
    monkeypatch.setenv("WANDB_RUN_ID", "run3")
    with_hydra = compose_config(*spec["command"][3:-1], *args)
    for key, value in point.items():
        assert OmegaConf.select(with_hydra, key) == value
    assert (with_hydra.dataset.name, with_hydra.model.name, with_hydra.method.name) == ("cifar10", "resnet18", "gnp")
    assert with_hydra.wandb.mode == "online" and spec["project"] == with_hydra.wandb.project
    run_dir = next(a for a in spec["command"] if a.startswith("hydra.run.dir="))
    assert OmegaConf.create({"d": run_dir.partition("=")[2]}).d == "outputs/wandb_sweeps/sweep7/run3"
