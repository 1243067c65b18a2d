"""The loss a run trained on, as a function of its parameters on a fixed set of batches.

L(theta) = (1/N) sum over the N images of the cross-entropy (with the run's label smoothing), plus
the in-loss L2 term 0.5 * wd * ||theta||^2 when the run's optimizer had `weight_decay_mode: loss`.
Values, gradients and Hessian-vector products are of the whole set: each batch contributes with
weight n_b / N, so nothing is a mean of per-batch quantities. The model is evaluated as it is (the
caller puts it in eval mode), and nothing here reads a number back from the device, except the one
timing that chooses how Hessian-vector products are computed (HVP_METHODS).
"""
from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, jvp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from gnp.console import first_line
from gnp.distributed import synchronize

Vector = list[torch.Tensor]  # one tensor per parameter, as the parameters are shaped
Batches = list[tuple[torch.Tensor, torch.Tensor]]
# How H v is computed; both are exact. "auto" times one product of each on the first batch and keeps the
# faster, or double backward when the model cannot be differentiated in forward mode (timm's fused
# attention, custom autograd functions without a forward-mode rule).
DOUBLE_BACKWARD, FORWARD_OVER_REVERSE = "double-backward", "forward-over-reverse"
HVP_METHODS = ("auto", DOUBLE_BACKWARD, FORWARD_OVER_REVERSE)


def describe_loss(label_smoothing: float, l2: list[tuple[float, list[nn.Parameter]]], model: nn.Module) -> str:
    """The loss in words, for analysis.json."""
    text = "cross-entropy" + (f" with label smoothing {label_smoothing:g}" if label_smoothing else "")
    trainable = sum(p.requires_grad for p in model.parameters())
    for coefficient, params in l2:
        which = "all parameters" if len(params) == trainable else "parameters with 2+ dimensions"
        text += f" + 0.5 * {coefficient:g} * ||theta||^2 (in-loss L2 over {which})"
    return text


