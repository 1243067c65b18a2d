"""Table files: `conf/table/<name>.yaml` parsed into a `Table` (rows, columns, methods, published
sources), every key checked, with a one-line `TableError` naming the file and the fix."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

import yaml

from gnp.paths import CONF_DIR

TABLE_DIR = CONF_DIR / "table"

_TABLE_KEYS = {"title", "note", "runnable", "reason", "seeds", "overrides", "datasets", "columns", "rows", "methods",
               "published", "heatmap"}
_ROW_KEYS = {"label", "augs", "overrides", "runnable", "reason"}
_METHOD_KEYS = {"label", "overrides", "datasets", "runnable", "reason"}
_SOURCE_KEYS = {"file", "label", "path", "methods", "rows", "note"}


class TableError(ValueError):
    """A table name, a table file or a runs folder is invalid; the message says what to change."""


@dataclass(frozen=True)
class Row:
    key: str                          # the model config: conf/model/<key>.yaml
    label: str
    augs: dict[str, str | None]       # column -> aug choice of this row (None: the model config's own)
    overrides: tuple[str, ...]
    reason: str | None                # why it cannot run yet; None: runnable


@dataclass(frozen=True)
class Method:
    key: str
    label: str
    overrides: tuple[str, ...]
    per_dataset: dict[str, tuple[str, ...]]
    reason: str | None


@dataclass(frozen=True)
class Source:
    """Published numbers: where in results/published/<file>.yaml each cell's value is."""
    file: str
    label: str
    path: str                         # dotted, with {model} {dataset} {column}
    methods: dict[str, str]           # our method -> its key in the file; others are not covered
    rows: tuple[str, ...] | None      # the rows it covers; None: all
    note: str | None


@dataclass(frozen=True)
class Table:
    name: str
    title: str
    note: str | None
    reason: str | None
    seeds: tuple[int, ...]
    overrides: tuple[str, ...]
    datasets: dict[str, str]          # key -> label, in column order
    columns: dict[str, str]
    rows: dict[str, Row]
    methods: dict[str, Method]
    published: tuple[Source, ...]
    heatmap: tuple[str, str] | None   # config keys of the heatmap's rows and columns


def table_names() -> list[str]:
    return sorted(p.stem for p in TABLE_DIR.glob("*.yaml"))


def load_table(name: str) -> Table:
    names = table_names()
    if name not in names:
        raise TableError(f"unknown table {name!r}; choose one of: {', '.join(names)}")
    return parse_table(name, yaml.safe_load((TABLE_DIR / f"{name}.yaml").read_text()))


def parse_table(name: str, raw: dict) -> Table:
    where = f"conf/table/{name}.yaml"
    _check_keys(where, raw, _TABLE_KEYS, required=("title", "seeds", "datasets", "columns", "rows", "methods"))
    columns = _labels(raw["columns"])
    rows = {}
    for key, spec in raw["rows"].items():
        spec = spec or {}
        _check_keys(f"{where}: row {key}", spec, _ROW_KEYS)
        augs = spec.get("augs", {c: c for c in columns})
        unknown = sorted(set(augs) - set(columns))
        if unknown:
            raise TableError(f"{where}: row {key}: augs names column(s) {', '.join(unknown)}; "
                             f"the columns are {', '.join(columns)}")
        rows[key] = Row(key, spec.get("label", key), dict(augs), tuple(spec.get("overrides", ())),
                        _reason(f"{where}: row {key}", spec))
    methods = {}
    for key, spec in raw["methods"].items():
        _check_keys(f"{where}: method {key}", spec, _METHOD_KEYS, required=("overrides",))
        if not re.fullmatch(r"[\w.-]+", key):
            raise TableError(f"{where}: method name {key!r} names run folders: use letters, digits, _ . -")
        per_dataset = {d: tuple(o) for d, o in (spec.get("datasets") or {}).items()}
        methods[key] = Method(key, spec.get("label", key), tuple(spec["overrides"]), per_dataset,
                              _reason(f"{where}: method {key}", spec))
    sources = []
    for spec in raw.get("published") or ():
        _check_keys(f"{where}: published", spec, _SOURCE_KEYS, required=("file", "label", "path", "methods"))
        sources.append(Source(spec["file"], spec["label"], spec["path"], dict(spec["methods"]),
                              tuple(spec["rows"]) if spec.get("rows") else None, spec.get("note")))
    heatmap = tuple(raw["heatmap"]) if raw.get("heatmap") else None
    if heatmap is not None and len(heatmap) != 2:
        raise TableError(f"{where}: heatmap must be [row key, column key], e.g. [method.alpha, method.r]")
    return Table(name, raw["title"], raw.get("note"), _reason(where, raw), tuple(int(s) for s in raw["seeds"]),
                 tuple(raw.get("overrides", ())), _labels(raw["datasets"]), columns, rows, methods, tuple(sources),
                 heatmap)


def _check_keys(where: str, spec: dict, allowed: set[str], required: Iterable[str] = ()) -> None:
    if not isinstance(spec, dict):
        raise TableError(f"{where}: expected a mapping, got {spec!r}")
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise TableError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
    missing = [k for k in required if k not in spec]
    if missing:
        raise TableError(f"{where}: missing key(s) {', '.join(missing)}")


def _labels(spec: dict | list) -> dict[str, str]:
    return dict(spec) if isinstance(spec, dict) else {key: key for key in spec}


def _reason(where: str, spec: dict) -> str | None:
    if spec.get("runnable", True):
        return None
    if not spec.get("reason"):
        raise TableError(f"{where}: runnable: false needs a reason: (what is missing)")
    return spec["reason"]

