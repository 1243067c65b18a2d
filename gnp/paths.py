"""The repository's folders and files that several modules use, in one place (no imports beyond the standard
library): the configs, the committed results, the docs, and the default folders of runs. The files of a run
directory are gnp.rundir's."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"
BENCHMARK_DIR = ROOT / "results" / "benchmarks"  # the benchmark's files (gnp.measurements)
PUBLISHED_DIR = ROOT / "results" / "published"  # the papers' numbers the tables compare with
DOCS_DIR = ROOT / "docs"  # the reference pages; their speed, cost, key and settings tables are generated
# Default folders, relative to the working directory: a single run's (conf/config.yaml's hydra.run.dir starts
# with it), and the tables' runs (scripts/reproduce.py --root, `make tables RUNS=...`).
OUTPUTS_DIR = "outputs"
RUNS_DIR = "runs"
