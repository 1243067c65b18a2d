"""What a table reports of each run: the test error of its summary.json (the paper's tables), or a
quantity of its analysis.json (`python -m gnp.analysis`: flatness of the trained model). The rest
of the pipeline (collect, statistics, rendering) takes the quantity as a parameter."""
from __future__ import annotations

from dataclasses import dataclass

from gnp.tables.runs import TEST_ERROR, Run, is_number


@dataclass(frozen=True)
class Quantity:
    name: str
    label: str                        # for titles, legends and axes
    fmt: str                          # how a mean or a std is printed (the precision "lowest" is judged at)
    in_analysis: bool                 # read from analysis.json's "quantities" (else from summary.json)

    def value(self, run: Run) -> float | None:
        """The run's value; None when it has none (it counts as missing for this quantity)."""
        value = (run.analysis or {}).get(self.name) if self.in_analysis else run.summary.get(self.name)
        return float(value) if is_number(value) else None

    def format(self, value: float) -> str:
        return format(value, self.fmt)


TEST_ERROR_QUANTITY = Quantity(TEST_ERROR, "test error (%)", ".2f", in_analysis=False)
# analysis.json's quantities, each computed on a fixed, seeded subset of the training set with the
# model in evaluation mode and the loss the run trained on.
ANALYSIS_QUANTITIES = {q.name: q for q in (
    Quantity("train_loss", "training loss", ".3g", True),
    Quantity("train_error", "training error (%)", ".3g", True),
    Quantity("train_grad_norm", "‖∇L(θ)‖ on the training subset", ".3g", True),
    Quantity("hessian_top_eigenvalue", "largest Hessian eigenvalue", ".3g", True),
    Quantity("hessian_trace", "Hessian trace", ".3g", True),
    Quantity("sam_sharpness", "SAM sharpness", ".3g", True),
)}
