"""Numbers the tools take from their users: finite, within stated bounds, refused with one message.

Every count a tool turns into processes, connections, files or rows has an upper bound, because a
typo there (`--workers 99999`) otherwise starts that many processes before anything can say no; and
every float is finite, because `nan` passes any `value <= 0` test (every comparison with it is
false) and `inf` turns a duration into a run that never ends.

    check_number("--workers", 99999, 1, 64)     # ValueError: --workers: expected a whole number from 1 to 64, got 99999
    parser.add_argument("--jobs", type=number_argument(int, 1, 32))
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def describe_range(kind: type[int] | type[float], low: float, high: float, *, above_low: bool = False) -> str:
    """'a whole number from 1 to 64', 'a number above 0 and at most 3,600'."""
    noun = "a whole number" if kind is int else "a number"
    if above_low:
        return f"{noun} above {_shown(low)} and at most {_shown(high)}"
    return f"{noun} from {_shown(low)} to {_shown(high)}"


def check_number(label: str, value: float, low: float, high: float, *, above_low: bool = False) -> None:
    """Raise ValueError naming `label` unless `value` is finite and within `low`..`high` (above `low` when asked)."""
    within = math.isfinite(value) and (value > low if above_low else value >= low) and value <= high
    if not within:
        kind = int if isinstance(value, int) else float
        expected = describe_range(kind, low, high, above_low=above_low)
        raise ValueError(f"{label}: expected {expected}, got {value if kind is int else f'{value:g}'}")


def _shown(value: float) -> str:
    # 1000000 as "1,000,000", not "1e+06"; 0.5 as "0.5"; nan and inf as they are.
    if isinstance(value, int) or (math.isfinite(value) and value == int(value) and abs(value) < 1e15):
        return f"{int(value):,}"
    return f"{value:g}"


def number_argument(
    kind: type[int] | type[float], low: float, high: float, *, above_low: bool = False
) -> Callable[[str], int | float]:
    """An argparse type: a number of `kind` within the bounds, or argparse's usage error saying which."""
    expected = describe_range(kind, low, high, above_low=above_low)

    def parse(text: str) -> int | float:
        try:  # not a number of the kind, or out of bounds: the same message
            value = kind(text)
            check_number("", value, low, high, above_low=above_low)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        return value

    return parse


__all__ = ["check_number", "describe_range", "number_argument"]
