"""Stage 1, per model: the step of each method of conf/method/ (one config per method; a config built on
another's, such as gnp_warmup, is left out) and of the reference method with hybrid steps, through the suite's
own code, the hand-written two-pass step, and the reference method with each fast path flipped, timed
interleaved; then the evaluation's throughput and the peak memory of the baseline's and the reference's steps.
Which methods are the baseline and the reference is gnp.methods' to say (BASELINE, REFERENCE), what a step
costs in passes the method's (`passes_per_step`, from `Method.expected_passes`; each method's limit against the
two-pass step scales with it, plus the `step_overhead` its class allows) and the step's to report
(`passes_taken` and `two_pass_fraction`, from `last_step.passes`)."""
from __future__ import annotations

import argparse
import statistics
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch
import yaml

from gnp import measurements as files
from gnp.bench import memory
from gnp.bench.console import mib, print_table
from gnp.bench.settings import DataPaths, FastPaths, ModelSpec, main_paths, run_overrides
from gnp.bench.stages import cuda
from gnp.bench.steps import SuiteStep, TwoPassStep
from gnp.bench.timing import interleaved, mixed_step_ms, paired_ratio, rate, release, spread, warm_up
from gnp.compose import compose_config
from gnp.config import method_class, method_passes
from gnp.data import BatchLoader
from gnp.measurements import FAST_PATH, METHOD, median_ms, method_variants
from gnp.methods import BASELINE, REFERENCE
from gnp.models import count_parameters
from gnp.paths import CONF_DIR


def method_configs(folder: Path = CONF_DIR / "method") -> list[str]:
    """The methods of conf/method/: each config built on its class's settings alone, not on another config."""
    return sorted(path.stem for path in folder.glob("*.yaml")
                  if all(entry == "_self_" or entry.startswith("settings/")
                         for entry in yaml.safe_load(path.read_text()).get("defaults", [])))


# name -> (config method, extra override): every method, and the reference with hybrid steps. The baseline
# (one pass) is the step every ratio is taken against.
METHODS = {**{name: (name, None) for name in method_configs()},
           "hybrid": (REFERENCE, "method.two_pass_probability=0.5")}
ONE_PASS, REFERENCE_NAME = BASELINE, "two_pass"
# Step-time ratios against their limits, on a GPU and on a CPU: the reference ÷ the baseline, and a method
# taking two passes per step ÷ the hand-written two-pass step; a method's own limit against it scales with its
# passes per step and adds its class's `step_overhead` (element-wise work beyond SAM's).
STEP_LIMITS = {"cuda": {f"{REFERENCE}/{BASELINE}": 2.0, REFERENCE_NAME: 1.0},
               "cpu": {f"{REFERENCE}/{BASELINE}": 2.05, REFERENCE_NAME: 1.02}}
MEMORY_SLACK = 0.05  # the reference's peak memory <= (the baseline's + 2 x parameter bytes) x (1 + slack)


class Variant(NamedTuple):
    method: str  # the config's method
    paths: FastPaths
    override: str | None  # one more config override
    role: str  # files.METHOD, files.REFERENCE or FAST_PATH


def step_variants(main: FastPaths, precisions: list[str]) -> dict[str, Variant]:
    """The methods in the main setting, the hand-written two-pass step, then GNP with each fast path
    flipped, named by how it differs from the main setting (`gnp[compile=off,precision=fp32]`). The
    pairs of fast paths compare eager runs (compile off) except the compile and fused pairs, so that
    only the main setting is compiled."""
    variants = {name: Variant(method, main, extra, METHOD) for name, (method, extra) in METHODS.items()}
    variants[REFERENCE_NAME] = Variant(REFERENCE, main, None, files.REFERENCE)
    eager = replace(main, compile=False)
    flipped = [eager, replace(eager, channels_last=not main.channels_last), replace(main, fused=not main.fused)]
    flipped += [replace(eager, precision=p) for p in precisions if p != main.precision]
    for paths in flipped:
        if paths != main:
            variants[f"{REFERENCE}[{paths.differences(main)}]"] = Variant(REFERENCE, paths, None, FAST_PATH)
    return variants


def fast_path_pairs(variants: dict[str, Variant], main: FastPaths) -> list[dict]:
    """Each fast path as a pair of measured GNP variants that differ in it alone: (path, on, off)."""
    reference = {v.paths: name for name, v in variants.items() if v.method == REFERENCE and not v.override
                 and v.role != files.REFERENCE}
    eager = replace(main, compile=False)
    pairs = []
    if main.compile:
        pairs.append(("compile", main, eager))
    pairs.append(("channels_last", replace(eager, channels_last=True), replace(eager, channels_last=False)))
    pairs.append(("fused", replace(main, fused=True), replace(main, fused=False)))
    for low in ("bf16", "fp16"):
        pairs.append((low, replace(eager, precision=low), replace(eager, precision="fp32")))
    return [{"path": path, "on": reference[on], "off": reference[off]} for path, on, off in pairs
            if on in reference and off in reference]


