"""Eager checks of numeric arguments, with errors that name the argument and the value received.

A NaN guidance scale used to write black images with exit 0, a step count of 0 silently meant "the default" and
a class label 1.7 became 1; each public entry point checks its numbers with these before any model runs.
"""

from __future__ import annotations

import argparse
import math
import numbers


def class_label_value(text: str) -> int | str:
    """A class label as typed: ASCII digits are an index, anything else a name ("²" and "１" are digits to
    ``str.isdigit`` but not to ``int``, and are names here, which the model then refuses by name)."""
    return int(text) if text.isascii() and text.isdigit() else text


def whole_number(value, name: str, minimum: int = 1) -> int:
    """``value`` as an int if it is a whole number >= ``minimum`` (1.0 is accepted, 1.7, NaN and True are not)."""
    whole = not isinstance(value, bool) and (isinstance(value, numbers.Integral) or (
        isinstance(value, numbers.Real) and math.isfinite(value) and float(value).is_integer()))
    if not whole or value < minimum:
        raise ValueError(f"{name} must be a whole number >= {minimum}, got {value!r}")
    return int(value)


def finite_number(value, name: str, minimum: float | None = None, exclusive: bool = False,
                  maximum: float | None = None) -> float:
    """``value`` as a float if it is finite (and >= ``minimum``, or > it when ``exclusive``; and <= ``maximum``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if minimum is not None and (value < minimum or (exclusive and value == minimum)):
        raise ValueError(f"{name} must be {'>' if exclusive else '>='} {minimum:g}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum:g}, got {value!r}")
    return float(value)


def count_argument(minimum: int = 1):
    """An argparse type for counts: 0 (where 1 is the least), -3, 1.7 and NaN are errors, not defaults."""

    def parse(text: str) -> int:
        try:
            return whole_number(int(text) if text.strip().lstrip("-").isdigit() else float(text), "value", minimum)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number >= {minimum}, got {text!r}") from None

    return parse


def number_argument(minimum: float | None = None, exclusive: bool = False):
    """An argparse type for finite numbers (NaN and inf are errors), optionally bounded below."""

    def parse(text: str) -> float:
        try:
            return finite_number(float(text), "value", minimum, exclusive)
        except ValueError:
            bound = "" if minimum is None else f" {'>' if exclusive else '>='} {minimum:g}"
            raise argparse.ArgumentTypeError(f"must be a finite number{bound}, got {text!r}") from None

    return parse


class DefaultsShown(argparse.ArgumentDefaultsHelpFormatter):
    """Help that ends with the default, unless there is none or the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)
