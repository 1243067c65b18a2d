"""What a run costs: measured throughput read from results/benchmarks/*.json, and the time of one
run of a plan from its finished seeds or extrapolated from that throughput."""
from __future__ import annotations

import inspect
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from gnp import measurements
from gnp.checks import is_number
from gnp.config import method_passes, train_steps_per_epoch
from gnp.schema import undotted
from gnp.models import MODELS
from gnp.paths import BENCHMARK_DIR
from gnp.tables.plans import Plan
from gnp.tables.runs import Run
from gnp.tables.spec import TableError



@dataclass(frozen=True)
class Throughput:
    model: str
    options: dict                     # the builder's options that differ from its defaults ({}: the full model)
    method: str                       # the benchmark's name of what it measured
    passes: float                     # its mean forward/backward passes per step
    images_per_second: float
    device: str
    how: str                          # what was measured, in words
    upper_bound: bool = False         # a start-up epoch: slower than steady state


def read_throughput(folder: Path = BENCHMARK_DIR) -> list[Throughput]:
    """Measured training speed in results/benchmarks/*.json (read by gnp.measurements, written by
    scripts/benchmark.py): each method's steps at the main setting and the end-to-end check runs, with
    the passes per step they took, and the model's options (a shrunk model says nothing about the full one:
    an estimate takes measurements of the same options only)."""
    try:
        benchmarks = measurements.read_all(folder)
    except measurements.BenchmarkFileError as e:
        raise TableError(str(e)) from None
    out = []
    for path, data in benchmarks:
        env = data["environment"]
        device = env["device_name"] if env["device"] != "cpu" else _cpu(env["cpu_threads"])
        for m in data["models"]:  # steady-state step times of the suite's methods at the main setting
            for name, variant in measurements.method_variants(m["variants"]).items():
                passes = variant.get("passes_taken", 1 + variant["two_pass_fraction"])  # older files: at most 2
                out.append(Throughput(m["model"], m["options"], name, passes, variant["images_per_second"], device,
                                      f"{path.name}: step time at batch {m['batch_size']} ({m['main_label']})"))
        for run in data.get("checks", {}).get("runs", []):  # one short first epoch of the real loop
            if run["ok"]:
                out.append(Throughput(run["model"], run["options"], run["method"], run["passes_per_step"],
                                      run["images_per_second"], device, f"{path.name}: a short first epoch at batch "
                                      f"{run['batch_size']} with start-up", upper_bound=True))
    return out


@dataclass(frozen=True)
class Estimate:
    seconds: float | None             # None: unknown
    device: str | None
    how: str
    upper_bound: bool = False         # from a start-up epoch: the run is likely faster


def estimate(plan: Plan, throughputs: list[Throughput], finished: list[Run]) -> Estimate:
    """Time of one run of the plan: from its finished seeds if any, else from measured throughput."""
    times = [r.summary["wall_seconds"] for r in finished if is_number(r.summary.get("wall_seconds"))]
    if times:
        device = str(finished[0].summary.get("device"))
        return Estimate(statistics.fmean(times), device, f"measured: {len(times)} finished seed(s) of this cell")
    if plan.config is None:
        return Estimate(None, None, "unknown: the cell cannot run yet")
    c = plan.config
    model, options = c["model.name"], _model_options(c)
    passes = method_passes(OmegaConf.create(undotted(c)))
    # The model as the cell builds it; a GPU's measurement before a CPU's, a steady state before a start-up.
    candidates = sorted((t for t in throughputs if t.model == model and t.options == options),
                        key=lambda t: (t.device.startswith("cpu"), t.upper_bound, abs(t.passes - passes)))
    if not candidates:
        shown = f" with {', '.join(f'{k}={v}' for k, v in options.items())}" if options else ""
        return Estimate(None, None, f"unknown: no measurement of {model}{shown} in results/benchmarks/")
    best = candidates[0]
    cost = _relative_cost(throughputs, best, passes)
    if cost is None:
        return Estimate(None, None, f"unknown: {model} measured at {best.passes:g} passes per step only, and no "
                                    f"measured cost of a second pass on {best.device}")
    scaled = f", scaled from {best.passes:g} to {passes:.3g} passes per step by the measured cost of a second " \
             f"pass" if cost != 1 else ""
    bound = " (an upper bound)" if best.upper_bound else ""
    images = c["train.epochs"] * train_steps_per_epoch(OmegaConf.create(undotted(c))) * c["train.batch_size"]
    return Estimate(images * cost / best.images_per_second, best.device,
                    f"extrapolated to {c['train.epochs']} epochs from {best.how}, {model} {best.method}{scaled}; "
                    f"training steps only{bound}", best.upper_bound)


@dataclass
class Cost:
    """The time of a selection's runs left, summed over its cells: hours per (device, upper bound),
    and the cells and runs whose time is unknown, by reason. scripts/reproduce.py prints it, and
    the cost table of docs/tables.md is generated from it."""
    hours: dict[tuple[str, bool], float] = field(default_factory=dict)
    unknown_cells: Counter = field(default_factory=Counter)
    unknown_runs: Counter = field(default_factory=Counter)

    def add(self, guess: Estimate, runs_left: float, runs: int) -> None:
        """One cell's estimate, for `runs_left` runs' worth of training (`runs` runs)."""
        if guess.seconds is None:
            why = guess.how.removeprefix("unknown: ")
            self.unknown_cells[why] += 1
            self.unknown_runs[why] += runs
        else:
            key = (guess.device, guess.upper_bound)
            self.hours[key] = self.hours.get(key, 0.0) + guess.seconds * runs_left / 3600

    def lines(self) -> list[str]:
        out = []
        for (device, upper_bound), h in sorted(self.hours.items()):
            left = duration(h * 3600) if device.startswith("cpu") else f"{h:.1f} GPU-hours"
            out.append(f"Time for the runs left: {'at most ' * upper_bound}{left} on {device}"
                       + (" (extrapolated from start-up epochs: upper bounds)" if upper_bound else ""))
        if self.unknown_cells:
            out.append(f"Time unknown for {sum(self.unknown_cells.values())} cells: "
                       + "; ".join(sorted(self.unknown_cells)))
        return out


def duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.2f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def _relative_cost(throughputs: list[Throughput], measured: Throughput, passes: float) -> float | None:
    """Time of a step of `passes` mean passes over the measured step's. A step of p passes takes
    1 + (p - 1) * (rho - 1) one-pass steps, rho being a two-pass step's time over a one-pass step's
    measured on the same device (the mean over its models)."""
    if abs(passes - measured.passes) < 1e-9:
        return 1.0
    ratios = []
    for one in (t for t in throughputs if t.device == measured.device and t.passes == 1):
        ratios += [one.images_per_second / t.images_per_second for t in throughputs
                   if (t.device, t.model, t.how, t.passes) == (one.device, one.model, one.how, 2)]
    if not ratios:
        return None
    rho = statistics.fmean(ratios)
    return (1 + (passes - 1) * (rho - 1)) / (1 + (measured.passes - 1) * (rho - 1))


def _model_options(config: dict) -> dict:
    """The builder options of a cell's model that differ from the builder's defaults (as the benchmark
    records a model's)."""
    options = {k[6:]: v for k, v in config.items() if k.startswith("model.") and k != "model.name"}
    signature = inspect.signature(MODELS[config["model.name"]]).parameters
    return {k: v for k, v in options.items() if k in signature and signature[k].default != v}


def _cpu(threads: int) -> str:
    return f"cpu ({threads} thread{'s' * (threads != 1)})"
