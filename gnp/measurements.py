"""Measurements of speed: the benchmark file format (results/benchmarks/*.json), written by the
benchmark (gnp.bench) atomically, and its one reader, shared by the speed tables of docs/speed.md (gnp.bench.speed_tables)
and the time estimates of the tables (gnp.tables.estimates), which stand on it, not on the benchmark.

A file is one JSON object with `"format": FORMAT`, the environment it was measured in, its settings
and a record per stage (`models`, `exact`, `loader`, `loop`, `checks`, `analysis`); a stage that did
not run is absent. Each step variant of a model says what it is (`role`): one of the suite's methods
at the main setting (named by its config in conf/method/, and `hybrid`), the hand-written two-pass
reference step (`two_pass`) or GNP with a fast path flipped (`gnp[channels_last=off]`, ...).
"""
from __future__ import annotations

import json
from pathlib import Path

from gnp import io
from gnp.console import first_line
from gnp.paths import BENCHMARK_DIR

FORMAT = "gnp-benchmark/2"
METHOD, REFERENCE, FAST_PATH = "method", "reference", "fast_path"  # a step variant's role


class BenchmarkFileError(ValueError):
    """A file in the folder is not a benchmark file; the message names it and the fix."""


def write(path: Path, report: dict) -> None:
    """Write `report` to `path` atomically (a killed run leaves the previous file whole)."""
    io.write_json(path, report)


def read_all(folder: Path = BENCHMARK_DIR) -> list[tuple[Path, dict]]:
    """Every benchmark file in `folder`, in name order, as (path, content)."""
    files = []
    for path in sorted(Path(folder).glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BenchmarkFileError(f"cannot read {path} ({first_line(e)}); restore it from git or move it "
                                     f"away") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise BenchmarkFileError(f"{path} is not a {FORMAT} file (scripts/benchmark.py writes them); "
                                     f"move it out of {folder}")
        files.append((path, data))
    return files


def method_variants(variants: dict[str, dict]) -> dict[str, dict]:
    """Those of a model's step variants that are the suite's methods at the main setting: not the
    hand-written reference step, nor GNP with a fast path flipped."""
    return {name: v for name, v in variants.items() if v["role"] == METHOD}


def median_ms(variants: dict[str, dict], name: str) -> float:
    """The median milliseconds per step of one of a model's step variants."""
    return variants[name]["ms_per_step"]["median"]
