"""Small pieces shared by the RL experiments: the regression-optimizer contract and adapters.

Every RL experiment takes its regression step (the TD fit) through ONE contract, the one of
``gaussnewton`` optimizers and of the experiment registry::

    opt.init(params) -> state
    opt.step(params, state, x, y, key) -> (params, state, info)

minimizing the batch-mean squared error ``(1/b) Σ_i ½ (f(params, x_i) − y_i)²`` with
``f = model_fn(params, x)`` of shape ``(b,)``. ``gn.egn(model_fn, loss="squared_error", ...)``,
``gn.ignd`` and the registry's optimizers satisfy it; :func:`optax_regressor` wraps any optax
transformation (SGD, Adam) into it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["optax_regressor", "info_scalars", "squared_error"]


def squared_error(pred: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
    """Batch-mean ``½ (pred − y)²`` (the library's ``squared_error`` loss for ``c = 1``)."""
    return 0.5 * jnp.mean((pred - y) ** 2)


class _OptaxRegressor(NamedTuple):
    init: Callable[[Any], Any]
    step: Callable[..., tuple[Any, Any, dict]]


def optax_regressor(tx: Any, model_fn: Callable) -> _OptaxRegressor:
    """Wrap an optax ``GradientTransformation`` into the ``init/step`` regression contract.

    ``step`` takes one gradient step on ``L(w) = (1/b) Σ ½ (f(w, x_i) − y_i)²``; ``info`` holds
    ``loss`` (before the step) and ``grad_norm``.
    """
    import optax

    def loss_fn(params, x, y):
        pred = model_fn(params, x)
        return squared_error(pred.reshape(y.shape), y)

    def init(params):
        return tx.init(params)

    def step(params, state, x, y, key=None):
        del key
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        return params, state, {"loss": loss, "grad_norm": optax.global_norm(grads)}

    return _OptaxRegressor(init, step)


def info_scalars(info: Any) -> dict[str, jnp.ndarray]:
    """Flatten an optimizer's ``info`` (dict or NamedTuple) to ``{name: scalar array}``."""
    if info is None:
        return {}
    if hasattr(info, "_asdict"):
        info = info._asdict()
    if not isinstance(info, dict):
        return {}
    out = {}
    for k, v in info.items():
        v = jnp.asarray(v)
        if v.ndim == 0 and (jnp.issubdtype(v.dtype, jnp.number) or v.dtype == jnp.bool_):
            out[k] = v.astype(jnp.float32) if v.dtype == jnp.bool_ else v
    return out
