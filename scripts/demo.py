"""`make demo`: SGD, SAM and GNP on the offline digits task, then their test errors side by side.

Each run is a real `train.py` run (conf/experiment/digits_demo.yaml) with all of its outputs in
outputs/demo/<time>/<method>/. Extra arguments are Hydra overrides: `scripts/demo.py train.epochs=3`.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from gnp.training import train

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("sgd", "sam", "gnp")


def main(overrides: list[str]) -> None:
    out = ROOT / "outputs" / "demo" / time.strftime("%Y-%m-%d_%H-%M-%S")
    summaries = []
    for method in METHODS:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose(config_name="config", overrides=["experiment=digits_demo", f"method={method}", *overrides])
        print(f"\n== {method}: r={cfg.method.r} alpha={cfg.method.alpha}, {cfg.train.epochs} epochs on digits ==")
        summaries.append(train(cfg, out / method))

    print(f"\nTest error on digits (300 held-out images; chance is 90%), outputs in {out.relative_to(ROOT)}/")
    print(f"{'method':<8}{'r':>6}{'alpha':>7}{'test error':>12}{'best':>8}{'seconds':>9}")
    for s in summaries:
        print(f"{s['method']:<8}{s['r']:>6}{s['alpha']:>7}{s['test_error']:>11.2f}%{s['best_test_error']:>7.2f}%"
              f"{s['wall_seconds']:>9.0f}")


if __name__ == "__main__":
    main(sys.argv[1:])
