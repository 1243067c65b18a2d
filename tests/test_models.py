"""Model zoo: full-size parameter counts (built on the meta device), forward/backward of reduced
models on CPU, ShakeDrop's statistics and reuse of its draws, and the recipes in conf/model."""
from __future__ import annotations

from pathlib import Path

import pytest
import scipy.stats
import torch
import torch.nn as nn
from conftest import compose_config
from omegaconf import OmegaConf

from gnp.models import MODELS, build_model, count_parameters
from gnp.models.pyramidnet import PyramidNet
from gnp.models.shakedrop import ShakeDrop

CONF = Path(__file__).resolve().parents[1] / "conf"

# (lowest, highest) parameter count for 10 classes, and the classifier's input width
FULL_SIZE = {
    "resnet18": ((11_173_962, 11_173_962), 512),
    "resnet101": ((42_400_000, 42_600_000), 2048),
    "wrn28_10": ((36_479_194, 36_479_194), 640),
    "pyramidnet110": ((28_300_000, 28_500_000), 16 + 270),
    # widths rounded as the official code (truncated, as the paper: 26.0M)
    "pyramidnet272": ((26_000_000, 26_250_000), (16 + 200) * 4),
    "vit_ti": ((5_300_000, 5_450_000), 192),
    "vit_s": ((21_200_000, 21_400_000), 384),
    "vit_b": ((85_000_000, 85_300_000), 768),
}
# Reduced widths/depths (through the builders' options) for running on CPU
SMALL = {
    "resnet18": {"width": 8},
    "resnet101": {"width": 4},
    "wrn28_10": {"depth": 10, "widen": 2, "dropout": 0.3},
    "pyramidnet110": {"depth": 20, "alpha": 12, "shakedrop": 0.5},
    "pyramidnet272": {"depth": 29, "alpha": 12},
    "vit_ti": {"depth": 2},
    "vit_s": {"depth": 1},
    "vit_b": {"depth": 1},
}


def meta_model(name: str, num_classes: int = 10, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return build_model(name, num_classes, **kwargs)


def test_every_model_is_covered():
    assert set(MODELS) == set(FULL_SIZE) == set(SMALL)


@pytest.mark.parametrize("name", sorted(FULL_SIZE))
def test_full_size_parameter_counts(name):
    (low, high), features = FULL_SIZE[name]
    ten, hundred = count_parameters(meta_model(name, 10)), count_parameters(meta_model(name, 100))
    assert low <= ten <= high
    assert hundred - ten == 90 * (features + 1)  # only the classifier grows with the classes


@pytest.mark.parametrize("name", sorted(SMALL))
@pytest.mark.parametrize("num_classes", [10, 100])
def test_forward_backward_on_cpu(name, num_classes):
    torch.manual_seed(0)
    model = build_model(name, num_classes, **SMALL[name])
    x = torch.randn(4, 3, 32, 32)
    logits = model(x)
    assert logits.shape == (4, num_classes) and torch.isfinite(logits).all()
    nn.functional.cross_entropy(logits, torch.arange(4) % num_classes).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))  # evaluation is deterministic


