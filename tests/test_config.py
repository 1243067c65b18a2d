"""Every config choice composes and validates; each bad value fails early with a message that names
the key, the value and what is allowed; the entry point's CLI works."""
import pytest

from conftest import CONF, compose_config, train_py
from gnp.config import ConfigError, validate

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
