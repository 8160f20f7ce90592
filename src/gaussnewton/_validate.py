"""Argument validation shared by the method constructors (private)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any


def is_schedule(value: Any) -> bool:
    return callable(value)


#: the largest float32: a hyper-parameter above it is ``inf`` in a float32 step
FLOAT32_MAX = 3.4028234663852886e38


def _schedule_first_value(name: str, schedule: Callable, hint: str) -> float:
    """``schedule(0)`` as a float (schedules are checked on their first value)."""
    try:
        first = schedule(0)
        return float(first)
    except Exception as err:  # noqa: BLE001 - any failure of a user schedule is reported
        raise TypeError(
            f"{name}: the schedule {schedule!r} must map a step count to a number, but "
            f"{name}(0) failed ({type(err).__name__}: {err}). {hint}".rstrip()
        ) from None


def check_number(
    name: str, value: Any, *, low: float = 0.0, strict: bool = True, hint: str = ""
) -> None:
    """``value`` must be a finite real number ``> low`` (``>= low`` when not strict) that float32
    can hold, or a schedule whose first value ``schedule(0)`` is such a number."""
    what = f"{name}={value!r}"
    if is_schedule(value):
        v = _schedule_first_value(name, value, hint)
        what = f"{name}: the schedule's first value {name}(0) = {v!r}"
    else:
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise TypeError(f"{what} must be a number or an optax schedule. {hint}") from None
    bad = not math.isfinite(v) or (v <= low if strict else v < low)
    if bad:
        rel = ">" if strict else ">="
        raise ValueError(f"{what} must be finite and {rel} {low}. {hint}".rstrip())
    if abs(v) > FLOAT32_MAX:
        raise ValueError(
            f"{what} overflows float32 (max {FLOAT32_MAX:.3g}): it would be inf in a float32 "
            f"step. {hint}".rstrip()
        )


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


def check_params(params: Any) -> None:
    """Every parameter leaf must be a floating array (the methods move every leaf)."""
    import jax
    import jax.numpy as jnp

    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    if not leaves:
        raise ValueError("params has no array leaves: there is nothing to train.")
    for path, leaf in leaves:
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"params{jax.tree_util.keystr(path)} has dtype {dtype}: Gauss-Newton methods train "
                "floating-point leaves only. Keep integer or boolean values out of params (close "
                "over them in model_fn, or carry them as model state with gn.Model(has_state=True)), "
                "or cast them to a float dtype."
            )


def check_batch(x: Any, outputs: Any) -> None:
    """Trace-time checks of a batch: a non-empty batch axis and floating model outputs."""
    import jax.numpy as jnp

    if outputs.ndim == 0:
        raise ValueError(
            "model_fn returned a scalar; it must return per-example outputs of shape (b, ...)."
        )
    if outputs.shape[0] == 0:
        raise ValueError(
            "the batch is empty (batch size b = 0): pass at least one example "
            "(x with a leading batch axis of size >= 1)."
        )
    if not jnp.issubdtype(outputs.dtype, jnp.floating):
        raise TypeError(
            f"model_fn returned outputs of dtype {outputs.dtype}; they must be floating point "
            "(e.g. cast with .astype(jnp.float32)): the methods differentiate them."
        )
