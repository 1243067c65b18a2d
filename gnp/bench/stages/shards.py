"""Stage: the layout. One process takes each step's batch in 1, 2, 4 and 8 shards (train.shards), one
after another: GNP's step time and peak memory with each, as ratios to one shard. Accumulating shards
is what lets a batch that does not fit a device through, and what makes one process give the step of
k devices; the cost is the lost parallelism of smaller passes."""
from __future__ import annotations

import argparse

import torch

from gnp.bench import memory
from gnp.bench.console import mib, print_table
from gnp.bench.settings import DataPaths, ModelSpec, main_paths, run_overrides
from gnp.bench.steps import SuiteStep
from gnp.bench.timing import interleaved, paired_ratio, release, spread, warm_up
from gnp.compose import compose_config

SHARDS = (1, 2, 4, 8)
METHOD = "gnp"


def measure(spec: ModelSpec, args: argparse.Namespace, device: torch.device, data: DataPaths) -> dict:
    """The step of `spec`'s model and batch with each number of shards that splits its batch in shards of
    2 images or more, timed interleaved, and each one's peak memory alone."""
    paths = main_paths(spec, args, device)
    counts = [k for k in SHARDS if spec.batch_size % k == 0 and spec.batch_size // k >= 2]
    overrides = {k: [*run_overrides(spec, METHOD, paths, device, data.tiny), f"train.shards={k}"] for k in counts}
    print(f"\n== shards: {spec.label}, batch {spec.batch_size}, {paths.label}, {METHOD}: train.shards="
          f"{','.join(map(str, counts))} in one process", flush=True)
    steps = {k: SuiteStep(compose_config(*o, validated=True), device) for k, o in overrides.items()}
    warm_up(steps, device, args.warmup)
    samples = interleaved(steps, device, args.repeats, spec.steps)
    del steps
    release(device)
    peaks = memory.peak_bytes({str(k): o for k, o in overrides.items()}, device) if "memory" not in args.skip else {}
    result = {"model": spec.name, "options": spec.options, "label": spec.label, "batch_size": spec.batch_size,
              "method": METHOD, "settings": paths.label,
              "memory_how": memory.CUDA_HOW if device.type == "cuda" else memory.CPU_HOW, "shards": {}}
    for k in counts:
        record = {"ms_per_step": spread(samples[k]), "time/one_shard": paired_ratio(samples[k], samples[1])}
        if peaks:
            record |= {"peak_bytes": peaks[str(k)], "memory/one_shard": peaks[str(k)] / peaks["1"]}
        result["shards"][str(k)] = record
    return result


def show(result: dict) -> None:
    rows = []
    for k, r in result["shards"].items():
        memory_cells = [mib(r["peak_bytes"]), f"{r['memory/one_shard']:.2f}"] if "peak_bytes" in r else ["–", "–"]
        rows.append([k, f"{r['ms_per_step']['median']:.3g}", f"{r['time/one_shard']:.2f}", *memory_cells])
    print_table(["train.shards", "ms/step", "÷ 1 shard", "peak memory", "÷ 1 shard"], rows)
