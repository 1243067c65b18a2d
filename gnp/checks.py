"""The checks of a value every part of the suite makes (configs, method settings, command lines, files read
back), written once. Nothing here imports more than the standard library."""
from __future__ import annotations

import argparse
import math
from typing import Any, Callable


def is_int(value: Any) -> bool:
    """An integer, and not a bool (YAML's true is no count)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite real number: an int or a float, not a bool, not NaN or infinite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def positive(kind: Callable[[str], Any] = int) -> Callable[[str], Any]:
    """An argparse type: a number of `kind` > 0, or a one-line usage error naming the value."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value > 0:
            what = "an integer >= 1" if kind is int else "a number > 0"
            raise argparse.ArgumentTypeError(f"{text} is invalid: it must be {what}")
        return value
    parse.__name__ = kind.__name__
    return parse
