"""Checks a composed config before any work starts: each error names the key, the value and what
is allowed, and an unknown key names its closest valid spelling.

The method's settings are its class's (`method._target_`): the keys it accepts are its constructor's
arguments and its checks are the constructor's own, run here on a probe model before any run directory
exists. `method_settings` turns the config into those arguments, for the check and for the real build.
"""
from __future__ import annotations

import importlib
import inspect
import re
import textwrap
from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn
import yaml
from omegaconf import DictConfig

from gnp import methods
from gnp.augment import build_augmentation
from gnp.checks import is_int, is_number
from gnp.console import first_line
from gnp.data import DATASETS, TRAIN_SIZES, shards_problem, training_batch_problem
from gnp.methods import Method, SettingError
from gnp.models import check_model_options, normalises_with_batch_statistics
from gnp.schema import SHARED_OPTIMIZER_KEYS, ConfigError, check_keys
from gnp.tracking import has_wandb_credentials

# The class of each base optimizer a config names (conf/optimizer/<name>.yaml, whose keys beyond the shared
# ones are the class's own arguments: SGD's momentum and nesterov, AdamW's betas and eps).
BASE_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}
WEIGHT_DECAY_MODES = ("loss", "optimizer")
WANDB_MODES = ("auto", "online", "offline", "disabled")
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "fp64")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
AUTO_OR_BOOL = "auto, true or false"

