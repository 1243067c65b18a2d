"""Stage 2: GNP's exact mode (the true gradient of L + lambda ||grad L|| by double backward) against
plain and first-order GNP steps, on a small ResNet-18."""
from __future__ import annotations

import argparse
import statistics
from dataclasses import asdict, replace

import torch

from gnp.bench.console import print_table
from gnp.bench.settings import DataPaths, ModelSpec, main_paths, run_overrides
from gnp.bench.steps import SuiteStep
from gnp.bench.timing import interleaved, release, spread, warm_up
from gnp.compose import compose_config

MODEL = ("resnet18", {"width": 8}, 32)  # the model, its builder options and batch
VARIANTS = {"plain": ("plain",), "gnp": ("gnp",), "exact": ("gnp", "method.exact=true")}  # name -> method, overrides


def measure(args: argparse.Namespace, device: torch.device, data: DataPaths) -> dict:
    """Plain, GNP and exact GNP (double backward) steps on a ResNet-18 of width 8, batch 32, eager."""
    spec = ModelSpec(*MODEL)
    paths = replace(main_paths(spec, args, device), compile=False)  # no double backward through compiled graphs
    steps = {name: SuiteStep(compose_config(*run_overrides(spec, method, paths, device, data.tiny), *extra, validated=True), device)
             for name, (method, *extra) in VARIANTS.items()}
    print(f"\n== exact mode: {spec.label}, batch {spec.batch_size}, {paths.label}", flush=True)
    warm_up(steps, device, args.warmup)
    for step in steps.values():
        step.passes.clear()
    samples = interleaved(steps, device, args.repeats, args.steps)
    timings = {name: spread(s) for name, s in samples.items()}
    fractions = {name: statistics.fmean(n > 1 for n in step.passes) for name, step in steps.items()}
    release(device)
    return {"model": spec.name, "options": spec.options, "batch_size": spec.batch_size, "settings": asdict(paths),
            "ms_per_step": timings, "two_pass_fraction": fractions,
            "ratios": {f"{n}/plain": timings[n]["median"] / timings["plain"]["median"] for n in ("gnp", "exact")}}


def show(e: dict) -> None:
    plain = e["ms_per_step"]["plain"]["median"]
    print_table(["exact mode", "ms/step", "x plain"],
                [[name, f"{t['median']:.2f}", f"{t['median'] / plain:.2f}"] for name, t in e["ms_per_step"].items()])
