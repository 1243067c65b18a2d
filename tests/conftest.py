"""Shared fixtures: configs composed from the real conf/ folder, small datasets written in the real CIFAR
on-disk format so that the real loading code is what the tests exercise, and train.py (or a script's main)
run in this process."""
from __future__ import annotations

import collections
import contextlib
import errno
import importlib
import io
import logging
import os
import runpy
import signal
import subprocess
import sys
import threading
import time
import traceback
import warnings
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.multiprocessing as mp
from hydra.core.global_hydra import GlobalHydra
from gnp.compose import compose_config  # noqa: F401 (the tests' way to compose, re-exported)
from gnp.data import write_synthetic_cifar
from gnp.methods import Method

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
TRAIN_PY = ROOT / "train.py"
# The digits task (real images, offline) on a ResNet-18 of width 2, on the CPU, logged nowhere: seconds a run.
TINY_DIGITS = ("experiment=digits_demo", "model.width=2", "wandb.mode=disabled", "device=cpu")
# One epoch of plain SGD on 64 of its images (one step of 64), tested on 32.
QUICK_DIGITS = (*TINY_DIGITS, "method=plain", "train.epochs=1", "dataset.limit_train=64", "dataset.limit_test=32")
# Builder options that make each model tiny on a CPU (a smoke run of its code; the rest of its config is kept).
TINY_MODELS = {"resnet18": {"width": 2}, "resnet101": {"width": 2}, "wrn28_10": {"depth": 10, "widen": 1},
               "pyramidnet110": {"depth": 8, "alpha": 6}, "pyramidnet272": {"depth": 11, "alpha": 6},
               "vit_ti": {"depth": 1}, "vit_s": {"depth": 1}, "vit_b": {"depth": 1}}


def tiny_model(name: str) -> tuple[str, ...]:
    """The overrides that choose the model `name`, shrunk by TINY_MODELS."""
    return (f"model={name}", *(f"model.{key}={value}" for key, value in TINY_MODELS[name].items()))


def in_process(main: Callable[[], int | None], argv: list[str], cwd: str | Path = ROOT) -> subprocess.CompletedProcess:
    """`sys.exit(main())` of a command run in this process with sys.argv = argv, from the folder `cwd`: its
    exit status and what it printed, as subprocess.run returns them, without the start-up of a new Python.
    What a run changes in the process (signal handlers, Hydra's state and logging, sys.argv, the folder)
    is put back. Tests of what only a process shows (a signal from outside) fork one (`Forked`), and those of a
    new Python's imports start one."""
    out, err = io.StringIO(), io.StringIO()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)}
    root = logging.getLogger()
    root_state = root.handlers[:], root.level
    previous_argv, folder = sys.argv, os.getcwd()
    try:
        os.chdir(cwd)
        sys.argv = list(argv)
        GlobalHydra.instance().clear()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main()
            except SystemExit as e:
                code = e.code
            code = _exit_status(code)
    finally:
        GlobalHydra.instance().clear()
        sys.argv = previous_argv
        os.chdir(folder)
        root.handlers[:], root.level = root_state
        for s, handler in handlers.items():
            signal.signal(s, handler)
    return subprocess.CompletedProcess([sys.executable, *argv], code, out.getvalue(), err.getvalue())


def _exit_status(code: object) -> int:
    """The exit status of `sys.exit(code)`, printing a message as Python does."""
    if code is None or isinstance(code, int):
        return code or 0
    print(code, file=sys.stderr)  # as Python prints sys.exit("message"), with status 1
    return 1


def train_py(*args: str, cwd: str | Path = ROOT) -> subprocess.CompletedProcess:
    """`python train.py ARGS` in this process (see `in_process`): the script itself, its checks and Hydra's app."""
    def main() -> None:
        runpy.run_path(str(TRAIN_PY), run_name="__main__")

    return in_process(main, [str(TRAIN_PY), *args], cwd)


