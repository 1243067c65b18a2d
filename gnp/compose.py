"""Composing conf/ with Hydra's compose API: the one place that does it outside `train.py`'s own Hydra app.

The command line's checks, the tables, the benchmark, the demo and the tests all compose through here:

    with composer() as compose:
        cfg = compose(["method=sam", "model=wrn28_10"])
    cfg = compose_config("experiment=digits_demo", "method=gnp")    # one config
    cfg = compose_config("method=sam", validated=True)              # checked as train.py would
    compose_config("seed=1", with_hydra=True).hydra.run.dir          # with Hydra's own settings
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from gnp.paths import CONF_DIR


@contextmanager
def composer(validated: bool = False) -> Iterator[Callable[..., DictConfig]]:
    """A function that composes conf/config.yaml with overrides, valid inside this context (one Hydra
    initialisation for many configs; any other initialisation of this process is cleared first).
    `validated=True` checks each config as train.py would (gnp.config.validate raises ConfigError).
    `with_hydra=True` keeps Hydra's own node (`hydra.run.dir`, `hydra.sweep.dir`, ...) in the result."""
    def compose_with(overrides: Iterable[str], with_hydra: bool = False) -> DictConfig:
        cfg = compose(config_name="config", overrides=list(overrides), return_hydra_config=with_hydra)
        if validated:
            from gnp.config import validate  # its checks import torch; composing alone does not need it

            validate(cfg)
        return cfg

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            yield compose_with
    finally:
        GlobalHydra.instance().clear()


def compose_config(*overrides: str, with_hydra: bool = False, validated: bool = False) -> DictConfig:
    """conf/config.yaml composed with these overrides; `validated=True` checks it as train.py would."""
    with composer(validated) as compose_with:
        return compose_with(overrides, with_hydra)
