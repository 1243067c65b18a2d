"""Stage 1, per model: the step of each method of the main comparison through the suite's own code,
the hand-written two-pass step, and GNP with each fast path flipped, timed interleaved; then the
evaluation's throughput and the peak memory of SGD and GNP."""
from __future__ import annotations

import argparse
import statistics
from dataclasses import asdict, replace
from typing import Any

import torch

from gnp.bench import memory
from gnp.bench.console import mib, print_table
from gnp.bench.settings import DataPaths, FastPaths, ModelSpec, compose_config, main_paths, run_overrides
from gnp.bench.stages import cuda
from gnp.bench.steps import SuiteStep, TwoPassStep
from gnp.bench.timing import interleaved, mixed_step_ms, paired_ratio, rate, release, spread, warm_up
from gnp.data import BatchLoader
from gnp.models import count_parameters

# name -> (config method, extra override): the methods of the main comparison.
METHODS = {"sgd": ("plain", None), "sam": ("sam", None), "gnp": ("gnp", None),
           "hybrid": ("gnp", "method.two_pass_probability=0.5")}
# GNP ÷ SGD and GNP ÷ the hand-written two-pass step, on a GPU and on a CPU.
STEP_LIMITS = {"cuda": {"gnp/sgd": 2.0, "gnp/two_pass": 1.0}, "cpu": {"gnp/sgd": 2.05, "gnp/two_pass": 1.03}}
MEMORY_SLACK = 0.05  # GNP's peak memory <= (SGD's + 2 x parameter bytes) x (1 + slack)

Variant = tuple[str, FastPaths, "str | None"]  # (config method, fast paths, extra override)


def step_variants(main: FastPaths, precisions: list[str]) -> dict[str, Variant]:
    """The methods in the main setting, the hand-written two-pass step, then GNP with each fast path
    flipped, named by how it differs from the main setting (`gnp[compile=off,precision=fp32]`). The
    pairs of fast paths compare eager runs (compile off) except the compile and fused pairs, so that
    only the main setting is compiled."""
    variants: dict[str, Variant] = {name: (method, main, extra) for name, (method, extra) in METHODS.items()}
    variants["two_pass"] = ("gnp", main, None)
    eager = replace(main, compile=False)
    flipped = [eager, replace(eager, channels_last=not main.channels_last), replace(main, fused=not main.fused)]
    flipped += [replace(eager, precision=p) for p in precisions if p != main.precision]
    for paths in flipped:
        if paths != main:
            variants[f"gnp[{paths.differences(main)}]"] = ("gnp", paths, None)
    return variants


def fast_path_pairs(variants: dict[str, Variant], main: FastPaths) -> list[dict]:
    """Each fast path as a pair of measured GNP variants that differ in it alone: (path, on, off)."""
    gnp = {paths: name for name, (method, paths, extra) in variants.items()
           if method == "gnp" and not extra and name != "two_pass"}
    eager = replace(main, compile=False)
    pairs = []
    if main.compile:
        pairs.append(("compile", main, eager))
    pairs.append(("channels_last", replace(eager, channels_last=True), replace(eager, channels_last=False)))
    pairs.append(("fused", replace(main, fused=True), replace(main, fused=False)))
    for low in ("bf16", "fp16"):
        pairs.append((low, replace(eager, precision=low), replace(eager, precision="fp32")))
    return [{"path": path, "on": gnp[on], "off": gnp[off]} for path, on, off in pairs if on in gnp and off in gnp]


