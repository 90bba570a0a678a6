"""Checks of option values at the door, one message format for every entry point.

Every check raises :class:`~undiscard.errors.OptionError` naming the option, what it
accepts and what came.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from undiscard.errors import OptionError

__all__ = ["check_choice", "check_positive_int"]


def check_choice(name: str, value: Any, choices: Sequence[str], *, what: str = "") -> str:
    """``value`` if it is one of ``choices``, else :class:`OptionError`.

    Example:
        >>> check_choice("aggregate", "mean", ("mean", "entropy"))
        'mean'
    """
    if not isinstance(value, str) or value not in choices:
        raise OptionError(f"{name} must be one of {tuple(choices)}{what}; got {value!r}")
    return value


def check_positive_int(name: str, value: Any, *, hint: str = "") -> int:
    """``value`` if it is an ``int`` >= 1 (not a bool, not a float), else :class:`OptionError`.

    Example:
        >>> check_positive_int("max_batch", 64)
        64
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise OptionError(f"{name} must be a positive integer{hint}; got {value!r}")
    return value
