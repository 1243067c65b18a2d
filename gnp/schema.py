"""The config's keys, without importing torch: which keys each section may hold, the error for one that does
not exist (with its closest spelling), and configs as dotted keys. The command line's first check and
gnp.config's checks both stand on it.

The keys are those conf/ states (read with PyYAML, no Hydra): conf/config.yaml's own and its groups', every
dataset file's, and each optimizer's file's own. `model` and `aug` are open to their builders' own options,
which gnp.models and gnp.augment check, and `method` to its class's, which gnp.config checks."""
from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from pathlib import Path

import yaml

from gnp.paths import CONF_DIR


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _schema() -> dict[str, frozenset[str]]:
    """Every key a section of conf/config.yaml (or its dataset group) may hold; "" is the top level."""
    config = {k: v for k, v in _load(CONF_DIR / "config.yaml").items() if k != "hydra"}
    groups = {group for entry in config.pop("defaults") if isinstance(entry, dict)
              for group, choice in entry.items() if choice is not None and not group.startswith("override ")}
    sections = {key: frozenset(value) for key, value in config.items() if isinstance(value, dict)}
    dataset = frozenset(key for path in (CONF_DIR / "dataset").glob("*.yaml") for key in _load(path))
    return {"": frozenset({*config, *groups}), **sections, "dataset": dataset}


SCHEMA = _schema()
# The keys of each optimizer: its file's, conf/optimizer/<name>.yaml.
OPTIMIZER_SCHEMA = {path.stem: frozenset(_load(path)) for path in sorted((CONF_DIR / "optimizer").glob("*.yaml"))}
# The keys every optimizer has; the others of a file are its class's own arguments.
SHARED_OPTIMIZER_KEYS = frozenset.intersection(*OPTIMIZER_SCHEMA.values())


class ConfigError(ValueError):
    """A config value is out of range or a key is unknown; the message says what to change."""


def unknown_key_error(key: str, valid: Iterable[str]) -> ConfigError:
    """The error for a key that does not exist: its closest valid spelling, and the keys of its section when
    they are few (a model's options, say), else where to find them all."""
    valid = sorted(valid)
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    section = key.rpartition(".")[0]
    siblings = [k for k in valid if k.rpartition(".")[0] == section] if section else []
    hint = f"did you mean {close[0]}?" if close else "`python train.py --cfg job` lists every key"
    if 0 < len(siblings) <= 6:
        hint += f" ({section} has {', '.join(siblings)})"
    return ConfigError(f"{key} is not a config key: {hint}")


def check_keys(cfg: Mapping) -> None:
    """Refuse keys that no part of the suite reads (a typo would otherwise be silently ignored)."""
    def full(section: str, keys: Iterable[str]) -> set[str]:
        return {f"{section}.{k}" if section else k for k in keys}

    optimizer_keys = OPTIMIZER_SCHEMA.get(cfg.get("optimizer", {}).get("name"), SHARED_OPTIMIZER_KEYS)
    for section, allowed in [*SCHEMA.items(), ("optimizer", optimizer_keys)]:
        node = cfg if not section else cfg.get(section)
        if not isinstance(node, Mapping):
            continue
        for key in node:
            if key not in allowed:
                raise unknown_key_error(f"{section}.{key}" if section else key, full(section, allowed))


def dotted(config: Mapping, prefix: str = "") -> dict:
    """A nested config as one level of dotted keys: {"train": {"shards": 4}} -> {"train.shards": 4}."""
    out = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            out.update(dotted(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def undotted(flat: Mapping) -> dict:
    """The nested config of dotted keys (`dotted`'s inverse)."""
    tree: dict = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree
