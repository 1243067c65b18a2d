"""Published numbers (results/published/*.yaml) for the cells of a table."""
from __future__ import annotations

from typing import Any

import yaml

from gnp.checks import is_number
from gnp.tables.plans import Cell
from gnp.paths import PUBLISHED_DIR
from gnp.tables.spec import Source, TableError


NOT_COVERED = object()  # the source does not report this method or row at all


def published_value(source: Source, cell: Cell) -> float | None | object:
    """The source's value for the cell: a number, None (n/a: not known) or NOT_COVERED."""
    if (source.rows and cell.row not in source.rows) or cell.method not in source.methods:
        return NOT_COVERED
    node: Any = _published_file(source.file)
    for part in source.path.format(model=cell.row, dataset=cell.dataset, column=cell.column).split("."):
        node = node.get(part) if isinstance(node, dict) else None
    value = node.get(source.methods[cell.method]) if isinstance(node, dict) else None
    return float(value) if is_number(value) else None


_published_cache: dict[str, dict] = {}


def _published_file(name: str) -> dict:
    if name not in _published_cache:
        path = PUBLISHED_DIR / f"{name}.yaml"
        if not path.exists():
            raise TableError(f"{path} does not exist; the table's published: entries name files in {PUBLISHED_DIR}")
        _published_cache[name] = yaml.safe_load(path.read_text()) or {}
    return _published_cache[name]

