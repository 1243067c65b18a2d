"""The checks (on CUDA, or on a CPU with --checks on as a smoke run of shrunk models): no training
step or loader batch synchronises the host with the GPU, and every model family trains a short GNP
epoch through the training loop."""
from __future__ import annotations

import argparse
import traceback
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

from gnp.bench.settings import DataPaths, FastPaths, ModelSpec, run_overrides
from gnp.bench.stages.loop import run_checked
from gnp.bench.steps import SuiteStep
from gnp.bench.timing import release
from gnp.compose import compose_config
from gnp.config import method_passes
from gnp.console import error_line
from gnp.distributed import synchronize
from gnp.measurements import REFERENCE

# The end-to-end checks: one short GNP epoch of every model family with its own recipe, in bf16 and
# fp16 (channels_last for the CNNs). The loop stage's runs check the compiled ResNet-18 in bf16; a
# compiled run here would cost a compilation of its own (about a minute on an H100).
CHECK_RUNS = {
    "wrn28_10 bf16": ("model=wrn28_10", "precision=bf16"),
    "pyramidnet272 bf16 (ShakeDrop, AutoAugment + mixup + cutout)": ("model=pyramidnet272", "precision=bf16"),
    "vit_s fp16": ("model=vit_s", "precision=fp16"),
    "resnet18 fp16": ("model=resnet18", "precision=fp16"),
}
# Builder options that shrink each checked model when the checks run on a CPU (a smoke run of their code).
CPU_CHECK_OPTIONS = {"wrn28_10": {"depth": 10, "widen": 1}, "pyramidnet272": {"depth": 11, "alpha": 6},
                     "vit_s": {"depth": 1}, "resnet18": {"width": 4}}
SYNC_STEPS = 3  # steady-state steps run under torch.cuda.set_sync_debug_mode


# --- no host synchronisation in a training step or a loader batch -------------------------------

def sync_checks(steps: dict[str, SuiteStep], variants: dict, spec: ModelSpec, main: FastPaths,
                device: torch.device, data: DataPaths) -> dict:
    """Steady-state loop steps of every suite variant under torch.cuda.set_sync_debug_mode: bf16 and
    fp32 ones must not synchronise at all ("error" mode raises at the first synchronising call);
    fp16 ones may synchronise only inside GradScaler, at most once per step ("warn" mode, each
    warning counted with the file that made it). With a fused base optimizer GradScaler hands its
    inf/NaN flag to the fused kernel and makes none; an unfused one reads it on the host, once."""
    checks = {}
    suite = {name: v for name, v in variants.items() if v.role != REFERENCE}  # the reference has no loop step
    for name, v in suite.items():
        check = count_syncs if v.paths.precision == "fp16" else no_sync
        checks[name] = check(steps[name].loop_step, device)
    fp16 = [v for v in suite.values() if v.paths.precision == "fp16"]
    if fp16:  # the same with an unfused optimizer: exactly GradScaler's one synchronisation per step
        unfused = replace(fp16[0].paths, fused=False)
        step = SuiteStep(compose_config(*run_overrides(spec, fp16[0].method, unfused, device, data.tiny), validated=True), device)
        for _ in range(2):
            step()
        checks[f"gnp[{unfused.differences(main)}]"] = count_syncs(step.loop_step, device)
    return checks


def no_sync(call: Callable[[], None], device: torch.device) -> dict:
    """SYNC_STEPS calls under "error" mode: ok when none synchronises."""
    synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(SYNC_STEPS):
            call()
    except RuntimeError as e:
        return {"ok": False, "mode": "error", "error": error_line(e), "where": innermost(e)}
    finally:
        torch.cuda.set_sync_debug_mode("default")
    synchronize(device)
    return {"ok": True, "mode": "error", "steps": SYNC_STEPS}


def count_syncs(call: Callable[[], None], device: torch.device) -> dict:
    """SYNC_STEPS calls under "warn" mode: ok when every synchronisation is GradScaler's, at most one a call."""
    synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(SYNC_STEPS):
                call()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    synchronize(device)
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    places = sorted({f"{Path(w.filename).name}:{w.lineno}" for w in syncs})
    in_scaler = all(Path(w.filename).name == "grad_scaler.py" for w in syncs)
    return {"ok": in_scaler and len(syncs) <= SYNC_STEPS, "mode": "warn", "steps": SYNC_STEPS,
            "synchronisations": len(syncs), "where": places}


def innermost(error: BaseException) -> str:
    """file:line of the innermost frame of an error's traceback."""
    frames = traceback.extract_tb(error.__traceback__)
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"


# --- every model family trains ------------------------------------------------------------------

def run_checks(args: argparse.Namespace, device: torch.device, data: DataPaths, work: Path) -> list[dict]:
    """One short GNP epoch of each model family with its own recipe (CHECK_RUNS)."""
    runs = []
    eval_images = min(1000, data.n_test)
    for label, overrides in CHECK_RUNS.items():
        model = overrides[0].removeprefix("model=")
        options = CPU_CHECK_OPTIONS[model] if device.type == "cpu" else {}
        cfg = compose_config(*overrides, *(f"model.{k}={v}" for k, v in options.items()), "method=gnp",
                             "train.epochs=1", f"device={device}", f"dataset.root={data.full}", "dataset.verify=false",
                             f"dataset.limit_train={args.check_images}", f"dataset.limit_test={eval_images}",
                             f"train.eval_batch_size={eval_images}", "wandb.mode=disabled",
                             "train.progress=false", validated=True)
        print(f"\n== check: {label}, batch {cfg.train.batch_size}, {args.check_images} images", flush=True)
        run = run_checked(cfg, work / f"check_{len(runs)}", device)
        rows = run.pop("metrics")
        runs.append({"label": label, "model": model, "options": options, "method": "gnp",
                     "passes_per_step": method_passes(cfg), "batch_size": cfg.train.batch_size,
                     "overrides": list(overrides),
                     "images_per_second": rows[-1]["images_per_second"] if rows else None, **run})
        release(device)
    return runs