def _check(ok: bool, key: str, value, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: {allowed}")


def validate(cfg: DictConfig, *, check_environment: bool = True) -> None:
    """Raise ConfigError on the first unknown key or invalid value.

    `check_environment=False` skips what depends on the machine that will run the job (a visible
    GPU, W&B credentials), for a sweep checked on a login node before it goes to a cluster.
    """
    check_keys(cfg)
    t, o, d = cfg.train, cfg.optimizer, cfg.dataset
    _check(is_int(t.epochs) and t.epochs >= 1, "train.epochs", t.epochs, "must be an integer >= 1")
    _check(is_int(t.batch_size) and t.batch_size >= 1, "train.batch_size", t.batch_size, "must be an integer >= 1")
    _check(t.shards == "auto" or (is_int(t.shards) and t.shards >= 1), "train.shards", t.shards,
           "must be auto (one shard per process) or an integer >= 1")
    _check(is_int(t.eval_batch_size) and t.eval_batch_size >= 1, "train.eval_batch_size", t.eval_batch_size,
           "must be an integer >= 1")
    _check(is_number(t.warmup_epochs) and 0 <= t.warmup_epochs < t.epochs, "train.warmup_epochs",
           t.warmup_epochs, f"must be in [0, train.epochs={t.epochs})")
    _check(is_number(t.label_smoothing) and 0 <= t.label_smoothing < 1, "train.label_smoothing",
           t.label_smoothing, "must be in [0, 1)")
    _check(t.progress in ("auto", True, False), "train.progress", t.progress, AUTO_OR_BOOL)
    _check(is_number(t.checkpoint_minutes) and t.checkpoint_minutes >= 0, "train.checkpoint_minutes",
           t.checkpoint_minutes, "must be a number of minutes >= 0 (0 = only at the end of each epoch)")
    _check(is_int(t.sync_every) and t.sync_every >= 1, "train.sync_every", t.sync_every,
           "must be an integer >= 1 (steps between reads of the device's flags)")
    _check(is_number(t.ema_decay) and 0 <= t.ema_decay < 1, "train.ema_decay", t.ema_decay,
           "must be in [0, 1) (0 = no weight EMA; 0.999 is typical)")
    _check(t.channels_last in ("auto", True, False), "train.channels_last", t.channels_last, AUTO_OR_BOOL)
    _check(t.compile in (True, False) or t.compile in COMPILE_MODES, "train.compile", t.compile,
           f"choose false, true or a torch.compile mode ({', '.join(COMPILE_MODES)})")

    _check(o.name in BASE_OPTIMIZERS, "optimizer.name", o.name, f"choose one of {', '.join(BASE_OPTIMIZERS)}")
    _check(is_number(o.lr) and o.lr > 0, "optimizer.lr", o.lr, "must be a number > 0")
    _check(is_number(o.weight_decay) and o.weight_decay >= 0, "optimizer.weight_decay", o.weight_decay,
           "must be a number >= 0")
    _check(o.weight_decay_mode in WEIGHT_DECAY_MODES, "optimizer.weight_decay_mode", o.weight_decay_mode,
           "choose loss (L2 inside the loss, as the official code) or optimizer (the base optimizer's own)")
    _check(isinstance(o.decay_norm_and_bias, bool), "optimizer.decay_norm_and_bias", o.decay_norm_and_bias,
           "true (decay every parameter, as the official code) or false (no decay on biases and norm weights)")
    _check(o.fused in ("auto", True, False), "optimizer.fused", o.fused, AUTO_OR_BOOL)
    if "momentum" in o:
        _check(is_number(o.momentum) and 0 <= o.momentum < 1, "optimizer.momentum", o.momentum, "must be in [0, 1)")
        _check(o.nesterov in (True, False), "optimizer.nesterov", o.nesterov, "true or false")
        _check(not o.nesterov or o.momentum > 0, "optimizer.nesterov", o.nesterov,
               "Nesterov needs momentum > 0; with optimizer.momentum=0 set optimizer.nesterov=false too")
    if "betas" in o:
        betas = list(o.betas) if isinstance(o.betas, Sequence) and not isinstance(o.betas, str) else o.betas
        _check(isinstance(betas, list) and len(betas) == 2 and all(is_number(b) and 0 <= b < 1 for b in betas),
               "optimizer.betas", betas, "must be two numbers in [0, 1), e.g. [0.9,0.999]")
    if "eps" in o:
        _check(is_number(o.eps) and o.eps > 0, "optimizer.eps", o.eps, "must be a number > 0")

    _check(d.name in DATASETS, "dataset.name", d.name, f"choose one of {', '.join(DATASETS)}")
    for key in ("limit_train", "limit_test"):
        value = d[key]
        _check(value is None or (is_int(value) and value >= 1), f"dataset.{key}", value,
               "must be null (all images) or an integer >= 1")
    # The dataset's published size stands in for the one on disk, so a sweep's jobs are judged before
    # any starts; the loop checks the images it loaded, and the split over its processes, with the same function.
    problem = training_batch_problem(t.batch_size, _nominal_train_size(cfg))
    if problem:
        raise ConfigError(problem)
    probe_method(cfg)
    _check(cfg.wandb.mode in WANDB_MODES, "wandb.mode", cfg.wandb.mode, f"choose one of {', '.join(WANDB_MODES)}")
    try:  # the model registry and the augmentation check their own options
        check_model_options(cfg.model.name, [key for key in cfg.model if key != "name"])
        build_augmentation(cfg.aug, mean=d.mean)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if t.shards != "auto":  # the processes that take the shards are checked when they start
        problem = shards_problem(t.shards, t.batch_size, normalises_with_batch_statistics(**model_options(cfg)))
        if problem:
            raise ConfigError(problem)
    _check(cfg.precision in PRECISIONS, "precision", cfg.precision, f"choose one of {', '.join(PRECISIONS)}")
    _check(is_int(cfg.seed) and cfg.seed >= 0, "seed", cfg.seed, "must be an integer >= 0")
    _check(cfg.init_seed is None or (is_int(cfg.init_seed) and cfg.init_seed >= 0), "init_seed", cfg.init_seed,
           "must be null (= seed) or an integer >= 0")
    check_device(cfg.device, check_environment)
    if check_environment and cfg.wandb.mode == "online" and not has_wandb_credentials():
        raise ConfigError("wandb.mode=online needs W&B credentials: run `wandb login` or set WANDB_API_KEY, "
                          "or log locally with wandb.mode=offline")


# What the run gives a method besides its own config keys, matched by the name of a constructor argument (its
# own or a base's): the in-loss L2 coefficient, the run's seed, the float16 GradScaler and the GR warmup's steps.
RUN_SETTINGS = {"l2": "optimizer.weight_decay_mode=loss", "seed": "seed", "grad_scaler": "precision=fp16",
                "warmup_steps": "method.warmup_epochs"}
_METHOD_KEYS = ("_target_", "name")  # the config's own keys of a method: its class, and its name in outputs
# Where the suite's method configs differ from the constructors' defaults, for every method: the authors' code
# clips the final gradient at norm 5, where a method built in Python clips only when asked.
SUITE_SETTINGS = {"max_grad_norm": 5.0}
SETTINGS_FILE_WIDTH = 120  # the generated settings files' lines, comments included


def config_settings(cls: type[Method]) -> dict:
    """The settings a config of `cls` gives, at their values in the suite's configs: each argument of the
    constructor the run does not fill in (warmup_steps as method.warmup_epochs) at its default, or the suite's
    (SUITE_SETTINGS); "???" (Hydra's "required") where the constructor has no default."""
    settings = {}
    for key, default in cls.setting_defaults().items():
        if key == "warmup_steps":
            settings["warmup_epochs"] = 0 if default == 0 else "???"  # steps cannot be said in epochs
        elif key not in RUN_SETTINGS:
            settings[key] = SUITE_SETTINGS.get(key, "???" if default is inspect.Parameter.empty else default)
    return settings


def method_class(method: Mapping) -> type[Method]:
    """The class `method._target_` names: a subclass of gnp.methods.Method."""
    target = method.get("_target_")
    module, _, name = target.rpartition(".") if isinstance(target, str) else ("", "", "")
    try:
        cls = getattr(importlib.import_module(module), name) if module else None
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"method._target_={target} cannot be imported ({e}); name a class as module.Class on "
                          f"the Python path (PYTHONPATH), e.g. gnp.methods.GNP") from None
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise ConfigError(f"method._target_={target!r} is invalid: name a subclass of gnp.methods.Method as "
                          f"module.Class, e.g. gnp.methods.GNP (every conf/method/*.yaml has one)")
    return cls