def measure_model(spec: ModelSpec, args: argparse.Namespace, device: torch.device, data: DataPaths) -> dict:
    main = main_paths(spec, args, device)
    variants = step_variants(main, args.precisions)
    print(f"\n== steps: {spec.label}, batch {spec.batch_size}, {main.label}: {len(variants)} variants, "
          f"{args.warmup} warm-up steps each, then {args.repeats} rounds of {spec.steps}", flush=True)
    steps: dict[str, SuiteStep] = {}
    passes: dict[str, float] = {}
    labels: dict[str, str] = {}
    overheads: dict[str, float] = {}
    for name, v in variants.items():
        cfg = compose_config(*run_overrides(spec, v.method, v.paths, device, data.tiny),
                             *([v.override] if v.override else []), validated=True)
        steps[name] = (TwoPassStep if v.role == files.REFERENCE else SuiteStep)(cfg, device)
        passes[name] = 2.0 if v.role == files.REFERENCE else method_passes(cfg)
        cls = method_class(cfg.method)
        labels[name], overheads[name] = cls.__name__, cls.step_overhead
    net = steps[REFERENCE].parts.model
    parameter_bytes = sum(p.numel() * p.element_size() for p in net.parameters())
    warm_up(steps, device, args.warmup)
    for step in steps.values():
        step.passes.clear()  # count the timed steps only
    samples = interleaved(steps, device, args.repeats, spec.steps)

    result: dict[str, Any] = {
        "model": spec.name, "options": spec.options, "label": spec.label, "batch_size": spec.batch_size,
        "steps_per_round": spec.steps, "parameters": count_parameters(net), "parameter_bytes": parameter_bytes,
        "main": asdict(main), "main_label": main.label, "variants": {},
    }
    for name, v in variants.items():
        timing = spread(samples[name])
        result["variants"][name] = {
            "method": v.method, "label": labels[name], "role": v.role,
            "settings": {**asdict(v.paths), **({"override": v.override} if v.override else {})},
            "ms_per_step": timing, "images_per_second": rate(spec.batch_size, timing),
            "passes_per_step": passes[name], "passes_taken": statistics.fmean(steps[name].passes),
            "two_pass_fraction": statistics.fmean(n > 1 for n in steps[name].passes),
        }
    for name in mixed(result["variants"]):  # its median mixes two kinds of steps: a mean is what it costs
        record, two_pass = result["variants"][name], _two_pass_twin(result["variants"], name)
        record["mean_ms_per_step"] = mixed_step_ms(record["ms_per_step"]["samples"],
                                                   [n > 1 for n in steps[name].passes],
                                                   median_ms(result["variants"], ONE_PASS),
                                                   median_ms(result["variants"], two_pass))
        record["images_per_second"] = spec.batch_size * 1000 / record["mean_ms_per_step"]
    result["ratios"] = step_ratios(result["variants"])
    result["limits"] = step_limits(result["variants"], overheads, device.type)
    result["within_limits"] = {key: result["ratios"][key] <= limit for key, limit in result["limits"].items()}
    result["fast_paths"] = [{**pair, "speedup": variant_ratio(result["variants"], pair["off"], pair["on"])}
                            for pair in fast_path_pairs(variants, main)]
    if "evaluation" not in args.skip:
        result["evaluation"] = measure_evaluation(steps[REFERENCE], data, args, device)
    if args.checks and device.type == "cuda":
        result["sync"] = cuda.sync_checks(steps, variants, spec, main, device, data)
    del steps, net
    release(device)
    if "memory" not in args.skip:
        result["memory"] = measure_memory(spec, main, device, data, parameter_bytes)
    return result


def mixed(variants: dict) -> list[str]:
    """The method variants whose steps are of two kinds drawn at random: a method's config with hybrid
    steps (an override), by its method's own count between one and two passes per step on average."""
    return [name for name, v in method_variants(variants).items()
            if "override" in v["settings"] and 1 < v["passes_per_step"] < 2]


def step_limits(variants: dict, overheads: dict[str, float], device_type: str) -> dict[str, float]:
    """The limit of each ratio: the reference ÷ the baseline, and each method that perturbs (not a mixed
    variant) ÷ the two-pass step, at its passes per step over two plus its class's step_overhead."""
    base = STEP_LIMITS[device_type]
    limits = {f"{REFERENCE}/{ONE_PASS}": base[f"{REFERENCE}/{ONE_PASS}"]}
    for name in _against_two_pass(variants):
        passes = variants[name]["passes_per_step"]
        limits[f"{name}/{REFERENCE_NAME}"] = round(base[REFERENCE_NAME] * passes / 2 + overheads[name], 4)
    return limits


def _against_two_pass(variants: dict) -> list[str]:
    """The method variants held against the hand-written two-pass step: those that perturb, but mixed ones."""
    mixes = mixed(variants)
    return [name for name, v in method_variants(variants).items() if v["passes_per_step"] > 1 and name not in mixes]


