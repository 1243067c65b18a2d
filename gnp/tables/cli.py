"""The command-line options scripts/reproduce.py and scripts/make_tables.py share, and their one-line
errors."""
from __future__ import annotations

import argparse
import shlex
import sys
from typing import Iterable

from gnp.checks import positive
from gnp.paths import RUNS_DIR
from gnp.tables.plans import Shrink


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line, and list the options when a flag is unknown."""

    def error(self, message: str):
        if message.startswith("unrecognized arguments"):
            options = sorted({s for a in self._actions for s in a.option_strings if s.startswith("--")})
            message += f"; options: {', '.join(options)}"
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_selection_arguments(parser: argparse.ArgumentParser) -> None:
    """The options both scripts share: where runs go, and a smoke-test shrink of every cell."""
    parser.add_argument("--root", default=RUNS_DIR, help=f"folder of the table's run directories (default: {RUNS_DIR})")
    parser.add_argument("--seeds", type=_seeds, help="comma-separated seeds instead of the table's, e.g. 0,1,2,3")
    parser.add_argument("--limit-train", type=positive(), metavar="N",
                        help="smoke test: N training (and test) images per run (runs go to <root>/<table>-smoke-...)")
    parser.add_argument("--epochs", type=positive(), metavar="E", help="smoke test: E epochs per run")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="one more Hydra override for every cell (repeatable), e.g. model.width=4")


def selection(args: argparse.Namespace) -> dict:
    """make_plans' keyword arguments from the shared options."""
    bad = [o for o in args.override if "=" not in o]
    if bad:
        fail(f"--override {bad[0]!r}: expected KEY=VALUE, e.g. --override model.width=4")
    return {"root": args.root, "seeds": args.seeds, "shrink": Shrink(args.limit_train, args.epochs),
            "extra": tuple(args.override)}


def reproduce_command(table: str, root: str, shrink: Shrink, extra: Iterable[str], seeds=None) -> str:
    """The scripts/reproduce.py command line of a selection (without --launch)."""
    flags = [table] + (["--root", root] if root != RUNS_DIR else [])
    return "python scripts/reproduce.py " + shlex.join(flags + selection_flags(shrink, extra, seeds))


def selection_flags(shrink: Shrink, extra: Iterable[str], seeds=None) -> list[str]:
    """The options that choose a selection of runs (--seeds, --limit-train, --epochs, --override)."""
    flags = []
    if seeds is not None:
        flags += ["--seeds", ",".join(map(str, seeds))]
    if shrink.limit_train is not None:
        flags += ["--limit-train", str(shrink.limit_train)]
    if shrink.epochs is not None:
        flags += ["--epochs", str(shrink.epochs)]
    for override in extra:
        flags += ["--override", override]
    return flags


def _seeds(text: str) -> tuple[int, ...]:
    parts = text.split(",")
    if not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers >= 0, e.g. 0,1,2")
    return tuple(int(p) for p in parts)


def fail(message: str) -> None:
    """End a script with a one-line error."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)
