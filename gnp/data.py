"""Datasets as uint8 tensors, and a loader that keeps them on the training device.

CIFAR-10/100 are read from the official "python version" archives (or their extracted folders),
checked against the published MD5 sums. `digits` is scikit-learn's bundled handwritten digits,
upscaled to 3x32x32: a real, offline task for demos and tests.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
import pickle
import shlex
import shutil
import tarfile
import tempfile
import urllib.error
import zlib
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from gnp.console import first_line

if TYPE_CHECKING:
    from torchvision.datasets import CIFAR10

    from gnp.augment import Augmentation

CIFAR = ("cifar10", "cifar100")
DATASETS = (*CIFAR, "digits")
DIGITS_TEST_SIZE = 300
# Training images of each dataset as published (a fake CIFAR archive may hold fewer): what the config's
# checks assume before any data is read.
TRAIN_SIZES = {"cifar10": 50_000, "cifar100": 50_000, "digits": 1_797 - DIGITS_TEST_SIZE}
CLASSES = {"cifar10": 10, "cifar100": 100, "digits": 10}


class DataError(RuntimeError):
    """The data on disk is missing, incomplete or corrupted; the message says how to fix it."""


@dataclass
class Splits:
    train_images: torch.Tensor  # uint8 [N, 3, 32, 32]
    train_labels: torch.Tensor  # int64 [N]
    test_images: torch.Tensor
    test_labels: torch.Tensor
    verified: bool  # every file matched its published checksum


def load_dataset(
    name: str,
    root: str | Path | None = None,
    *,
    download: bool = False,
    verify: bool = True,
    limit_train: int | None = None,
    limit_test: int | None = None,
) -> Splits:
    """Load a whole dataset into memory; `limit_*` keep the first N images (quick runs)."""
    if name == "digits":
        splits = _load_digits()
    elif name in CIFAR:
        splits = _load_cifar(_cifar_spec(name), Path(root or "data").expanduser().resolve(), download, verify)
    else:
        raise ValueError(f"dataset.name={name!r} is not known; choose one of: {', '.join(DATASETS)}")
    splits.train_images, splits.train_labels = splits.train_images[:limit_train], splits.train_labels[:limit_train]
    splits.test_images, splits.test_labels = splits.test_images[:limit_test], splits.test_labels[:limit_test]
    return splits


# --- CIFAR ---------------------------------------------------------------------------------------

def _cifar_spec(name: str) -> type[CIFAR10]:
    """torchvision's description of a CIFAR archive (URL, MD5 sums, batch files), imported only where CIFAR is
    read or written: importing torchvision takes about 1.5 s that a digits run or a mistyped command need not pay."""
    from torchvision.datasets import CIFAR10, CIFAR100
    return {"cifar10": CIFAR10, "cifar100": CIFAR100}[name]


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _where_to_put(spec: type[CIFAR10], root: Path) -> str:
    return (
        f"Put {spec.filename} (from {spec.url}, MD5 {spec.tgz_md5}) or its extracted folder "
        f"{spec.base_folder}/ in {root}, or run with dataset.download=true on a machine with a network."
    )


class _BadFile(Exception):
    """One file of a CIFAR folder is missing or damaged; the caller names where the folder came from
    (an extracted archive, or a folder of the user's) and the fix."""

    def __init__(self, filename: str, problem: str, *, missing: bool = False, checksum: bool = False):
        super().__init__(f"{filename} {problem}")
        self.filename, self.problem, self.missing, self.checksum = filename, problem, missing, checksum


def _load_cifar(spec: type[CIFAR10], root: Path, download: bool, verify: bool) -> Splits:
    folder, archive = root / spec.base_folder, root / spec.filename
    if folder.is_dir():
        try:
            return _read_folder(spec, folder, verify)
        except _BadFile as bad:
            path = folder / bad.filename
            if bad.missing:
                raise DataError(
                    f"{path} is missing, so {spec.__name__} is incomplete. {_where_to_put(spec, root)}") from None
            alternative = "set dataset.verify=false for a copy you trust" if bad.checksum else "replace the file"
            raise DataError(f"{path} {bad.problem}. Delete {folder} and extract {spec.filename} again, "
                            f"or {alternative}.") from None
    if not archive.is_file():
        if not download:
            raise DataError(f"{spec.__name__} was not found in {root}. {_where_to_put(spec, root)}")
        _download(spec, root)
    if verify and _md5(archive) != spec.tgz_md5:
        raise DataError(
            f"{archive} is corrupted (MD5 {_md5(archive)}, expected {spec.tgz_md5}). Delete it and "
            f"download it again from {spec.url}, or set dataset.verify=false for a copy you trust."
        )
    return _extract(spec, archive, root, verify)


def _read_folder(spec: type[CIFAR10], folder: Path, verify: bool) -> Splits:
    """Check every file of an extracted folder (present, its MD5 when `verify`) and read the batches,
    each checked for the expected shapes and labels; raises _BadFile."""
    for filename, md5 in [*spec.train_list, *spec.test_list, [spec.meta["filename"], spec.meta["md5"]]]:
        path = folder / filename
        if not path.is_file():
            raise _BadFile(filename, "is missing", missing=True)
        if verify and (digest := _md5(path)) != md5:
            raise _BadFile(filename, f"is corrupted (MD5 {digest}, expected {md5})", checksum=True)
    classes = CLASSES[spec.__name__.lower()]
    train_x, train_y = _read_batches(folder, [f for f, _ in spec.train_list], classes)
    test_x, test_y = _read_batches(folder, [f for f, _ in spec.test_list], classes)
    return Splits(train_x, train_y, test_x, test_y, verified=verify)


def _download(spec: type[CIFAR10], root: Path) -> None:
    try:
        from torchvision.datasets.utils import download_url
        download_url(spec.url, str(root), spec.filename, spec.tgz_md5)
    except (urllib.error.URLError, OSError, RuntimeError) as e:
        Path(root, spec.filename).unlink(missing_ok=True)  # never leave a partial archive behind
        raise DataError(f"Downloading {spec.url} failed ({e}). {_where_to_put(spec, root)}") from e


def _extract(spec: type[CIFAR10], archive: Path, root: Path, verify: bool) -> Splits:
    """Extract into a temporary folder and check and read every file there, then rename the folder
    into place: a failed or interrupted extraction leaves no folder that a later run would read.

    The format's own checks run whatever `verify` says: gzip's CRC and length (read to the end of
    the stream, which tarfile alone stops short of), the tar headers, and the batches' shapes."""
    def corrupted(problem: str) -> DataError:
        return DataError(f"{archive} is corrupted: {problem}. Delete it and download it again from {spec.url}.")

    with tempfile.TemporaryDirectory(dir=root, prefix=".extract-") as tmp:
        try:
            with gzip.open(archive) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
                tar.extractall(tmp, filter="data")
                while stream.read(1 << 20):  # the rest of the stream (the tar's padding), to gzip's check
                    pass
        except (tarfile.TarError, gzip.BadGzipFile, EOFError, zlib.error) as e:
            raise corrupted(f"it could not be extracted ({first_line(e)})") from e
        except OSError as e:
            raise DataError(f"{archive} could not be extracted into {root} ({first_line(e)}).") from e
        extracted = Path(tmp, spec.base_folder)
        if not extracted.is_dir():
            raise corrupted(f"it does not contain {spec.base_folder}/, so it is not the {spec.__name__} archive")
        try:
            splits = _read_folder(spec, extracted, verify)
        except _BadFile as bad:
            raise corrupted(f"its {spec.base_folder}/{bad.filename} {bad.problem}") from None
        extracted.rename(root / spec.base_folder)
    return splits


def _read_batches(folder: Path, filenames: Sequence[str], classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The images [N, 3, 32, 32] and labels of the pickled batches; raises _BadFile for a batch that
    does not unpickle to uint8 data [n, 3072] and n labels in [0, classes)."""
    images, labels = [], []
    for filename in filenames:
        try:
            with open(folder / filename, "rb") as f:
                batch = pickle.load(f, encoding="latin1")
            data, targets = batch["data"], batch["labels" if "labels" in batch else "fine_labels"]
        except Exception as e:  # unpickling garbage can raise almost anything
            raise _BadFile(filename, f"could not be read as a CIFAR batch ({type(e).__name__}: {first_line(e)})")
        y = np.asarray(targets)
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            shape = f"{data.dtype} {list(data.shape)}" if isinstance(data, np.ndarray) else type(data).__name__
            raise _BadFile(filename, f"holds images of {shape}, not uint8 [n, 3072]")
        if y.shape != (len(data),) or y.dtype.kind not in "iu":
            raise _BadFile(filename, f"holds {len(data)} images but labels of {y.dtype} {list(y.shape)}")
        if len(y) and (y.min() < 0 or y.max() >= classes):
            raise _BadFile(filename, f"holds labels outside 0-{classes - 1}")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(y.astype(np.int64))
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


# --- digits --------------------------------------------------------------------------------------

def _digits_file() -> Path:
    """scikit-learn's bundled digits table (one row per image: 64 pixels in 0..16, then the label), found
    without importing scikit-learn, whose import takes about a second that every digits run would pay."""
    package = importlib.util.find_spec("sklearn")
    if package is None or not package.submodule_search_locations:
        raise DataError("dataset.name=digits needs scikit-learn, which is not installed: pip install scikit-learn")
    return Path(package.submodule_search_locations[0], "datasets", "data", "digits.csv.gz")


def _load_digits() -> Splits:
    table = torch.from_numpy(np.loadtxt(_digits_file(), delimiter=",", dtype=np.float32))
    images = table[:, :-1].reshape(-1, 1, 8, 8) * (255 / 16)  # [N, 1, 8, 8]
    images = F.interpolate(images, size=32, mode="bilinear", align_corners=False)
    images = images.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    labels = table[:, -1].to(torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))  # fixed split
    test, train = order[:DIGITS_TEST_SIZE], order[DIGITS_TEST_SIZE:]
    return Splits(images[train], labels[train], images[test], labels[test], verified=False)


# --- loader --------------------------------------------------------------------------------------

class Stream(IntEnum):
    """The independent random streams of a run; each draw is keyed by (seed, stream, step, ...)."""
    ORDER = 0  # the permutation of one epoch's training set
    AUGMENT = 1  # the augmentation of one shard of one batch
    MODEL = 2  # the dropout, stochastic depth and ShakeDrop draws of one shard of one step


def random_seed(seed: int, stream: Stream, *keys: int) -> int:
    """A 63-bit seed for one draw of `stream` that depends only on the run's seed and `keys` (an
    epoch, or a step and a shard), so a run resumed at any step repeats every draw exactly, whichever
    process runs the shard."""
    state = np.random.SeedSequence([seed, int(stream), *keys]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def training_batch_problem(batch_size: int, train_size: int, world_size: int = 1) -> str | None:
    """What is wrong with a global training batch of `batch_size` for `train_size` images split over
    `world_size` processes, as one line naming the key and the fix; None when it is fine."""
    if batch_size > train_size:
        return (f"train.batch_size={batch_size} is invalid: larger than the training set ({train_size} images); "
                f"lower it or raise dataset.limit_train")
    if batch_size % world_size:
        return (f"train.batch_size={batch_size} is invalid: it is split evenly over the {world_size} processes; "
                f"use a multiple of {world_size}")
    return None


def shards_problem(shards: int, batch_size: int, batch_norm: bool, world_size: int | None = None) -> str | None:
    """What is wrong with splitting a global batch of `batch_size` into `shards` (train.shards) laid out
    over `world_size` processes (None: not known yet), as one line naming the key and the fix; None when
    it is fine. `batch_norm`: the model normalises with batch statistics in training, which one image
    cannot give."""
    if batch_size % shards:
        return (f"train.shards={shards} is invalid: it must divide train.batch_size={batch_size} into equal "
                f"shards; use a divisor of {batch_size}")
    if world_size is not None and shards % world_size:
        return (f"train.shards={shards} is invalid: each of the {world_size} processes takes an equal number "
                f"of shards; use a multiple of {world_size}, or train.shards=auto (one shard per process)")
    if batch_norm and batch_size // shards < 2:
        return (f"train.shards={shards} is invalid: a shard of {batch_size // shards} image cannot give BatchNorm "
                f"batch statistics; use at most {batch_size // 2} shards for train.batch_size={batch_size}")
    return None


class BatchLoader:
    """Yields normalised float batches from a uint8 dataset held on `device`.

    Shuffling is a permutation drawn on the device; augmentation runs on whole batches there. A
    training batch is split into `shards` equal shards, each augmented as one device's share of it
    (a batch-level draw, such as the official cutout's hole or mixup's weight, is one per shard); the
    draws of shard j of epoch e's batch b depend only on (seed, e, b, j), so a run resumed at any step
    sees the same batches, and a shard is the same whichever process takes it. Every process draws the
    same permutation; under DDP each takes its own consecutive shards of each global batch (of the
    test set: its own slice).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        batch_size: int,
        device: torch.device,
        mean: Sequence[float],
        std: Sequence[float],
        train: bool,
        augment: Augmentation | None = None,
        num_classes: int | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shards: int | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        shards = world_size if shards is None else shards
        problem = (training_batch_problem(batch_size, len(labels), world_size) or
                   shards_problem(shards, batch_size, False, world_size)) if train else None
        if problem:
            raise ValueError(problem)
        self.images, self.labels = images.to(device), labels.to(device)
        self.batch_size, self.device, self.train = batch_size, device, train
        self.mean = torch.tensor(mean, device=device, dtype=dtype).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=device, dtype=dtype).view(1, 3, 1, 1) * 255
        self.augment, self.num_classes, self.dtype = augment, num_classes, dtype
        self.seed, self.rank, self.world_size = seed, rank, world_size
        per_process = shards // world_size
        self.shards, self.local_shards = shards, range(rank * per_process, (rank + 1) * per_process)

    def __len__(self) -> int:
        """Batches per epoch: training drops the last partial batch (as the official recipes)."""
        n = len(self.labels)
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images.to(self.dtype) - self.mean) / self.std

    def generator(self, stream: Stream, *keys: int) -> torch.Generator:
        return torch.Generator(self.device).manual_seed(random_seed(self.seed, stream, *keys))

    def epoch(self, epoch: int = 0, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This replica's batches of one epoch from batch `start` on: training batches are shuffled
        and augmented. Targets are labels, or soft targets [B, num_classes] where the augmentation
        mixes images (mixup/cutmix)."""
        n = len(self.labels)
        if self.train:
            order = torch.randperm(n, generator=self.generator(Stream.ORDER, epoch), device=self.device)
        else:
            order = torch.arange(n, device=self.device)
        for b in range(start, len(self)):
            index = order[b * self.batch_size : (b + 1) * self.batch_size]
            if not self.train:
                index = index.tensor_split(self.world_size)[self.rank]
                yield self.normalize(self.images[index]), self.labels[index]
                continue
            split = index.tensor_split(self.shards)
            images, targets = zip(*(self.training_shard(epoch, b, j, split[j]) for j in self.local_shards))
            yield (images[0], targets[0]) if len(images) == 1 else (torch.cat(images), torch.cat(targets))

    def training_shard(self, epoch: int, batch: int, shard: int,
                       index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Shard `shard` of a training batch (the images at `index`), augmented with that shard's own draws."""
        images, labels = self.images[index], self.labels[index]
        if self.augment is None:
            return self.normalize(images), labels
        rng = self.generator(Stream.AUGMENT, epoch, batch, shard)
        images = self.normalize(self.augment(images, rng))
        return self.augment.mix(images, labels, self.num_classes, rng)


# --- synthetic data in the real format ----------------------------------------------------------

def write_synthetic_cifar(root: str | Path, name: str, n_train: int = 100, n_test: int = 50, *,
                          archive: bool = False, seed: int = 0) -> Path:
    """Write random images in the official CIFAR-10/100 python format (folder, or archive with
    `archive=True`), for tests and for smoke runs without the real data; returns its path.
    Its files cannot match the published checksums: load it with verify=False."""
    spec = _cifar_spec(name)
    classes = CLASSES[name]
    label_key = "labels" if name == "cifar10" else "fine_labels"
    rng = np.random.default_rng(seed)
    folder = Path(root) / spec.base_folder
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
    path = Path(root) / spec.filename
    with tarfile.open(path, "w:gz") as tar:
        tar.add(folder, arcname=spec.base_folder)
    shutil.rmtree(folder)
    return path


# What the printed training command uses: a narrow ResNet-18 for one epoch on at most this many images
# finishes in about a minute on a laptop CPU.
_QUICK_TRAIN, _QUICK_TEST = 2000, 500


def _quick_training_command(root: Path, name: str, n_train: int, n_test: int) -> str:
    """A train.py command line that trains on a fake set in about a minute on a laptop CPU."""
    words = ["python", "train.py", f"dataset={name}", f"dataset.root={root.resolve()}", "dataset.verify=false",
             "model.width=8", "train.epochs=1", f"train.batch_size={min(128, n_train)}", "device=cpu",
             "wandb.mode=disabled"]
    if n_train > _QUICK_TRAIN:
        words.append(f"dataset.limit_train={_QUICK_TRAIN}")
    if n_test > _QUICK_TEST:
        words.append(f"dataset.limit_test={_QUICK_TEST}")
    return shlex.join(words)


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m gnp.data fake-cifar DIR`: random images in the real CIFAR format, to try the
    CIFAR path without the archives (`dataset.root=DIR dataset.verify=false`)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m gnp.data", description=main.__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    fake = commands.add_parser("fake-cifar", help="write random images in the official CIFAR python format")
    fake.add_argument("root", type=Path, help="the data root to write into (use it as dataset.root)")
    fake.add_argument("--dataset", choices=CIFAR, default="cifar10")
    fake.add_argument("--train", type=int, default=_QUICK_TRAIN, help=f"training images (default {_QUICK_TRAIN})")
    fake.add_argument("--test", type=int, default=_QUICK_TEST, help=f"test images (default {_QUICK_TEST})")
    fake.add_argument("--archive", action="store_true", help="write the .tar.gz archive instead of the folder")
    fake.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.train < 1 or args.test < 1:
        parser.error("--train and --test must be at least 1")
    path = write_synthetic_cifar(args.root, args.dataset, args.train, args.test, archive=args.archive, seed=args.seed)
    print(f"wrote {args.train} training and {args.test} test images of random {args.dataset} to {path}\n"
          f"train on them (about a minute on a laptop CPU):\n"
          f"  {_quick_training_command(args.root, args.dataset, args.train, args.test)}")


if __name__ == "__main__":
    main()