@pytest.mark.parametrize("name", ["wrn28_10", "pyramidnet272", "vit_ti"])
def test_same_rng_state_repeats_the_random_draws(name):
    """What the method's two passes rely on: restoring torch's RNG state repeats dropout and
    ShakeDrop exactly, in forward and backward; a different state gives different draws."""
    torch.manual_seed(0)
    model = build_model(name, 10, **SMALL[name])
    if name.startswith("vit"):
        nn.init.normal_(model.head.weight)  # the zero-initialised head would hide the dropout
    x = torch.randn(4, 3, 32, 32)

    def pass_from(state: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        torch.set_rng_state(state)
        model.zero_grad()
        logits = model(x)
        logits.square().sum().backward()
        return logits.detach(), [p.grad.clone() for p in model.parameters()]

    state = torch.get_rng_state()
    first, first_grads = pass_from(state)
    second, second_grads = pass_from(state)
    assert torch.equal(first, second)
    assert all(torch.equal(a, b) for a, b in zip(first_grads, second_grads))
    torch.manual_seed(123)
    other, _ = pass_from(torch.get_rng_state())
    assert not torch.equal(first, other)


# --- ShakeDrop ------------------------------------------------------------------------------------

def shakedrop_scales(keep_prob: float, n: int = 20000) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample forward and backward scale of a training-mode ShakeDrop on ones."""
    torch.manual_seed(0)
    x = torch.ones(n, 2, 3, 3, requires_grad=True)
    out = ShakeDrop(keep_prob).train()(x)
    (grad,) = torch.autograd.grad(out.sum(), x)
    # one draw per sample: the scale is constant over each sample
    assert torch.equal(out, out[:, :1, :1, :1].expand_as(out))
    assert torch.equal(grad, grad[:, :1, :1, :1].expand_as(grad))
    return out[:, 0, 0, 0].detach(), grad[:, 0, 0, 0]


def test_shakedrop_forward_and_backward_scales():
    forward, backward = shakedrop_scales(0.6)
    kept = forward == 1.0
    assert torch.equal(kept, backward == 1.0)  # one gate for both directions
    assert abs(kept.float().mean().item() - 0.6) < 0.015
    # dropped samples: forward scale U[-1, 1], backward scale U[0, 1], independent draws
    assert scipy.stats.kstest(forward[~kept].numpy(), scipy.stats.uniform(-1, 2).cdf).pvalue > 1e-3
    assert scipy.stats.kstest(backward[~kept].numpy(), scipy.stats.uniform(0, 1).cdf).pvalue > 1e-3
    assert abs(forward.mean().item() - 0.6) < 0.015  # E = keep_prob, the evaluation scale


def test_shakedrop_eval_is_the_expectation_and_off_is_identity():
    x = torch.randn(5, 4, 2, 2)
    torch.testing.assert_close(ShakeDrop(0.7).eval()(x), 0.7 * x)
    state = torch.get_rng_state()
    assert ShakeDrop(1.0).train()(x) is x
    assert torch.equal(torch.get_rng_state(), state)  # no draws when off


def test_pyramidnet272_shakedrop_decays_linearly_to_half():
    model = meta_model("pyramidnet272")
    keep = [block.shake_drop.keep_prob for block in model.blocks]
    assert len(keep) == 90
    assert keep == pytest.approx([1 - 0.5 * l / 90 for l in range(1, 91)])
    assert keep[-1] == pytest.approx(0.5)
    assert all(block.shake_drop.keep_prob == 1.0 for block in meta_model("pyramidnet110").blocks)


def test_pyramidnet_widths_grow_by_alpha_over_the_blocks():
    model = meta_model("pyramidnet110")
    widths = [block.branch[1].out_channels for block in model.blocks]
    assert len(widths) == 54 and widths[0] == 16 + 5 and widths[-1] == 16 + 270
    assert all(b - a == 5 for a, b in zip(widths, widths[1:]))  # 270 / 54 per block
    assert isinstance(model, PyramidNet)


# --- initialisation ---------------------------------------------------------------------------------

def test_official_initialisation():
    torch.manual_seed(0)
    wrn = build_model("wrn28_10", 100, depth=10, widen=4)
    bound = 100 ** -0.5
    assert wrn.head.fc.weight.abs().max() <= bound and wrn.head.fc.weight.abs().max() > 0.9 * bound
    assert torch.equal(wrn.head.fc.bias, torch.zeros(100))
    conv = wrn.blocks[-1].conv2  # 256 -> 256, 3x3: kaiming normal, fan_out
    assert abs(conv.weight.std().item() / (2 / (256 * 9)) ** 0.5 - 1) < 0.02
    vit = build_model("vit_ti", 10, depth=1)
    assert torch.equal(vit.head.weight, torch.zeros_like(vit.head.weight))  # JAX-style zero head


# --- the registry and its errors --------------------------------------------------------------------

def test_unknown_model_lists_the_choices():
    with pytest.raises(ValueError, match="choose one of: pyramidnet110, pyramidnet272, resnet101"):
        build_model("resnet50", 10)


def test_unknown_option_lists_the_options():
    with pytest.raises(ValueError, match="no option\\(s\\) dropout; its options are: width"):
        build_model("resnet18", 10, dropout=0.1)


@pytest.mark.parametrize(
    "name, kwargs, message",
    [
        ("wrn28_10", {"depth": 27}, "depth=27"),
        ("pyramidnet272", {"depth": 270}, "depth=270"),
        ("pyramidnet272", {"shakedrop": 1.5}, "shakedrop=1.5"),
        ("wrn28_10", {"dropout": 1.0}, "dropout=1.0"),
    ],
)
def test_bad_options_name_the_problem(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        meta_model(name, **kwargs)


# --- configs and recipes ----------------------------------------------------------------------------

@pytest.mark.parametrize("config", sorted(p.stem for p in (CONF / "model").glob("*.yaml")))
def test_every_model_config_builds_its_model(config):
    cfg = compose_config(f"model={config}")
    options = {k: v for k, v in cfg.model.items() if k != "name"}
    model = meta_model(cfg.model.name, 10, **options)
    assert count_parameters(model) == count_parameters(meta_model(cfg.model.name, 10))  # full size


def test_every_registered_model_has_a_config():
    assert set(MODELS) <= {p.stem for p in (CONF / "model").glob("*.yaml")}


def test_vit_config_is_vit_s_with_the_official_recipe():
    cfg = compose_config("model=vit")
    assert cfg.model.name == "vit_s"
    assert cfg.optimizer.name == "adamw" and cfg.optimizer.lr == 1e-3
    assert cfg.optimizer.weight_decay == 0.3 and cfg.optimizer.weight_decay_mode == "optimizer"
    assert cfg.train.epochs == 300 and cfg.train.batch_size == 256
    assert OmegaConf.to_container(compose_config("model=vit_s")) == OmegaConf.to_container(cfg)


def test_pyramidnet272_config_carries_its_recipe():
    cfg = compose_config("model=pyramidnet272")
    assert (cfg.model.name, cfg.model.shakedrop) == ("pyramidnet272", 0.5)
    assert cfg.optimizer.name == "sgd" and cfg.optimizer.lr == 0.05
    assert cfg.optimizer.weight_decay == 5e-4 and cfg.optimizer.weight_decay_mode == "loss"
    assert cfg.train.epochs == 1800 and cfg.train.batch_size == 128
    assert cfg.aug.name == "autoaugment_mixcut" and cfg.aug.mixup_alpha == 1.0


def test_resnet18_keeps_the_defaults():
    cfg, defaults = compose_config("model=resnet18"), compose_config()
    assert OmegaConf.to_container(cfg) == OmegaConf.to_container(defaults)
    assert cfg.optimizer.name == "sgd" and cfg.optimizer.lr == 0.1 and cfg.train.epochs == 200


def test_command_line_overrides_win_over_model_recipes():
    cfg = compose_config("model=vit", "optimizer.lr=0.5", "train.epochs=3", "model.drop_path_rate=0.1")
    assert (cfg.optimizer.lr, cfg.train.epochs, cfg.model.drop_path_rate) == (0.5, 3, 0.1)
    cfg = compose_config("model=pyramidnet272", "aug=basic", "train.batch_size=64", "optimizer=adamw")
    assert (cfg.aug.name, cfg.train.batch_size, cfg.optimizer.name) == ("basic", 64, "adamw")
    assert cfg.optimizer.lr == 0.05  # the recipe's own keys still apply on top of the chosen group
