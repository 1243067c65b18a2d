"""The loss a run trained on, as a function of its parameters on a fixed set of batches.

L(theta) = (1/N) sum over the N images of the cross-entropy (with the run's label smoothing), plus
the in-loss L2 term 0.5 * wd * ||theta||^2 when the run's optimizer had `weight_decay_mode: loss`.
Values, gradients and Hessian-vector products are of the whole set: each batch contributes with
weight n_b / N, so nothing is a mean of per-batch quantities. The model is evaluated as it is (the
caller puts it in eval mode), and nothing here reads a number back from the device.
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from gnp.methods import dot, global_norm as norm  # noqa: F401 (one copy: the methods'; norm is also the analysis's)

Vector = list[torch.Tensor]  # one tensor per parameter, as the parameters are shaped
Batches = list[tuple[torch.Tensor, torch.Tensor]]


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

    `on_pass` is called after each full pass over the batches (for a progress display).
    """

    def __init__(self, model: nn.Module, batches: Batches, *, label_smoothing: float = 0.0,
                 l2: list[tuple[float, list[nn.Parameter]]] = (), on_pass: Callable[[], None] | None = None):
        self.model, self.batches, self.label_smoothing = model, batches, label_smoothing
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.size = sum(len(labels) for _, labels in batches)
        index = {id(p): i for i, p in enumerate(self.params)}
        self.l2 = [0.0] * len(self.params)  # each parameter's coefficient
        for coefficient, params in l2:
            for p in params:
                self.l2[index[id(p)]] = coefficient
        self.on_pass = on_pass
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
        """H v, the Hessian of L at theta times `vector`, by double backward batch by batch (H is a
        sum over batches, so this is the product with the Hessian of the whole set)."""
        total = [torch.zeros_like(p) for p in self.params]
        with sdpa_kernel([SDPBackend.MATH]):  # the fused CUDA attention kernels have no double backward
            for images, labels in self.batches:
                with torch.enable_grad():
                    grads = torch.autograd.grad(self._batch_loss(images, labels), self.params, create_graph=True,
                                                materialize_grads=True)
                    products = torch.autograd.grad(dot(grads, vector), self.params, materialize_grads=True)
                torch._foreach_add_(total, products)
        self._add_l2(total, vector)
        self.hvp_count += 1
        self._passed()
        return total

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
        """This batch's share of the mean loss over the set: its mean cross-entropy times n_b / N."""
        loss = F.cross_entropy(self.model(images), labels, label_smoothing=self.label_smoothing)
        return loss * (len(labels) / self.size)

    def l2_value(self) -> torch.Tensor | float:
        """The in-loss L2 term's share of L: 0.5 * sum of c * ||p||^2 (0 for a run without one)."""
        terms = [0.5 * c * p.detach().pow(2).sum() for c, p in zip(self.l2, self.params) if c]
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


# --- vectors as lists of tensors ---------------------------------------------------------------

def flatten(a: Vector) -> torch.Tensor:
    return torch.cat([x.reshape(-1) for x in a])


def unflatten(flat: torch.Tensor, like: list[torch.Tensor]) -> Vector:
    return [piece.view_as(p) for piece, p in zip(flat.split([p.numel() for p in like]), like)]
