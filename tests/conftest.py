"""Shared fixtures: configs composed from the real conf/ folder, and small datasets written in the
real CIFAR on-disk format so that the real loading code is what the tests exercise."""
from __future__ import annotations

import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from torchvision.datasets import CIFAR10, CIFAR100

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def compose_config(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def write_cifar(root: Path, name: str, n_train: int = 100, n_test: int = 50, *, archive: bool = False,
                seed: int = 0) -> Path:
    """Write a small CIFAR-10/100 copy in the official python format; returns the folder or archive."""
    spec = {"cifar10": CIFAR10, "cifar100": CIFAR100}[name]
    classes = 10 if name == "cifar10" else 100
    label_key = "labels" if name == "cifar10" else "fine_labels"
    rng = np.random.default_rng(seed)
    folder = root / spec.base_folder
    folder.mkdir(parents=True, exist_ok=True)
    train_files = [f for f, _ in spec.train_list]
    sizes = np.full(len(train_files), n_train // len(train_files))
    sizes[: n_train % len(train_files)] += 1
    for filename, n in [*zip(train_files, sizes), (spec.test_list[0][0], n_test)]:
        batch = {"data": rng.integers(0, 256, (int(n), 3072), dtype=np.uint8),
                 label_key: rng.integers(0, classes, int(n)).tolist(),
                 "batch_label": filename, "filenames": [f"{i}.png" for i in range(int(n))]}
        if name == "cifar100":
            batch["coarse_labels"] = rng.integers(0, 20, int(n)).tolist()
        with open(folder / filename, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    with open(folder / spec.meta["filename"], "wb") as f:
        pickle.dump({spec.meta["key"]: [f"class{i}" for i in range(classes)]}, f, protocol=2)
    if not archive:
        return folder
    path = root / spec.filename
    with tarfile.open(path, "w:gz") as tar:
        tar.add(folder, arcname=spec.base_folder)
    for f in folder.iterdir():
        f.unlink()
    folder.rmdir()
    return path


@pytest.fixture
def cifar_root(tmp_path):
    """A data root holding small generated CIFAR-10 and CIFAR-100 folders."""
    root = tmp_path / "data"
    write_cifar(root, "cifar10")
    write_cifar(root, "cifar100")
    return root
