"""Optimisation methods: each wraps any torch optimizer and is stepped with `step(closure)`.

    method = GNP(model, torch.optim.SGD(model.parameters(), lr=0.1), r=0.1, alpha=0.8)
    loss = method.step(lambda: F.cross_entropy(model(x), y))

`Plain` (standard training), `SAM`, `GNP`, `ASAM` and the rest of the SAM family (`GSAM`, `GAM`, `LookSAM`,
`FriendlySAM`, `WSAM`) share the machinery of `Method` (base.py) and, for the perturbing ones, of
`TwoPassMethod` (two_pass.py); a new method is a subclass that says how it perturbs and how it combines the
two gradients (docs/methods.md, "Adding a method"). A config chooses one by its class (`_target_`).
"""
from gnp.methods.asam import ASAM
from gnp.methods.base import NORM_FLOOR, Method, SettingError, StepReport, dot, global_norm
from gnp.methods.friendly_sam import FriendlySAM
from gnp.methods.gam import GAM
from gnp.methods.gnp import GNP
from gnp.methods.gsam import GSAM
from gnp.methods.looksam import LookSAM
from gnp.methods.plain import Plain
from gnp.methods.sam import SAM
from gnp.methods.two_pass import TwoPassMethod, unit
from gnp.methods.wsam import WSAM

# Roles in the comparisons of the benchmark: the one-pass step every method is timed against, and the method
# whose update the hand-written two-pass reference step reproduces (its config names in conf/method/).
BASELINE, REFERENCE = "plain", "gnp"

__all__ = ["ASAM", "BASELINE", "FriendlySAM", "GAM", "GNP", "GSAM", "LookSAM", "Method", "NORM_FLOOR", "Plain",
           "REFERENCE", "SAM", "SettingError", "StepReport", "TwoPassMethod", "WSAM", "dot", "global_norm", "unit"]
