"""`python -m gnp.analysis RUN_DIR [RUN_DIR ...]`: the flatness of finished runs, into each run's
analysis.json (docs/flatness.md).

Exit status 0 when every run was analysed (or was up to date, or skipped because it did not
finish), 2 when any input was bad (each problem is one line on stderr; the other runs are still
analysed), 1 when the machine ran out of memory.
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from gnp.analysis import sharpness
from gnp.analysis.hessian import TRACE_METHODS, TRACE_SAMPLES
from gnp.analysis.objective import HVP_METHODS
from gnp.analysis.run import (DEFAULT_QUANTITIES, QUANTITIES, RESULT_FILE, Analysis, AnalysisError, Options, Skipped,
                              is_up_to_date, load_finished_run, runs_to_analyse)
from gnp.checks import positive
from gnp.console import first_line

BAD_INPUT, OUT_OF_MEMORY = 2, 1


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """A mistake on the command line is one line (argparse's usage block is left out)."""
        self.exit(BAD_INPUT, f"error: {message} (python -m gnp.analysis --help)\n")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = _Parser(prog="python -m gnp.analysis", description="The flatness of finished runs: training loss, "
                     "error and gradient norm, the Hessian's top eigenvalues and trace, SAM sharpness, and on request "
                     "the Hessian's spectral density and per-block curvature and loss landscapes, each on a seeded "
                     "subset of the run's training set, into the run's analysis.json.")
    parser.add_argument("runs", nargs="*", type=Path, metavar="RUN_DIR",
                        help="run directories, or folders holding them (every run under them is analysed)")
    parser.add_argument("--subset", type=positive(int), help="training images used (default 5000, or all of a "
                        "smaller training set)")
    parser.add_argument("--batch-size", type=positive(int), default=500, help="images per pass (default 500); "
                        "every quantity is of the whole subset")
    parser.add_argument("--only", help=f"quantities to compute, comma-separated (default all but hessian_density): "
                        f"{', '.join(QUANTITIES)}")
    parser.add_argument("--top-k", type=positive(int), default=5, help="Hessian eigenvalues (default 5)")
    parser.add_argument("--trace-method", choices=TRACE_METHODS, default=TRACE_METHODS[0],
                        help=f"estimator of the Hessian trace (default {TRACE_METHODS[0]})")
    parser.add_argument("--trace-samples", type=positive(int), help="Hessian-vector products of the trace "
                        "estimator (at least 2; default " + ", ".join(f"{n} for {m}" for m, n in TRACE_SAMPLES.items())
                        + ")")
    parser.add_argument("--hvp", choices=HVP_METHODS, default=HVP_METHODS[0], help="how Hessian-vector products "
                        "are computed, both exact: auto (default) times each on the first batch and keeps the faster, "
                        "double backward where the model has no forward mode")
    parser.add_argument("--rho", type=positive(float), help="SAM sharpness radius (default the run's method.r if "
                        "positive, else 0.05)")
    parser.add_argument("--ascent-steps", type=int, default=sharpness.STEPS, help="the most trial points of each "
                        f"ascent of the sharpness, one gradient pass each (default {sharpness.STEPS})")
    parser.add_argument("--ascent-tol", type=positive(float), default=sharpness.TOL, help="an ascent has converged "
                        "when the gradient's part along the sphere is at most this share of the gradient (default "
                        f"{sharpness.TOL:g})")
    parser.add_argument("--sharpness-starts", type=positive(int), default=sharpness.STARTS, help="ascents of the "
                        "sharpness: from SAM's perturbation, then from random points, each followed by one from the "
                        f"mirror image of the point it reached (default {sharpness.STARTS})")
    parser.add_argument("--m-sharpness", type=positive(int), metavar="M", help="also SAM's m-sharpness: the "
                        "sharpness of each batch of M images of the subset, averaged")
    parser.add_argument("--seed", type=int, default=0, help="the subset, the Lanczos start vector, the "
                        "Hutchinson vectors, the landscape's directions and the sharpness's random starts (default 0)")
    parser.add_argument("--float64", action="store_true", help="compute in float64 (small models)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when visible), cpu, cuda or cuda:N")
    parser.add_argument("--landscape", action="store_true", help="also the 1-D and 2-D loss surfaces along "
                        "filter-normalised random directions (figures analysis_landscape.png/.pdf)")
    parser.add_argument("--landscape-points", type=int, default=21, help="points per axis of the surfaces "
                        "(default 21: the 2-D grid is 21 x 21); the interpolation's step is 1 / (points - 1)")
    parser.add_argument("--landscape-range", type=positive(float), default=1.0,
                        help="the surfaces span [-range, range] along each direction (default 1)")
    parser.add_argument("--density", action="store_true", help="also hessian_density: the Hessian's spectral "
                        "density by stochastic Lanczos quadrature (figure analysis_density.png/.pdf); costs "
                        "probes x steps Hessian-vector products and keeps steps vectors of the parameters' size")
    parser.add_argument("--density-probes", type=positive(int), default=2,
                        help="random probe vectors of the density (default 2)")
    parser.add_argument("--density-steps", type=positive(int), default=64,
                        help="Lanczos steps per probe (default 64: 128 products with 2 probes)")
    parser.add_argument("--per-block", action="store_true", help="also the largest eigenvalue and trace of the "
                        "Hessian of each top-level block (the model's named children that hold parameters, a "
                        "Sequential or ModuleList child split into its children; figure analysis_blocks.png/.pdf); "
                        "costs --trace-samples + about 22 products per block")
    parser.add_argument("--between", nargs=2, type=Path, metavar=("A", "B"), help="also the loss along the line "
                        "from run A's weights to run B's (same model), into A's analysis.json")
    args = parser.parse_args(argv)
    if not args.runs and not args.between:
        parser.error("give at least one RUN_DIR (or --between A B)")
    if args.trace_samples is not None and args.trace_samples < 2:
        parser.error(f"--trace-samples {args.trace_samples} is invalid: a standard error needs at least 2")
    if args.ascent_steps < 0:
        parser.error(f"--ascent-steps {args.ascent_steps} is invalid: it must be 0 or more")
    if args.ascent_tol >= 1:
        parser.error(f"--ascent-tol {args.ascent_tol:g} is invalid: it must be below 1 (every point would count as "
                     f"converged)")
    if args.landscape_points < 2:
        parser.error(f"--landscape-points {args.landscape_points} is invalid: it must be at least 2")
    args.quantities = DEFAULT_QUANTITIES
    if args.only is not None:
        chosen = [name.strip() for name in args.only.split(",") if name.strip()]
        unknown = [name for name in chosen if name not in QUANTITIES]
        if unknown or not chosen:
            parser.error(f"--only {args.only}: unknown quantity {', '.join(unknown) or '(none given)'}; "
                         f"choose from {', '.join(QUANTITIES)}")
        args.quantities = tuple(name for name in QUANTITIES if name in chosen)
    if args.density:
        args.quantities = tuple(name for name in QUANTITIES if name in args.quantities or name == "hessian_density")
    try:
        args.device = _device(args.device)
    except ValueError as e:
        parser.error(str(e))
    return args


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name} is invalid: choose auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} is not available: no CUDA device is visible; use --device cpu")
    return device


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    options = Options(subset=args.subset, batch_size=args.batch_size, seed=args.seed, float64=args.float64,
                      quantities=args.quantities, top_k=args.top_k, trace_method=args.trace_method,
                      trace_samples=args.trace_samples, hvp_method=args.hvp, rho=args.rho,
                      ascent_steps=args.ascent_steps, ascent_tol=args.ascent_tol,
                      sharpness_starts=args.sharpness_starts, m_sharpness=args.m_sharpness, landscape=args.landscape,
                      landscape_points=args.landscape_points, landscape_range=args.landscape_range,
                      density_probes=args.density_probes, density_steps=args.density_steps, per_block=args.per_block)
    jobs: dict[Path, tuple[Path, Path | None]] = {}  # by resolved path: (run, the other end of its interpolation)
    errors, skipped, analysed, up_to_date = 0, Counter(), 0, 0
    if args.between:
        jobs[args.between[0].resolve()] = (args.between[0], args.between[1])
    for path in args.runs:
        try:
            for run_dir in runs_to_analyse(path):
                jobs.setdefault(run_dir.resolve(), (run_dir, None))
        except AnalysisError as e:
            print(f"error: {e}", file=sys.stderr)
            errors += 1
    for run_dir, other in jobs.values():
        try:
            run = load_finished_run(run_dir)
            analysis = Analysis(run, replace(options, between=other), args.device)
            if is_up_to_date(run_dir, analysis.settings):
                print(f"{run_dir}: {RESULT_FILE} is up to date (made with the same settings)")
                up_to_date += 1
                continue
            print(f"{run_dir}: {_describe(analysis.execute())}")
            analysed += 1
        except Skipped as e:
            print(f"{run_dir}: skipped, the run did not finish (status {e.status})")
            skipped[e.status] += 1
        except AnalysisError as e:
            print(f"error: {e}", file=sys.stderr)
            errors += 1
        except torch.cuda.OutOfMemoryError as e:
            print(f"error: {run_dir}: out of memory ({first_line(e)}); lower --batch-size", file=sys.stderr)
            return OUT_OF_MEMORY
    counts = f"{analysed} analysed, {up_to_date} up to date, {sum(skipped.values())} skipped"
    if skipped:
        counts += " (" + ", ".join(f"{n} {status}" for status, n in sorted(skipped.items())) + ")"
    print(counts + (f", {errors} with errors" if errors else ""))
    return BAD_INPUT if errors else 0