class Forked:
    """`python SCRIPT ARGS` (from the folder `cwd`, in the environment `env` or this one's) in a process forked
    from this one: a process of its own, with Python's default signal handlers and warnings, its exit status and
    its output in pipes, as subprocess.Popen gives them, computing on one thread as start_replicas' processes do,
    for the tests of what only a process shows (a signal from outside, a replica of a distributed run). A new
    Python would first import torch and Hydra again, seconds of every such test. It ends without atexit's
    handlers (they are this pytest's), and with its test at the latest (`_forked_processes_end_with_their_test`)."""

    started: list[Forked] = []

    def __init__(self, script: str, *args: str, cwd: str | Path = ROOT, env: dict[str, str] | None = None):
        (out, out_end), (err, err_end) = os.pipe(), os.pipe()
        self.args = [script, *args]
        self.pid = os.fork()
        if self.pid == 0:
            os.close(out)
            os.close(err)
            _run_as_main(script, args, cwd, env, out_end, err_end)
        os.close(out_end)
        os.close(err_end)
        self.stdout = open(out, encoding="utf-8", errors="replace")
        self.stderr = open(err, encoding="utf-8", errors="replace")
        self.returncode: int | None = None
        Forked.started.append(self)

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float) -> int:
        """Its exit status; killed (and TimeoutExpired raised) if it has not ended within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                self.kill()
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(0.01)
        return self.returncode

    def kill(self) -> None:
        if self.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
            self.returncode = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)

    def communicate(self, timeout: float) -> tuple[str, str]:
        """What it printed until it ended, both pipes read at once (either may fill while it runs)."""
        deadline = time.monotonic() + timeout
        printed = {}
        readers = [threading.Thread(target=lambda pipe=pipe: printed.update({pipe: pipe.read()}), daemon=True)
                   for pipe in (self.stdout, self.stderr)]
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join(max(0.0, deadline - time.monotonic()))
        self.wait(max(0.0, deadline - time.monotonic()))
        if len(printed) < 2:  # a process it started holds the pipes
            raise subprocess.TimeoutExpired(self.args, timeout)
        return printed[self.stdout], printed[self.stderr]


@pytest.fixture(autouse=True)
def _forked_processes_end_with_their_test():
    """A test that fails while its Forked process runs kills it: the process holds this pytest's descriptors."""
    yield
    while Forked.started:
        process = Forked.started.pop()
        process.kill()
        process.stdout.close()
        process.stderr.close()


def _run_as_main(script: str, args: tuple[str, ...], cwd: str | Path, env: dict[str, str] | None, out: int,
                 err: int):
    """In the forked process: run `script` as `python script args` would, then end with its exit status."""
    code, killed_by = 1, None
    try:
        os.dup2(out, 1)
        os.dup2(err, 2)
        os.close(out)
        os.close(err)
        sys.stdin = open(os.devnull)
        sys.stdout = open(1, "w", closefd=False)  # block-buffered, as Python's own stdout on a pipe
        sys.stderr = open(2, "w", buffering=1, errors="backslashreplace", closefd=False)
        for signum in signal.valid_signals():
            if callable(signal.getsignal(signum)):  # a handler of this process's (pytest's, a test's)
                signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        importlib.reload(warnings)  # Python's filters and printing, not the test's recording of warnings
        logging.getLogger().handlers.clear()  # pytest's log capture
        GlobalHydra.instance().clear()
        if env is not None:
            os.environ.clear()
            os.environ.update(env)
        torch.set_num_threads(1)  # the parent's OpenMP threads are not in this process: libgomp would wait
        os.chdir(cwd)
        sys.argv = [script, *args]
        sys.path.insert(0, str(Path(script).resolve().parent))
        try:
            runpy.run_path(script, run_name="__main__")  # sys.argv[0] and __file__ as given
            code = 0
        except SystemExit as e:
            code = _exit_status(e.code)
        except KeyboardInterrupt:
            traceback.print_exc()
            killed_by = signal.SIGINT  # as Python ends: by the SIGINT it did not handle
    except BaseException:
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        if killed_by:
            signal.signal(killed_by, signal.SIG_DFL)
            os.kill(os.getpid(), killed_by)
        os._exit(code)  # never back into this process's pytest


