"""`make demo`: plain SGD, SAM, GNP and ASAM on the offline digits task, then their test errors side by side.

Each run is a real `train.py` run (conf/experiment/digits_demo.yaml) with all of its outputs in
outputs/demo/<time>/<method>/. Extra arguments are Hydra overrides: `scripts/demo.py train.epochs=3`.
"""
from __future__ import annotations

import sys
import time

from gnp.compose import compose_config
from gnp.config import method_label
from gnp.paths import OUTPUTS_DIR, ROOT
from gnp.training import train

METHODS = ("plain", "sam", "gnp", "asam")


def main(overrides: list[str]) -> None:
    out = ROOT / OUTPUTS_DIR / "demo" / time.strftime("%Y-%m-%d_%H-%M-%S")
    summaries = []
    for method in METHODS:
        cfg = compose_config("experiment=digits_demo", f"method={method}", *overrides)
        settings = method_label(cfg.method)
        print(f"\n== {method} ({settings or 'one pass'}), {cfg.train.epochs} epochs on digits ==")
        summaries.append((settings, train(cfg, out / method)))

    print(f"\nTest error on digits (300 held-out images; chance is 90%), outputs in {out.relative_to(ROOT)}/")
    print(f"{'method':<8}{'settings':<18}{'test error':>12}{'best':>8}{'seconds':>9}")
    for settings, s in summaries:
        print(f"{s.method:<8}{settings or '-':<18}{s.test_error:>11.2f}%{s.best_test_error:>7.2f}%"
              f"{s.wall_seconds:>9.0f}")


if __name__ == "__main__":
    main(sys.argv[1:])
