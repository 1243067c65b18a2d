"""What a table reports of each run: the test error of its summary.json (the paper's tables), or a
quantity of its analysis.json (`python -m gnp.analysis`: flatness of the trained model). The rest
of the pipeline (collect, statistics, rendering) takes the quantity as a parameter."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from gnp.checks import is_number
from gnp.tables.runs import TEST_ERROR, Run


@dataclass(frozen=True)
class Quantity:
    name: str
    label: str                        # for titles, legends and axes
    fmt: str | None                   # how a mean or a std is printed (the precision "lowest" is judged at);
                                      # None: by the spread of each cell (`gnp.tables.stats.cell_format`)
    in_analysis: bool                 # read from analysis.json's "quantities" (else from summary.json)

    def value(self, run: Run) -> float | None:
        """The run's value; None when it has none (it counts as missing for this quantity)."""
        value = (run.analysis or {}).get(self.name) if self.in_analysis else run.summary.get(self.name)
        return float(value) if is_number(value) else None


TEST_ERROR_QUANTITY = Quantity(TEST_ERROR, "test error (%)", ".2f", in_analysis=False)
# analysis.json's quantities, each computed on a fixed, seeded subset of the training set with the
# model in evaluation mode and the loss the run trained on; each printed with the decimals its cell's spread
# shows.
ANALYSIS_QUANTITIES = {q.name: q for q in (
    Quantity("train_loss", "loss on the analysis subset (cross-entropy + in-loss L2)", None, True),
    Quantity("train_cross_entropy", "cross-entropy on the analysis subset", None, True),
    Quantity("train_error", "error (%) on the analysis subset", None, True),
    Quantity("train_grad_norm", "‖∇L(θ)‖ on the analysis subset", None, True),
    Quantity("hessian_top_eigenvalue", "largest Hessian eigenvalue", None, True),
    Quantity("hessian_trace", "Hessian trace (with the in-loss L2 term's wd · P)", None, True),
    Quantity("sam_sharpness", "SAM sharpness", None, True),
    Quantity("m_sharpness", "SAM m-sharpness (the mean over batches of m of each batch's maximum)", None, True),
)}


# analysis.json's settings that change a value (not the device or the batch size, beyond rounding),
# by the option of python -m gnp.analysis that sets each.
ANALYSIS_OPTIONS = {"subset": "--subset", "rho": "--rho", "top_k": "--top-k", "trace_method": "--trace-method",
                    "trace_samples": "--trace-samples",
                    "ascent_steps": "--ascent-steps", "ascent_tol": "--ascent-tol",
                    "sharpness_starts": "--sharpness-starts", "m_sharpness": "--m-sharpness", "seed": "--seed",
                    "dtype": "--float64"}


def hessian_density(run: Run) -> tuple[list[float], list[float]] | None:
    """The grid and density of the run's Hessian spectral density (`python -m gnp.analysis --density`);
    None when its analysis.json has none, or one whose grid and density are not lists of numbers of
    the same length."""
    result = (run.analysis_details or {}).get("hessian_density")
    grid, density = (result.get("grid"), result.get("density")) if isinstance(result, dict) else (None, None)
    if not (isinstance(grid, list) and isinstance(density, list) and len(grid) == len(density) > 1):
        return None
    return (grid, density) if all(is_number(v) for v in grid + density) else None


def analysis_options(runs: list[Run]) -> tuple[list[str], dict[str, Counter], int]:
    """What the analyses of `runs` were made with: the options they share ("--rho 0.05", ...), for
    each option on which they differ the runs with each value ({"--rho": {"0.05": 6, "0.1": 3}}),
    and how many analysis.json files recorded no settings. Values made with other options do not
    compare."""
    values: dict[str, Counter] = {option: Counter() for option in ANALYSIS_OPTIONS.values()}
    unrecorded = 0
    for run in runs:
        if run.analysis is None:
            continue
        if run.analysis_settings is None:
            unrecorded += 1
            continue
        for key, option in ANALYSIS_OPTIONS.items():
            values[option][_shown(key, run.analysis_settings.get(key))] += 1
    shared = []
    for option, counter in values.items():
        if len(counter) == 1 and (shown := next(iter(counter))) != "no":
            shared.append(option if shown == "yes" else f"{option} {shown}")
    return shared, {option: counter for option, counter in values.items() if len(counter) > 1}, unrecorded


def _shown(key: str, value) -> str:
    if key == "dtype":  # --float64 is a switch
        return "yes" if value == "float64" else "no"
    if value is None:  # an option not given (--m-sharpness), or one its analysis did not have
        return "no"
    return f"{value:g}" if is_number(value) else str(value)