def settings_file(name: str) -> str:
    """conf/method/settings/<name>.yaml for the class gnp.methods.<name>: its `_target_` and `config_settings`,
    each setting with its meaning (the class's `setting_meanings`) as its comment."""
    suite = ", ".join(f"{key}: {value}" for key, value in SUITE_SETTINGS.items())
    header = (f"# Generated from the constructor of gnp.methods.{name} by `python scripts/method_settings.py`: do not\n"
              f"# edit. Every setting of a config of {name} at the constructor's default, commented with its\n"
              f"# setting_help, but {suite} (gnp.config.SUITE_SETTINGS). conf/method/*.yaml build on it.\n")
    cls = getattr(methods, name)
    meanings = cls.setting_meanings()
    constructor_key = {run.removeprefix("method."): key for key, run in RUN_SETTINGS.items()
                       if run.startswith("method.")}  # warmup_epochs: warmup_steps
    lines = {key: yaml.safe_dump({key: value}).rstrip("\n") for key, value in config_settings(cls).items()}
    column = max(map(len, lines.values())) + 2
    body = [f"_target_: gnp.methods.{name}"]
    for key, line in lines.items():
        # a long meaning goes on under its first line, at the same column (docs read it as one comment)
        text = textwrap.wrap(meanings[constructor_key.get(key, key)], SETTINGS_FILE_WIDTH - column - 2)
        body += [f"{line:<{column}}# {text[0]}", *(f"{'':<{column}}# {more}" for more in text[1:])]
    return header + "\n".join(body) + "\n"


def method_class_names() -> list[str]:
    """The classes gnp.methods exports that a config can build (not the bases, which say no gradient)."""
    names = []
    for name in methods.__all__:
        cls = getattr(methods, name)
        if isinstance(cls, type) and issubclass(cls, Method):
            try:
                cls.check_contract()
                names.append(name)
            except TypeError:
                continue
    return names


def method_label(method: Mapping) -> str:
    """The settings that tell a method's runs apart (its class's `label_settings`), e.g. `r=0.1 alpha=0.8`."""
    return " ".join(f"{key}={method[key]:g}" if is_number(method[key]) else f"{key}={method[key]}"
                    for key in method_class(method).label_settings if key in method)


def _nominal_train_size(cfg: DictConfig) -> int:
    """The training images a run uses if its dataset has the published size, cut at dataset.limit_train."""
    n = TRAIN_SIZES[cfg.dataset.name]
    return n if cfg.dataset.limit_train is None else min(n, cfg.dataset.limit_train)


def train_steps_per_epoch(cfg: DictConfig) -> int:
    """Steps per epoch of a dataset of the published size: floor(training images / global batch)."""
    return _nominal_train_size(cfg) // cfg.train.batch_size


