"""One process or many. One function decides how this process was launched: by `torchrun` (RANK,
WORLD_SIZE, LOCAL_RANK), as one task of a SLURM job (submitit's or srun's), or alone; the same
training code then runs with or without DDP. And the device: which one, and waiting for its queued work."""
from __future__ import annotations

import inspect
import os
import re
import socket
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, TypeVar

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from gnp.console import first_line
from gnp.methods.base import running_statistics

_DDP_ARGUMENTS = inspect.signature(DistributedDataParallel).parameters
T = TypeVar("T")


@dataclass(frozen=True)
class Process:
    host: str
    pid: int


@dataclass(frozen=True)
class Context:
    rank: int
    world_size: int
    device: torch.device
    processes: tuple[Process, ...] = ()  # every process of a run of several, in rank order

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class Launch:
    rank: int
    local_rank: int
    world_size: int
    master_addr: str | None = None  # None: torchrun has set MASTER_ADDR and MASTER_PORT already
    master_port: int | None = None


def detect_launch(env: Mapping[str, str] = os.environ) -> Launch:
    """torchrun first, then a multi-task submitit job (hydra/launcher=slurm, or submitit's local
    executor), then a multi-task SLURM job started with srun, else a single process."""
    if "WORLD_SIZE" in env and "RANK" in env:
        return Launch(int(env["RANK"]), int(env.get("LOCAL_RANK", "0")), int(env["WORLD_SIZE"]))
    if env.get("SUBMITIT_EXECUTOR"):
        import submitit

        job = submitit.JobEnvironment()
        if job.num_tasks > 1:
            return Launch(job.global_rank, job.local_rank, job.num_tasks, job.hostnames[0], _port(job.raw_job_id))
    # SLURM_STEP_NUM_TASKS, not SLURM_NTASKS: a batch script sees the whole allocation's task count
    # too, but only the tasks of an srun step are processes of one run.
    tasks = int(env.get("SLURM_STEP_NUM_TASKS", "1"))
    if tasks > 1 and "SLURM_PROCID" in env:
        return Launch(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", "0")), tasks,
                      _first_host(env.get("SLURM_JOB_NODELIST", "localhost")), _port(env.get("SLURM_JOB_ID", "0")))
    return Launch(0, 0, 1)


def _port(job_id: str) -> int:
    """A rendezvous port that every task of a job derives alike without talking, that differs between
    jobs sharing a node (array jobs included), and lies below Linux's ephemeral ports (32768 on)."""
    return 20_000 + int("".join(c for c in str(job_id) if c.isdigit()) or 0) % 12_768


def _first_host(nodelist: str) -> str:
    """The first host of a SLURM node list ("gpu[03-05,07]" -> "gpu03"), as `scontrol` expands it."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=30, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        prefix, _, ranges = nodelist.partition("[")
        return prefix + ranges.split(",")[0].split("-")[0].rstrip("]") if ranges else nodelist.split(",")[0]


def pick_device(preference: str = "auto") -> torch.device:
    """`auto` is CUDA when a device is visible, else the CPU; anything else is taken as named."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(preference)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={preference!r} asked for CUDA, but no CUDA device is visible; use device=cpu")
    return device


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on the device (CUDA runs kernels asynchronously): before a clock is read."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def setup(device: str = "auto") -> Context:
    """Start the process group when there are several processes; otherwise a single process."""
    launch = detect_launch()
    chosen = pick_device(device)
    if launch.world_size == 1:
        return Context(0, 1, chosen)
    if chosen.type == "cuda":
        chosen = torch.device("cuda", launch.local_rank)
        torch.cuda.set_device(chosen)
    if not dist.is_initialized():
        init = {}
        if launch.master_addr is not None:
            init["init_method"] = f"tcp://{launch.master_addr}:{launch.master_port}"
        dist.init_process_group("nccl" if chosen.type == "cuda" else "gloo", rank=launch.rank,
                                world_size=launch.world_size, device_id=chosen if chosen.type == "cuda" else None,
                                **init)
    processes = [None] * launch.world_size
    dist.all_gather_object(processes, Process(socket.gethostname(), os.getpid()))
    return Context(launch.rank, launch.world_size, chosen, tuple(processes))


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


class ReplicaFailed(RuntimeError):
    """Another process of the run failed; its own message says why."""


class ProcessDied(RuntimeError):
    """Another process of the run died (or lost its connection) during a collective; `speaks` says whether
    this process speaks for the run (records and reports it): the lowest-ranked survivor of its node."""

    def __init__(self, message: str, speaks: bool):
        super().__init__(message)
        self.speaks = speaks


# How collectives fail when a peer is gone: gloo's and NCCL's errors (plain RuntimeErrors in some versions).
_PEER_GONE = re.compile(r"gloo|NCCL|Connection (closed|reset) by peer")
_DEATH_SHOWS_WITHIN_S = 3.0  # a killed process on this node is a zombie or gone by then


