"""Rewrite the parts of docs/ that restate conf/: the config keys of docs/configuration.md, each method's
settings in docs/methods.md and the launchers' keys in docs/sweeps.md (gnp.config_docs). The speed tables and
the cost table have their own:

    python scripts/docs.py
    python scripts/benchmark.py --docs      # docs/speed.md, from results/benchmarks/
    python scripts/reproduce.py --docs      # docs/tables.md's cost table, from conf/table/ and the benchmarks

(`make docs` runs all three.)
"""
from __future__ import annotations

import sys

from gnp import config_docs
from gnp.io import OutputError
from gnp.tables import TableError


def main() -> int:
    try:
        changed = config_docs.update()
    except (TableError, OutputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for block, rewritten in changed:
        print(f"{block.page} ({block.what}): {'rewritten' if rewritten else 'already current'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
