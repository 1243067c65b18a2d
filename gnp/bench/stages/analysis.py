"""Stage 5: what a flatness analysis (`python -m gnp.analysis`, README: Flatness of the trained models)
costs against training:

- one Hessian-vector product (`SubsetLoss.hvp`, the model in eval mode) by each exact method, double
  backward and forward-over-reverse, alone and (per product) in a block taken together as the trace
  estimators take them (`SubsetLoss.hvps`), against one plain training step (forward and backward) on the
  same batch and model, paired over interleaved rounds; both in float32, eager, without channels_last, as
  the analysis computes; `hvp` is the method the analysis's `--hvp auto` picks on that batch, alone;
- the wall time of a default analysis of a run (the command with its own defaults: the top 5 Hessian
  eigenvalues, a Hutch++ trace of 33 products, the sharpness ascended to convergence from 3 starts and
  their mirror images, the loss, error and gradient norm, on a subset of a tenth of the training images
  as 5,000 of CIFAR's 50,000) against one training epoch of that run, trained just before through the
  training loop in the main setting; and of an analysis with the previous defaults (PREVIOUS: a
  Hutchinson trace of 100 products, products by double backward) against the default one;
- the trace estimators, from those two analyses: the products Hutchinson's estimator would need for the
  default estimator's standard error (its variance falls as 1 / products), and the default's products
  over that.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from gnp.analysis import __main__ as analysis_command
from gnp.analysis.hessian import PRODUCTS_PER_PASS
from gnp.analysis.objective import DOUBLE_BACKWARD, FORWARD_OVER_REVERSE, SubsetLoss
from gnp.analysis.run import RESULT_FILE
from gnp.bench.settings import DataPaths, FastPaths, ModelSpec, main_paths, run_overrides
from gnp.bench.stages.loop import run_checked
from gnp.bench.steps import SuiteStep
from gnp.bench.timing import interleaved, paired_ratio, release, spread, warm_up
from gnp.compose import compose_config

PREVIOUS = ["--trace-method", "hutchinson", "--trace-samples", "100", "--hvp", DOUBLE_BACKWARD]  # the defaults before


def measure(spec: ModelSpec, args: argparse.Namespace, device: torch.device, data: DataPaths, work: Path) -> dict:
    """The products, the analyses and the trace estimators for the model `spec` (--analysis-model)."""
    result = {"model": spec.name, "options": spec.options, "label": spec.label, "batch_size": spec.batch_size}
    result["hvp"] = measure_hvp(spec, args, device, data)
    result["run"] = measure_run(spec, args, device, data, work)
    result["trace"] = trace_efficiency(result["run"])
    return result


def measure_hvp(spec: ModelSpec, args: argparse.Namespace, device: torch.device, data: DataPaths) -> dict:
    """One Hessian-vector product on a training batch by each method, alone and in a block of
    PRODUCTS_PER_PASS taken together (per product), against one plain step on the same batch; a method the
    model cannot take (forward mode) is recorded as such."""
    paths = FastPaths("fp32", channels_last=False, compile=False, fused=device.type == "cuda")
    step = SuiteStep(compose_config(*run_overrides(spec, "plain", paths, device, data.tiny), validated=True), device)
    net = step.parts.model

    def loss(method: str) -> SubsetLoss:
        return SubsetLoss(net, [(step.images, step.target)], label_smoothing=step.parts.cfg.train.label_smoothing,
                          l2=step.parts.method.l2_groups(), hvp_method=method)

    generator = torch.Generator(device).manual_seed(0)
    vector = [torch.randn(p.shape, generator=generator, device=device, dtype=p.dtype) for p in loss("auto").params]

    def products(one: SubsetLoss, count: int) -> Callable[[], None]:
        def call() -> None:
            net.eval()  # as the analysis evaluates the model
            try:
                one.hvps([vector] * count)
            finally:
                net.train()
        return call

    print(f"\n== analysis cost: a Hessian-vector product against a plain step, {spec.label}, batch "
          f"{spec.batch_size}, {paths.label}", flush=True)
    chooser = loss("auto")
    products(chooser, 1)()  # what --hvp auto picks on this batch
    calls, unavailable = {}, {}
    for method in (DOUBLE_BACKWARD, FORWARD_OVER_REVERSE):
        one = loss(method)
        try:
            products(one, 1)()
        except ValueError as e:  # no forward mode
            unavailable[method] = str(e)
            continue
        calls[method], calls[f"{method} block"] = products(one, 1), products(one, PRODUCTS_PER_PASS)
    calls["step"] = step
    warm_up(calls, device, max(args.warmup, 1))
    samples = interleaved(calls, device, args.repeats, spec.steps)
    release(device)
    methods = {}
    for method in (m for m in (DOUBLE_BACKWARD, FORWARD_OVER_REVERSE) if m in calls):
        block = [t / PRODUCTS_PER_PASS for t in samples[f"{method} block"]]
        methods[method] = {"ms": spread(samples[method]), "hvp/step": paired_ratio(samples[method], samples["step"]),
                           "block": {"products": PRODUCTS_PER_PASS, "ms_per_product": spread(block),
                                     "hvp/step": paired_ratio(block, samples["step"])}}
    chosen = chooser.hvp_choice["method"]
    return {"settings": asdict(paths), "chosen": chooser.hvp_choice, "methods": methods, "unavailable": unavailable,
            "ms": {"hvp": methods[chosen]["ms"], "step": spread(samples["step"])},
            "hvp/step": methods[chosen]["hvp/step"]}


def measure_run(spec: ModelSpec, args: argparse.Namespace, device: torch.device, data: DataPaths,
                work: Path) -> dict:
    """Train a plain run through the loop (--loop-epochs epochs, the first a warm-up), then time the
    default analysis of its final weights, and the analysis with the previous defaults."""
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
    seconds, record = _analyse(command + args.analysis_args, device)
    previous_seconds, previous = _analyse(command + PREVIOUS + args.analysis_args, device)  # its own options win
    epoch = statistics.median(samples)
    return {"main": asdict(main), "images": data.n_train, "epochs": args.loop_epochs,
            "epoch_training_seconds": epochs, "epoch_seconds": epoch,
            "analysis_arguments": command[1:] + args.analysis_args,
            "extra_arguments": args.analysis_args, "analysis_settings": record["settings"],
            "analysis_seconds": seconds, "hvp_count": _products(record), "details": _hessian_details(record),
            "analysis/epoch": seconds / epoch,
            "previous": {"arguments": PREVIOUS, "analysis_settings": previous["settings"],
                         "analysis_seconds": previous_seconds, "hvp_count": _products(previous),
                         "details": _hessian_details(previous)},
            "analysis/previous": seconds / previous_seconds, "summary": trained["summary"]}


def _analyse(command: list[str], device: torch.device) -> tuple[float, dict]:
    """Seconds of `python -m gnp.analysis COMMAND`, in this process, and the analysis.json it wrote."""
    release(device)
    started = time.perf_counter()
    try:
        status = analysis_command.main(command)
    except SystemExit as e:  # its own command-line check
        status = e.code
    seconds = time.perf_counter() - started
    if status:
        raise RuntimeError(f"python -m gnp.analysis {' '.join(command)} exited with status {status}")
    return seconds, json.loads((Path(command[0]) / RESULT_FILE).read_text())


def _products(record: dict) -> int:
    """The Hessian-vector products an analysis took."""
    return sum(record["details"].get(name, {}).get("hvp_count", 0)
               for name in ("hessian_top_eigenvalues", "hessian_trace"))


def _hessian_details(record: dict) -> dict:
    """What the Hessian quantities of analysis.json say, without the eigenvectors' residuals."""
    details = record["details"]
    return {name: details[name] for name in ("hessian_top_eigenvalues", "hessian_trace") if name in details}