def lost_process(error: BaseException, ctx: Context) -> ProcessDied | None:
    """The death of another process behind `error`, when it is a failed collective of a run of several
    processes; else None. Processes on this node are looked up by PID; one on another node is known
    only when it is the only other process."""
    if ctx.world_size == 1 or not ctx.processes or not (
            isinstance(error, dist.DistError) or (isinstance(error, RuntimeError) and _PEER_GONE.search(str(error)))):
        return None
    here = ctx.processes[ctx.rank].host
    local = [r for r, p in enumerate(ctx.processes) if p.host == here and r != ctx.rank]
    deadline, dead = time.monotonic() + _DEATH_SHOWS_WITHIN_S, []
    while local and not dead and time.monotonic() < deadline:
        dead = [r for r in local if _is_dead(ctx.processes[r].pid)]
        time.sleep(0.05)
    others = [r for r in range(ctx.world_size) if r != ctx.rank]
    if dead:
        who = ", ".join(f"process {r} (PID {ctx.processes[r].pid})" for r in dead) + " died"
    elif len(others) == 1:
        (other,) = others
        who = f"process {other} (on {ctx.processes[other].host}) died or lost its connection"
    else:
        hosts = sorted({p.host for p in ctx.processes} - {here})
        who = f"a process on another node ({', '.join(hosts)}) died or lost its connection"
    speaks = ctx.rank == min(r for r in [ctx.rank, *local] if r not in dead)
    reason = re.sub(r"^\[[^\]]*\] ?", "", first_line(error)).split(". ")[0]  # gloo's without its source line
    return ProcessDied(f"{who} ({reason})", speaks)


def _is_dead(pid: int) -> bool:
    """Whether the process `pid` of this node has ended (a zombie its parent has not reaped yet included)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False  # no /proc: alive as far as can be told
    return state in ("Z", "X")


def agree(error: BaseException | None, device: torch.device) -> None:
    """Every process learns whether any of them failed at this point: a failed one raises its error,
    the others ReplicaFailed, so that none waits forever in the next collective."""
    if _active():
        failed = torch.tensor([float(error is not None)], device=device)
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        if error is None and failed.item():
            raise ReplicaFailed("another process of this run failed (its error is printed above); this one stops too")
    if error is not None:
        raise error


def agreed(work: Callable[[], T], device: torch.device, here: bool = True) -> T | None:
    """`work()` on this process if `here`, then `agree` on the outcome of every process's part; the
    result where it ran."""
    result, error = None, None
    if here:
        try:
            result = work()
        except Exception as e:
            error = e
    agree(error, device)
    return result


def _is_main() -> bool:
    return not _active() or dist.get_rank() == 0


def on_main(work: Callable[[], T], device: torch.device) -> T | None:
    """`work()` on the main process only, agreed on; its result on the main process."""
    return agreed(work, device, here=_is_main())


def main_first(work: Callable[[], T], device: torch.device) -> T:
    """`work()` on the main process, then on the others, which find what it prepared (a downloaded,
    extracted dataset), agreeing on the outcome after each."""
    first = agreed(work, device, here=_is_main())
    then = agreed(work, device, here=not _is_main())
    return first if _is_main() else then


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum across processes (a no-op in a single process)."""
    if _active():
        dist.all_reduce(tensor)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum across processes (a no-op in a single process)."""
    if _active():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """[world_size, *shape]: every process's `tensor`, in rank order."""
    if not _active():
        return tensor.unsqueeze(0)
    out = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(out, tensor.contiguous())
    return torch.stack(out)


def wrap(model: nn.Module, device: torch.device) -> DistributedDataParallel:
    """DDP that leaves each replica its own buffers (BatchNorm statistics) in the forward pass, as
    the authors' code keeps them per device; `replica_averaged` averages them where it matters."""
    own_buffers = {"forward_sync_buffers": False} if "forward_sync_buffers" in _DDP_ARGUMENTS \
        else {"broadcast_buffers": False}  # the name before torch 2.14
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None, **own_buffers)


def broadcast_object(obj: Any) -> Any:
    """The main process's `obj` on every process."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def running_stats(*modules: nn.Module) -> list[torch.Tensor]:
    """The floating-point running statistics (BatchNorm mean and variance) of the modules: the only
    state that differs between DDP replicas, since each normalises with its own shard's batches."""
    return [buffer for module in modules for buffer in running_statistics(module) if buffer.is_floating_point()]


@contextmanager
def replica_averaged(stats: list[torch.Tensor]) -> Iterator[None]:
    """Inside: every replica holds the mean of the replicas' statistics, so all evaluate (and save)
    one model, as the authors' code averages BatchNorm statistics over devices for evaluation.
    Afterwards each replica has its own statistics back and training goes on exactly as before."""
    if not _active() or not stats:
        yield
        return
    own = [s.clone() for s in stats]
    flat = torch.cat([s.flatten() for s in stats])
    dist.all_reduce(flat)
    flat.div_(dist.get_world_size())
    torch._foreach_copy_(stats, [chunk.view_as(s) for chunk, s in zip(flat.split([s.numel() for s in stats]), stats)])
    try:
        yield
    finally:
        torch._foreach_copy_(stats, own)