def method_settings(cfg: DictConfig, steps_per_epoch: int,
                    grad_scaler: torch.amp.GradScaler | None = None) -> dict:
    """The keyword arguments of the method's constructor: its config keys (warmup_epochs as warmup_steps)
    and, where the constructor takes them, the in-loss L2 of the optimizer config, the seed and the scaler."""
    m, o = cfg.method, cfg.optimizer
    cls = method_class(m)
    accepted = cls.setting_names()
    own = [*_METHOD_KEYS, *(k for k in accepted if k not in RUN_SETTINGS),
           *(["warmup_epochs"] if "warmup_steps" in accepted else [])]
    unknown = [key for key in m if key not in own]
    if unknown:
        raise ConfigError(f"method.{unknown[0]} is not a key of method={m.get('name')} ({cls.__name__}); its keys: "
                          f"{', '.join(f'method.{k}' for k in own)}")
    if not isinstance(m.get("name"), str) or not m.name:
        raise ConfigError(f"method.name={m.get('name')!r} is invalid: give the method a name (it names run "
                          f"directories and table columns)")
    settings = {k: v for k, v in m.items() if k not in (*_METHOD_KEYS, "warmup_epochs")}
    run = {"seed": cfg.seed, "grad_scaler": grad_scaler,
           "l2": o.weight_decay if o.weight_decay_mode == "loss" else 0.0}
    if "warmup_epochs" in m:
        _check(is_number(m.warmup_epochs) and 0 <= m.warmup_epochs <= cfg.train.epochs, "method.warmup_epochs",
               m.warmup_epochs, f"must be in [0, train.epochs={cfg.train.epochs}]")
        run["warmup_steps"] = round(m.warmup_epochs * steps_per_epoch)
    for key, needed in (("l2", run["l2"] > 0), ("grad_scaler", grad_scaler is not None)):
        if needed and key not in accepted:
            raise ConfigError(f"method={m.name} ({cls.__name__}) takes no {key}, which {RUN_SETTINGS[key]} needs: "
                              f"choose another setting or a method that takes it")
    return {**settings, **{k: v for k, v in run.items() if k in accepted and v is not None}}


def build_method(cfg: DictConfig, model: nn.Module, base_optimizer: torch.optim.Optimizer, steps_per_epoch: int,
                 grad_scaler: torch.amp.GradScaler | None = None) -> Method:
    """The config's method around `base_optimizer`. Whatever its constructor refuses is a one-line ConfigError:
    a SettingError names the key; any other ValueError or TypeError (a plug-in's own check, a class that breaks
    the contract of gnp.methods) names the method and says what the constructor said."""
    cls = method_class(cfg.method)
    settings = method_settings(cfg, steps_per_epoch, grad_scaler)
    try:
        return cls(model, base_optimizer, **settings)
    except SettingError as e:
        if e.name != "warmup_steps":
            raise ConfigError(f"method.{e}") from None
        epochs = cfg.method.warmup_epochs
        raise ConfigError(f"method.warmup_epochs={epochs} is invalid: " + (
            f"it rounds to 0 of the {steps_per_epoch} steps per epoch; use at least {1 / steps_per_epoch:.3g}"
            if epochs else f"must be > 0 with method.warmup={cfg.method.warmup}")) from None
    except (ValueError, TypeError) as e:
        raise ConfigError(f"method={cfg.method.name} ({cls.__name__}) refused its settings: {first_line(e)}") from None


def probe_method(cfg: DictConfig) -> Method:
    """The method's constructor checks its settings, on a probe model, before any run exists; returns
    the probe's method (what it says of itself holds for the real one)."""
    probe = nn.Linear(1, 1)
    return build_method(cfg, probe, torch.optim.SGD(probe.parameters(), lr=1.0), max(train_steps_per_epoch(cfg), 1),
                        torch.amp.GradScaler("cpu") if cfg.precision == "fp16" else None)


def method_passes(cfg: DictConfig) -> float:
    """Mean forward/backward passes per step of the config's method over its whole run (cost estimates)."""
    return probe_method(cfg).expected_passes(cfg.train.epochs * train_steps_per_epoch(cfg))


def optimizer_arguments(optimizer: DictConfig) -> dict:
    """The base optimizer's own arguments: the keys of its config beyond the shared ones (lists as tuples)."""
    return {key: tuple(value) if isinstance(value, Sequence) and not isinstance(value, str) else value
            for key, value in optimizer.items() if key not in SHARED_OPTIMIZER_KEYS}


def model_options(cfg: DictConfig) -> dict:
    """The model's name and its builder's options, from the config's `model` section."""
    return {"name": cfg.model.name, **{k: v for k, v in cfg.model.items() if k != "name"}}


def resolve_shards(cfg: DictConfig, world_size: int) -> int:
    """train.shards as a number: `auto` is one shard per process."""
    return world_size if cfg.train.shards == "auto" else cfg.train.shards


def check_device(device: str, check_environment: bool = True) -> None:
    """`auto`, `cpu`, `cuda` or `cuda:N`, and a CUDA device must exist when one is named."""
    _check(isinstance(device, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", device) is not None, "device", device,
           "choose auto (a GPU when there is one), cpu, cuda or cuda:N")
    if not check_environment or not device.startswith("cuda"):
        return
    count = torch.cuda.device_count()
    index = int(device.partition(":")[2] or 0)
    if index >= count:
        visible = f"only {count} CUDA device(s) are visible" if count else "no CUDA device is visible"
        raise ConfigError(f"device={device} is not available: {visible}; use device=auto or device=cpu")
