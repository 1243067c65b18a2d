"""`make demo`: plain SGD, SAM, GNP and ASAM on the offline digits task, then their test errors side by side.

Each run is a real `train.py` run (conf/experiment/digits_demo.yaml) with all of its outputs in
outputs/demo/<time>/<method>/. Extra arguments are Hydra overrides: `scripts/demo.py train.epochs=3`.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from gnp.compose import compose_config
from gnp.training import train

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("plain", "sam", "gnp", "asam")


def main(overrides: list[str]) -> None:
    out = ROOT / "outputs" / "demo" / time.strftime("%Y-%m-%d_%H-%M-%S")
    summaries = []
    for method in METHODS:
        cfg = compose_config("experiment=digits_demo", f"method={method}", *overrides)
        settings = ", ".join(f"{k}={cfg.method[k]}" for k in ("r", "alpha") if k in cfg.method)
        print(f"\n== {method} ({settings or 'one pass'}), {cfg.train.epochs} epochs on digits ==")
        summaries.append(train(cfg, out / method))

    print(f"\nTest error on digits (300 held-out images; chance is 90%), outputs in {out.relative_to(ROOT)}/")
    print(f"{'method':<8}{'r':>6}{'alpha':>7}{'test error':>12}{'best':>8}{'seconds':>9}")
    for s in summaries:
        r, alpha = (s["method_settings"].get(k, "-") for k in ("r", "alpha"))
        print(f"{s['method']:<8}{r:>6}{alpha:>7}{s['test_error']:>11.2f}%{s['best_test_error']:>7.2f}%"
              f"{s['wall_seconds']:>9.0f}")

if __name__ == "__main__":
    main(sys.argv[1:])