def measure_model(spec: ModelSpec, args: argparse.Namespace, device: torch.device, data: DataPaths) -> dict:
    main = main_paths(spec, args, device)
    variants = step_variants(main, args.precisions)
    print(f"\n== steps: {spec.label}, batch {spec.batch_size}, {main.label}: {len(variants)} variants, "
          f"{args.warmup} warm-up steps each, then {args.repeats} rounds of {spec.steps}", flush=True)
    steps: dict[str, SuiteStep] = {}
    for name, (method, paths, extra) in variants.items():
        overrides = run_overrides(spec, method, paths, device, data.tiny) + ([extra] if extra else [])
        steps[name] = (TwoPassStep if name == "two_pass" else SuiteStep)(compose_config(overrides), device)
    net = steps["gnp"].parts.net
    parameter_bytes = sum(p.numel() * p.element_size() for p in net.parameters())
    warm_up(steps, device, args.warmup)
    for step in steps.values():
        step.two_pass.clear()  # count the timed steps only
    samples = interleaved(steps, device, args.repeats, spec.steps)

    result: dict[str, Any] = {
        "model": spec.name, "options": spec.options, "label": spec.label, "batch_size": spec.batch_size,
        "steps_per_round": spec.steps, "parameters": count_parameters(net), "parameter_bytes": parameter_bytes,
        "main": asdict(main), "main_label": main.label, "variants": {},
    }
    for name, (method, paths, extra) in variants.items():
        timing = spread(samples[name])
        result["variants"][name] = {
            "method": method, "settings": {**asdict(paths), **({"override": extra} if extra else {})},
            "ms_per_step": timing, "images_per_second": rate(spec.batch_size, timing),
            "two_pass_fraction": statistics.fmean(steps[name].two_pass),
        }
    hybrid = result["variants"]["hybrid"]  # its median mixes two kinds of steps: a mean is what it costs
    hybrid["mean_ms_per_step"] = mixed_step_ms(hybrid["ms_per_step"]["samples"], steps["hybrid"].two_pass,
                                               _median(result, "sgd"), _median(result, "gnp"))
    hybrid["images_per_second"] = spec.batch_size * 1000 / hybrid["mean_ms_per_step"]
    result["ratios"] = step_ratios(result["variants"])
    result["limits"] = STEP_LIMITS[device.type]
    result["fast_paths"] = [{**pair, "speedup": variant_ratio(result["variants"], pair["off"], pair["on"])}
                            for pair in fast_path_pairs(variants, main)]
    if "evaluation" not in args.skip:
        result["evaluation"] = measure_evaluation(steps["gnp"], data, args, device)
    if args.checks and device.type == "cuda":
        result["sync"] = cuda.sync_checks(steps, variants, spec, main, device, data)
    del steps, net
    release(device)
    if "memory" not in args.skip:
        result["memory"] = measure_memory(spec, main, device, data, parameter_bytes)
    return result


def _median(model: dict, variant: str) -> float:
    return model["variants"][variant]["ms_per_step"]["median"]


def variant_ratio(variants: dict, a: str, b: str) -> float:
    """Variant a's step time over b's, paired by round."""
    return paired_ratio(variants[a]["ms_per_step"]["samples"], variants[b]["ms_per_step"]["samples"])


def step_ratios(variants: dict) -> dict[str, float]:
    ratios = {f"{name}/sgd": variant_ratio(variants, name, "sgd") for name in ("sam", "gnp", "two_pass")}
    ratios["gnp/two_pass"] = variant_ratio(variants, "gnp", "two_pass")
    # Hybrid steps against what they would cost if a plain step cost SGD's median and a two-pass one
    # GNP's, for the draws they made (the mix `mixed_step_ms` is measured against).
    sgd, gnp, hybrid = (variants[v] for v in ("sgd", "gnp", "hybrid"))
    ratios["hybrid/sgd"] = hybrid["mean_ms_per_step"] / sgd["ms_per_step"]["median"]
    ratios["hybrid_expected/sgd"] = 1 + hybrid["two_pass_fraction"] * (
        gnp["ms_per_step"]["median"] / sgd["ms_per_step"]["median"] - 1)
    return ratios


