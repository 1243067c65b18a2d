"""Optimisation methods: each wraps any torch optimizer and is stepped with `step(closure)`.

    method = GNP(model, torch.optim.SGD(model.parameters(), lr=0.1), r=0.1, alpha=0.8)
    loss = method.step(lambda: F.cross_entropy(model(x), y))

`Plain` (standard training), `SAM`, `GNP` and `ASAM` share the machinery of `Method` (base.py) and, for
the two-pass ones, of `TwoPassMethod` (two_pass.py); a new method is a subclass that says how it
perturbs and how it combines the two gradients. A config chooses one by its class (`_target_`).
"""
from gnp.methods.asam import ASAM
from gnp.methods.base import Method, SettingError, StepReport
from gnp.methods.gnp import GNP
from gnp.methods.plain import Plain
from gnp.methods.sam import SAM
from gnp.methods.two_pass import TwoPassMethod

__all__ = ["ASAM", "GNP", "Method", "Plain", "SAM", "SettingError", "StepReport", "TwoPassMethod"]
