r"""Helpers for Flax NNX and Equinox models (optional imports; the core never needs them).

Both return ``(model_fn, params, combine)``: ``model_fn`` for the optimizers, the trainable
parameters as a pytree, and ``combine(params, model_state=None)`` that rebuilds the framework's
model. ``model_fn`` is a plain function ``model_fn(params, x)`` when the model has no state and needs
no key, and otherwise a :class:`~gaussnewton.Model` whose state channel carries everything that is
not trained (batch statistics, NNX RNG streams, ``eqx.nn.State``):

* one optimizer step evaluates ONE function ``w ↦ f(w, x; state)`` (the same batch-norm mode and
  dropout mask for the direction and every line-search trial), and
* the state returned by the evaluation at the current parameters (updated running statistics, an
  advanced RNG stream) becomes ``opt_state.model_state`` when the step is accepted, so the next step
  draws a new dropout mask.

Flax NNX (the recipe behind :func:`from_nnx`)::

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def fn(p, x, *, state):
        m = nnx.merge(graphdef, p, state)  # a fresh module: nothing outside is mutated
        out = m(x)  # BatchNorm / Dropout update m's variables
        return out, nnx.split(m, nnx.Param, ...)[2]

Equinox (the recipe behind :func:`from_equinox`; Equinox models act on ONE example)::

    params, static = eqx.partition(model, eqx.is_inexact_array)

    def fn(p, x, *, state):
        m = eqx.combine(p, static)
        return jax.vmap(m, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, state)

Example:
    >>> from flax import nnx
    >>> import gaussnewton as gn
    >>> model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    >>> model_fn, params, combine = gn.from_nnx(model)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from gaussnewton.model import Model

PyTree = Any

__all__ = ["from_nnx", "from_equinox"]


def _has_leaves(tree: PyTree) -> bool:
    return len(jax.tree_util.tree_leaves(tree)) > 0


def _keep_dtypes(new: PyTree, old: PyTree) -> PyTree:
    """``new`` with each leaf cast to the dtype of the matching leaf of ``old``.

    A float32 running mean updated with float64 activations would otherwise come back float64, and
    the optimizer state would change type between steps (a recompilation, a mismatched select).
    PRNG key leaves are left alone.
    """

    def cast(n, o):
        n_dt, o_dt = jnp.result_type(n), jnp.result_type(o)
        if n_dt == o_dt or jnp.issubdtype(o_dt, jax.dtypes.prng_key):
            return n
        return jnp.asarray(n).astype(o_dt)

    try:
        return jax.tree_util.tree_map(cast, new, old)
    except ValueError as e:
        raise ValueError(
            "the model returned a state with a different structure than it was given (model state "
            "must keep its pytree structure from step to step); " + str(e)
        ) from e


def from_nnx(model: Any, *, wrt: Any = None) -> tuple[Callable | Model, Any, Callable[..., Any]]:
    r"""Split a Flax NNX module into ``(model_fn, params, combine)``.

    ``params`` are the variables selected by ``wrt`` (an NNX filter, default ``nnx.Param``); every
    other ``nnx.Variable`` (``BatchStat``, the ``RngKey``/``RngCount`` of dropout streams, ...) is
    the model state. Without such state ``model_fn(params, x)`` is a plain function. With it,
    ``model_fn`` is ``gn.Model(fn, has_state=True, initial_state=rest)`` and

        fn(params, x, *, state) = (module(x), the module's non-trained variables after the call)

    evaluated on a fresh ``nnx.merge(graphdef, params, state)``: pure (no outside object is
    mutated), so it works eagerly and under ``jit`` / ``vmap`` / ``grad``.

    Train vs eval mode is the module's own flag when ``from_nnx`` is called: call
    ``model.train()`` (batch statistics of the batch, running averages updated, dropout on) or
    ``model.eval()`` (running averages used and unchanged, dropout off) before. Dropout masks are
    drawn from the module's RNG streams, which are part of the state: one step (direction and all
    line-search trials) sees one mask, and the stored new state advances the stream, so each step
    draws a new one.

    ``combine(params, model_state=None)`` rebuilds the module with the trained parameters and the
    given state (default: the state at the time of ``from_nnx``), e.g.
    ``trained = combine(params, opt_state.model_state); trained.eval(); trained(x_test)``.

    Args:
        model: an ``nnx.Module``.
        wrt: NNX filter of the trained variables (default ``nnx.Param``).

    Returns:
        ``(model_fn, params, combine)``.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> import gaussnewton as gn
        >>> class Net(nnx.Module):
        ...     def __init__(self, rngs):
        ...         self.lin = nnx.Linear(3, 4, rngs=rngs)
        ...         self.bn = nnx.BatchNorm(4, rngs=rngs)
        ...         self.drop = nnx.Dropout(0.1, rngs=rngs)
        ...     def __call__(self, x):
        ...         return self.drop(self.bn(self.lin(x)))[:, 0]
        >>> model_fn, params, combine = gn.from_nnx(Net(nnx.Rngs(0)))  # train mode
        >>> model_fn.has_state  # initial_state: batch statistics + the dropout stream
        True
        >>> x = jnp.arange(24.0).reshape(8, 3)
        >>> f, new_state = model_fn.apply(params, x, model_fn.initial_state)
        >>> f.shape
        (8,)
        >>> # training: opt = gn.egn(model_fn, loss=...); opt.step(...) keeps opt_state.model_state
        >>> trained = combine(params, new_state)
        >>> trained.eval()  # running statistics, no dropout
        >>> trained(x).shape
        (8,)
    """
    try:
        from flax import nnx
    except ImportError as e:  # pragma: no cover - exercised only without flax
        raise ImportError("from_nnx needs flax: pip install flax") from e
    if not isinstance(model, nnx.Module):
        raise TypeError(
            f"from_nnx(model={type(model).__name__}): model must be a flax.nnx.Module "
            "(for a Linen module use module.apply as a plain model_fn)."
        )
    wrt = nnx.Param if wrt is None else wrt
    graphdef, params, rest = nnx.split(model, wrt, ...)
    if not _has_leaves(params):
        raise ValueError(
            f"from_nnx(model, wrt={wrt!r}): the filter selects no variables of "
            f"{type(model).__name__}; pass wrt=nnx.Param or another filter that selects arrays."
        )

    def fresh(tree):
        # nnx.merge reuses the given Variable objects: rebuild them (a tree_map makes new ones in the
        # current trace) so that the module's updates never touch the caller's variables, and a
        # BatchNorm inside a jax transform does not mutate a Variable of an outer trace.
        return jax.tree_util.tree_map(lambda a: a, tree)

    def combine(p, model_state=None):
        return nnx.merge(graphdef, fresh(p), fresh(rest if model_state is None else model_state))

    if not _has_leaves(rest):

        def plain_fn(p, x):
            return nnx.merge(graphdef, fresh(p), fresh(rest))(x)

        return plain_fn, params, combine

    def fn(p, x, *, state):
        module = nnx.merge(graphdef, fresh(p), fresh(state))
        out = module(x)
        _, _, new_state = nnx.split(module, wrt, ...)
        return out, _keep_dtypes(new_state, state)

    return Model(fn, has_state=True, initial_state=rest), params, combine


def from_equinox(
    model: Any, state: Any = None, *, needs_key: bool = False, batched: bool = False
) -> tuple[Callable | Model, Any, Callable[..., Any]]:
    r"""Partition an Equinox module into ``(model_fn, params, combine)``.

    ``params`` are the inexact arrays of ``model`` (``eqx.partition(model, eqx.is_inexact_array)``).
    Equinox layers act on ONE example, so ``model_fn`` vmaps over the batch (axis name
    ``"batch"``, so ``eqx.nn.BatchNorm(..., axis_name="batch")`` averages over the mini-batch)
    unless ``batched=True`` (the model already takes a batch and is called once). The model is
    called as

    ==============================  ==========================================================
    no state, no key                ``model(x_i) -> f_i``
    ``needs_key=True``              ``model(x_i, key=k_i) -> f_i``
    ``state`` given                 ``model(x_i, state) -> (f_i, new_state)``
    both                            ``model(x_i, state, key=k_i) -> (f_i, new_state)``
    ==============================  ==========================================================

    where ``k_i`` are ``jax.random.split(key, b)`` of the step's key (one key per example, e.g. for
    ``eqx.nn.Dropout``; with ``batched=True`` the model gets the step's key itself). With a state
    (the ``eqx.nn.State`` of ``eqx.nn.make_with_state``) or a key, ``model_fn`` is a
    :class:`~gaussnewton.Model` (``has_state``, ``needs_key``, ``initial_state=state``); the state
    returned by the vmapped call (one state for the batch) is the new model state.

    Inference mode (batch norm with its running statistics, no dropout) is the model's own flag:
    pass ``eqx.nn.inference_mode(model)`` for evaluation.

    ``combine(params, model_state=None)`` returns the model with the trained parameters, or
    ``(model, state)`` when a ``state`` was given (``model_state`` default: ``state``), e.g.
    ``m, s = combine(params, opt_state.model_state); m = eqx.nn.inference_mode(m)``.

    Args:
        model: an ``eqx.Module`` acting on one example (or a batch with ``batched=True``).
        state: its ``eqx.nn.State`` (from ``eqx.nn.make_with_state``), or ``None``.
        needs_key: the model takes ``key=`` (a new key every optimizer step).
        batched: the model takes the whole batch (no vmap).

    Returns:
        ``(model_fn, params, combine)``.

    Example:
        >>> import equinox as eqx, jax, jax.numpy as jnp
        >>> import gaussnewton as gn
        >>> class Net(eqx.Module):
        ...     lin: eqx.nn.Linear
        ...     bn: eqx.nn.BatchNorm
        ...     def __init__(self, key):
        ...         self.lin = eqx.nn.Linear(3, 4, key=key)
        ...         self.bn = eqx.nn.BatchNorm(4, axis_name="batch", mode="ema")
        ...     def __call__(self, x, state):
        ...         h, state = self.bn(self.lin(x), state)
        ...         return h[0], state
        >>> net, bn_state = eqx.nn.make_with_state(Net)(jax.random.key(0))
        >>> model_fn, params, combine = gn.from_equinox(net, bn_state)
        >>> x = jnp.arange(24.0).reshape(8, 3)
        >>> f, new_state = model_fn.apply(params, x, model_fn.initial_state)
        >>> f.shape
        (8,)
        >>> # training: opt = gn.egn(model_fn, loss=...); opt.step(...) keeps opt_state.model_state
        >>> trained, bn_state = combine(params, new_state)
        >>> trained = eqx.nn.inference_mode(trained)  # running statistics
    """
    try:
        import equinox as eqx
    except ImportError as e:  # pragma: no cover - exercised only without equinox
        raise ImportError("from_equinox needs equinox: pip install equinox") from e
    for name, value in (("needs_key", needs_key), ("batched", batched)):
        if not isinstance(value, bool):
            raise TypeError(f"from_equinox({name}={value!r}) must be True or False.")
    if state is not None and not isinstance(state, eqx.nn.State):
        raise TypeError(
            f"from_equinox(state={type(state).__name__}): state must be an eqx.nn.State (the "
            "second output of eqx.nn.make_with_state(Model)(...)) or None."
        )
    params, static = eqx.partition(model, eqx.is_inexact_array)
    has_state = state is not None

    def combine(p, model_state=None):
        m = eqx.combine(p, static)
        if has_state:
            return m, (state if model_state is None else model_state)
        return m

    if not (has_state or needs_key):

        def plain_fn(p, x):
            m = eqx.combine(p, static)
            return m(x) if batched else jax.vmap(m)(x)

        return plain_fn, params, combine

    def fn(p, x, **kw):
        m = eqx.combine(p, static)
        s, key = kw.get("state"), kw.get("key")

        def call(xi, si, ki):
            args = (xi, si) if has_state else (xi,)
            return m(*args, key=ki) if needs_key else m(*args)

        if batched:
            out = call(x, s, key)
        else:
            b = jax.tree_util.tree_leaves(x)[0].shape[0]
            keys = jax.random.split(key, b) if needs_key else None
            out = jax.vmap(
                call,
                axis_name="batch",
                in_axes=(0, None, 0 if needs_key else None),
                out_axes=(0, None) if has_state else 0,
            )(x, s, keys)
        if has_state:
            f, new_state = out
            return f, _keep_dtypes(new_state, s)
        return out

    model_fn = Model(fn, has_state=has_state, needs_key=needs_key, initial_state=state)
    return model_fn, params, combine
