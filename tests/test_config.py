"""Every config choice composes and validates; each bad value fails early with a message that names
the key, the value and what is allowed; the entry point's CLI works."""
import pytest
import torch
import yaml

from conftest import CONF, compose_config, train_py
from gnp.config import (BASE_OPTIMIZERS, SUITE_SETTINGS, ConfigError, build_method, config_settings, method_class,
                        method_class_names, settings_file, validate)
from gnp.methods import GSAM, LookSAM
from gnp.schema import OPTIMIZER_SCHEMA, SCHEMA, SHARED_OPTIMIZER_KEYS
from gnp.training import build_optimizer

GROUPS = ["dataset", "model", "method", "optimizer", "aug", "experiment"]
CHOICES = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]


def test_the_required_choices_exist():
    names = set(CHOICES)
    for required in [("dataset", "cifar10"), ("dataset", "cifar100"), ("dataset", "digits"), ("model", "resnet18"),
                     ("method", "plain"), ("method", "sam"), ("method", "gnp"), ("method", "asam"), ("optimizer", "sgd"),
                     ("optimizer", "adamw"), ("aug", "none"), ("aug", "basic"), ("aug", "cutout"),
                     ("aug", "autoaugment")]:
        assert required in names


@pytest.mark.parametrize("group,choice", CHOICES)
def test_every_choice_composes_and_validates(group, choice):
    cfg = compose_config(f"{group}={choice}")
    validate(cfg)
    if group != "experiment":
        assert cfg[group].name == choice or (group, choice) == ("model", "vit")


def test_default_is_the_official_gnp_recipe():
    cfg = compose_config()
    assert (cfg.method.name, cfg.method.r, cfg.method.alpha) == ("gnp", 0.1, 0.8)
    assert cfg.method.normalize_first_grad is True and cfg.method.max_grad_norm == 5.0
    assert (cfg.optimizer.weight_decay, cfg.optimizer.weight_decay_mode) == (1e-3, "loss")
    assert cfg.optimizer.nesterov is True and cfg.train.batch_size == 256 and cfg.train.epochs == 200


@pytest.mark.parametrize("override,message", [
    ("train.epochs=0", "train.epochs=0 is invalid: must be an integer >= 1"),
    ("train.batch_size=0", "train.batch_size=0 is invalid: must be an integer >= 1"),
    ("optimizer.lr=0", "optimizer.lr=0 is invalid: must be a number > 0"),
    ("optimizer.lr=-0.1", "optimizer.lr=-0.1 is invalid"),
    ("method.alpha=1.5", r"method.alpha=1.5 is invalid: alpha must be a number in \[0, 1\]"),
    ("method.alpha=-0.1", r"method.alpha=-0.1 is invalid: alpha must be a number in \[0, 1\]"),
    ("method.r=-0.01", "method.r=-0.01 is invalid: r must be a finite number >= 0"),
    ("model.name=resnet7", "model.name='resnet7' is not a known model; choose one of: .*resnet18"),
    ("+model.depth=20", "model 'resnet18' has no option.s. depth; its options are: width"),
    ("aug.name=randaugment", "aug.name='randaugment' is not a known augmentation"),
    ("optimizer.weight_decay_mode=both", "optimizer.weight_decay_mode='both' is invalid"),
    ("wandb.mode=maybe", "wandb.mode='maybe' is invalid: choose one of auto, online, offline, disabled"),
    ("dataset.limit_train=0", "dataset.limit_train=0 is invalid"),
    ("optimizer.momentum=1", r"optimizer.momentum=1 is invalid: must be in \[0, 1\)"),
    ("optimizer.momentum=0", "optimizer.nesterov=True is invalid: Nesterov needs momentum > 0"),
    ("optimizer=adamw optimizer.betas=[0.9,1.0]", r"optimizer.betas=\[0.9, 1.0\] is invalid: must be two numbers"),
    ("optimizer=adamw optimizer.betas=0.9", "optimizer.betas=0.9 is invalid: must be two numbers in"),
    ("optimizer=adamw optimizer.eps=0", "optimizer.eps=0 is invalid: must be a number > 0"),
    ("train.shards=0", "train.shards=0 is invalid: must be auto .one shard per process. or an integer >= 1"),
    ("train.shards=some", "train.shards='some' is invalid: must be auto"),
    ("train.shards=3", "train.shards=3 is invalid: it must divide train.batch_size=256 into equal shards; use a "
                       "divisor of 256"),
    ("train.shards=256", "train.shards=256 is invalid: a shard of 1 image cannot give BatchNorm batch statistics; "
                         "use at most 128 shards for train.batch_size=256"),
    ("precision=fp8", "precision='fp8' is invalid: choose one of auto, fp32, bf16, fp16, fp64"),
])
def test_bad_values_name_key_value_and_range(override, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose_config(*override.split()))


def test_shards_of_one_image_are_refused_only_where_batchnorm_needs_two():
    validate(compose_config("model=vit_ti", "train.shards=256"))  # LayerNorm normalises each image on its own
    validate(compose_config("train.shards=128"))


def test_a_method_takes_the_keys_of_its_class_only():
    """SAM has no alpha (it is alpha = 1 by definition); GNP has one."""
    with pytest.raises(ConfigError, match=r"^method.alpha is not a key of method=sam \(SAM\); its keys: "):
        validate(compose_config("method=sam", "+method.alpha=0.5"))
    validate(compose_config("method=gnp", "method.alpha=0.5"))


