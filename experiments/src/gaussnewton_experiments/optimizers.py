"""Built-in optimizers of the experiments: EGN variants (gaussnewton) and SGD / Adam (optax).

Every entry follows the registry's contract ``factory(model_fn, loss, **hparams)`` returning an
object with ``init(params)`` and a pure, jit-able ``step(params, state, x, y, key)`` that returns
``(params, state, info)``. More methods join with one :func:`register_optimizer` call each.

Tuning grids (``--tune``, selected on the validation split):
- SGD / Adam: learning rate in {1, 0.5, 0.1, 0.05, 0.01, 0.005, 0.001, 5e-4, 1e-4} (EXPERIMENTS §2);
- EGN variants: learning rate x damping λ x batch size from a small grid (see ``EGN_GRID``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gaussnewton_experiments.registry import register_optimizer

__all__ = [
    "LR_GRID",
    "EGN_GRID",
    "EGN_FIXED_GRID",
    "EGN_LS_GRID",
    "EGN_ADAPTIVE_GRID",
    "loss_value",
    "OptaxStep",
    "optax_factory",
    "egn_factory",
]

LR_GRID = (1.0, 0.5, 0.1, 0.05, 0.01, 0.005, 0.001, 5e-4, 1e-4)
# EGN with adaptive λ: the floor ``damping_min`` equals the start value, so λ never falls below
# the tuned value (with λ -> 0 the row-space step interpolates each mini-batch exactly).
EGN_GRID = tuple(
    {"learning_rate": 1.0, "damping": lam, "damping_min": lam, "batch_size": b}
    for b in (32, 128)
    for lam in (0.03, 0.3, 3.0)
)
# Registry defaults of every EGN entry are the library's (learning rate 1, λ = 1e-3); the
# supervised experiments put a λ floor on top (``SUPERVISED_EGN_DEFAULTS`` in gaussnewton_experiments/supervised.py).
_EGN_DEFAULTS = {"learning_rate": 1.0, "damping": 1e-3}
EGN_FIXED_GRID = tuple(
    {"learning_rate": lr, "damping": lam, "batch_size": b}
    for b in (32, 128)
    for lr in (0.3, 0.1)
    for lam in (1.0, 10.0, 0.1)
)
EGN_LS_GRID = tuple(
    {"learning_rate": 1.0, "damping": lam, "batch_size": b}
    for b in (32, 128)
    for lam in (0.1, 1.0, 10.0)
)
EGN_ADAPTIVE_GRID = tuple(
    {"learning_rate": lr, "damping": lam, "damping_min": lam, "batch_size": b}
    for b in (32, 128)
    for lr in (1.0, 0.3)
    for lam in (0.3, 3.0)
)


def loss_value(loss: Any, f: jax.Array, y: jax.Array) -> jax.Array:
    """Batch-MEAN loss of outputs ``f`` (b, c) for a loss name (library conventions).

    ``squared_error``: mean_i 1/2 ||f_i - y_i||^2; ``softmax_cross_entropy``: integer labels (b,) or
    one-hot (b, c), or per-token outputs (b, T, V) with integer labels (b, T) (mean over examples
    and tokens, as the library's training loss); ``sigmoid_binary_cross_entropy``: c = 1,
    y in {0, 1}. A ``gaussnewton`` Loss object is evaluated through its ``value`` method.
    """
    if f.ndim == 1:
        f = f[:, None]
    if loss == "squared_error":
        y = y.reshape(f.shape)
        return 0.5 * jnp.mean(jnp.sum(jnp.square(f - y), axis=-1))
    if loss == "softmax_cross_entropy":
        if y.ndim == f.ndim - 1:  # integer labels: (b,) for (b, c), (b, T) for (b, T, V)
            return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(f, y))
        return jnp.mean(optax.softmax_cross_entropy(f, y))
    if loss == "sigmoid_binary_cross_entropy":
        y = y.reshape(f.shape).astype(f.dtype)
        return jnp.mean(jnp.sum(optax.sigmoid_binary_cross_entropy(f, y), axis=-1))
    if hasattr(loss, "value"):
        return jnp.mean(loss.value(f, y))
    raise ValueError(
        f"loss must be 'squared_error', 'softmax_cross_entropy', 'sigmoid_binary_cross_entropy' "
        f"or a gaussnewton Loss, got {loss!r}."
    )


class OptaxStep(NamedTuple):
    """An optax transform wrapped in the experiments' ``init`` / ``step`` interface."""

    init: Callable[[Any], Any]
    step: Callable[..., tuple[Any, Any, dict[str, jax.Array]]]


def optax_factory(make_tx: Callable[..., optax.GradientTransformation]) -> Callable[..., OptaxStep]:
    """Factory for a first-order optax method: ``value_and_grad`` of the batch loss + ``update``."""

    def factory(model_fn: Callable, loss: Any, **hparams: Any) -> OptaxStep:
        tx = make_tx(**hparams)
        lr = hparams.get("learning_rate", 0.0)

        def objective(params, x, y):
            return loss_value(loss, model_fn(params, x), y)

        def step(params, state, x, y, key=None):
            del key
            value, grads = jax.value_and_grad(objective)(params, x, y)
            updates, state = tx.update(grads, state, params)
            params = optax.apply_updates(params, updates)
            info = {
                "loss": value,
                "grad_norm": optax.tree.norm(grads),
                "step_size": jnp.asarray(lr if not callable(lr) else 0.0, jnp.float32),
            }
            return params, state, info

        return OptaxStep(init=tx.init, step=step)

    return factory


_ADAPTIVE = ("min", "max", "increase", "decrease", "loss_floor")


def gn_factory(function: str, *, takes_loss: bool = True, **preset: Any) -> Callable[..., Any]:
    """Factory for the method ``gaussnewton.<function>`` (``egn``, ``sgn``, ...) with ``preset``
    keyword arguments (overridable by the run's hyper-parameters).

    Hyper-parameters ``damping_min`` / ``damping_max`` / ``damping_increase`` / ``damping_loss_floor`` /
    ``damping_decrease`` configure the adaptive policy (``gn.AdaptiveDamping``).
    """

    def factory(model_fn: Callable, loss: Any, **hparams: Any) -> Any:
        import gaussnewton as gn

        method = getattr(gn, function)
        kwargs = {**preset, **hparams}
        adaptive = {k: kwargs.pop(f"damping_{k}") for k in _ADAPTIVE if f"damping_{k}" in kwargs}
        if adaptive:  # e.g. damping_min=1e-3: an AdaptiveDamping policy with these fields
            if kwargs.get("damping_policy", "adaptive") == "constant":
                raise ValueError(
                    f"damping_{next(iter(adaptive))} needs adaptive damping; use a variant with "
                    "damping_policy='adaptive' (e.g. 'egn' or 'egn-adaptive')."
                )
            kwargs["damping_policy"] = gn.AdaptiveDamping(**adaptive)
        if takes_loss:
            opt = method(model_fn, loss=loss, **kwargs)
        else:
            if loss != "squared_error":
                raise ValueError(f"{function} supports the squared error only, got loss={loss!r}.")
            opt = method(model_fn, **kwargs)

        def step(params, state, x, y, key=None):
            params, state, info = opt.step(params, state, x, y, key=key)
            return params, state, info._asdict()

        return OptaxStep(init=opt.init, step=step)

    return factory


def egn_factory(**preset: Any) -> Callable[..., Any]:
    """Factory for ``gaussnewton.egn`` with ``preset`` keyword arguments (see :func:`gn_factory`)."""
    return gn_factory("egn", **preset)


register_optimizer(
    "sgd",
    optax_factory(
        lambda learning_rate=0.1, momentum=0.0: optax.sgd(learning_rate, momentum or None)
    ),
    defaults={"learning_rate": 0.1},
    grid=[{"learning_rate": lr} for lr in LR_GRID],
    description="optax.sgd (tuned learning rate)",
)
register_optimizer(
    "adam",
    optax_factory(lambda learning_rate=1e-3: optax.adam(learning_rate)),
    defaults={"learning_rate": 1e-3},
    grid=[{"learning_rate": lr} for lr in LR_GRID],
    description="optax.adam (tuned learning rate)",
)
register_optimizer(
    "egn",
    egn_factory(line_search="armijo", damping_policy="adaptive"),
    defaults=_EGN_DEFAULTS,
    grid=EGN_GRID,
    description="EGN: Armijo line search (alpha_max = learning_rate) + adaptive λ with a floor",
)
register_optimizer(
    "egn-default",
    gn_factory("egn"),
    defaults={},
    grid=(),
    description="gn.egn with the library's defaults: only the model and the loss are given",
)
register_optimizer(
    "egn-fixed",
    egn_factory(line_search=None, damping_policy="constant"),
    defaults=_EGN_DEFAULTS,
    grid=EGN_FIXED_GRID,
    description="plain EGN: fixed step size, constant λ",
)
register_optimizer(
    "egn-ls",
    egn_factory(line_search="armijo", damping_policy="constant"),
    defaults=_EGN_DEFAULTS,
    grid=EGN_LS_GRID,
    description="EGN + Armijo backtracking line search on the same batch, constant λ",
)
register_optimizer(
    "egn-adaptive",
    egn_factory(line_search=None, damping_policy="adaptive"),
    defaults=_EGN_DEFAULTS,
    grid=EGN_ADAPTIVE_GRID,
    description="EGN + adaptive (Levenberg-Marquardt gain-ratio) λ, fixed step size",
)
register_optimizer(
    "egn-momentum",
    egn_factory(line_search="armijo", damping_policy="adaptive", momentum=0.9),
    defaults=_EGN_DEFAULTS,
    grid=EGN_GRID,
    description="EGN (Armijo + adaptive λ) + bias-corrected momentum (beta = 0.9)",
)


register_optimizer(
    "egn-cg",
    egn_factory(line_search="armijo", damping_policy="adaptive", solver="cg", max_cg_iters=50),
    defaults=_EGN_DEFAULTS,
    grid=[
        {"damping": lam, "damping_min": lam, "max_cg_iters": k}
        for lam in (0.03, 0.3)
        for k in (10, 50)
    ],
    description="EGN, row-space CG (matrix-free K v, warm start), Armijo + adaptive λ",
)
register_optimizer(
    "sgn",
    gn_factory("sgn"),
    defaults={"learning_rate": 1.0, "damping": 1e-4},
    grid=[{"damping": lam, "batch_size": b} for b in (32, 128) for lam in (1e-4, 1e-2, 1.0)],
    description="SGN: parameter-space CG on the damped GGN (<= 10 iterations), Armijo, adaptive λ",
)
register_optimizer(
    "sqn",
    gn_factory("sqn"),
    defaults={"learning_rate": 1.0},
    grid=[{"learning_rate": lr, "batch_size": b} for b in (32, 128) for lr in (1.0, 0.1)],
    description="SQN: stochastic L-BFGS (history 10, same-batch pairs) + Armijo",
)
register_optimizer(
    "ignd",
    gn_factory("ignd"),
    defaults={"learning_rate": 0.1, "damping": 1.0},
    grid=[{"learning_rate": lr, "damping": lam} for lr in (1.0, 0.1, 0.01) for lam in (0.1, 1.0)],
    description="IGND: per-example Gauss-Newton scaled gradients (scalar outputs only)",
)
register_optimizer(
    "dual-gn",
    gn_factory("dual_gn"),
    defaults={"learning_rate": 1.0, "damping": 1e-3},
    grid=EGN_LS_GRID,
    description="dual Gauss-Newton (Roulet & Blondel): exact convex loss, linearised network",
)
register_optimizer(
    "ggn",
    gn_factory("gram_gauss_newton", takes_loss=False),
    defaults={"learning_rate": 1.0, "damping": 1e-3},
    grid=[{"learning_rate": lr, "damping": lam} for lr in (1.0, 0.3) for lam in (1e-3, 1.0, 10.0)],
    description="Gram-Gauss-Newton (Cai et al.), squared loss, sum convention",
)
