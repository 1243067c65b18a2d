"""Loading CIFAR from its real on-disk format, the errors for bad data (damaged archives and batches
included, with dataset.verify=false), digits, the batch loader, and the fake-CIFAR command."""
import gzip
import json
import pickle
import shlex
import subprocess
import sys
import tarfile
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.datasets import CIFAR10

from conftest import train_py
from gnp.data import write_synthetic_cifar, BatchLoader, DataError, load_dataset


@pytest.mark.parametrize("name,classes", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_folder_loads_every_image_and_label(tmp_path, name, classes):
    folder = write_synthetic_cifar(tmp_path, name, n_train=103, n_test=17)
    splits = load_dataset(name, tmp_path, verify=False)
    assert splits.train_images.shape == (103, 3, 32, 32) and splits.train_images.dtype == torch.uint8
    assert splits.test_images.shape == (17, 3, 32, 32)
    assert splits.train_labels.max() < classes and not splits.verified
    # The first training image is the first row of the first batch file, laid out channel-first.
    first_file = sorted(p for p in folder.iterdir() if p.name.startswith(("data_batch_1", "train")))[0]
    with open(first_file, "rb") as f:
        raw = pickle.load(f, encoding="latin1")
    np.testing.assert_array_equal(splits.train_images[0].numpy(), raw["data"][0].reshape(3, 32, 32))


def test_archive_is_extracted_then_loaded(tmp_path):
    archive = write_synthetic_cifar(tmp_path, "cifar10", n_train=20, n_test=10, archive=True)
    assert archive.is_file() and not (tmp_path / "cifar-10-batches-py").exists()
    splits = load_dataset("cifar10", tmp_path, verify=False, limit_train=7)
    assert len(splits.train_labels) == 7 and len(splits.test_labels) == 10
    assert (tmp_path / "cifar-10-batches-py" / "test_batch").is_file()


def test_missing_dataset_says_which_archive_goes_where(tmp_path):
    with pytest.raises(DataError) as e:
        load_dataset("cifar100", tmp_path)
    message = str(e.value)
    assert "cifar-100-python.tar.gz" in message and str(tmp_path) in message and "dataset.download=true" in message


def test_missing_batch_file_is_named_and_never_partially_loaded(tmp_path):
    folder = write_synthetic_cifar(tmp_path, "cifar10")
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3 is missing"):
        load_dataset("cifar10", tmp_path, verify=False)


def test_checksum_mismatch_names_the_corrupted_file(tmp_path):
    write_synthetic_cifar(tmp_path, "cifar10")  # generated data cannot match the published MD5 sums
    with pytest.raises(DataError, match=r"data_batch_1 is corrupted \(MD5 [0-9a-f]{32}, expected c99cafc"):
        load_dataset("cifar10", tmp_path, verify=True)


def test_unreadable_batch_is_named(tmp_path):
    folder = write_synthetic_cifar(tmp_path, "cifar10")
    (folder / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="test_batch could not be read"):
        load_dataset("cifar10", tmp_path, verify=False)


def test_corrupted_archive_is_named(tmp_path):
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"\x1f\x8b truncated")
    with pytest.raises(DataError, match="cifar-10-python.tar.gz is corrupted"):
        load_dataset("cifar10", tmp_path, verify=True)
    with pytest.raises(DataError, match="could not be extracted"):
        load_dataset("cifar10", tmp_path, verify=False)


def _flip_a_bit_in_the_compressed_images(archive, member="cifar-10-batches-py/data_batch_1"):
    """Flip one bit of the compressed archive where deflate still decodes it, to a stream of the same
    length that differs only inside `member`'s images: the tar and the pickle read as before, and only
    gzip's CRC can tell (the silent corruption of a real download)."""
    raw = archive.read_bytes()
    original = gzip.decompress(raw)
    with tarfile.open(archive) as tar:
        info = tar.getmember(member)
        start, end = info.offset_data, info.offset_data + info.size
        images = pickle.loads(tar.extractfile(info).read(), encoding="latin1")["data"]
    middle = len(raw) * (start + end) // 2 // len(original)  # about where the member's middle is compressed
    for offset in range(middle, middle + 200):
        for bit in range(8):
            flipped = bytearray(raw)
            flipped[offset] ^= 1 << bit
            try:
                decoded = zlib.decompressobj(31).decompress(bytes(flipped[:-8]))  # the trailer's CRC unchecked
            except zlib.error:
                continue
            if len(decoded) != len(original) or decoded[:start] != original[:start] or decoded[end:] != original[end:]:
                continue
            try:
                damaged = pickle.loads(decoded[start:end], encoding="latin1")["data"]
            except Exception:
                continue
            if damaged.shape == images.shape and (damaged != images).any():
                archive.write_bytes(bytes(flipped))
                return offset
    raise AssertionError("no bit of the compressed images decodes silently")