def _two_pass_twin(variants: dict, name: str) -> str:
    """The method variant that takes only the mixed variant's two-pass steps: its method, no override."""
    record = variants[name]
    return next(n for n, v in method_variants(variants).items()
                if v["method"] == record["method"] and "override" not in v["settings"])


def variant_ratio(variants: dict, a: str, b: str) -> float:
    """Variant a's step time over b's, paired by round."""
    return paired_ratio(variants[a]["ms_per_step"]["samples"], variants[b]["ms_per_step"]["samples"])


def step_ratios(variants: dict) -> dict[str, float]:
    """Every method and the reference step against the one-pass step, paired by round; every method
    that perturbs against the hand-written two-pass step; a mixed variant by its mean, beside what its
    draws would cost at the medians of its two kinds of steps."""
    plain = median_ms(variants, ONE_PASS)
    ratios = {}
    for name in [*method_variants(variants), REFERENCE_NAME]:
        if name != ONE_PASS:
            ratios[f"{name}/{ONE_PASS}"] = variant_ratio(variants, name, ONE_PASS)
    for name in _against_two_pass(variants):
        ratios[f"{name}/{REFERENCE_NAME}"] = variant_ratio(variants, name, REFERENCE_NAME)
    for name in mixed(variants):
        record = variants[name]
        two_pass = median_ms(variants, _two_pass_twin(variants, name))
        ratios[f"{name}/{ONE_PASS}"] = record["mean_ms_per_step"] / plain
        ratios[f"{name}_expected/{ONE_PASS}"] = 1 + record["two_pass_fraction"] * (two_pass / plain - 1)
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
    """Peak memory of the baseline's and of the reference's steps, each variant alone, against the
    reference's limit: the saved first gradient and the saved parameters."""
    peaks = memory.peak_bytes({name: run_overrides(spec, name, main, device, data.tiny)
                               for name in (ONE_PASS, REFERENCE)}, device)
    limit = (peaks[ONE_PASS] + 2 * parameter_bytes) * (1 + MEMORY_SLACK)
    return {"how": memory.CUDA_HOW if device.type == "cuda" else memory.CPU_HOW, "plain_bytes": peaks[ONE_PASS],
            "gnp_bytes": peaks[REFERENCE], "parameter_bytes": parameter_bytes, "limit_bytes": limit,
            "extra_parameter_copies": (peaks[REFERENCE] - peaks[ONE_PASS]) / parameter_bytes,
            "within_limit": peaks[REFERENCE] <= limit}


def show(m: dict) -> None:
    print(f"\n{m['label']}, batch {m['batch_size']}, main setting {m['main_label']}, "
          f"{m['parameters']:,} parameters")
    rows = []
    for name, v in m["variants"].items():
        t = v["ms_per_step"]
        mean = "mean_ms_per_step" in v
        ratio = m["ratios"][f"{name}/{ONE_PASS}"] if mean else variant_ratio(m["variants"], name, ONE_PASS)
        rows.append([name, f"{v['mean_ms_per_step'] if mean else t['median']:.2f}", f"{t['min']:.2f}-{t['max']:.2f}",
                     f"{v['images_per_second']:,.0f}", f"{ratio:.3f}", f"{v['passes_per_step']:g}",
                     f"{v['two_pass_fraction']:.2f}",
                     f"mean of {100 * v['two_pass_fraction']:.0f}% two-pass steps" if mean else ""])
    print_table(["variant", "ms/step", "min-max", "images/s", "x plain (paired)", "passes", "two-pass", ""], rows)
    r = m["ratios"]
    print("   ".join(f"{key} {r[key]:.3f} (limit {limit}: {'within' if m['within_limits'][key] else 'OVER'})"
                     for key, limit in m["limits"].items()))
    print("   ".join(f"{key} {r[key]:.3f}" for key in r if key not in m["limits"]))
    for pair in m["fast_paths"]:
        print(f"fast path {pair['path']}: GNP {pair['speedup']:.2f}x faster with it ({pair['on']} vs {pair['off']})")
    if "evaluation" in m:
        print(f"evaluation: {m['evaluation']['images_per_second']:,.0f} images/s")
    if "memory" in m:
        mem = m["memory"]
        print(f"peak memory: plain {mib(mem['plain_bytes'])}, GNP {mib(mem['gnp_bytes'])} "
              f"({mem['extra_parameter_copies']:.2f} parameter-sized buffers more), limit {mib(mem['limit_bytes'])}: "
              f"{'within' if mem['within_limit'] else 'OVER'}")
    for name, check in m.get("sync", {}).items():
        print(f"sync check {name}: {'ok' if check['ok'] else 'FAILED'} "
              + (f"({check['synchronisations']} synchronisations in {check['steps']} steps: {check['where']})"
                 if check["mode"] == "warn" else check.get("error", "")))
