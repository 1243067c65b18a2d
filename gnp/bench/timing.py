"""Timing on a shared machine: device synchronisation around each timed block, interleaved rounds
(so that drift falls on every variant alike), medians with their spread, and paired ratios (the
median over rounds of a ratio within a round, so that drift between rounds cancels)."""
from __future__ import annotations

import gc
import statistics
import time
from typing import Any, Callable

import torch

from gnp.distributed import synchronize


def release(device: torch.device) -> None:
    """Free what the last measurement left (Python garbage, CUDA's cached blocks)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def warm_up(calls: dict[str, Callable[[], Any]], device: torch.device, times: int) -> None:
    """Untimed calls first: compilation, autotuning, allocator and caches settle."""
    for call in calls.values():
        for _ in range(times):
            call()
    synchronize(device)


def interleaved(calls: dict[str, Callable[[], Any]], device: torch.device, rounds: int,
                per_round: int) -> dict[str, list[float]]:
    """Seconds per call of each of `calls`: `rounds` rounds in which every one makes `per_round` calls
    between two device synchronisations. The order rotates every round, so that drift of a shared
    machine falls on all alike and none always follows the same one."""
    names = list(calls)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            synchronize(device)
            start = time.perf_counter()
            for _ in range(per_round):
                calls[name]()
            synchronize(device)
            samples[name].append((time.perf_counter() - start) / per_round)
    return samples


def spread(seconds: list[float], scale: float = 1000.0) -> dict:
    """Median, extremes and quartiles of the samples (times `scale`: milliseconds by default), and
    the samples in the order they were taken."""
    values = [s * scale for s in seconds]
    ordered = sorted(values)
    q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive") if len(values) > 1 else values * 3
    return {"median": statistics.median(values), "min": ordered[0], "max": ordered[-1], "q1": q1, "q3": q3,
            "samples": values}


def paired_ratio(a: list[float], b: list[float]) -> float:
    """Median over rounds of a's time over b's in the same round: a shared machine's drift from one
    round to the next cancels out."""
    return statistics.median(x / y for x, y in zip(a, b))


def mixed_step_ms(samples_ms: list[float], two_pass: list[bool], plain_ms: float, two_pass_ms: float) -> float:
    """Mean ms per step of a variant whose steps are of two kinds (hybrid training), robust to a
    shared machine's spikes: each timed block's time over what its own mix of steps costs at the
    one-pass and the two-pass medians, the median of that, times what the variant's overall mix costs."""
    per_block = len(two_pass) // len(samples_ms)
    relative = []
    for i, ms in enumerate(samples_ms):
        k = sum(two_pass[i * per_block: (i + 1) * per_block])
        relative.append(ms / ((k * two_pass_ms + (per_block - k) * plain_ms) / per_block))
    fraction = sum(two_pass) / len(two_pass)
    return statistics.median(relative) * (fraction * two_pass_ms + (1 - fraction) * plain_ms)


def rate(images: int, timing: dict) -> float:
    """Images per second at the median of a millisecond `spread`."""
    return images * 1000 / timing["median"]
