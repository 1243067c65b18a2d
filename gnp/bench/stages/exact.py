"""Stage 2: GNP's exact mode (the true gradient of L + lambda ||grad L|| by double backward) against
SGD and first-order GNP, on a small ResNet-18."""
from __future__ import annotations

import argparse
from dataclasses import asdict, replace

import torch

from gnp.bench.console import print_table
from gnp.bench.settings import DataPaths, ModelSpec, compose_config, main_paths, run_overrides
from gnp.bench.steps import SuiteStep
from gnp.bench.timing import interleaved, release, spread, warm_up

MODEL = ("resnet18", {"width": 8}, 32)  # the model, its builder options and batch


def measure(args: argparse.Namespace, device: torch.device, data: DataPaths) -> dict:
    """SGD, GNP and exact GNP (double backward) on a ResNet-18 of width 8, batch 32, eager."""
    spec = ModelSpec(*MODEL)
    paths = replace(main_paths(spec, args, device), compile=False)  # no double backward through compiled graphs
    steps = {name: SuiteStep(compose_config([*run_overrides(spec, method, paths, device, data.tiny), *extra]), device)
             for name, method, extra in (("sgd", "plain", ()), ("gnp", "gnp", ()), ("exact", "gnp", ["method.exact=true"]))}
    print(f"\n== exact mode: {spec.label}, batch {spec.batch_size}, {paths.label}", flush=True)
    warm_up(steps, device, args.warmup)
    samples = interleaved(steps, device, args.repeats, args.steps)
    timings = {name: spread(s) for name, s in samples.items()}
    release(device)
    return {"model": spec.name, "options": spec.options, "batch_size": spec.batch_size, "settings": asdict(paths),
            "ms_per_step": timings,
            "ratios": {f"{n}/sgd": timings[n]["median"] / timings["sgd"]["median"] for n in ("gnp", "exact")}}


def show(e: dict) -> None:
    sgd = e["ms_per_step"]["sgd"]["median"]
    print_table(["exact mode", "ms/step", "x sgd"],
                [[name, f"{t['median']:.2f}", f"{t['median'] / sgd:.2f}"] for name, t in e["ms_per_step"].items()])
