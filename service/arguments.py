"""Argument types shared by the command lines (``metallm``'s and the demo producer's).

Plain functions that argparse calls on an argument's text: a bad value is a usage error
naming the argument (exit 2), never a driver error or a silently shortened run.
"""

from __future__ import annotations

import argparse
from datetime import datetime


def _at_least(value: str, minimum: int) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {value!r}") from None
    if number < minimum:
        raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {number}")
    return number


def positive_int(value: str) -> int:
    """An argument that counts something: a whole number ≥ 1.

    >>> positive_int("3")
    3
    >>> positive_int("0")
    Traceback (most recent call last):
    ...
    argparse.ArgumentTypeError: must be at least 1, got 0
    """
    return _at_least(value, 1)


def non_negative_int(value: str) -> int:
    """A whole number ≥ 0 (0: none).

    >>> non_negative_int("0")
    0
    """
    return _at_least(value, 0)


def iso_datetime(value: str) -> datetime:
    """An ISO 8601 date or date and time.

    >>> iso_datetime("2026-11-27T10:00")
    datetime.datetime(2026, 11, 27, 10, 0)
    """
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO date/time: {value!r}") from None
