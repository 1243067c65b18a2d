"""Peak memory of one step variant alone: on CUDA the allocator's peak in this process, on a CPU the
peak resident memory of a child process (`python -m gnp.bench.memory OVERRIDES_JSON`, which prints
`{"peak_bytes": N}`), so that no variant's freed memory hides in another's peak."""
from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
from pathlib import Path

import torch

from gnp.bench.steps import SuiteStep
from gnp.bench.timing import release
from gnp.compose import compose_config
from gnp.distributed import synchronize
from gnp.paths import ROOT

STEPS = 3  # steps of the variant the peak is taken over
# For a CPU's peak resident memory to follow the live tensors: glibc's malloc otherwise raises its
# mmap threshold after the first large free and keeps freed activations in its heap, which inflated
# GNP's peak by 6 to 12 parameter-sized buffers on a ResNet-18 of width 32 (an artefact, not a need).
CPU_ENV = {"MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
CUDA_HOW = (f"torch.cuda.max_memory_allocated over {STEPS} steps of the variant alone, minus what was allocated "
            "before it was built")
CPU_HOW = (f"peak resident memory (VmHWM) of a child process running {STEPS} steps of the variant alone, minus its "
           "resident memory before the model was built; glibc's malloc maps every block of 64 KiB or more on its "
           "own (MALLOC_MMAP_THRESHOLD_), so that freed tensors leave the resident memory at once")


def peak_bytes(variants: dict[str, list[str]], device: torch.device) -> dict[str, int]:
    """Bytes of peak memory that building and stepping each variant (its config overrides) adds."""
    if device.type == "cuda":
        return {name: variant_peak_memory(overrides, device) for name, overrides in variants.items()}
    # A child process per variant, all at once; the child imports the same gnp as this process.
    env = os.environ | CPU_ENV | {"PYTHONPATH": os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    children = {name: subprocess.Popen([sys.executable, "-m", "gnp.bench.memory", json.dumps(overrides)],
                                       stdout=subprocess.PIPE, text=True, env=env)
                for name, overrides in variants.items()}
    peaks = {}
    for name, child in children.items():
        out, _ = child.communicate()
        if child.returncode:
            raise RuntimeError(f"the memory measurement of {name} failed (exit status {child.returncode})")
        peaks[name] = json.loads(out.strip().splitlines()[-1])["peak_bytes"]
    return peaks


def variant_peak_memory(overrides: list[str], device: torch.device) -> int:
    """Bytes of peak memory that building and stepping this variant adds, in this process."""
    cfg = compose_config(*overrides, validated=True)
    release(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        before = reset_peak_rss()
    step = SuiteStep(cfg, device)
    for _ in range(STEPS):
        step()
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss()
    return peak - before


def reset_peak_rss() -> int:
    """Reset the process's peak resident memory (Linux: /proc/self/clear_refs) and return the current one."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # then the peak also covers what came before (e.g. imports)
    return _proc_status("VmRSS") or peak_rss()


def peak_rss() -> int:
    return _proc_status("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _proc_status(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


if __name__ == "__main__":
    print(json.dumps({"peak_bytes": variant_peak_memory(json.loads(sys.argv[1]), torch.device("cpu"))}))