def start_replicas(worker: Callable[..., None], args: tuple, processes: int) -> None:
    """`worker(rank, *args)` for each rank in processes forked from this one, until all have ended (a failure in
    one is raised here). A spawned process would import torch and the tests again, seconds each. Each forked one
    computes on one thread, as torch's DataLoader workers do where their parent has run OpenMP threads (and as
    torchrun's replicas, with OMP_NUM_THREADS=1)."""
    mp.start_processes(_on_one_thread, args=(worker, *args), nprocs=processes, start_method="fork")


def _on_one_thread(rank: int, worker: Callable[..., None], *args) -> None:
    torch.set_num_threads(1)
    worker(rank, *args)


def pytest_configure(config):
    """Under pytest-xdist (`-n N`, as `make test` runs), one thread for each test process and every process it
    starts: N processes of torch's default threads, one per core each, spent more time waiting on each other's
    cores than testing (the suite took longer than in one process)."""
    if getattr(config.option, "numprocesses", None) and "PYTEST_XDIST_WORKER" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = "1"  # before the workers start, which inherit it


def pytest_collection_modifyitems(items):
    """The modules with the most slow tests first, then those with the most tests, each module's tests in their
    own order. `make test` gives each pytest-xdist worker a module at a time in this order (--dist loadscope
    --no-loadscope-reorder): the long modules start at once and the short ones fill the end. In xdist's own
    order, by number of tests alone, the modules of few long tests (torchrun's) came last, and one worker ran
    them while the other waited."""
    module = {item: item.nodeid.partition("::")[0] for item in items}
    tests = collections.Counter(module.values())
    slow = collections.Counter(module[item] for item in items if item.get_closest_marker("slow"))
    # sort is stable: a module's tests keep their order
    items.sort(key=lambda item: (-slow[module[item]], -tests[module[item]]))


@pytest.fixture
def cifar_root(tmp_path):
    """A data root holding small generated CIFAR-10 and CIFAR-100 folders."""
    root = tmp_path / "data"
    write_synthetic_cifar(root, "cifar10")
    write_synthetic_cifar(root, "cifar100")
    return root


def signal_at_step(monkeypatch, step: int, signum=signal.SIGTERM, times: int = 1) -> dict:
    """Deliver `signum` (`times` times) to this process during optimisation step `step` (1-based), as a
    scheduler would; returns the count of steps started."""
    calls = {"n": 0}
    original = Method.step

    def step_then_signal(self, closure):
        calls["n"] += 1
        if calls["n"] == step:
            for _ in range(times):
                os.kill(os.getpid(), signum)
        return original(self, closure)

    monkeypatch.setattr(Method, "step", step_then_signal)
    return calls


class _FullDisk(io.RawIOBase):
    """A file on a disk that fills up after 64 KiB: then every write fails as the kernel's does."""

    def __init__(self, fd: int):
        self.fd, self.room = fd, 64 * 1024

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return os.write(self.fd, data)

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if not self.closed:
            os.close(self.fd)
        super().close()


def full_disk_after_the_first_checkpoint(setattr) -> None:
    """Write every checkpoint after the first to a disk that fills up, through `setattr` (monkeypatch's, or
    the builtin in a child process). torch's zip writer then raises its own RuntimeError ("unexpected pos"),
    not the ENOSPC of the write."""
    real_fdopen, checkpoints = os.fdopen, []

    def fdopen(fd, *args, **kwargs):
        if ".checkpoint.pt." in os.readlink(f"/proc/self/fd/{fd}"):
            checkpoints.append(fd)
            if len(checkpoints) > 1:
                return io.BufferedWriter(_FullDisk(fd))
        return real_fdopen(fd, *args, **kwargs)

    setattr(os, "fdopen", fdopen)
