"""Run the suite's CUDA paths end to end and measure their throughput, in one run.

    python scripts/cuda_check.py                    # on a GPU machine; about two minutes on an H100
    python scripts/cuda_check.py --device cpu --train-images 1024 --test-images 256 --models   # smoke run

1. loader: images/s of the device-resident loader with each augmentation, over one epoch.
2. training: the real loop (gnp.training.train) on CIFAR-10-sized random data written in the real
   on-disk format: 2 epochs each of SGD, SAM and GNP on ResNet-18 (bf16 autocast on CUDA), the
   images/s of the second epoch and the SAM/GNP cost relative to SGD; then a finished run restarted.
3. models: one short GNP epoch of WRN-28-10, PyramidNet-272 (ShakeDrop, its mixup recipe) and ViT-S.

Each stage checks what it can (finite losses, errors in range, the device used) and everything goes
to one JSON file (default results/benchmarks/cuda_check_<device>.json).
"""
from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from gnp import io
from gnp.augment import build_augmentation
from gnp.data import BatchLoader, load_dataset, write_synthetic_cifar
from gnp.distributed import pick_device
from gnp.training import train

ROOT = Path(__file__).resolve().parents[1]
AUGMENTATIONS = ("none", "basic", "cutout", "autoaugment", "autoaugment_mixcut")
MODELS = ("wrn28_10", "pyramidnet272", "vit_s")  # PyramidNet-272 needs about 12 GiB at its batch of 128


def compose_config(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def loader_throughput(data, device: torch.device, batch_size: int) -> dict[str, float]:
    cfg = compose_config()
    rates = {}
    for name in AUGMENTATIONS:
        aug_cfg = compose_config(f"aug={name}").aug
        loader = BatchLoader(data.train_images, data.train_labels, batch_size=batch_size, device=device,
                             mean=cfg.dataset.mean, std=cfg.dataset.std, train=True,
                             augment=build_augmentation(aug_cfg, mean=cfg.dataset.mean), num_classes=10)
        for epoch in range(2):  # the first epoch warms up kernels and the allocator
            start = time.perf_counter()
            checksum = sum(x.float().sum() for x, _ in loader.epoch(epoch))
            assert math.isfinite(float(checksum)), f"aug={name} produced non-finite images"
            seconds = time.perf_counter() - start
        rates[name] = len(loader) * batch_size / seconds
        print(f"loader aug={name:<20} {rates[name]:>12,.0f} images/s", flush=True)
    return rates


def run(run_dir: Path, *overrides: str) -> dict:
    summary = train(compose_config(*overrides), run_dir)
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(row["train_loss"]) and 0 <= row["test_error"] <= 100 for row in history), history
    return {"summary": summary, "last_epoch": history[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--train-images", type=int, default=50_000)
    parser.add_argument("--test-images", type=int, default=10_000)
    parser.add_argument("--model-images", type=int, default=5_120, help="training images of each model's epoch")
    parser.add_argument("--models", nargs="*", default=list(MODELS), help="models of stage 3 (none: skip it)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = pick_device(args.device)
    report: dict = {"torch": torch.__version__, "device": str(device),
                    "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_synthetic_cifar(tmp / "data", "cifar10", args.train_images, args.test_images)
        data = load_dataset("cifar10", tmp / "data", verify=False)
        report["loader_images_per_second"] = loader_throughput(data, device, 256)

        common = (f"device={device}", f"dataset.root={tmp / 'data'}", "dataset.verify=false", "wandb.mode=disabled",
                  "train.progress=false")
        report["training"] = {}
        for method in ("sgd", "sam", "gnp"):
            result = run(tmp / method, *common, f"method={method}", "model=resnet18", "train.epochs=2")
            report["training"][method] = result
            assert result["summary"]["device"] != "cpu" or device.type == "cpu"
        rate = {m: report["training"][m]["last_epoch"]["images_per_second"] for m in report["training"]}
        report["training_step_time_ratio"] = {"sam/sgd": rate["sgd"] / rate["sam"], "gnp/sgd": rate["sgd"] / rate["gnp"]}
        print(f"training images/s {rate}; step time ratios {report['training_step_time_ratio']}", flush=True)

        start = time.perf_counter()
        restarted = run(tmp / "gnp", *common, "method=gnp", "model=resnet18", "train.epochs=2")
        assert restarted["summary"]["test_error"] == report["training"]["gnp"]["summary"]["test_error"]
        report["restart_of_a_finished_run_seconds"] = time.perf_counter() - start

        report["models"] = {}
        for model in args.models:
            result = run(tmp / model, *common, "method=gnp", f"model={model}", "train.epochs=1",
                         f"dataset.limit_train={args.model_images}")
            report["models"][model] = result
            print(f"{model}: {result['last_epoch']['images_per_second']:,.0f} images/s with GNP", flush=True)

    if device.type == "cuda":
        report["peak_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    out = args.out or ROOT / "results" / "benchmarks" / f"cuda_check_{device.type}.json"
    io.write_json(out, report)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
