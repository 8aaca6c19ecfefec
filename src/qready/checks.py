"""Argument checks shared by the whole library: each returns the checked value or raises ``ValueError``
naming the argument (``name``, e.g. ``"group_size"`` or ``"option 'seed'"``) and what is allowed."""

from __future__ import annotations

import numbers
from collections.abc import Sequence


def check_int(name: str, value: object, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as an ``int`` (bools refused), optionally within ``[minimum, maximum]``.

    >>> check_int("group_size", 4, minimum=1)
    4
    >>> check_int("group_size", 0, minimum=1)
    Traceback (most recent call last):
    ...
    ValueError: group_size must be >= 1, got 0
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def check_float(
    name: str,
    value: object,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive: bool = False,
) -> float:
    """``value`` as a finite ``float`` within ``[minimum, maximum]`` (open interval if ``exclusive``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    lo_bad = minimum is not None and (value <= minimum if exclusive else value < minimum)
    hi_bad = maximum is not None and (value >= maximum if exclusive else value > maximum)
    if value != value or lo_bad or hi_bad:
        lo = "-inf" if minimum is None else repr(minimum)
        hi = "inf" if maximum is None else repr(maximum)
        interval = f"({lo}, {hi})" if exclusive else f"[{lo}, {hi}]"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return value


def check_bool(name: str, value: object) -> bool:
    """``value`` if it is a ``bool``."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def check_shape(name: str, value: object) -> tuple[int, ...]:
    """``value`` as a non-empty tuple of positive ints (lists accepted, e.g. from YAML)."""
    if not isinstance(value, (tuple, list)) or len(value) == 0:
        raise ValueError(f"{name} must be a non-empty tuple of positive ints, got {value!r}")
    dims = []
    for d in value:
        if isinstance(d, bool) or not isinstance(d, numbers.Integral) or int(d) < 1:
            raise ValueError(f"{name} must be a non-empty tuple of positive ints, got {value!r}")
        dims.append(int(d))
    return tuple(dims)
