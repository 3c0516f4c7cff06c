"""The tools' bounded numbers (`agent.tools.numbers`): accepted exactly when finite and within bounds."""

from __future__ import annotations

import argparse
import math
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.tools.numbers import check_number, describe_range, number_argument


@given(st.floats(allow_nan=True, allow_infinity=True), st.booleans())
def test_a_float_is_accepted_exactly_when_finite_and_within(value: float, above_low: bool) -> None:
    parse = number_argument(float, 0, 3600, above_low=above_low)
    within = math.isfinite(value) and (value > 0 if above_low else value >= 0) and value <= 3600
    if within:
        assert parse(repr(value)) == value
    else:
        expected = f"expected {describe_range(float, 0, 3600, above_low=above_low)}, got '{value!r}'"
        with pytest.raises(argparse.ArgumentTypeError, match=re.escape(expected)):
            parse(repr(value))


@given(st.integers(min_value=-(10**30), max_value=10**30))
def test_a_whole_number_is_accepted_exactly_when_within(value: int) -> None:
    parse = number_argument(int, 1, 64)
    if 1 <= value <= 64:
        assert parse(str(value)) == value
    else:
        with pytest.raises(argparse.ArgumentTypeError, match=f"expected a whole number from 1 to 64, got '{value}'"):
            parse(str(value))


def test_what_is_not_a_number_is_named() -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=r"expected a whole number from 1 to 64, got '2\.5'"):
        number_argument(int, 1, 64)("2.5")
    with pytest.raises(argparse.ArgumentTypeError, match="got 'soon'"):
        number_argument(float, 0, 1)("soon")


def test_the_message_names_the_option_and_shows_bounds_as_people_write_them() -> None:
    with pytest.raises(ValueError, match=r"^--prefill: expected a whole number from 0 to 10,000,000, got 10000000001$"):
        check_number("--prefill", 10_000_000_001, 0, 10_000_000)
    with pytest.raises(ValueError, match=r"^--seconds: expected a number above 0 and at most 0\.5, got nan$"):
        check_number("--seconds", math.nan, 0, 0.5, above_low=True)