def _left_behind(root):
    return sorted(p.name for p in root.iterdir() if p.suffix != ".gz")


def _one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_a_flipped_bit_in_the_compressed_images_is_caught_without_checksums(tmp_path):
    archive = write_synthetic_cifar(tmp_path, "cifar10", n_train=100, n_test=20, archive=True)
    offset = _flip_a_bit_in_the_compressed_images(archive)
    assert offset > len(archive.read_bytes()) // 20  # well inside the compressed data, not a header
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", tmp_path, verify=False)
    message = _one_line(e)
    assert message.startswith(f"{archive} is corrupted: it could not be extracted (CRC check failed")
    assert message.endswith(f"Delete it and download it again from {CIFAR10.url}.")
    assert _left_behind(tmp_path) == []  # no folder, no temporary folder: the next run tries the archive again


@pytest.mark.parametrize("keep", [0.5, 0.999])  # in the middle of the images, or in the tar's final padding
def test_a_truncated_archive_is_caught_and_leaves_nothing(tmp_path, keep):
    archive = write_synthetic_cifar(tmp_path, "cifar10", n_train=100, n_test=20, archive=True)
    raw = archive.read_bytes()
    archive.write_bytes(raw[: int(len(raw) * keep)])
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", tmp_path, verify=False)
    assert _one_line(e).startswith(f"{archive} is corrupted: it could not be extracted (")
    assert _left_behind(tmp_path) == []


def _archive_with(tmp_path, damage):
    """A fake CIFAR-10 archive whose gzip and tar are sound but whose data_batch_2 `damage` rewrote."""
    folder = write_synthetic_cifar(tmp_path / "build", "cifar10", n_train=100, n_test=20)
    damage(folder / "data_batch_2")
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return archive


def _rewrite_batch(path, **changes):
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="latin1")
    with open(path, "wb") as f:
        pickle.dump({**batch, **changes}, f, protocol=2)


@pytest.mark.parametrize("damage, problem", [
    (lambda path: path.write_bytes(path.read_bytes()[:1000]), "could not be read as a CIFAR batch (UnpicklingError"),
    (lambda path: _rewrite_batch(path, data=np.zeros((20, 3071), np.uint8)),
     "holds images of uint8 [20, 3071], not uint8 [n, 3072]"),
    (lambda path: _rewrite_batch(path, labels=[0] * 19), "holds 20 images but labels of int64 [19]"),
    (lambda path: _rewrite_batch(path, labels=[10] * 20), "holds labels outside 0-9"),
], ids=["truncated", "image shape", "label count", "label range"])
def test_a_damaged_batch_is_named_in_an_archive_and_in_a_folder(tmp_path, damage, problem):
    archive = _archive_with(tmp_path, damage)
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", tmp_path, verify=False)
    assert _one_line(e).startswith(f"{archive} is corrupted: its cifar-10-batches-py/data_batch_2 {problem}")
    assert _one_line(e).endswith("Delete it and download it again from " + CIFAR10.url + ".")
    assert _left_behind(tmp_path) == ["build"]  # nothing extracted into the data root

    folder = tmp_path / "build" / "cifar-10-batches-py"
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", tmp_path / "build", verify=False)
    assert _one_line(e).startswith(f"{folder / 'data_batch_2'} {problem}")
    assert _one_line(e).endswith(f"Delete {folder} and extract cifar-10-python.tar.gz again, or replace the file.")


