"""Time one training step of SGD (r = 0), SAM and GNP, and of exact mode on a tiny model.

    python scripts/benchmark_step.py                        # resnet18; CUDA if available
    python scripts/benchmark_step.py --device cpu --steps 3 --batch-size 16

Prints a table and writes JSON to results/benchmarks/step_<device>.json (or --out). Every method
runs the same model, batch, base optimizer (SGD, Nesterov momentum 0.9), in-loss L2 1e-3 and
clipping at 5.0, as in the official CIFAR recipes; on CUDA the forward runs under bf16 autocast.
"""
from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from gnp import GradientNormPenalty, io
from gnp.distributed import pick_device
from gnp.models import build_model, count_parameters

NUM_CLASSES = 10
# name -> GradientNormPenalty settings; sgd is the plain one-pass baseline the ratios divide by.
METHODS = {
    "sgd": dict(r=0.0, alpha=0.0),
    "sam": dict(r=0.05, alpha=1.0),
    "gnp": dict(r=0.1, alpha=0.8),
}
TINY_METHODS = {**{k: METHODS[k] for k in ("sgd", "gnp")}, "exact": dict(r=0.1, alpha=0.8, exact=True)}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18", help="a name known to gnp.models.build_model")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 256 on CUDA, 32 on CPU")
    parser.add_argument("--steps", type=int, default=None, help="timed steps; default: 20 on CUDA, 5 on CPU")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first; default: 5 on CUDA, 1 on CPU")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N")
    parser.add_argument("--no-bf16", action="store_true", help="run the forward in float32 on CUDA too")
    parser.add_argument("--tiny-width", type=int, default=8, help="width of the tiny resnet18 for exact mode")
    parser.add_argument("--tiny-batch-size", type=int, default=32)
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path; default: results/benchmarks/step_<device type>.json")
    args = parser.parse_args()
    for name in ("batch_size", "steps", "tiny_width", "tiny_batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')}={value} must be at least 1")
    if args.warmup is not None and args.warmup < 0:
        parser.error(f"--warmup={args.warmup} must be at least 0")
    return args


def time_steps(model: nn.Module, settings: dict, batch_size: int, steps: int, warmup: int,
               device: torch.device, bf16: bool) -> dict:
    """Mean seconds per step (and peak CUDA memory) of GradientNormPenalty with `settings`."""
    generator = torch.Generator(device).manual_seed(0)
    x = torch.randn(batch_size, 3, 32, 32, device=device, generator=generator)
    y = torch.randint(0, NUM_CLASSES, (batch_size,), device=device, generator=generator)
    base = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    opt = GradientNormPenalty(model, base, l2=1e-3, max_grad_norm=5.0, **settings)

    def closure():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        return F.cross_entropy(logits.float(), y), logits

    model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        opt.step(closure)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        loss = opt.step(closure)
    synchronize(device)
    seconds = (time.perf_counter() - start) / steps
    result = {"step_ms": 1000 * seconds, "final_loss": loss.item()}
    if device.type == "cuda":
        result["peak_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_suite(label: str, build, methods: dict, batch_size: int, steps: int, warmup: int,
              device: torch.device, bf16: bool) -> dict:
    results = {}
    for name, settings in methods.items():
        torch.manual_seed(0)
        model = build().to(device)
        print(f"[{label}] {name}: {warmup} warm-up + {steps} timed steps, batch {batch_size}", flush=True)
        results[name] = time_steps(model, settings, batch_size, steps, warmup, device, bf16)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    baseline = results["sgd"]["step_ms"]
    ratios = {f"{name}/sgd": results[name]["step_ms"] / baseline for name in methods if name != "sgd"}
    return {"batch_size": batch_size, "methods": results, "ratios": ratios}


def print_table(title: str, suite: dict) -> None:
    print(f"\n{title} (batch {suite['batch_size']})")
    print(f"{'method':8s} {'ms/step':>10s} {'x sgd':>7s} {'peak MiB':>9s}")
    baseline = suite["methods"]["sgd"]["step_ms"]
    for name, result in suite["methods"].items():
        memory = result.get("peak_memory_mib")
        memory_text = f"{memory:9.0f}" if memory is not None else f"{'-':>9s}"
        print(f"{name:8s} {result['step_ms']:10.1f} {result['step_ms'] / baseline:7.2f} {memory_text}")


def main() -> None:
    args = parse_args()
    device = pick_device(args.device)
    on_cuda = device.type == "cuda"
    if on_cuda:
        torch.backends.cudnn.benchmark = True
    bf16 = on_cuda and not args.no_bf16
    batch_size = args.batch_size or (256 if on_cuda else 32)
    steps = args.steps or (20 if on_cuda else 5)
    warmup = args.warmup if args.warmup is not None else (5 if on_cuda else 1)

    main_suite = run_suite(args.model, lambda: build_model(args.model, NUM_CLASSES), METHODS,
                           batch_size, steps, warmup, device, bf16)
    tiny_suite = run_suite(f"resnet18 width {args.tiny_width}",
                           lambda: build_model("resnet18", NUM_CLASSES, width=args.tiny_width),
                           TINY_METHODS, args.tiny_batch_size, steps, warmup, device, bf16)
    report = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if on_cuda else platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "bf16_autocast": bf16,
        "steps": steps,
        "warmup": warmup,
        "model": args.model,
        "parameters": count_parameters(build_model(args.model, NUM_CLASSES)),
        "main": main_suite,
        "tiny_model": {"model": "resnet18", "width": args.tiny_width, **tiny_suite},
    }
    print_table(f"{args.model} on {report['device_name']}", main_suite)
    print_table(f"resnet18 width {args.tiny_width} (exact mode)", tiny_suite)
    out = args.out or Path("results/benchmarks") / f"step_{device.type}.json"
    io.write_json(out, report)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
