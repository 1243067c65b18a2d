"""Checks a composed config before any work starts: each error names the key, the value and what
is allowed."""
from __future__ import annotations

from omegaconf import DictConfig

from gnp.augment import build_augmentation
from gnp.data import DATASETS
from gnp.models import check_model_options

OPTIMIZERS = ("sgd", "adamw")
WEIGHT_DECAY_MODES = ("loss", "optimizer")
WANDB_MODES = ("auto", "online", "offline", "disabled")
PRECISIONS = ("auto", "fp32", "bf16")


class ConfigError(ValueError):
    """A config value is out of range; the message names the key, the value and what is allowed."""


def _check(ok: bool, key: str, value, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: {allowed}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError on the first invalid value."""
    t, m, o, d = cfg.train, cfg.method, cfg.optimizer, cfg.dataset
    _check(_is_int(t.epochs) and t.epochs >= 1, "train.epochs", t.epochs, "must be an integer >= 1")
    _check(_is_int(t.batch_size) and t.batch_size >= 1, "train.batch_size", t.batch_size, "must be an integer >= 1")
    _check(_is_int(t.eval_batch_size) and t.eval_batch_size >= 1, "train.eval_batch_size", t.eval_batch_size,
           "must be an integer >= 1")
    _check(_is_number(t.warmup_epochs) and 0 <= t.warmup_epochs < t.epochs, "train.warmup_epochs",
           t.warmup_epochs, f"must be in [0, train.epochs={t.epochs})")
    _check(_is_number(t.label_smoothing) and 0 <= t.label_smoothing < 1, "train.label_smoothing",
           t.label_smoothing, "must be in [0, 1)")
    _check(_is_number(o.lr) and o.lr > 0, "optimizer.lr", o.lr, "must be a number > 0")
    _check(o.name in OPTIMIZERS, "optimizer.name", o.name, f"choose one of {', '.join(OPTIMIZERS)}")
    _check(_is_number(o.weight_decay) and o.weight_decay >= 0, "optimizer.weight_decay", o.weight_decay,
           "must be a number >= 0")
    _check(o.weight_decay_mode in WEIGHT_DECAY_MODES, "optimizer.weight_decay_mode", o.weight_decay_mode,
           "choose loss (L2 inside the loss, as the official code) or optimizer (the base optimizer's own)")
    _check(_is_number(m.r) and m.r >= 0, "method.r", m.r, "must be a number >= 0")
    _check(_is_number(m.alpha) and 0 <= m.alpha <= 1, "method.alpha", m.alpha, "must be in [0, 1]")
    _check(m.name != "sam" or m.alpha == 1, "method.alpha", m.alpha,
           "method=sam is alpha=1 by definition; use method=gnp for other values")
    _check(m.max_grad_norm is None or (_is_number(m.max_grad_norm) and m.max_grad_norm > 0),
           "method.max_grad_norm", m.max_grad_norm, "must be a number > 0, or null for no clipping")
    _check(d.name in DATASETS, "dataset.name", d.name, f"choose one of {', '.join(DATASETS)}")
    for key in ("limit_train", "limit_test"):
        value = d[key]
        _check(value is None or (_is_int(value) and value >= 1), f"dataset.{key}", value,
               "must be null (all images) or an integer >= 1")
    _check(cfg.wandb.mode in WANDB_MODES, "wandb.mode", cfg.wandb.mode, f"choose one of {', '.join(WANDB_MODES)}")
    try:  # the model registry and the augmentation check their own options
        check_model_options(cfg.model.name, [key for key in cfg.model if key != "name"])
        build_augmentation(cfg.aug, mean=d.mean)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _check(cfg.precision in PRECISIONS, "precision", cfg.precision, f"choose one of {', '.join(PRECISIONS)}")
    _check(_is_int(cfg.seed) and cfg.seed >= 0, "seed", cfg.seed, "must be an integer >= 0")