class SubsetLoss:
    """The training loss of `model` on `batches`, with `l2` the in-loss L2 groups of the run's method
    (`Method.l2_groups`: (coefficient, parameters) pairs).

    `hvp_method` is one of HVP_METHODS; `hvp_choice` says, after the first product, which method
    computes them and why. `on_pass` is called after each full pass over the batches (for a progress
    display).
    """

    def __init__(self, model: nn.Module, batches: Batches, *, label_smoothing: float = 0.0,
                 l2: list[tuple[float, list[nn.Parameter]]] = (), on_pass: Callable[[], None] | None = None,
                 hvp_method: str = "auto"):
        if hvp_method not in HVP_METHODS:
            raise ValueError(f"hvp_method {hvp_method!r} is unknown: choose one of {', '.join(HVP_METHODS)}")
        self.model, self.batches, self.label_smoothing = model, batches, label_smoothing
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self.names = [name for name, _ in named]
        self.params = [p for _, p in named]
        self.size = sum(len(labels) for _, labels in batches)
        index = {id(p): i for i, p in enumerate(self.params)}
        self.l2 = [0.0] * len(self.params)  # each parameter's coefficient
        for coefficient, params in l2:
            for p in params:
                self.l2[index[id(p)]] = coefficient
        self.on_pass = on_pass
        self.hvp_method = hvp_method
        self.hvp_choice: dict | None = None  # {"method", "reason", "ms"}: set by the first product
        self.hvp_count = 0

    # --- the three things everything else is built from ------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> tuple[torch.Tensor, torch.Tensor]:
        """L(theta) and the error (%) on the set, as 0-dim tensors on the device."""
        loss_sum = errors = 0.0
        for images, labels in self.batches:
            logits = self.model(images)
            loss_sum = loss_sum + F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing,
                                                  reduction="sum")
            errors = errors + (logits.argmax(1) != labels).sum()
        self._passed()
        return loss_sum / self.size + self.l2_value(), 100.0 * errors / self.size

    def gradient(self) -> tuple[torch.Tensor, Vector]:
        """L(theta) and grad L(theta), accumulated over the batches."""
        total = [torch.zeros_like(p) for p in self.params]
        loss = 0.0
        for images, labels in self.batches:
            with torch.enable_grad():
                batch_loss = self._batch_loss(images, labels)
                grads = torch.autograd.grad(batch_loss, self.params, materialize_grads=True)
            torch._foreach_add_(total, grads)
            loss = loss + batch_loss.detach()
        self._add_l2(total, self.params)
        self._passed()
        return loss + self.l2_value(), total

    def hvp(self, vector: Vector) -> Vector:
        """H v, the Hessian of L at theta times `vector`, batch by batch (H is a sum over batches, so
        this is the product with the Hessian of the whole set), by the method `hvp_choice` names."""
        return self.hvps([vector])[0]

    def hvps(self, vectors: list[Vector]) -> list[Vector]:
        """H v for each of `vectors`, in one pass over the batches: each batch's forward pass and first
        backward pass serve them all, so that each product costs less than alone (hvp_count counts them
        all). The second pass holds len(vectors) times its tensors at once."""
        block = [torch.stack(parts) for parts in zip(*vectors)]  # per parameter, the vectors along dim 0
        if self.hvp_choice is None:
            self.hvp_choice = self._choose_hvp(block)
        product = self._HVP[self.hvp_choice["method"]]
        total = [torch.zeros_like(b) for b in block]
        for images, labels in self.batches:
            torch._foreach_add_(total, product(self, block, images, labels))
        self._add_l2(total, block)
        self.hvp_count += len(vectors)
        self._passed()
        return [list(parts) for parts in zip(*total)]

    # --- the loss as a function of the parameters --------------------------------------------------

    def loss_fn(self, params: Sequence[torch.Tensor]) -> torch.Tensor:
        """L at `params` (tensors shaped as `self.params`, in their order; the model's own are left
        alone), over all the batches: a pure function for torch.func (grad, jvp, hessian) or any other
        tool, equal to `evaluate()`'s loss at params = self.params."""
        total = sum(self._functional_batch_loss(params, images, labels) for images, labels in self.batches)
        return total + self._l2_term(params)

    def _functional_batch_loss(self, params: Sequence[torch.Tensor], images: torch.Tensor,
                               labels: torch.Tensor) -> torch.Tensor:
        """This batch's share of the mean loss over the set, at `params`: its mean cross-entropy times n_b / N."""
        logits = functional_call(self.model, dict(zip(self.names, params)), (images,))
        return F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing) * (len(labels) / self.size)

    # --- one batch's share of H v for a block of vectors (each parameter's along dim 0), two exact ways

    def _batch_hvp_double_backward(self, block: Vector, images: torch.Tensor, labels: torch.Tensor) -> Vector:
        """d/dtheta (grad L_b . v): a backward pass that records its own graph, and a backward pass
        through both, vectorised over the vectors (vmap)."""
        with torch.enable_grad(), sdpa_kernel([SDPBackend.MATH]):  # fused attention has no double backward
            grads = torch.autograd.grad(self._batch_loss(images, labels), self.params, create_graph=True,
                                        materialize_grads=True)
            return list(torch.autograd.grad(grads, self.params, grad_outputs=block, is_grads_batched=True,
                                            materialize_grads=True))

    def _batch_hvp_forward_over_reverse(self, block: Vector, images: torch.Tensor, labels: torch.Tensor) -> Vector:
        """The directional derivative of grad L_b along v: one reverse pass carrying forward-mode tangents,
        vectorised over the vectors (vmap)."""
        gradient = grad(lambda params: self._functional_batch_loss(params, images, labels))
        primals = tuple(p.detach() for p in self.params)
        with warnings.catch_warnings():
            # torch's forward-mode decompositions still compile with torch.jit.script on first use and warn
            # that it is deprecated: a note about torch's internals, not about this analysis.
            warnings.filterwarnings("ignore", message=".*torch.jit.script.* is deprecated", category=FutureWarning)
            return list(vmap(lambda tangents: jvp(gradient, (primals,), (tangents,))[1])(tuple(block)))

    _HVP = {DOUBLE_BACKWARD: _batch_hvp_double_backward, FORWARD_OVER_REVERSE: _batch_hvp_forward_over_reverse}

    def _choose_hvp(self, block: Vector) -> dict:
        """The method of `hvp_method`; for "auto" the faster on the first batch, each timed once after an
        untimed pass (where forward mode may fail): 4 passes over one batch, not counted in hvp_count."""
        images, labels = self.batches[0]
        if self.hvp_method == DOUBLE_BACKWARD:
            return {"method": DOUBLE_BACKWARD, "reason": "asked for", "ms": None}
        try:
            self._batch_hvp_forward_over_reverse(block, images, labels)
        except (RuntimeError, NotImplementedError) as e:
            if self.hvp_method == FORWARD_OVER_REVERSE:
                raise ValueError(f"--hvp {FORWARD_OVER_REVERSE} cannot differentiate this model ({first_line(e)}): "
                                 f"use --hvp {DOUBLE_BACKWARD} or auto") from None
            return {"method": DOUBLE_BACKWARD, "reason": f"no forward mode ({first_line(e)})", "ms": None}
        if self.hvp_method == FORWARD_OVER_REVERSE:
            return {"method": FORWARD_OVER_REVERSE, "reason": "asked for", "ms": None}
        self._batch_hvp_double_backward(block, images, labels)
        ms = {name: _milliseconds(lambda: self._HVP[name](self, block, images, labels), images.device)
              for name in (DOUBLE_BACKWARD, FORWARD_OVER_REVERSE)}
        return {"method": min(ms, key=ms.get), "reason": "faster on the first batch", "ms": ms}

    # --- moving theta and putting it back exactly ------------------------------------------------

    @contextmanager
    def moved(self):
        """Within the block the parameters may be changed (`set_params`); afterwards they are
        exactly what they were."""
        saved = [p.detach().clone() for p in self.params]
        try:
            yield saved
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self.params, saved)

    @torch.no_grad()
    def set_params(self, base: Vector, *steps: tuple[float | torch.Tensor, Vector]) -> None:
        """theta <- base + sum of scale * direction; a scale may be a 0-dim tensor on the device."""
        torch._foreach_copy_(self.params, base)
        for scale, direction in steps:
            torch._foreach_add_(self.params, torch._foreach_mul(direction, scale))

    # --- helpers ---------------------------------------------------------------------------------

    def _batch_loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """This batch's share of the mean loss over the set, at the model's parameters."""
        return self._functional_batch_loss(self.params, images, labels)

    def l2_value(self) -> torch.Tensor | float:
        """The in-loss L2 term's share of L: 0.5 * sum of c * ||p||^2 (0 for a run without one)."""
        return self._l2_term([p.detach() for p in self.params])

    def _l2_term(self, params: Sequence[torch.Tensor]) -> torch.Tensor | float:
        terms = [0.5 * c * p.pow(2).sum() for c, p in zip(self.l2, params) if c]
        return torch.stack(terms).sum() if terms else 0.0

    def l2_trace(self) -> float:
        """The in-loss L2 term's share of tr(H): its Hessian is c * I on each parameter with coefficient c."""
        return float(sum(c * p.numel() for c, p in zip(self.l2, self.params)))

    def _add_l2(self, total: Vector, vector: Vector) -> None:
        """total += coefficient * vector: the L2 term's gradient (vector = theta) or its Hessian
        times a vector (c * I)."""
        for t, v, c in zip(total, vector, self.l2):
            if c:
                t.add_(v.detach(), alpha=c)

    def _passed(self) -> None:
        if self.on_pass is not None:
            self.on_pass()


def _milliseconds(call: Callable[[], object], device: torch.device) -> float:
    """One call's wall time, the device synchronised around it."""
    synchronize(device)
    started = time.perf_counter()
    call()
    synchronize(device)
    return 1000 * (time.perf_counter() - started)


# --- vectors as lists of tensors ---------------------------------------------------------------

def flatten(a: Vector) -> torch.Tensor:
    return torch.cat([x.reshape(-1) for x in a])


def unflatten(flat: torch.Tensor, like: list[torch.Tensor]) -> Vector:
    return [piece.view_as(p) for piece, p in zip(flat.split([p.numel() for p in like]), like)]


def flat_hvps(loss: SubsetLoss, rows: torch.Tensor) -> torch.Tensor:
    """H v for each row v of `rows` (vectors over `loss.params`, flattened), as the rows of the result: the
    products of one `loss.hvps` pass, for the estimators that work on flat vectors (Lanczos, the traces)."""
    return torch.stack([flatten(product) for product in loss.hvps([unflatten(row, loss.params) for row in rows])])