def trace_efficiency(run: dict) -> dict | None:
    """The products Hutchinson's estimator (the previous analysis) would need for the default estimator's
    standard error, its variance falling as 1 / products, and the default's products over that; None
    without both traces, or with a zero standard error."""
    new, old = (r["details"].get("hessian_trace") for r in (run, run["previous"]))
    if not (new and old and new["stderr"] > 0 and old["method"] == "hutchinson"):
        return None
    equal_error = old["samples"] * (old["stderr"] / new["stderr"]) ** 2
    return {"method": new["method"], "products": new["samples"], "stderr": new["stderr"],
            "hutchinson_products": old["samples"], "hutchinson_stderr": old["stderr"],
            "hutchinson_products_for_equal_error": equal_error, "products/hutchinson": new["samples"] / equal_error}


def _training_seconds(row: dict, data: DataPaths, spec: ModelSpec) -> float:
    """An epoch's training time (its evaluation left out): its images over the rate the loop measured."""
    return data.n_train // spec.batch_size * spec.batch_size / row["images_per_second"]


def show(result: dict) -> None:
    hvp, run, trace = result["hvp"], result["run"], result["trace"]
    settings = run["analysis_settings"]
    methods = ", ".join(f"{method} {r['hvp/step']:.2f}x ({r['ms']['median']:.1f} ms; {r['block']['hvp/step']:.2f}x "
                        f"a product in blocks of {r['block']['products']})" for method, r in hvp["methods"].items())
    print(f"one Hessian-vector product against a plain training step of the same batch "
          f"({hvp['ms']['step']['median']:.1f} ms), paired by round: {methods}; auto picks {hvp['chosen']['method']}"
          + "".join(f"; {method}: {why}" for method, why in hvp["unavailable"].items()))
    extra = run["extra_arguments"]
    which = f"the analysis with {' '.join(extra)}" if extra else "a default analysis"
    print(f"{which}: {run['analysis_seconds']:.1f} s ({settings['subset']} of {run['images']} images, "
          f"{run['hvp_count']} Hessian-vector products) = {run['analysis/epoch']:.1f}x one training epoch "
          f"({run['epoch_seconds']:.2f} s); {run['analysis/previous']:.2f}x the previous defaults "
          f"({' '.join(run['previous']['arguments'])}: {run['previous']['analysis_seconds']:.1f} s, "
          f"{run['previous']['hvp_count']} products)")
    if trace:
        print(f"trace: {trace['method']} with {trace['products']} products has standard error {trace['stderr']:.3g}; "
              f"Hutchinson's would need {trace['hutchinson_products_for_equal_error']:.0f} products for it "
              f"({trace['hutchinson_products']} gave {trace['hutchinson_stderr']:.3g}): "
              f"{trace['products/hutchinson']:.2f}x the products")