def test_train_py_stops_on_a_corrupted_archive_with_one_line(tmp_path):
    archive = write_synthetic_cifar(tmp_path / "data", "cifar10", n_train=100, n_test=20, archive=True)
    _flip_a_bit_in_the_compressed_images(archive)
    done = train_py(f"dataset.root={tmp_path / 'data'}", "dataset.verify=false", "device=cpu", "wandb.mode=disabled",
                    f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr + done.stdout
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, done.stderr
    assert errors[0].startswith(f"error: {archive} is corrupted: it could not be extracted (CRC check failed")
    assert errors[0].endswith(f"Delete it and download it again from {CIFAR10.url}.")
    assert not (tmp_path / "run").exists()


def test_download_without_network_explains_and_leaves_no_partial_file(tmp_path, monkeypatch):
    monkeypatch.setattr(CIFAR10, "url", "http://127.0.0.1:9/cifar-10-python.tar.gz")  # nothing listens
    with pytest.raises(DataError, match="Downloading http://127.0.0.1:9/.* failed") as e:
        load_dataset("cifar10", tmp_path, download=True)
    assert "cifar-10-python.tar.gz" in str(e.value)
    assert not (tmp_path / "cifar-10-python.tar.gz").exists()


def test_digits_split_is_fixed_and_real():
    a, b = load_dataset("digits"), load_dataset("digits")
    assert a.train_images.shape == (1497, 3, 32, 32) and a.test_images.shape == (300, 3, 32, 32)
    assert torch.equal(a.test_labels, b.test_labels) and torch.equal(a.train_images, b.train_images)
    assert set(a.test_labels.tolist()) == set(range(10))
    assert a.train_images.max() == 255 and a.train_images.min() == 0


def test_digits_are_scikit_learns_digits_read_without_importing_it():
    from sklearn.datasets import load_digits

    reference = load_digits()
    splits = load_dataset("digits")
    images = torch.cat([splits.test_images, splits.train_images])
    order = torch.randperm(1797, generator=torch.Generator().manual_seed(0))  # the fixed split, test first
    expected = F.interpolate(torch.tensor(reference.images, dtype=torch.float32)[:, None] * (255 / 16), size=32,
                             mode="bilinear", align_corners=False).round().clamp(0, 255).to(torch.uint8)
    assert torch.equal(images, expected[order].expand(-1, 3, -1, -1))
    assert torch.equal(torch.cat([splits.test_labels, splits.train_labels]), torch.tensor(reference.target)[order])
    done = subprocess.run([sys.executable, "-c", "import sys; from gnp.data import load_dataset; "
                           "load_dataset('digits'); print(sorted(m for m in ('sklearn', 'torchvision') if m in "
                           "sys.modules))"], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "[]", done.stderr[-2000:]


def _loader(n=50, **kwargs):
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 32, 32)
    defaults = dict(batch_size=8, device=torch.device("cpu"), mean=(0, 0, 0), std=(1 / 255,) * 3, train=True)
    return BatchLoader(images, torch.arange(n), **{**defaults, **kwargs})


def test_training_batches_drop_the_last_partial_batch_and_never_repeat_an_image():
    loader = _loader()
    labels = torch.cat([y for _, y in loader.epoch(0)])
    assert len(loader) == 6 and len(labels) == 48 and len(set(labels.tolist())) == 48


def test_normalised_images_match_their_labels():
    for x, y in _loader().epoch(3):
        assert torch.equal(x[:, 0, 0, 0], y.float())  # mean 0, std 1/255: x is the raw byte


def test_shuffle_depends_only_on_seed_and_epoch():
    first = lambda loader, epoch: next(iter(loader.epoch(epoch)))[1]  # noqa: E731
    assert torch.equal(first(_loader(), 1), first(_loader(), 1))
    assert not torch.equal(first(_loader(), 1), first(_loader(), 2))
    assert not torch.equal(first(_loader(), 1), first(_loader(seed=1), 1))


def test_replicas_split_each_global_batch_without_overlap():
    full = [y for _, y in _loader().epoch(0)]
    shards = [[y for _, y in _loader(rank=r, world_size=2).epoch(0)] for r in range(2)]
    for b, batch in enumerate(full):
        assert torch.equal(torch.cat([shards[0][b], shards[1][b]]), batch)


def test_test_loader_keeps_order_and_the_last_partial_batch():
    loader = _loader(n=20, train=False)
    labels = torch.cat([y for _, y in loader.epoch()])
    assert len(loader) == 3 and torch.equal(labels, torch.arange(20))


def test_a_training_batch_must_fit_the_set_and_split_across_replicas():
    with pytest.raises(ValueError, match=r"train.batch_size=7 is invalid: it is split evenly over the 2 processes; "
                                         r"use a multiple of 2"):
        _loader(batch_size=7, world_size=2)
    with pytest.raises(ValueError, match=r"train.batch_size=64 is invalid: larger than the training set \(50 images\)"):
        _loader(batch_size=64)
    assert len(_loader(batch_size=64, train=False)) == 1  # evaluation takes a partial batch


def test_the_fake_cifar_command_writes_archives_the_loader_reads(tmp_path, capsys):
    from gnp.data import main

    main(["fake-cifar", str(tmp_path), "--dataset", "cifar100", "--train", "30", "--test", "12"])
    assert "dataset.root=" in capsys.readouterr().out
    splits = load_dataset("cifar100", tmp_path, verify=False)
    assert len(splits.train_labels) == 30 and len(splits.test_labels) == 12 and splits.train_labels.max() < 100


def test_the_fake_cifar_command_prints_a_quick_training_command_that_finishes(tmp_path, capsys):
    from gnp.data import main

    main(["fake-cifar", str(tmp_path / "fake"), "--dataset", "cifar100", "--train", "64", "--test", "32"])
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    words = shlex.split(printed)
    assert words[:2] == ["python", "train.py"] and "dataset=cifar100" in words and "device=cpu" in words
    # exactly the printed arguments, with the repository's train.py, in a fresh folder
    done = train_py(*words[2:], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    [summary] = (tmp_path / "outputs").rglob("summary.json")
    record = json.loads(summary.read_text())
    assert record["status"] == "finished" and record["dataset"] == "cifar100"
