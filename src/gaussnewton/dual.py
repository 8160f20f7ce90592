r"""Dual Gauss-Newton directions (Roulet & Blondel, 2023), docs/METHODS.md §4.4.

Keep the convex loss exact, linearize only the network — the prox-linear subproblem with
``λ = 1/γ``:

.. math:: v^* = \arg\min_v\; P(v) = \tfrac1b \sum_i l(f_i + J_i v, y_i) + \tfrac{λ}{2}\|v\|^2 .

Fenchel duality (``l(z) = max_α ⟨α, z⟩ − l^*(α)``, then minimize over ``v``) gives
``v = −(1/(λb)) Jᵀ α`` and the dual, multiplied by ``b``, with ``μ = bλ``:

.. math:: \max_α\; Φ(α) = ⟨α, f⟩ − \sum_i l^*(α_i) − \tfrac{1}{2μ} α^\top K α,
          \qquad v(α) = −\tfrac1μ J^\top α .

* squared error: ``l*(α) = ½‖α‖² + ⟨α, y⟩``, so ``α* = μ (K + μI)⁻¹ g`` and ``v*`` IS the EGN
  direction with the same ``λ`` (one Cholesky);
* softmax CE: ``l*(α) = Σ_k p_k log p_k`` with ``p = α + y`` on the simplex — the dual variables
  live on shifted simplices; ``α_i = p_i − y_i``;
* sigmoid BCE: the 2-class softmax CE of the logits ``(0, f)`` with labels ``(1 − y, y)`` (its
  first logit has zero Jacobian), so it reuses the simplex solver.

Inner solver (simplex case, ``K`` formed): feasible Newton ascent on ``Φ`` in ``p``. With the
entropy Hessian ``diag(1/p)`` the Newton system is solved in the scaled variable ``Δ = √p ⊙ δ``,
``(I + √p K √p / μ) δ = √p ⊙ ∇Φ − A_sᵀ ν``, ``A_s δ = 0`` (the constraint ``Σ_k Δ_ik = 0``; the
matrix has eigenvalues ``≥ 1``), followed by Armijo backtracking from the largest step that keeps
``p > 0`` (fraction 0.99 to the boundary). ``Φ`` increases monotonically and the iterates converge
to ``α*``.

**Any number of inner steps gives a descent direction.** First the Cauchy point of the primal
along the gradient: ``v_c = −τ∇L`` with ``τ ∈ (0, 1/λ]`` minimizing the convex 1-D function
``P(−τ∇L)`` (bisection; in dual terms ``α_c = τλ g``; ``τ = 1/λ`` gives ``α₀ = g``). Since
``d/dτ P(−τ∇L)|₀ = −‖∇L‖² < 0``, ``P(v_c) < P(0)`` whenever ``∇L ≠ 0``. The output is the LATEST
inner iterate ``α_k`` with ``P(v(α_k)) ≤ P(v_c)`` (``P`` is cheap with ``K`` formed:
``J v = −K α/μ``, ``‖v‖² = αᵀKα/μ²``), else ``α_c``. Either way ``P(v) ≤ P(v_c) < P(0) = L(w)``.
``P`` is ``λ``-strongly convex with ``∇P(0) = (1/b) Jᵀ g = ∇L``, so
``P(v) ≥ P(0) + ∇Lᵀv + (λ/2)‖v‖²``, i.e. ``∇Lᵀv ≤ P(v) − P(0) − (λ/2)‖v‖² < 0``: a descent
direction, whose length is bounded by the linearized model (unlike ``−∇L/λ`` for small ``λ``).
As ``α_k → α*`` and ``P(v*) ≤ P(v_c)`` (with equality only if ``v_c = v*``), the output converges
to the prox-linear minimizer ``v*`` as the number of inner steps grows.

The direction is a drop-in replacement for the gradient in any optax chain:
:func:`dual_gn_transform` returns ``(1/b) Jᵀ α* = −λ v*`` — the gradient formula
``∇L = (1/b) Jᵀ g`` with ``g`` replaced by ``α*`` (→ ``∇L`` as ``λ → ∞``).

Adaptive damping measures ``ρ`` against the prox-linear model: predicted change
``(1/b) Σ_i l(f_i + J_i Δ) − L(w)`` (one JVP; for squared error it is EGN's quadratic model).

Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> fn = lambda p, x: jnp.tanh(x @ p["w1"]) @ p["w2"]
    >>> p = {"w1": jnp.ones((3, 4)) * 0.1, "w2": jnp.ones((4, 3)) * 0.1}
    >>> x, y = jnp.ones((8, 3)), jnp.zeros((8,), jnp.int32)
    >>> from gaussnewton.dual import dual_gn, dual_gn_transform
    >>> opt = dual_gn(fn, loss="softmax_cross_entropy", damping=1e-2, max_inner_iters=3)
    >>> p2, state, info = jax.jit(opt.step)(p, opt.init(p), x, y)
    >>> tx = optax.chain(dual_gn_transform(fn, loss="softmax_cross_entropy"), optax.adam(1e-3))
    >>> s = tx.init(p)
    >>> updates, s = jax.jit(tx.update)(p, s, p, x=x, y=y)  # the incoming gradient is recomputed
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.scipy.linalg import cho_factor, cho_solve
from jax.scipy.special import xlogy

from gaussnewton._family import assemble, check_axis_name, check_common, check_int
from gaussnewton._sharding import NO_AXIS, BatchAxis, like_batch, replicate, vary_like
from gaussnewton._tree import compute_dtype, tree_vdot
from gaussnewton.damping import AdaptiveDamping
from gaussnewton.gram import as_2d, gram_factors, strategy_name
from gaussnewton.gram import gram as compute_gram
from gaussnewton.linalg import solve_damped_spd
from gaussnewton.linearization import linearize
from gaussnewton.linesearch import Armijo
from gaussnewton.losses import (
    Loss,
    LossLike,
    SigmoidBinaryCrossEntropy,
    SoftmaxCrossEntropy,
    SquaredError,
    WeightedLabels,
)
from gaussnewton.model import Model, as_model
from gaussnewton.optimizer import GaussNewtonOptimizer, Linearization

PyTree = Any

__all__ = ["dual_gn", "dual_gn_transform", "DualGNTransformState", "DualSolve", "dual_solve"]

_LS_C1 = 1e-4  # Armijo constant of the inner backtracking (on Φ)
_LS_TRIALS = 40  # halvings of the inner step before giving up (step 0)
_BISECT = 60  # bisection steps of the Cauchy step length


def _kind(loss: Loss) -> str:
    if isinstance(loss, SquaredError):
        return "squared"
    if isinstance(loss, SoftmaxCrossEntropy):
        return "softmax"
    if isinstance(loss, SigmoidBinaryCrossEntropy):
        return "binary"
    raise ValueError(
        f"dual_gn needs the convex conjugate of the loss; loss={loss.name!r} is not supported. Use "
        "'squared_error', 'softmax_cross_entropy' or 'sigmoid_binary_cross_entropy' (or gn.egn)."
    )


class DualSolve(NamedTuple):
    """The dual solution ``α`` (``(b, c)``), inner steps run, and the optimality residual of the
    last inner iterate: ``max |p − softmax(f − K α / μ)|`` (``α* = ∇l(f + J v(α*))``)."""

    alpha: jax.Array
    iters: jax.Array
    residual: jax.Array


def _simplex_dual(f, y, k, mu, num_iters: int) -> DualSolve:
    """Feasible Newton ascent on ``Φ(p)`` over products of simplices (see the module docstring)."""
    b, c = f.shape
    n = b * c
    km = k.reshape(n, n)
    km = 0.5 * (km + km.T)
    dt = km.dtype
    f, y = f.astype(dt), y.astype(dt)
    eye_b = jnp.eye(b, dtype=dt)
    kmul = lambda a: (km @ a.reshape(n)).reshape(b, c)  # noqa: E731

    def phi(p):
        a = p - y
        return jnp.vdot(a, f) - jnp.sum(xlogy(p, p)) - 0.5 / mu * jnp.vdot(a, kmul(a))

    def primal(a):  # b · P(v(α))
        ka = kmul(a)
        z = f - ka / mu
        return jnp.sum(
            jax.nn.logsumexp(z, axis=-1) - jnp.sum(y * z, axis=-1)
        ) + 0.5 / mu * jnp.vdot(a, ka)

    def ascent_grad(p):  # ∇Φ up to a per-row constant (removed by the constraint)
        return f - jnp.log(p) - kmul(p - y) / mu

    p0 = jax.nn.softmax(f, axis=-1)
    g = p0 - y  # α₀ = g: v(α₀) = −∇L/λ
    # Cauchy point of the prox-linear problem along −∇L: α_c = τλ g, τ ∈ (0, 1/λ] minimizing
    # P(−τ∇L) (convex in τ; bisection on its derivative; J∇L = K g / b).
    lam = mu / b
    h = kmul(g) / b
    gkg = jnp.vdot(g, kmul(g))

    def dP(tau):
        z = f - tau * h
        return -jnp.vdot(jax.nn.softmax(z, axis=-1) - y, h) + lam * tau * gkg / b

    def bisect(_, lohi):
        lo, hi = lohi
        mid = 0.5 * (lo + hi)
        neg = dP(mid) < 0
        return jnp.where(neg, mid, lo), jnp.where(neg, hi, mid)

    tau_max = 1.0 / lam
    # (inside shard_map the bracket varies like f: the loop carry keeps one type)
    bracket = vary_like((jnp.zeros((), dt), jnp.asarray(tau_max, dt)), f)
    lo, hi = jax.lax.fori_loop(0, _BISECT, bisect, bracket)
    tau = jnp.where(dP(tau_max) <= 0, tau_max, 0.5 * (lo + hi))
    alpha_c = tau * lam * g
    p_c = primal(alpha_c)
    eps = jnp.finfo(dt).eps
    p_a = (1.0 - eps) * p0 + eps / c  # strictly interior
    p_b = (1.0 - eps) * (y + alpha_c) + eps / c
    p = jnp.where(phi(p_b) > phi(p_a), p_b, p_a)  # Newton starts at the better of the two

    def newton(_, carry):
        p, best = carry
        grad = ascent_grad(p)
        sq = jnp.sqrt(p)
        s = sq.reshape(n)
        mt = jnp.eye(n, dtype=dt) + s[:, None] * km * s[None, :] / mu
        a_t = (sq[:, :, None] * eye_b[:, None, :]).reshape(n, b)  # A_sᵀ
        sol = cho_solve(
            cho_factor(mt, lower=True), jnp.concatenate([(s * grad.reshape(n))[:, None], a_t], 1)
        )
        w, z = sol[:, 0], sol[:, 1:]
        nu = jnp.linalg.solve(a_t.T @ z, a_t.T @ w)
        step = (s * (w - z @ nu)).reshape(b, c)
        slope = jnp.vdot(grad, step)
        finite = jnp.all(jnp.isfinite(step)) & jnp.isfinite(slope)
        ratio = jnp.where(step < 0, p / jnp.where(step < 0, -step, 1.0), jnp.inf)
        t0 = jnp.minimum(1.0, 0.99 * jnp.min(ratio))
        phi_p = phi(p)

        def passes(t):
            return phi(p + t * step) >= phi_p + _LS_C1 * t * slope

        def cond(st):
            _, j, ok = st
            return jnp.logical_not(ok) & (j < _LS_TRIALS)

        def body(st):
            t, j, _ = st
            return 0.5 * t, j + 1, passes(0.5 * t)

        t, _, ok = jax.lax.while_loop(cond, body, (t0, jnp.asarray(0), passes(t0)))
        move = ok & finite & (slope > 0)
        p_new = jnp.where(move, p + t * step, p)
        a_new = p_new - y
        better = primal(a_new) <= p_c
        return p_new, jnp.where(better, a_new, best)

    p, best = jax.lax.fori_loop(0, num_iters, newton, (p, alpha_c))
    # optimality: α* = ∇l(f + J v(α*)), i.e. p = softmax(f − K α / μ) (a probability mismatch)
    resid = jnp.max(jnp.abs(p - jax.nn.softmax(f - kmul(p - y) / mu, axis=-1)))
    return DualSolve(best, jnp.asarray(num_iters, jnp.int32), resid)


def dual_solve(loss: Loss, f, y, k, lam, max_inner_iters: int) -> DualSolve:
    """Solve the dual of §4.4 for outputs ``f`` (``(b, c)``), prepared labels ``y``, Gram ``k``
    (``(b, c, b, c)``) and ``λ``; returns ``α`` (``(b, c)``)."""
    kind = _kind(loss)
    b, c = f.shape
    dt = compute_dtype(k.dtype, f.dtype)
    k = k.astype(dt)
    mu = b * jnp.asarray(lam, dt)
    if kind == "squared":
        n = b * c
        u = solve_damped_spd(k.reshape(n, n), mu, (f - y).reshape(n).astype(dt))
        return DualSolve((mu * u).reshape(b, c), jnp.asarray(0, jnp.int32), jnp.zeros((), dt))
    if kind == "binary":
        fe = jnp.concatenate([jnp.zeros_like(f), f], axis=1)
        ye = jnp.concatenate([1.0 - y, y], axis=1)
        ke = jnp.pad(k, ((0, 0), (1, 0), (0, 0), (1, 0)))
        res = _simplex_dual(fe, ye, ke, mu, max_inner_iters)
        return res._replace(alpha=res.alpha[:, 1:])
    return _simplex_dual(f, y, k, mu, max_inner_iters)


def _solve_batch(fn, loss, params, x, y, lam, gram, max_inner_iters, axis: BatchAxis = NO_AXIS):
    lin = linearize(fn, loss, params, x, y, axis=axis)
    if isinstance(lin.labels, WeightedLabels):
        raise ValueError(
            "dual_gn solves the dual of the per-example loss and takes no WeightedLabels; use "
            "gn.egn (weighted and per-token losses) or unweighted labels."
        )
    if axis.sharded:  # inside shard_map: K of the whole batch from the gathered factors
        factors, block = gram_factors(as_2d(fn), axis.varying(params), x, strategy=gram)
        k = block(axis.gather(factors))
    else:
        k = compute_gram(as_2d(fn), params, x, strategy=gram)
    # on many devices: the dual is solved replicated (K is), each device keeps its rows of α
    f, labels = replicate(axis.gather((lin.outputs, lin.labels)))
    res = dual_solve(loss, f, labels, k, lam, max_inner_iters)
    alpha = like_batch(axis.local(res.alpha), lin.outputs)
    # the residual is the same on every device; the mean makes it one (replicated) value
    return lin, res._replace(alpha=alpha, residual=axis.mean(res.residual))


def dual_gn(
    model_fn: Callable,
    *,
    loss: LossLike,
    learning_rate: float | Callable = 1.0,
    damping: float | Callable = 1e-3,
    max_inner_iters: int = 5,
    damping_policy: str | AdaptiveDamping | Callable = "adaptive",
    line_search: str | Armijo | None = "armijo",
    momentum: float = 0.0,
    tx: optax.GradientTransformation | None = None,
    gram: str | Callable = "auto",
    axis_name: str | tuple[str, ...] | None = None,
) -> GaussNewtonOptimizer:
    r"""Dual Gauss-Newton: the prox-linear direction ``v*`` through its dual (module docstring).

    Args:
        model_fn: ``model_fn(params, x) -> (b, c)`` or ``(b,)`` outputs.
        loss: ``"squared_error"`` (then exactly EGN), ``"softmax_cross_entropy"`` or
            ``"sigmoid_binary_cross_entropy"``.
        learning_rate: step size (``α_max`` with the line search); number or schedule.
        damping: ``λ = 1/γ > 0`` of the proximity term (start value if adaptive).
        max_inner_iters: Newton steps on the dual (any number ``≥ 0`` gives a descent direction;
            ``0`` gives the Cauchy point ``−τ∇L``). ``info.cg_iters`` reports it and
            ``info.cg_residual`` the optimality residual ``max |p − softmax(f − Kα/μ)|`` of the
            last inner iterate (0 for squared error, solved exactly).
        damping_policy, line_search, momentum, tx, gram: as in :func:`gaussnewton.egn` (``gram``:
            a name or a registered strategy object).
        axis_name: the batch axis inside a user's ``jax.shard_map``, as in :func:`gaussnewton.egn`
            (the per-example Gram factors, outputs and labels are gathered and the dual solved on
            every device).
    """
    loss_obj = check_common(
        model_fn, loss, learning_rate, damping, momentum, tx, damping_strict=True
    )
    _kind(loss_obj)
    check_int("max_inner_iters", max_inner_iters, 0)
    gram = strategy_name(gram)
    axis = BatchAxis(check_axis_name(axis_name))

    def direction_fn(model, params, x, y, lam, key, method_state):
        del key
        fn = as_2d(model)
        lin, res = _solve_batch(fn, loss_obj, params, x, y, lam, gram, max_inner_iters, axis)
        f, y, g, value = lin.outputs, lin.labels, lin.g, lin.loss
        b = lin.batch_size
        cot = jnp.stack([g / b, (-res.alpha / (b * lam.astype(res.alpha.dtype))).astype(f.dtype)])
        both = jax.vmap(lin.vjp)(cot)
        grad = jax.tree_util.tree_map(lambda a: a[0], both)
        direction = jax.tree_util.tree_map(lambda a: a[1], both)
        slope_fn = lambda delta: tree_vdot(grad, delta)  # noqa: E731

        def quad(delta):  # prox-linear model: L_lin(Δ) − L − ∇LᵀΔ (= ½ΔᵀHΔ for squared error)
            _, jd = jax.jvp(lambda p: fn(p, x), (params,), (delta,))
            lin_loss = axis.mean(jnp.mean(loss_obj.value(f + jd, y)))
            return lin_loss - value - slope_fn(delta).astype(lin_loss.dtype)

        return Linearization(
            value,
            grad,
            direction,
            quad,
            res.iters,
            res.residual,
            method_state,
            labels_ok=lin.labels_ok,
        )

    return assemble(
        "dual_gn",
        model_fn,
        loss_obj,
        direction_fn,
        learning_rate=learning_rate,
        damping=damping,
        damping_policy=damping_policy,
        line_search=line_search,
        momentum=momentum,
        tx=tx,
        axis_name=axis_name,
    )


class DualGNTransformState(NamedTuple):
    """State of :func:`dual_gn_transform` for a :class:`~gaussnewton.Model` with state or key.

    ``key`` is raw ``uint32`` key data, split once per update as in the optimizers (an update's
    model key is ``fold_in(step key, 1)``); ``model_state`` is the model state of the last
    evaluation at ``params``.
    """

    key: jax.Array
    model_state: PyTree


def dual_gn_transform(
    model_fn: Callable | Model,
    *,
    loss: LossLike,
    damping: float = 1e-3,
    max_inner_iters: int = 5,
    gram: str | Callable = "auto",
    key: jax.Array | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""The dual GN direction as an optax transform: ``update(grads, state, params, *, x, y)``.

    Returns ``(1/b) Jᵀ α*`` (gradient units: ``−λ v*``, equal to ``∇L`` as ``λ → ∞``), so
    ``optax.chain(dual_gn_transform(...), optax.sgd(1/λ))`` takes the full prox-linear step and
    ``optax.adam`` etc. use it in place of the gradient. The incoming ``grads`` are not used: the
    transform recomputes outputs, Gram and dual from ``params`` and the batch ``(x, y)``.

    ``model_fn`` may be a :class:`~gaussnewton.Model`: with ``has_state`` or ``needs_key`` the
    transform's state is a :class:`DualGNTransformState` (``init(params)`` starts from
    ``Model.initial_state`` and ``key``, default ``jax.random.key(0)``); each update evaluates the
    model with that state and a fresh key (``update(..., key=k)`` gives this update's key
    instead of splitting the state's) and keeps the new model state, as the optimizers do. A plain
    function (or a ``Model`` without state or key) keeps ``optax.EmptyState()``.

    Example:
        >>> import jax, jax.numpy as jnp, optax
        >>> import gaussnewton as gn
        >>> def fn(p, x, *, key):
        ...     keep = jax.random.bernoulli(key, 0.9, x.shape)
        ...     return jnp.where(keep, x / 0.9, 0.0) @ p
        >>> model = gn.Model(fn, needs_key=True)
        >>> tx = optax.chain(gn.dual_gn_transform(model, loss="squared_error", damping=1e-2),
        ...                  optax.sgd(100.0))
        >>> p = jnp.zeros((3, 1))
        >>> state = tx.init(p)
        >>> g, state = tx.update(p, state, p, x=jnp.ones((4, 3)), y=jnp.ones((4, 1)))
    """
    loss_obj = check_common(model_fn, loss, 1.0, damping, 0.0, None, damping_strict=True)
    if callable(damping):
        raise TypeError("dual_gn_transform: damping must be a number (λ > 0), e.g. 1e-3.")
    _kind(loss_obj)
    check_int("max_inner_iters", max_inner_iters, 0)
    gram = strategy_name(gram)
    model = as_model(model_fn)
    stateful = model.has_state or model.needs_key
    if key is not None and not stateful:
        raise ValueError(
            "dual_gn_transform(key=...) seeds a gn.Model with needs_key=True or has_state=True; "
            "this model takes no key: drop key=."
        )
    plain_fn = as_2d(model.fn)

    def init_fn(params):
        del params
        if not stateful:
            return optax.EmptyState()
        raw = jax.random.key_data(jax.random.key(0) if key is None else _typed_key(key))
        return DualGNTransformState(raw, model.initial_state)

    def update_fn(updates, state, params=None, *, x=None, y=None, key=None, **extra_args):
        del extra_args
        if params is None or x is None or y is None:
            raise ValueError(
                "dual_gn_transform needs params and the batch: call "
                "tx.update(grads, state, params, x=x, y=y)."
            )
        fn, new_state = plain_fn, state
        if stateful:
            if key is None:
                key, nxt = jax.random.split(jax.random.wrap_key_data(state.key))
                state = state._replace(key=jax.random.key_data(nxt))
            model_key = jax.random.fold_in(key, 1) if model.needs_key else None
            fn = as_2d(model.bind(state.model_state, model_key))
            model_state = state.model_state
            if model.has_state:
                _, model_state = model.apply(params, x, state.model_state, model_key)
            new_state = state._replace(model_state=model_state)
        lin, res = _solve_batch(fn, loss_obj, params, x, y, damping, gram, max_inner_iters)
        out = lin.vjp((res.alpha / lin.batch_size).astype(lin.outputs.dtype))
        out = jax.tree_util.tree_map(lambda o, u: o.astype(u.dtype), out, updates)
        return out, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _typed_key(key: jax.Array) -> jax.Array:
    """A typed PRNG key from a typed key or raw ``uint32`` key data."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    return jax.random.wrap_key_data(jnp.asarray(key, jnp.uint32))
