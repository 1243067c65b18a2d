"""What the benchmark times: one training step of the suite's own code on a fixed batch, and the
hand-written two-pass step (`two_pass_step`) that the suite's GNP step is held against."""
from __future__ import annotations

from typing import Callable

import torch
from omegaconf import DictConfig

from gnp.bench.parts import OneProcessRun


class SuiteStep:
    """One training step of the suite's own code on a fixed batch: the model (channels_last,
    compiled), the method and its fused base optimizer exactly as the training loop builds them from
    the config, and the training loop's closures (one per shard, each seeding its shard's draws).
    `passes` records, per call, the forward/backward passes the step took (as the method reports them)."""

    def __init__(self, cfg: DictConfig, device: torch.device):
        self.parts = OneProcessRun(cfg, device)
        self.images, self.target = self.parts.first_batch()
        self.passes: list[int] = []

    def closure(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.parts.loss_and_logits(self.images, self.target)

    def __call__(self) -> None:
        method = self.parts.method
        method.step(self.parts.shard_closures(self.images, self.target))
        self.passes.append(method.last_step.passes)

    def loop_step(self) -> None:
        """The step with the training loop's per-step work around it."""
        self.parts.loop_step(self.images, self.target)


class TwoPassStep(SuiteStep):
    """The same model, batch and base optimizer, stepped by the hand-written `two_pass_step` with the
    settings of the config's method."""

    def __call__(self) -> None:
        net, gnp = self.parts.model, self.parts.method
        two_pass_step([p for p in net.parameters() if p.requires_grad], list(net.buffers()), gnp.base_optimizer,
                      lambda: self.closure()[0], r=gnp.r, alpha=gnp.alpha, l2=gnp.l2, max_grad_norm=gnp.max_grad_norm)
        self.passes.append(2)


@torch.no_grad()
def two_pass_step(params: list[torch.Tensor], buffers: list[torch.Tensor],
                  optimizer: torch.optim.Optimizer, loss_fn: Callable[[], torch.Tensor], *, r: float, alpha: float,
                  l2: float, max_grad_norm: float | None) -> None:
    """The official GNP update written out by hand, the fewest operations that make it: the reference
    the suite's step is timed against.

        g1 = grad L(theta) + l2 * theta,  d = g1 / ||g1||
        g2 = grad L(theta + r * d) + l2 * (theta + r * d)
        g  = clip((1 - alpha) * d + alpha * g2),  then the optimizer steps from theta

    The second pass's BatchNorm update is discarded (the buffers are restored). Nothing else: no DDP,
    loss scaling, schedules, metrics or random-state rewind (a model with dropout would need it).
    `buffers` are the model's BatchNorm statistics; every parameter must get a gradient."""
    optimizer.zero_grad(set_to_none=True)
    with torch.enable_grad():
        loss_fn().backward()
    direction = [p.grad for p in params]
    if l2:
        torch._foreach_add_(direction, params, alpha=l2)
    torch._foreach_div_(direction, torch.linalg.vector_norm(torch.stack(torch._foreach_norm(direction))))
    saved_params = [torch.empty_like(p) for p in params]
    torch._foreach_copy_(saved_params, params)
    saved_buffers = [torch.empty_like(b) for b in buffers]
    if buffers:
        torch._foreach_copy_(saved_buffers, buffers)
    torch._foreach_add_(params, direction, alpha=r)
    for p in params:
        p.grad = None
    with torch.enable_grad():
        loss_fn().backward()
    combined = [p.grad for p in params]
    if l2:
        torch._foreach_add_(combined, params, alpha=l2)
    torch._foreach_copy_(params, saved_params)
    if buffers:
        torch._foreach_copy_(buffers, saved_buffers)
    torch._foreach_mul_(combined, alpha)
    torch._foreach_add_(combined, direction, alpha=1.0 - alpha)
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
