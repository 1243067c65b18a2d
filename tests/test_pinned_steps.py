"""Pins the optimisation steps of the plain, SAM and GNP updates across refactors.

`tests/pinned/steps.pt` holds the parameters and optimizer state after a few float64 steps of each
method on a small network with BatchNorm and dropout, in one CPU thread (the commit that wrote it is
inside: the one class of all three methods, before they became plug-ins). The steps must stay these
to within ATOL: on the CPU that wrote the file they are equal bit for bit, while another CPU's BLAS
kernels add in another order (an Intel Xeon against the AMD EPYC that wrote it: at most 3e-11, in
AdamW's update of a bias whose gradient BatchNorm leaves at rounding noise, elsewhere 3e-16), and
any change to a method's arithmetic moves them far more (alpha 0.8 to 0.81: 1e-3). Rewrite the file
only for an intended change of the update: `python tests/test_pinned_steps.py`.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from gnp.methods import GNP, SAM, Plain

PINNED = Path(__file__).parent / "pinned" / "steps.pt"
STEPS = 4
ATOL = 1e-9  # float64: rounding of other CPUs stays under it, a change of the update does not
# name -> (base optimizer, method, its settings): one-pass, SAM, GNP in both first-term forms, with
# in-loss L2, clipping, GR warmup and hybrid steps. (The file was written when all three were one class.)
CASES = {
    "plain": ("sgd", Plain, dict(l2=1e-3, max_grad_norm=5.0)),
    "sam": ("sgd", SAM, dict(r=0.05, l2=1e-3, max_grad_norm=5.0)),
    "gnp": ("sgd", GNP, dict(r=0.1, alpha=0.8, l2=1e-3, max_grad_norm=5.0)),
    "gnp_paper_formula": ("sgd", GNP, dict(r=0.1, alpha=0.8, normalize_first_grad=False, l2=1e-3)),
    "gnp_adamw": ("adamw", GNP, dict(r=0.1, alpha=0.8, max_grad_norm=0.5)),
    "gnp_r_warmup_hybrid": ("sgd", GNP, dict(r=0.1, alpha=0.8, warmup="r", warmup_steps=2, two_pass_probability=0.5,
                                             seed=3)),
    "gnp_exact": ("sgd", GNP, dict(r=0.1, alpha=0.8, exact=True)),
}


def network() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Dropout(0.2), nn.Linear(16, 3)).double()


def base_optimizer(kind: str, model: nn.Module) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.3)


def run(name: str) -> dict[str, torch.Tensor]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a reduction split over threads adds in another order: bits depend on the count
    try:
        return _steps(name)
    finally:
        torch.set_num_threads(threads)


def _steps(name: str) -> dict[str, torch.Tensor]:
    model = network()
    kind, method_class, settings = CASES[name]
    base = base_optimizer(kind, model)
    method = method_class(model, base, **settings)
    g = torch.Generator().manual_seed(1)
    for step in range(STEPS):
        x, y = torch.randn(12, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (12,), generator=g)
        torch.manual_seed(100 + step)  # the dropout draws of this step
        method.step(lambda: F.cross_entropy(model(x), y))
    state = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    for i, p in enumerate(model.parameters()):
        state.update({f"optimizer.{i}.{k}": v.clone() for k, v in base.state[p].items() if torch.is_tensor(v)})
    return state


@pytest.mark.parametrize("name", CASES)
def test_steps_equal_the_pinned_ones_to_rounding(name):
    pinned = torch.load(PINNED, weights_only=True)["cases"][name]
    now = run(name)
    assert now.keys() == pinned.keys()
    for key, value in pinned.items():  # also the dtype and shape
        torch.testing.assert_close(now[key], value, rtol=0, atol=ATOL, msg=lambda m: f"{name}: {key}: {m}")


if __name__ == "__main__":
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    PINNED.parent.mkdir(exist_ok=True)
    torch.save({"commit": commit, "torch": str(torch.__version__), "cases": {name: run(name) for name in CASES}}, PINNED)
    print(f"wrote {PINNED} ({len(CASES)} cases, commit {commit})", file=sys.stderr)
