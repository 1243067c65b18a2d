"""One whole benchmark run: the stages in order on one device, each printed and recorded as soon as
it ends (the file is rewritten after each, so a run cut short keeps what it measured); a stage that
raises is recorded as a failed check and the others still run."""
from __future__ import annotations

import argparse
import os
import platform
import re
import tempfile
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch

from gnp import measurements as files
from gnp.bench.parts import git_commit
from gnp.bench.settings import DataPaths, ModelSpec, resolve
from gnp.bench.stages import analysis, cuda, exact, loader, loop, methods, shards
from gnp.console import error_line
from gnp.distributed import pick_device


def run(args: argparse.Namespace, command: str) -> int:
    """Run every stage the settings ask for; the exit status is 1 if a check or a stage failed."""
    device = pick_device(args.device)
    args = resolve(args, device)
    env = environment(device)
    out = args.out or files.BENCHMARK_DIR / f"{args.name}_{device_slug(env)}.json"
    started = time.perf_counter()
    report: dict[str, Any] = {
        "format": files.FORMAT, "name": args.name, "command": command,
        "git_commit": git_commit(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "environment": env,
        "settings": {k: [asdict(m) for m in v] if k == "models" else asdict(v) if k == "analysis_model" else v
                     for k, v in vars(args).items() if k not in ("docs", "out")},
        "limits": {"steps": methods.STEP_LIMITS[device.type], "memory_slack": methods.MEMORY_SLACK,
                   "loader": loader.TARGET, "loop": loop.TARGETS},
        "complete": False, "stage_seconds": {}, "errors": {}, "models": [],
    }
    print(f"{env['device_name']} ({env['cpu_threads']} CPU threads), torch {env['torch']}; writing {out}", flush=True)

    def attempt(name: str, measure: Callable[[], Any], show: Callable[[Any], None]) -> Any:
        """Run one stage and print it; a stage that fails is recorded (a failed check) and the others
        still run, so that one command on a GPU machine brings back all it can."""
        stage_started = time.perf_counter()
        try:
            result = measure()
        except Exception as e:
            traceback.print_exc()
            report["errors"][name] = f"{error_line(e)} (at {cuda.innermost(e)})"
            return None
        finally:
            report["stage_seconds"][name] = time.perf_counter() - stage_started
        show(result)
        return result

    def save() -> None:
        report["seconds"] = time.perf_counter() - started
        files.write(out, report)

    with tempfile.TemporaryDirectory(prefix="gnp-bench-") as tmp:
        work = Path(tmp)
        data = DataPaths(work / "data", args.loop_images, args.test_images,
                         max(m.batch_size for m in [*args.models, args.analysis_model, ModelSpec(*exact.MODEL)]))
        for spec in args.models:
            if model := attempt(f"steps {spec.label}", lambda: methods.measure_model(spec, args, device, data),
                                methods.show):
                report["models"].append(model)
            save()
        stages = [
            ("shards", "shards" not in args.skip, lambda: shards.measure(args.models[0], args, device, data),
             shards.show),
            ("exact", "exact" not in args.skip, lambda: exact.measure(args, device, data), exact.show),
            ("loader", "loader" not in args.skip, lambda: loader.measure(args, device, data, report["models"]),
             lambda result: loader.show(result, device)),
            ("loop", "loop" not in args.skip, lambda: [loop.measure(args.models[0], args, device, data, work)],
             lambda loops: loop.show(loops[0])),
            ("analysis", "analysis" not in args.skip,
             lambda: analysis.measure(args.analysis_model, args, device, data, work), analysis.show),
            ("checks", args.checks, lambda: {"runs": cuda.run_checks(args, device, data, work)}, lambda checks: None),
        ]
        for key, wanted, measure, show in stages:
            if wanted and (result := attempt(key, measure, show)) is not None:
                report[key] = result
            save()
    failed = failed_checks(report)
    report["checks_failed"] = failed
    report["complete"] = True
    save()
    print_checks(failed, args.checks)
    print(f"\nwrote {out} ({report['seconds']:.0f} s)")
    return 1 if failed else 0


def failed_checks(report: dict) -> list[str]:
    """Every check that did not pass, and every stage that failed, named."""
    failed = [f"stage {name}: {error}" for name, error in report["errors"].items()]
    for model in report["models"]:
        failed += [f"sync {model['label']} {name}: {c.get('error') or c.get('where')}"
                   for name, c in model.get("sync", {}).items() if not c["ok"]]
    failed += [f"sync loader {name}: {c['error']}" for name, c in report.get("loader", {}).get("sync", {}).items()
               if not c["ok"]]
    for record in report.get("loop", []):
        failed += [f"loop {record['label']} {m}: {'; '.join(r['problems'])}" for m, r in record["methods"].items()
                   if not r["ok"]]
    failed += [f"check {r['label']}: {'; '.join(r['problems'])}" for r in report.get("checks", {}).get("runs", [])
               if not r["ok"]]
    return failed


def print_checks(failed: list[str], ran: bool) -> None:
    if ran:
        print("\nchecks: " + ("all passed" if not failed else f"{len(failed)} FAILED"))
    for line in failed:
        print(f"  FAILED {line}")


def environment(device: torch.device) -> dict:
    """The machine and software a file was measured with."""
    cuda_device = device.type == "cuda"
    return {
        "device": device.type, "device_name": torch.cuda.get_device_name(device) if cuda_device else cpu_name(),
        "device_count": torch.cuda.device_count() if cuda_device else 1, "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "torch": torch.__version__, "cuda": torch.version.cuda if cuda_device else None,
        "cudnn": torch.backends.cudnn.version() if cuda_device else None, "python": platform.python_version(),
        "platform": platform.platform(),
    }


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_slug(env: dict) -> str:
    if env["device"] == "cpu":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", env["device_name"].lower().replace("nvidia", "")).strip("-")
