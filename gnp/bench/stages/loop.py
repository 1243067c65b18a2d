"""Stage 4: the whole training loop (through the real config, on CIFAR-sized synthetic data) against
the bare step of the same setting; and `run_checked`, a training run judged by what it left."""
from __future__ import annotations

import argparse
import itertools
import math
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from gnp.bench.console import print_table
from gnp.bench.parts import train
from gnp.bench.settings import DataPaths, ModelSpec, main_paths, run_overrides
from gnp.bench.steps import SuiteStep
from gnp.bench.timing import interleaved, rate, release, spread, warm_up
from gnp.compose import compose_config
from gnp.console import error_line
from gnp.rundir import RunDir

METHODS = {"plain": "plain", "gnp": "gnp"}  # name -> config method: the loop's two runs
TARGETS = {"device": "H100", "model": "resnet18", "images_per_second": {"plain": 45_000, "gnp": 22_000}}


def measure(spec: ModelSpec, args: argparse.Namespace, device: torch.device, data: DataPaths, work: Path) -> dict:
    """The training loop for plain and GNP steps in the main setting, --loop-repeats runs each, against the
    bare step of the same setting timed in blocks just before and after each run (a shared machine's
    speed drifts: only measurements close in time compare). Every epoch after a run's first is a
    sample of the loop."""
    main = main_paths(spec, args, device)
    bare = {m: SuiteStep(compose_config(*run_overrides(spec, method, main, device, data.tiny), validated=True), device)
            for m, method in METHODS.items()}
    warm_up(bare, device, args.warmup)
    result: dict[str, Any] = {"model": spec.name, "options": spec.options, "label": spec.label,
                              "batch_size": spec.batch_size, "main": asdict(main), "epochs": args.loop_epochs,
                              "repeats": args.loop_repeats, "images": data.n_train, "methods": {}}
    runs: dict[str, list[dict]] = {m: [] for m in METHODS}
    bare_seconds: dict[str, list[float]] = {m: [] for m in METHODS}
    for repeat, (name, method) in itertools.product(range(args.loop_repeats), METHODS.items()):
        print(f"\n== loop: {spec.label} {name} ({repeat + 1}/{args.loop_repeats}), {args.loop_epochs} epochs of "
              f"{data.n_train} images, {main.label}", flush=True)
        overrides = run_overrides(spec, method, main, device, data.full) + [
            f"train.epochs={args.loop_epochs}", f"train.eval_batch_size={min(1000, data.n_test)}"]
        bare_seconds[name] += interleaved({name: bare[name]}, device, 1, spec.steps)[name]
        runs[name].append(run_checked(compose_config(*overrides, validated=True), work / f"loop_{name}_{repeat}", device))
        bare_seconds[name] += interleaved({name: bare[name]}, device, 1, spec.steps)[name]
    for name in METHODS:
        problems = [p for run in runs[name] for p in run["problems"]]
        epochs = [[row["images_per_second"] for row in run["metrics"]] for run in runs[name]]
        samples = [r for rates in epochs for r in (rates[1:] or rates)]  # a one-epoch run has only its first
        timing = spread(bare_seconds[name])
        entry = {"ok": not problems, "problems": problems, "epoch_images_per_second": epochs,
                 "summaries": [run["summary"] for run in runs[name]], "bare_step_ms": timing,
                 "bare_step_images_per_second": rate(spec.batch_size, timing)}
        if samples:
            entry.update(images_per_second=statistics.median(samples), min=min(samples), max=max(samples))
            entry["loop/bare_step"] = entry["images_per_second"] / entry["bare_step_images_per_second"]
        result["methods"][name] = entry
    del bare
    release(device)
    if device.type == "cuda" and spec.name == TARGETS["model"] and not spec.options:
        result["targets"] = TARGETS
    return result


def run_checked(cfg: DictConfig, run_dir: Path, device: torch.device) -> dict:
    """Train `cfg` through the training loop and judge what it left: finished, finite, on the device."""
    try:
        summary = train(cfg, run_dir)
    except Exception as e:  # a check that fails is recorded, and the others still run
        return {"ok": False, "problems": [error_line(e)], "metrics": [], "summary": None}
    rows = RunDir(run_dir).read_metrics()
    problems = []
    if not summary.finished:
        problems.append(f"status {summary.status}: {summary.error}")
    if not all(math.isfinite(row["first_pass_loss"]) and math.isfinite(row["test_loss"]) for row in rows):
        problems.append("a non-finite loss")
    if not all(0 <= row["test_error"] <= 100 for row in rows):
        problems.append("a test error outside [0, 100]")
    if (summary.device == "cpu") != (device.type == "cpu"):
        problems.append(f"trained on {summary.device}, not on {device}")
    if summary.precision != cfg.precision:
        problems.append(f"precision {summary.precision}, not {cfg.precision}")
    record = summary.as_dict()
    return {"ok": not problems, "problems": problems, "metrics": rows,
            "summary": {k: record[k] for k in ("status", "model", "method", "aug", "batch_size", "precision",
                                               "num_parameters", "device", "wall_seconds", "images_per_second")}}


def show(loop: dict) -> None:
    rows = [[method, f"{r.get('images_per_second', math.nan):,.0f}", f"{r.get('min', math.nan):,.0f}-"
             f"{r.get('max', math.nan):,.0f}", f"{r['bare_step_images_per_second']:,.0f}",
             f"{r.get('loop/bare_step', math.nan):.3f}"] for method, r in loop["methods"].items()]
    print_table([f"loop {loop['label']}", "images/s", "min-max", "bare step", "loop / step"], rows)
    if "targets" in loop:
        t = loop["targets"]
        print(f"targets on an {t['device']}: plain >= {t['images_per_second']['plain']:,}, GNP >= "
              f"{t['images_per_second']['gnp']:,} images/s")