def _describe(record: dict) -> str:
    """One line of the main numbers, each saying what it holds: the loss and the trace with the in-loss L2
    term's share, the sharpness beside its first-order value rho * |grad L|, and a sharpness whose ascents
    were cut by the cap says so."""
    q, d = record["quantities"], record["details"]
    parts = []
    if q.get("train_loss") is not None:
        parts.append(f"train loss {q['train_loss']:.4g}" + (f" (cross-entropy {q['train_cross_entropy']:.4g} + "
                     f"in-loss L2 {q['train_l2']:.4g})" if q.get("train_l2") else ""))
    for key, label in (("train_error", "error (%)"), ("train_grad_norm", "|grad L|"),
                       ("hessian_top_eigenvalue", "lambda_max")):
        if q.get(key) is not None:
            parts.append(f"{label} {q[key]:.4g}")
    if q.get("hessian_trace") is not None:
        parts.append(f"tr(H) {q['hessian_trace']:.4g}" + (f" ({q['hessian_trace_l2']:.4g} of it the in-loss L2 "
                     f"term's)" if q.get("hessian_trace_l2") else ""))
    for key, label in (("sam_sharpness", "sharpness"), ("m_sharpness", "m-sharpness")):
        if q.get(key) is not None:
            s = d[key]
            parts.append(f"{label} {q[key]:.4g} at rho {s['rho']:g} (first order rho*|grad L| {s['first_order']:.4g})")
    parts += _cut_short(d, record["settings"]["ascent_steps"])
    return ", ".join(parts) + f" -> {Path(record['run']['dir']) / RESULT_FILE}"


def _cut_short(details: dict, steps: int) -> list[str]:
    """What the cap on the ascents cut short: the value itself (the best ascent, or a batch of m-sharpness, was
    still rising: a lower bound), or only ascents that ended below the best value, which stands unless more
    steps would carry one of them past it."""
    lower_bound, below = False, []
    for key in ("sam_sharpness", "m_sharpness"):
        s = details.get(key) or {}
        if not s.get("rising"):
            continue
        cut = [a["value"] for a in s.get("ascents", []) if a["rising"]]
        if cut and max(cut) < s["value"]:
            below.append(f"{len(cut)} of {len(s['ascents'])} ascents still rising at --ascent-steps {steps}, at "
                         f"{max(cut):.4g} or less below the best {s['value']:.4g}")
        else:
            lower_bound = True
    return [f"sharpness still rising at --ascent-steps {steps} (a lower bound: raise it)"] * lower_bound + below


if __name__ == "__main__":
    sys.exit(main())