def test_cli_prints_the_composed_config_and_rejects_bad_values_before_training(tmp_path):
    shown = train_py("--cfg", "job", "method=sam", "model=resnet18")
    assert shown.returncode == 0 and "name: sam" in shown.stdout and "rho" not in shown.stdout
    bad = train_py("method.alpha=2", f"hydra.run.dir={tmp_path}", "wandb.mode=disabled")
    assert bad.returncode == 2
    assert "error: method.alpha=2 is invalid: alpha must be a number in [0, 1] (1 is SAM, 0 the base optimizer)" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "checkpoint.pt").exists()


METHOD_CONFIGS = [p.stem for p in sorted((CONF / "method").glob("*.yaml"))]


def _stated(name: str) -> dict:
    """What conf/method/<name>.yaml states itself, and the method configs it builds on (not the settings files)."""
    own = yaml.safe_load((CONF / "method" / f"{name}.yaml").read_text())
    bases = [entry for entry in own.pop("defaults", []) if entry != "_self_" and not entry.startswith("settings/")]
    return {**{k: v for base in bases for k, v in _stated(base).items()}, **own}


def test_the_settings_files_are_what_the_constructors_say():
    """conf/method/settings/ is generated: `python scripts/method_settings.py` rewrites a file this finds stale."""
    names = method_class_names()
    assert {"Plain", "SAM", "GNP", "ASAM", "GSAM", "GAM", "LookSAM", "FriendlySAM", "WSAM"} == set(names)
    assert sorted(p.stem for p in (CONF / "method" / "settings").glob("*.yaml")) == sorted(names)
    for name in names:
        assert (CONF / "method" / "settings" / f"{name}.yaml").read_text() == settings_file(name), name


@pytest.mark.parametrize("name", METHOD_CONFIGS)
def test_a_method_config_gets_what_its_class_gets_in_python(name):
    """Every setting of the class is in the config (so `method.KEY=...` needs no +), at the constructor's default
    unless the config states it, and what a config states differs from that default (nothing said twice): the
    method built from the config equals the one Python builds with the config's own settings alone."""
    cfg = compose_config(f"method={name}", "optimizer.weight_decay_mode=optimizer")  # no in-loss L2: l2's default
    cls = method_class(cfg.method)
    stated = {k: v for k, v in _stated(name).items() if k != "name"}
    assert set(cfg.method) == {"_target_", "name", *config_settings(cls)}
    assert all(value != config_settings(cls)[key] for key, value in stated.items()), stated
    steps = 3
    python = {("warmup_steps" if k == "warmup_epochs" else k): v * steps if k == "warmup_epochs" else v
              for k, v in {**SUITE_SETTINGS, **stated}.items()}
    probe = torch.nn.Linear(1, 1)
    from_config = build_method(cfg, probe, torch.optim.SGD(probe.parameters(), lr=1.0), steps)
    from_python = cls(probe, torch.optim.SGD(probe.parameters(), lr=1.0), **python)
    settings = [k for k, v in vars(from_python).items() if v is None or isinstance(v, (bool, int, float, str))]
    assert set(cls.setting_names()) <= set(settings)  # each kept as an attribute of its own name
    assert {k: vars(from_config)[k] for k in settings} == {k: vars(from_python)[k] for k in settings}


def test_gsam_and_looksam_defaults_are_the_documented_ones():
    """The values conf/method/gsam.yaml and looksam.yaml explain: GSAM's alpha 0.2 (the authors' CIFAR example),
    LookSAM's r 0.05 (SAM's CIFAR-10 rho)."""
    probe = torch.nn.Linear(1, 1)
    gsam = GSAM(probe, torch.optim.SGD(probe.parameters(), lr=1.0))
    looksam = LookSAM(probe, torch.optim.SGD(probe.parameters(), lr=1.0))
    assert (gsam.r, gsam.alpha, looksam.r, looksam.k, looksam.alpha) == (0.05, 0.2, 0.05, 5, 0.7)
    assert (compose_config("method=gsam").method.alpha, compose_config("method=looksam").method.r) == (0.2, 0.05)


def test_the_schema_is_what_conf_states():
    """The keys the first check allows, read from conf/ with PyYAML, are those Hydra composes: of every section,
    every dataset and every optimizer (model, aug and method are their builders' to check)."""
    for dataset in ("cifar10", "cifar100", "digits"):
        cfg = compose_config(f"dataset={dataset}")
        assert set(cfg) == SCHEMA[""]
        assert all(set(cfg[section]) == SCHEMA[section] for section in ("train", "wandb", "dataset"))
    assert set(OPTIMIZER_SCHEMA) == set(BASE_OPTIMIZERS) == {"sgd", "adamw"}
    for name in OPTIMIZER_SCHEMA:
        assert set(compose_config(f"optimizer={name}").optimizer) == OPTIMIZER_SCHEMA[name]
    assert {"lr", "weight_decay", "fused"} <= SHARED_OPTIMIZER_KEYS and "momentum" not in SHARED_OPTIMIZER_KEYS


@pytest.mark.parametrize("name,arguments", [("sgd", {"momentum": 0.9, "nesterov": True, "lr": 0.1}),
                                            ("adamw", {"betas": (0.9, 0.999), "eps": 1e-8, "lr": 1e-3})])
def test_a_base_optimizer_gets_the_arguments_of_its_file(name, arguments):
    cfg = compose_config(f"optimizer={name}", "optimizer.weight_decay_mode=optimizer")
    model = torch.nn.Linear(2, 2)
    optimizer = build_optimizer(cfg.optimizer, model, torch.device("cpu"))
    assert type(optimizer) is BASE_OPTIMIZERS[name]
    group = optimizer.param_groups[0]
    assert {key: group[key] for key in arguments} == arguments
    assert group["weight_decay"] == cfg.optimizer.weight_decay and group["fused"] is False
