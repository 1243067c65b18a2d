"""What a run costs: measured throughput read from results/benchmarks/*.json, and the time of one
run of a plan from its finished seeds or extrapolated from that throughput."""
from __future__ import annotations

import inspect
import json
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from gnp.data import DIGITS_TEST_SIZE
from gnp.models import MODELS
from gnp.runs import first_line
from gnp.tables.plans import Plan
from gnp.tables.runs import Run, is_number
from gnp.tables.spec import ROOT, TableError

BENCHMARK_DIR = ROOT / "results" / "benchmarks"
BENCHMARK_FORMAT = "gnp-benchmark/1"
TRAIN_IMAGES = {"cifar10": 50_000, "cifar100": 50_000, "digits": 1_797 - DIGITS_TEST_SIZE}


@dataclass(frozen=True)
class Throughput:
    model: str                        # at its builder's default options
    method: str                       # sgd, sam or gnp
    images_per_second: float
    device: str
    how: str                          # what was measured, in words
    upper_bound: bool = False         # a start-up epoch: slower than steady state


def read_throughput(folder: Path = BENCHMARK_DIR) -> list[Throughput]:
    """Measured training speed in results/benchmarks/*.json (format gnp-benchmark/1, written by
    scripts/benchmark.py). Only measurements of a model at its builder's default options count: a
    shrunk model says nothing about the full one."""
    out = []
    for path in sorted(Path(folder).glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise TableError(f"cannot read {path} ({first_line(e)}); restore it from git or move it away") from None
        if not isinstance(data, dict) or data.get("format") != BENCHMARK_FORMAT:
            raise TableError(f"{path} is not a {BENCHMARK_FORMAT} file (scripts/benchmark.py writes them); "
                             f"move it out of {folder}")
        env = data["environment"]
        device = env["device_name"] if env["device"] != "cpu" else f"cpu ({env['cpu_threads']} threads)"
        for m in data["models"]:  # steady-state step times
            for method in ("sgd", "sam", "gnp"):
                if method in m["variants"] and not m["options"]:
                    out.append(Throughput(m["model"], method, m["variants"][method]["images_per_second"], device,
                                          f"{path.name}: step time at batch {m['batch_size']} ({m['main_label']})"))
        for run in data.get("checks", {}).get("runs", []):  # one short first epoch of the real loop
            if run["ok"] and not run["options"]:
                out.append(Throughput(run["model"], run["method"], run["images_per_second"], device,
                                      f"{path.name}: a short first epoch at batch {run['batch_size']} with "
                                      "start-up", upper_bound=True))
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
    model, method = c["model.name"], c["method.name"]
    if not _default_model_options(c):
        return Estimate(None, None, f"unknown: no measurement of {model} with these options")
    candidates = sorted((t for t in throughputs if t.model == model and not t.device.startswith("cpu")),
                        key=lambda t: (t.upper_bound, t.method != method))
    if not candidates:
        return Estimate(None, None, f"unknown: no measurement of {model} in results/benchmarks/")
    best = candidates[0]
    cost = _relative_cost(throughputs, best, method)
    if cost is None:
        return Estimate(None, None, f"unknown: {model} measured with {best.method} only, and no SGD : GNP ratio")
    scaled = f", scaled from {best.method} by the measured SGD : GNP step ratio" if cost != 1 else ""
    bound = " (an upper bound)" if best.upper_bound else ""
    return Estimate(c["train.epochs"] * _images_per_epoch(c) * cost / best.images_per_second, best.device,
                    f"extrapolated to {c['train.epochs']} epochs from {best.how}, {model} {best.method}{scaled}; "
                    f"training steps only{bound}", best.upper_bound)


@dataclass
class Cost:
    """The time of a selection's runs left, summed over its cells: hours per (device, upper bound),
    and the cells and runs whose time is unknown, by reason. scripts/reproduce.py prints it, and
    README's cost table is generated from it."""
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


def _relative_cost(throughputs: list[Throughput], measured: Throughput, method: str) -> float | None:
    """Time of a `method` step over the measured method's step: SAM and GNP both take two passes."""
    two_pass = ("sam", "gnp")
    if (measured.method in two_pass) == (method in two_pass):
        return 1.0
    ratios = []  # GNP step time / SGD step time, on the same device
    for sgd in (t for t in throughputs if t.device == measured.device and t.method == "sgd"):
        ratios += [sgd.images_per_second / t.images_per_second for t in throughputs
                   if (t.device, t.model, t.how, t.method) == (sgd.device, sgd.model, sgd.how, "gnp")]
    if not ratios:
        return None
    ratio = statistics.fmean(ratios)
    return 1 / ratio if method == "sgd" else ratio


def _images_per_epoch(config: dict) -> int:
    n = TRAIN_IMAGES[config["dataset.name"]]
    if config.get("dataset.limit_train") is not None:
        n = min(n, config["dataset.limit_train"])
    batch = config["train.batch_size"]
    return n // batch * batch  # the last partial batch is dropped


def _default_model_options(config: dict) -> bool:
    options = {k[6:]: v for k, v in config.items() if k.startswith("model.") and k != "model.name"}
    signature = inspect.signature(MODELS[config["model.name"]]).parameters
    return all(signature[k].default == v for k, v in options.items() if k in signature)

