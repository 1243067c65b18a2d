"""`make bench`: the speed of the whole training loop against its limits, in one process.

    python scripts/benchmark.py                  # the current device: CUDA if visible (then also the CUDA checks)
    python scripts/benchmark.py --device cpu --models resnet18:width=32,batch=128 --steps 1 --repeats 8
    python scripts/benchmark.py --docs           # docs/speed.md's speed tables from results/benchmarks/*.json

Stages, each printed as a table; the JSON is rewritten after each one, so a run cut short keeps what
it measured (results/benchmarks/<name>_<device>.json, or --out):

1. steps, per model (--models): ms/step and images/s of plain (one pass), SAM, GNP, ASAM and hybrid
   GNP (p = 0.5) through the suite's own code (the model, method and optimizer that the training
   loop builds from the config, stepped with a closure of the loop's shape), of a hand-written
   two-pass step on the same model and optimizer, and of GNP with each fast path flipped (compile,
   channels_last, precision, fused optimizer). The variants are interleaved round-robin (--warmup
   steps each, then --repeats rounds of --steps steps each), with device synchronisation around each
   timed block: medians with min/max and quartiles, and ratios as medians over rounds of the ratio
   within a round (a shared machine's drift cancels). Then evaluation throughput and peak memory of
   plain and GNP steps (CUDA: max_memory_allocated in this process; CPU: peak RSS of a child process
   per variant).
2. exact mode: plain, GNP and exact (double-backward) GNP on a ResNet-18 of width 8, batch 32.
3. loader: the input pipeline alone per augmentation preset and style, against the GNP step's rate.
4. loop: the whole training loop (through the real config, on CIFAR-sized synthetic data,
   --loop-epochs epochs, the first one a warm-up) against the bare step, timed in blocks just before
   and after each of --loop-repeats runs of the loop.
5. analysis (--analysis-model): one Hessian-vector product by each method (double backward,
   forward-over-reverse; alone and in blocks of 4) against one plain step of the same batch, a default
   `python -m gnp.analysis` of a plain run against one of its training epochs and against an analysis
   with the previous defaults (Hutchinson's trace of 100 products, double backward), and the products
   Hutchinson's estimator would need for the default trace's standard error.
6. checks (CUDA only, or --checks on): every model family trains a short GNP epoch through the
   training loop, and no training step or loader batch synchronises the host with the GPU.

Limits are printed beside the measurements; only a failed check (or a stage that raised) makes the
exit status non-zero. The code is the package gnp.bench; this file is its command line.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from gnp.analysis import __main__ as analysis_command
from gnp.bench import speed_tables
from gnp.bench.run import run
from gnp.bench.settings import ANALYSIS_MODELS, CPU_DEFAULT_MODELS, CUDA_DEFAULT_MODELS, parse_model
from gnp.checks import positive
from gnp.tables import TableError

STAGES = ("memory", "evaluation", "shards", "exact", "loader", "loop", "analysis")  # what --skip can leave out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto (CUDA if visible), cpu, cuda, cuda:N")
    parser.add_argument("--models", nargs="+", type=parse_model, default=None, metavar="NAME[:KEY=VALUE,...]",
                        help="models and their builder options, `batch=N` and `steps=N` for their own batch size "
                             "and timed steps per round; default: "
                             f"{' '.join(CUDA_DEFAULT_MODELS)} on CUDA, {' '.join(CPU_DEFAULT_MODELS)} on a CPU")
    parser.add_argument("--batch-size", type=positive(), default=None,
                        help="default: 256 on CUDA (the recipes), 32 on a CPU")
    parser.add_argument("--steps", type=positive(), default=None,
                        help="timed steps per round; default 10 on CUDA, 2 on a CPU")
    parser.add_argument("--repeats", type=positive(), default=None, help="rounds; default 5")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps per variant first; default 5 on CUDA, 2 on a CPU")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                        help="precision of the main comparison; default bf16 on CUDA, fp32 on a CPU")
    parser.add_argument("--precisions", nargs="+", choices=("fp32", "bf16", "fp16"), default=None,
                        help="precisions GNP is also timed in; default fp32 bf16 fp16 on CUDA, fp32 bf16 on a CPU "
                             "(float16 convolutions are very slow on CPUs)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="compile the models (torch.compile) for the main comparison; default on for CUDA, "
                             "off on a CPU, where compiling takes minutes")
    parser.add_argument("--loop-images", type=positive(), default=None, help="training images of the synthetic "
                        "CIFAR-10 (loader and loop); default 50000 on CUDA, 1024 on a CPU")
    parser.add_argument("--test-images", type=positive(), default=None, help="its test images (evaluation); default "
                        "10000 on CUDA, 512 on a CPU")
    parser.add_argument("--loop-epochs", type=positive(), default=None, help="epochs of each loop run; the first is "
                        "a warm-up, the others are the samples; default 3 on CUDA, 2 on a CPU")
    parser.add_argument("--loop-repeats", type=positive(), default=2, help="runs of the loop per method (default 2)")
    parser.add_argument("--loader-batches", type=positive(), default=40, help="batches per timed block of the loader")
    parser.add_argument("--analysis-model", type=parse_model, default=None, metavar="NAME[:KEY=VALUE,...]",
                        help="the model of the analysis-cost stage, as in --models; default "
                             f"{ANALYSIS_MODELS['cuda']} on CUDA, {ANALYSIS_MODELS['cpu']} on a CPU")
    parser.add_argument("--analysis-subset", type=positive(), default=None,
                        help="training images the timed analysis uses (its --subset); default: the analysis's own "
                             "(5000) on CUDA, a tenth of --loop-images on a CPU")
    parser.add_argument("--analysis-args", type=shlex.split, default=[], metavar="'ARG ...'",
                        help="more options of the timed analysis, e.g. '--top-k 1 --trace-samples 2' for a smoke "
                             "run (default none: the analysis's own defaults)")
    parser.add_argument("--checks", choices=("auto", "on", "off"), default="auto",
                        help="the end-to-end checks: auto = on CUDA only; on a CPU they run on shrunk models and "
                             "without the synchronisation checks (a smoke run)")
    parser.add_argument("--check-images", type=positive(), default=2560, help="training images of each check run")
    parser.add_argument("--skip", nargs="+", default=(), choices=STAGES, help="stages to leave out")
    parser.add_argument("--name", default="bench", help="the JSON is results/benchmarks/<name>_<device>.json")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON here instead")
    parser.add_argument("--docs", action="store_true",
                        help="only rewrite docs/speed.md's speed tables from the JSON files in results/benchmarks/")
    args = parser.parse_args(argv)
    if args.warmup is not None and args.warmup < 0:
        parser.error(f"--warmup={args.warmup} must be at least 0")
    try:  # before anything is measured: the analysis's own parser says what is wrong
        analysis_command.parse_args(["RUN_DIR", *args.analysis_args])
    except SystemExit:
        parser.error(f"--analysis-args {shlex.join(args.analysis_args)!r} are not options of python -m gnp.analysis "
                     "(python -m gnp.analysis --help)")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.docs:
        try:
            changed = speed_tables.update()
        except (TableError, ValueError) as e:
            raise SystemExit(f"error: {e}") from None
        print(f"{speed_tables.PAGE}: speed tables {'rewritten' if changed else 'already current'}")
        return 0
    return run(args, shlex.join([Path(sys.executable).name, "scripts/benchmark.py", *argv]))


if __name__ == "__main__":
    sys.exit(main())
