"""Stage 5: what a flatness analysis (`python -m gnp.analysis`, README: Flatness of the trained models)
costs against training. Two ratios:

- one Hessian-vector product (`SubsetLoss.hvp`, double backward, the model in eval mode) against one
  plain training step (forward and backward) on the same batch and model, paired over interleaved
  rounds; both in float32, eager, without channels_last, as the analysis computes;
- the wall time of a default analysis of a run (the command with its own defaults: the top 5 Hessian
  eigenvalues, a Hutchinson trace of 100 samples, the sharpness by 5 ascent steps, the loss, error and
  gradient norm, on a subset of a tenth of the training images as 5,000 of CIFAR's 50,000) against one
  training epoch of that run, trained just before through the training loop in the main setting.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import torch

from gnp.analysis import __main__ as analysis_command
from gnp.analysis.objective import SubsetLoss
from gnp.analysis.run import RESULT_FILE
from gnp.bench.settings import DataPaths, FastPaths, ModelSpec, main_paths, run_overrides
from gnp.bench.stages.loop import run_checked
from gnp.bench.steps import SuiteStep
from gnp.bench.timing import interleaved, paired_ratio, release, spread, warm_up
from gnp.compose import compose_config


def measure(spec: ModelSpec, args: argparse.Namespace, device: torch.device, data: DataPaths, work: Path) -> dict:
    """Both ratios for the model `spec` (--analysis-model)."""
    result = {"model": spec.name, "options": spec.options, "label": spec.label, "batch_size": spec.batch_size}
    result["hvp"] = measure_hvp(spec, args, device, data)
    result["run"] = measure_run(spec, args, device, data, work)
    return result


def measure_hvp(spec: ModelSpec, args: argparse.Namespace, device: torch.device, data: DataPaths) -> dict:
    """One Hessian-vector product on a training batch against one plain step on the same batch."""
    paths = FastPaths("fp32", channels_last=False, compile=False, fused=device.type == "cuda")
    step = SuiteStep(compose_config(*run_overrides(spec, "plain", paths, device, data.tiny), validated=True), device)
    net = step.parts.model
    loss = SubsetLoss(net, [(step.images, step.target)], label_smoothing=step.parts.cfg.train.label_smoothing,
                      l2=step.parts.method.l2_groups())
    generator = torch.Generator(device).manual_seed(0)
    vector = [torch.randn(p.shape, generator=generator, device=device, dtype=p.dtype) for p in loss.params]

    def hvp() -> None:
        net.eval()  # as the analysis evaluates the model
        loss.hvp(vector)
        net.train()

    print(f"\n== analysis cost: a Hessian-vector product against a plain step, {spec.label}, batch "
          f"{spec.batch_size}, {paths.label}", flush=True)
    calls = {"hvp": hvp, "step": step}
    warm_up(calls, device, max(args.warmup, 1))
    samples = interleaved(calls, device, args.repeats, spec.steps)
    release(device)
    return {"settings": asdict(paths), "ms": {name: spread(s) for name, s in samples.items()},
            "hvp/step": paired_ratio(samples["hvp"], samples["step"])}


def measure_run(spec: ModelSpec, args: argparse.Namespace, device: torch.device, data: DataPaths,
                work: Path) -> dict:
    """Train a plain run through the loop (--loop-epochs epochs, the first a warm-up), then time the
    default analysis of its final weights."""
    main = main_paths(spec, args, device)
    run_dir = work / "analysed_run"
    overrides = run_overrides(spec, "plain", main, device, data.full) + [
        f"train.epochs={args.loop_epochs}", f"train.eval_batch_size={min(1000, data.n_test)}"]
    print(f"\n== analysis cost: a default analysis against a training epoch, {spec.label}, {args.loop_epochs} epochs "
          f"of {data.n_train} images, {main.label}", flush=True)
    trained = run_checked(compose_config(*overrides, validated=True), run_dir, device)
    if not trained["ok"]:
        raise RuntimeError(f"the run to analyse failed: {'; '.join(trained['problems'])}")
    rows = trained["metrics"]
    epochs = [_training_seconds(row, data, spec) for row in rows]
    samples = epochs[1:] or epochs  # the first epoch is a warm-up (compilation, autotuning)
    command = [str(run_dir), "--device", str(device)]
    if args.analysis_subset is not None:
        command += ["--subset", str(args.analysis_subset)]
    command += args.analysis_args
    release(device)
    started = time.perf_counter()
    try:
        status = analysis_command.main(command)
    except SystemExit as e:  # its own command-line check
        status = e.code
    seconds = time.perf_counter() - started
    if status:
        raise RuntimeError(f"python -m gnp.analysis {' '.join(command)} exited with status {status}")
    record = json.loads((run_dir / RESULT_FILE).read_text())
    details = record["details"]
    epoch = statistics.median(samples)
    return {"main": asdict(main), "images": data.n_train, "epochs": args.loop_epochs,
            "epoch_training_seconds": epochs, "epoch_seconds": epoch, "analysis_arguments": command[1:],
            "extra_arguments": args.analysis_args, "analysis_settings": record["settings"],
            "analysis_seconds": seconds,
            "hvp_count": details.get("hessian_top_eigenvalues", {}).get("hvp_count", 0)
            + details.get("hessian_trace", {}).get("samples", 0),
            "analysis/epoch": seconds / epoch, "summary": trained["summary"]}


def _training_seconds(row: dict, data: DataPaths, spec: ModelSpec) -> float:
    """An epoch's training time (its evaluation left out): its images over the rate the loop measured."""
    return data.n_train // spec.batch_size * spec.batch_size / row["images_per_second"]


def show(result: dict) -> None:
    hvp, run = result["hvp"], result["run"]
    settings = run["analysis_settings"]
    print(f"one Hessian-vector product: {hvp['hvp/step']:.2f}x a plain training step of the same batch "
          f"({hvp['ms']['hvp']['median']:.1f} vs {hvp['ms']['step']['median']:.1f} ms, paired by round)")
    extra = run["extra_arguments"]
    which = f"the analysis with {' '.join(extra)}" if extra else "a default analysis"
    print(f"{which}: {run['analysis_seconds']:.1f} s ({settings['subset']} of {run['images']} images, "
          f"{run['hvp_count']} Hessian-vector products) = {run['analysis/epoch']:.1f}x one training epoch "
          f"({run['epoch_seconds']:.2f} s)")
