"""Argument validation shared by the method constructors (private)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any


def is_schedule(value: Any) -> bool:
    return callable(value)


def check_number(
    name: str, value: Any, *, low: float = 0.0, strict: bool = True, hint: str = ""
) -> None:
    """``value`` must be a real number ``> low`` (``>= low`` when not strict), or a schedule."""
    if is_schedule(value):
        return
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name}={value!r} must be a number or an optax schedule. {hint}") from None
    bad = not math.isfinite(v) or (v <= low if strict else v < low)
    if bad:
        rel = ">" if strict else ">="
        raise ValueError(f"{name}={value!r} must be finite and {rel} {low}. {hint}".rstrip())


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; use one of {choices}.")


def check_momentum(value: Any) -> None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"momentum={value!r} must be a number in [0, 1).") from None
    if not 0.0 <= v < 1.0:
        raise ValueError(f"momentum={value!r} must lie in [0, 1) (0 disables momentum).")


def check_callable(name: str, value: Any, signature: str) -> Callable:
    if not callable(value):
        raise TypeError(f"{name} must be a callable {signature}, got {value!r}.")
    return value