def measure_evaluation(step: SuiteStep, data: DataPaths, args: argparse.Namespace, device: torch.device) -> dict:
    """images/s of the training loop's evaluation on the synthetic test set, with the main GNP variant's model."""
    d = step.parts.cfg.dataset
    images, labels = data.test(device)
    loader = BatchLoader(images, labels, batch_size=min(step.parts.cfg.train.eval_batch_size, len(labels)),
                         device=device, mean=d.mean, std=d.std, train=False)
    calls = {"evaluate": lambda: step.parts.evaluate(loader)}
    warm_up(calls, device, 1)
    samples = interleaved(calls, device, args.repeats, 1)["evaluate"]
    timing = spread(samples)
    return {"images": len(labels), "batch_size": loader.batch_size, "ms_per_pass": timing,
            "images_per_second": rate(len(labels), timing)}


def measure_memory(spec: ModelSpec, main: FastPaths, device: torch.device, data: DataPaths,
                   parameter_bytes: int) -> dict:
    """Peak memory of SGD and of GNP steps, each variant alone, against GNP's limit."""
    peaks = memory.peak_bytes({name: run_overrides(spec, METHODS[name][0], main, device, data.tiny)
                               for name in ("sgd", "gnp")}, device)
    limit = (peaks["sgd"] + 2 * parameter_bytes) * (1 + MEMORY_SLACK)
    return {"how": memory.CUDA_HOW if device.type == "cuda" else memory.CPU_HOW, "sgd_bytes": peaks["sgd"],
            "gnp_bytes": peaks["gnp"], "parameter_bytes": parameter_bytes, "limit_bytes": limit,
            "extra_parameter_copies": (peaks["gnp"] - peaks["sgd"]) / parameter_bytes,
            "within_limit": peaks["gnp"] <= limit}


def show(m: dict) -> None:
    print(f"\n{m['label']}, batch {m['batch_size']}, main setting {m['main_label']}, "
          f"{m['parameters']:,} parameters")
    rows = []
    for name, v in m["variants"].items():
        t = v["ms_per_step"]
        hybrid = name == "hybrid"
        ms = v["mean_ms_per_step"] if hybrid else t["median"]
        extra = f"mean of {100 * v['two_pass_fraction']:.0f}% two-pass steps" if hybrid else ""
        ratio = m["ratios"]["hybrid/sgd"] if hybrid else variant_ratio(m["variants"], name, "sgd")
        rows.append([name, f"{ms:.2f}", f"{t['min']:.2f}-{t['max']:.2f}", f"{v['images_per_second']:,.0f}",
                     f"{ratio:.3f}", extra])
    print_table(["variant", "ms/step", "min-max", "images/s", "x sgd (paired)", ""], rows)
    r, limits = m["ratios"], m["limits"]
    print(f"GNP / SGD {r['gnp/sgd']:.3f} (limit {limits['gnp/sgd']})   GNP / two-pass {r['gnp/two_pass']:.3f} "
          f"(limit {limits['gnp/two_pass']})   SAM / SGD {r['sam/sgd']:.3f}   hybrid / SGD {r['hybrid/sgd']:.3f} "
          f"(expected {r['hybrid_expected/sgd']:.3f} for its draws)")
    for pair in m["fast_paths"]:
        print(f"fast path {pair['path']}: GNP {pair['speedup']:.2f}x faster with it ({pair['on']} vs {pair['off']})")
    if "evaluation" in m:
        print(f"evaluation: {m['evaluation']['images_per_second']:,.0f} images/s")
    if "memory" in m:
        mem = m["memory"]
        print(f"peak memory: SGD {mib(mem['sgd_bytes'])}, GNP {mib(mem['gnp_bytes'])} "
              f"({mem['extra_parameter_copies']:.2f} parameter-sized buffers more), limit {mib(mem['limit_bytes'])}: "
              f"{'within' if mem['within_limit'] else 'OVER'}")
    for name, check in m.get("sync", {}).items():
        print(f"sync check {name}: {'ok' if check['ok'] else 'FAILED'} "
              + (f"({check['synchronisations']} synchronisations in {check['steps']} steps: {check['where']})"
                 if check["mode"] == "warn" else check.get("error", "")))
