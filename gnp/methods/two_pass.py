"""The machinery of the SAM family: a first pass at theta, a second at a perturbed point, a combination.

A method of the family says two things (see sam.py, gnp.py, asam.py): the `direction` of its
perturbation (theta' = theta + r * direction) and how it `combine`s the two gradients. Everything else
is here once: both passes draw the same random numbers (dropout, stochastic depth, ShakeDrop), BatchNorm
running statistics keep the first pass's update, the parameters come back bit for bit, each shard of a
step (each DDP replica's share of the batch, or each shard of a step that accumulates) perturbs with its
own g1 unless the perturbation is synced, and the schedules (GR warmup, hybrid steps) decide which steps
perturb. A method that takes more passes than two (GAM) defines `gradient` itself from the same parts
(`forward_backward`, `perturbed_pass`, the random-state rewind) and sets `passes`.
"""
from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn as nn

from gnp.methods.base import (NORM_FLOOR, Closure, Gradient, Method, Pass, SettingError, ShardStatistics, accumulate,
                              check_number, copies, global_norm, is_int, merge_passes, running_statistics)

RngState = tuple[torch.Tensor, dict[int, torch.Tensor]]


class TwoPassMethod(Method):
    """The shared part of SAM-family methods; subclasses define `direction` (and may define `combine`).

    Args (beyond Method's l2, max_grad_norm and grad_scaler):
        r: perturbation radius (>= 0); 0 is plain training with the base optimizer (one pass).
        sync_perturbation: False (the authors' code; SAM's "m-sharpness"): each shard of the step (each DDP
            replica's share of the batch, or each shard of `step([...])`) perturbs with its own g1 and
            combines its own two gradients; the step's gradient is their mean. True: the whole batch is one
            group: g1 is the mean over every shard of every replica, one perturbation is taken from it, g2 is
            the mean over every shard at that point, and they combine once: the full-batch step (BatchNorm
            still normalises each shard with its own batch statistics).
        warmup: GR warmup (Zhao, Zhang and Hu, ICML 2024) over the first `warmup_steps` steps, with
            f = min(1, step / warmup_steps) and steps counted from 0: "r" uses r * f, "zero" takes plain
            steps (one pass, g = g1) while f < 1; "none" (default) has none. GNP adds "lambda".
        warmup_steps: length of the GR warmup in steps; > 0 unless warmup is "none".
        two_pass_probability: hybrid training (the authors' `use_hybrid_training`): each step takes two
            passes with this probability and is a plain step otherwise; 1 (default) makes every step two-pass.
        seed: seeds the hybrid draws; the draw of step k depends only on (seed, k), so every DDP replica
            and a resumed run make the same draws.
    """

    warmups: tuple[str, ...] = ("none", "r", "zero")
    passes = 2
    label_settings = ("r",)
    setting_help = {
        "r": "perturbation radius (SAM's rho); 0 = plain training with the base optimizer (one pass)",
        "sync_perturbation": "DDP: false = each replica perturbs with its own shard's g1; true = one perturbation "
                             "from the whole batch's g1",
        "warmup": "GR warmup (follow-up paper) over warmup_epochs: none | r (r grows linearly) | zero (plain steps)",
        "warmup_steps": "length of the GR warmup (steps; a config's warmup_epochs, in epochs); > 0 unless warmup "
                        "is none",
        "two_pass_probability": "hybrid training: each step takes two passes with this probability, else one",
        "seed": "seeds the hybrid draws (the run's seed)",
    }

    def __init__(self, model: nn.Module, base_optimizer: torch.optim.Optimizer, r: float, *,
                 sync_perturbation: bool = False, warmup: str = "none", warmup_steps: int = 0,
                 two_pass_probability: float = 1.0, seed: int = 0, **settings):
        check_number("r", r, "a finite number >= 0 (0 trains with the base optimizer alone)", lambda v: v >= 0)
        if warmup not in self.warmups:
            raise SettingError("warmup", warmup, f"one of {', '.join(self.warmups)} for {type(self).__name__}")
        if not is_int(warmup_steps) or warmup_steps < 0:
            raise SettingError("warmup_steps", warmup_steps, "an integer >= 0")
        if warmup != "none" and warmup_steps == 0:
            raise SettingError("warmup_steps", warmup_steps, f"> 0 with warmup={warmup!r} (or warmup='none')")
        check_number("two_pass_probability", two_pass_probability,
                     "a number in (0, 1] (1 makes every step a two-pass step)", lambda v: 0 < v <= 1)
        if not is_int(seed):
            raise SettingError("seed", seed, "an integer")
        super().__init__(model, base_optimizer, **settings)
        self.r = float(r)
        self.sync_perturbation = bool(sync_perturbation)
        self.warmup, self.warmup_steps = warmup, warmup_steps
        self.two_pass_probability = float(two_pass_probability)
        self.seed = seed

    # --- what a method of the family says ------------------------------------------------------------

    @classmethod
    def check_contract(cls) -> None:
        if cls.direction is TwoPassMethod.direction and cls.gradient is TwoPassMethod.gradient:
            raise TypeError(f"{cls.__name__} defines no direction(params, g1, g1_norm): a TwoPassMethod says how it "
                            f"perturbs (theta' = theta + r * direction); docs/methods.md: Adding a method")
        super().check_contract()

    def direction(self, params: list[nn.Parameter], g1: list[torch.Tensor],
                  g1_norm: torch.Tensor) -> list[torch.Tensor]:
        """The perturbation's direction: theta' = theta + r * direction. It may reuse g1's tensors."""
        raise NotImplementedError

    def combine(self, g2: list[torch.Tensor], direction: list[torch.Tensor], g1_norm: torch.Tensor,
                schedule: dict[str, float]) -> None:
        """Turn the second pass's gradient, in place, into the final one. Default: g = g2 (SAM).

        `direction` is what `direction` returned (for SAM's, g1 / ||g1|| in g1's own tensors: times
        `g1_norm` gives g1 back) and `schedule` the step's hyperparameters."""

    def needs_second_pass(self, schedule: dict[str, float]) -> bool:
        """Whether the second pass contributes to this step's gradient (else the direction is the gradient)."""
        return True

    def schedule(self, step: int) -> tuple[dict[str, float], bool]:
        """The hyperparameters in force at `step` (counted from 0), as the step reports them (and metrics.jsonl
        logs them), and whether the step perturbs (else it is a plain one-pass step)."""
        if self.warmup == "zero" and self.warmup_progress(step) < 1:
            return {"r": 0.0}, False
        r = self.r * self.warmup_progress(step) if self.warmup == "r" else self.r
        # An r warmup starts from r = 0 and still takes two passes there (g2 = g1), as the authors' step
        # does; only a configured r = 0 means plain training.
        return {"r": r}, self.r > 0 and self._draws_two_pass(step)

    # --- the shared part -------------------------------------------------------------------------------

    def warmup_progress(self, step: int) -> float:
        return 1.0 if self.warmup == "none" else min(1.0, step / self.warmup_steps)

    def expected_passes(self, total_steps: int) -> float:
        schedule, _ = self.schedule(self.warmup_steps)  # the hyperparameters once any warmup is over
        if not self.r or not self.needs_second_pass(schedule):
            return 1.0
        plain_warmup = min(total_steps, self.warmup_steps) if self.warmup == "zero" else 0
        perturbing = self.two_pass_probability * (total_steps - plain_warmup) / max(total_steps, 1)
        return 1.0 + (self.passes - 1) * perturbing

    def _draws_two_pass(self, step: int) -> bool:
        """The hybrid draw of `step`: True with probability `two_pass_probability`.

        Drawn on the host from (seed, step) alone: no device synchronisation, torch's generators untouched,
        the same on every replica and again after a resume.
        """
        if self.two_pass_probability == 1:
            return True
        return random.Random(f"{self.seed}:{step}").random() < self.two_pass_probability

    def shards_gradient(self, shards: list[Closure], params: list[nn.Parameter],
                        scale: torch.Tensor | None) -> Gradient:
        schedule, perturbs = self.schedule(self.steps_taken)
        if perturbs and self.sync_perturbation and (self.ddp or len(shards) > 1):
            return self.synced_gradient(shards, params, scale, schedule)
        return super().shards_gradient(shards, params, scale)

    def gradient(self, closure: Closure, params: list[nn.Parameter], scale: torch.Tensor | None) -> Gradient:
        """The step of one shard: its first pass, its own perturbation, its second pass, combined."""
        schedule, perturbs = self.schedule(self.steps_taken)
        if not perturbs:
            return self.plain_gradient(closure, params, scale, schedule)
        rng_before = rng_state(params)
        first = self.forward_backward(closure, params, sync=False, scale=scale)
        g1_norm = global_norm(first.grads)
        direction = self.direction(params, first.grads, g1_norm)
        if not self.needs_second_pass(schedule):
            return Gradient(first, first, g1_norm, self.ddp, schedule)

        rng_after = rng_state(params)
        perturbed = self.perturbed_pass(closure, params, scale, direction, schedule["r"], rng_before)
        set_rng_state(rng_after)
        self.combine(perturbed.grads, direction, g1_norm, schedule)
        self.keep_first_pass_overflow(perturbed.grads, g1_norm, scale)
        return Gradient(first, perturbed, g1_norm, self.ddp, schedule, self.passes)

    def synced_gradient(self, shards: list[Closure], params: list[nn.Parameter], scale: torch.Tensor | None,
                        schedule: dict[str, float]) -> Gradient:
        """sync_perturbation: the whole batch is one group. g1 is the mean over every shard of every replica,
        the one perturbation is taken from it, g2 is the mean over every shard at that point, and they
        combine once; the result is the same on every replica."""
        lone = len(shards) == 1  # DDP averages a lone shard's first pass itself, during its backward
        statistics = ShardStatistics(self.model, len(shards))
        firsts, rng_states, g1 = [], [], None
        for index, closure in enumerate(shards):
            statistics.before(index)
            rng_before = rng_state(params)
            firsts.append(self.forward_backward(closure, params, sync=lone, scale=scale))
            rng_states.append((rng_before, rng_state(params)))
            statistics.after(index)
            g1 = accumulate(g1, params)
        statistics.average()
        if not lone:
            torch._foreach_div_(g1, len(shards))
            if self.ddp:
                self.average_over_replicas(g1)
        g1_norm = global_norm(g1)
        direction = self.direction(params, g1, g1_norm)
        first = merge_passes(firsts, g1)
        if not self.needs_second_pass(schedule):
            set_grads(params, direction)
            return Gradient(first, first, g1_norm, False, schedule)

        seconds, g2 = [], None
        with self.perturbed(params, direction, schedule):
            for closure, (rng_before, _) in zip(shards, rng_states):
                set_rng_state(rng_before)
                seconds.append(self.forward_backward(closure, params, sync=False, scale=scale))
                g2 = accumulate(g2, params)
            set_rng_state(rng_states[-1][1])
        if not lone:
            torch._foreach_div_(g2, len(shards))
        if self.ddp:
            self.average_over_replicas(g2)
        self.combine(g2, direction, g1_norm, schedule)
        self.keep_first_pass_overflow(g2, g1_norm, scale)
        set_grads(params, g2)
        return Gradient(first, merge_passes(seconds, g2), g1_norm, False, schedule, self.passes)

    def perturbed_pass(self, closure: Closure, params: list[nn.Parameter], scale: torch.Tensor | None,
                       direction: list[torch.Tensor], r: float, rng: RngState) -> Pass:
        """A pass of this replica at theta + r * direction with the random state `rng` (the first pass's, so
        that dropout and ShakeDrop draw the same); the parameters and BatchNorm statistics come back after it.
        The gradients it finds are new tensors: those in `p.grad` before live on where the method keeps them."""
        with self.perturbed(params, direction, {"r": r}):
            for p in params:
                p.grad = None
            set_rng_state(rng)
            return self.forward_backward(closure, params, sync=False, scale=scale)

    @contextmanager
    def perturbed(self, params: list[nn.Parameter], direction: list[torch.Tensor],
                  schedule: dict[str, float]) -> Iterator[None]:
        """Inside: the parameters at theta + r * direction. Afterwards they, and BatchNorm's running
        statistics (which the passes inside update), are back bit for bit."""
        saved_params = copies(params)
        running_stats = running_statistics(self.model)
        saved_stats = copies(running_stats)
        torch._foreach_add_(params, direction, alpha=schedule["r"])
        # An autocast region around `step` caches low-precision copies of the weights and would hand the
        # second pass (and whatever follows the step) copies of weights no longer current.
        torch.clear_autocast_cache()
        try:
            yield
        finally:
            torch._foreach_copy_(params, saved_params)
            torch.clear_autocast_cache()
            if running_stats:
                torch._foreach_copy_(running_stats, saved_stats)

    def keep_first_pass_overflow(self, final: list[torch.Tensor], g1_norm: torch.Tensor,
                                 scale: torch.Tensor | None) -> None:
        """GradScaler skips a step on an inf or NaN in the final gradient: a first pass's overflow must reach
        it even where the combination drops g1 (SAM's g = g2). 0 * ||g1|| is 0 or NaN."""
        if scale is not None:
            final[0].add_(g1_norm * 0)


def unit(g1: list[torch.Tensor], g1_norm: torch.Tensor) -> list[torch.Tensor]:
    """g1 / ||g1||, in place in g1's tensors (a zero gradient stays zero)."""
    torch._foreach_div_(g1, g1_norm.clamp_min(NORM_FLOOR))
    return g1


def set_grads(params: list[nn.Parameter], grads: list[torch.Tensor]) -> None:
    for p, g in zip(params, grads):
        p.grad = g


def rng_state(params: list[nn.Parameter]) -> RngState:
    """The CPU generator's state and that of every CUDA device holding parameters."""
    cuda_devices = {p.device.index for p in params if p.device.type == "cuda"}
    cuda = {i: torch.cuda.get_rng_state(i) for i in cuda_devices}
    return torch.get_rng_state(), cuda


def set_rng_state(state: RngState) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    for index, cuda_state in cuda.items():
        torch.cuda.set_rng_state(cuda_state, index)

