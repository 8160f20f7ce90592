"""The shared grid: problems x methods of the Gauss-Newton family (docs/METHODS.md §2, §4, §6).

For every applicable (problem, method) pair, with the method's default policies:
- the batch loss decreases over a few steps on a fixed batch;
- ``jax.jit(opt.step)`` traces once over several steps (a Python side effect in ``model_fn``
  counts traces);
- a non-finite batch (NaN in ``x``) leaves ``params`` and the state unchanged (λ may grow) and
  sets ``info.rejected``;
- ``jax.eval_shape(opt.init, abstract params)`` gives the concrete state's structure, shapes and
  dtypes;
- the state round-trips (pytree flatten/unflatten, flax state dict through msgpack,
  ``jax.device_get`` + ``jnp.asarray``) to the same next step, without a retrace.
One compilation per pair; float64 (conftest), small MLPs (3-5-5-c), b = 8.

Properties on one problem (regression), one compilation each:
- bfloat16 params (all methods) and float32 params (the methods with a dense SPD solve): the step
  returns params of the same dtype, a finite loss that decreases, and the Gram, its shift and
  right-hand side (spied on the SPD solve) and every factorization primitive are float32
  (``_tree.compute_dtype``);
- ``jax.vmap`` of ``init`` + ``step`` over 3 seeds equals the 3 separate steps (1e-12 relative in
  float64 for exact solves: batched and unbatched kernels may round differently; 1e-6, the CG
  tolerance, for row-space CG).
"""

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import flat, init_mlp, make_labels, mlp

import gaussnewton as gn
from gaussnewton import directions
from gaussnewton import dual as dual_module
from gaussnewton.dual import dual_gn
from gaussnewton.gram_gauss_newton import gram_gauss_newton
from gaussnewton.ignd import ignd
from gaussnewton.sgn import sgn
from gaussnewton.sqn import sqn

B = 8
STEPS = 6
# (problem name, loss, outputs c)
PROBLEMS = {
    "regression": ("squared_error", 1),
    "softmax3": ("softmax_cross_entropy", 3),
    "binary": ("sigmoid_binary_cross_entropy", 1),
}
METHODS = {
    "egn": lambda fn, loss: gn.egn(fn, loss=loss),
    "egn_cg": lambda fn, loss: gn.egn(fn, loss=loss, solver="cg", max_cg_iters=20),
    "sgn": lambda fn, loss: sgn(fn, loss=loss),
    # Cai et al.: fixed step, constant λ; a full step with tiny λ oscillates on b = 8 < d
    "ggn": lambda fn, loss: gram_gauss_newton(fn, learning_rate=0.5, damping=0.1),
    "dual_gn": lambda fn, loss: dual_gn(fn, loss=loss, damping=1e-2, max_inner_iters=3),
    "ignd": lambda fn, loss: ignd(fn, loss=loss, learning_rate=0.5, damping=1e-3),
    "sqn": lambda fn, loss: sqn(fn, loss=loss, history=5),
}
APPLICABLE = {
    "ggn": {"regression"},
    "ignd": {"regression", "binary"},
}
CASES = [(p, m) for p in PROBLEMS for m in METHODS if p in APPLICABLE.get(m, set(PROBLEMS))]
# the loss after STEPS steps must be at most this fraction of the initial loss
DECREASE = 0.9


@pytest.mark.parametrize(("problem", "method"), CASES, ids=[f"{p}-{m}" for p, m in CASES])
def test_grid(problem, method):
    loss, c = PROBLEMS[problem]
    kp, kx, ky = jax.random.split(jax.random.key(7), 3)
    params = init_mlp(kp, 3, c)
    x = jax.random.normal(kx, (B, 3))
    y = make_labels(ky, loss, B, c)
    traces = []

    def model_fn(p, xx):
        traces.append(1)  # runs only while tracing
        return mlp(p, xx)

    opt = METHODS[method](model_fn, loss)
    state = opt.init(params)
    step = jax.jit(opt.step)
    p = params
    losses = []
    for i in range(STEPS):
        p, state, info = step(p, state, x, y)
        losses.append(float(info.loss))
        assert not bool(info.rejected), (problem, method, i, info)
        if i == 0:
            n_traced = len(traces)
            assert n_traced > 0
    f_final = mlp(p, x)
    final = float(
        jnp.mean(gn.get_loss(loss).value(f_final, gn.get_loss(loss).prepare_labels(f_final, y)))
    )
    assert final <= DECREASE * losses[0], (problem, method, losses, final)
    assert np.all(np.isfinite(losses))

    # non-finite batch: same shapes, so no retrace; nothing moves except possibly λ
    x_bad = x.at[0, 1].set(jnp.nan)
    p_bad, state_bad, info_bad = step(p, state, x_bad, y)
    assert len(traces) == n_traced, f"{method} retraced: {len(traces)} vs {n_traced}"
    assert bool(info_bad.rejected)
    np.testing.assert_array_equal(flat(p_bad), flat(p))
    for name in state._fields:
        if name == "damping":
            assert float(state_bad.damping) >= float(state.damping)
            continue
        a = jax.tree_util.tree_leaves(getattr(state, name))
        b = jax.tree_util.tree_leaves(getattr(state_bad, name))
        for u, v in zip(a, b, strict=True):
            np.testing.assert_array_equal(np.asarray(u), np.asarray(v), err_msg=f"{method}: {name}")

    # abstract init: the structure, shapes and dtypes of the concrete state
    abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    _assert_same_avals(jax.eval_shape(opt.init, abstract), opt.init(params))

    # round-trips of the state give the same next step (and no retrace)
    p_next, s_next, _ = step(p, state, x, y)
    for how, restored in _round_trips(state).items():
        p_rt, s_rt, _ = step(p, restored, x, y)
        np.testing.assert_array_equal(flat(p_rt), flat(p_next), err_msg=f"{method}: {how}")
        _assert_same_avals(restored, state)
        for u, v in zip(
            jax.tree_util.tree_leaves(s_rt), jax.tree_util.tree_leaves(s_next), strict=True
        ):
            np.testing.assert_array_equal(np.asarray(u), np.asarray(v), err_msg=how)
    assert len(traces) == n_traced, f"{method}: a restored state retraced"


def _round_trips(state):
    leaves, treedef = jax.tree_util.tree_flatten(state)
    packed = flax.serialization.msgpack_serialize(flax.serialization.to_state_dict(state))
    return {
        "tree_flatten": jax.tree_util.tree_unflatten(treedef, leaves),
        "flax state dict + msgpack": flax.serialization.from_state_dict(
            state, flax.serialization.msgpack_restore(packed)
        ),
        "device_get": jax.tree_util.tree_map(jnp.asarray, jax.device_get(state)),
    }


def _assert_same_avals(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        assert (u.shape, u.dtype) == (v.shape, v.dtype), (u, v)


#: factorization primitives (jax.scipy / lax.linalg): they must run in float32 or wider
FACTORIZATIONS = {"cholesky", "triangular_solve", "eigh", "lu", "qr", "svd"}
#: the dense SPD solve each factoring method calls (native, so not a primitive): (module, name)
SPD_SOLVES = {
    "egn": (directions, "solve_tiled_spd"),
    "ggn": (directions, "solve_tiled_spd"),
    "dual_gn": (dual_module, "solve_damped_spd"),
}
DTYPE_CASES = [("bfloat16", m) for m in METHODS] + [("float32", m) for m in sorted(SPD_SOLVES)]


def _factorization_dtypes(jaxpr) -> list:
    """Operand dtypes of every factorization in ``jaxpr`` and its sub-jaxprs (cond, while, pjit)."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in FACTORIZATIONS:
            found += [var.aval.dtype for var in eqn.invars]
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found += _factorization_dtypes(inner)
    return found


def _spy_on_spd_solve(monkeypatch, method) -> list:
    """Record the dtypes of the matrix (or first Gram tile), shift and right-hand side."""
    if method not in SPD_SOLVES:
        return []
    module, name = SPD_SOLVES[method]
    real, seen = getattr(module, name), []

    def spy(a, *rest):
        matrix = a(0, 0) if callable(a) else a  # solve_tiled_spd takes the tile function
        seen.append([jnp.dtype(matrix.dtype)] + [jnp.result_type(r) for r in rest[-2:]])
        return real(a, *rest)

    monkeypatch.setattr(module, name, spy)
    return seen


@pytest.mark.parametrize(("dtype", "method"), DTYPE_CASES, ids=[f"{d}-{m}" for d, m in DTYPE_CASES])
def test_low_precision_params(dtype, method, monkeypatch):
    dt = jnp.dtype(dtype)
    kp, kx, ky = jax.random.split(jax.random.key(7), 3)
    cast = lambda t: jax.tree_util.tree_map(lambda a: a.astype(dt), t)  # noqa: E731
    params = cast(init_mlp(kp, 3, 1))
    x, y = cast(jax.random.normal(kx, (B, 3))), cast(make_labels(ky, "squared_error", B, 1))
    opt = METHODS[method](mlp, "squared_error")
    state = opt.init(params)
    seen = _spy_on_spd_solve(monkeypatch, method)
    traced = jax.jit(opt.step).trace(params, state, x, y)
    # the Gram and its solve: float32 (the compute dtype of bfloat16 and float32 params)
    solve_dtypes = _factorization_dtypes(traced.jaxpr.jaxpr) + sum(seen, [])
    assert all(d == jnp.float32 for d in solve_dtypes), (method, solve_dtypes)
    assert bool(seen) == (method in SPD_SOLVES), method
    step = traced.lower().compile()
    p, losses = params, []
    for _ in range(STEPS):
        p, state, info = step(p, state, x, y)
        losses.append(float(info.loss))
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(p)} == {dt}
    assert np.all(np.isfinite(losses)), (method, losses)
    final = float(jnp.mean(jnp.square(mlp(p, x).astype(jnp.float32) - y.astype(jnp.float32)))) / 2
    assert final <= DECREASE * losses[0], (method, dtype, losses, final)


#: method -> tolerance (relative, and absolute for leaves near 0) of vmap against separate steps: exact solves agree to rounding;
#: row-space CG stops at a residual of 1e-6 and amplifies the rounding differences of batched
#: reductions over its iterations (measured 6e-9), so it agrees to its own tolerance
VMAP_METHODS = {"egn": 1e-12, "egn_cg": 1e-6, "dual_gn": 1e-12}


@pytest.mark.parametrize("method", sorted(VMAP_METHODS))
def test_vmap_over_seeds_equals_separate_steps(method):
    kx, ky = jax.random.split(jax.random.key(7))
    x, y = jax.random.normal(kx, (B, 3)), make_labels(ky, "squared_error", B, 1)
    opt = METHODS[method](mlp, "squared_error")

    def init_and_step(params):
        return opt.step(params, opt.init(params), x, y)

    seeds = jax.random.split(jax.random.key(11), 3)
    stacked = jax.vmap(lambda k: init_mlp(k, 3, 1))(seeds)
    batched = jax.jit(jax.vmap(init_and_step))(stacked)
    single = jax.jit(init_and_step)
    for i in range(3):
        one = single(jax.tree_util.tree_map(lambda a, i=i: a[i], stacked))
        mine = jax.tree_util.tree_map(lambda a, i=i: a[i], batched)
        assert jax.tree_util.tree_structure(mine) == jax.tree_util.tree_structure(one)
        for u, v in zip(
            jax.tree_util.tree_leaves(mine), jax.tree_util.tree_leaves(one), strict=True
        ):
            u, v = np.asarray(u), np.asarray(v)
            if np.issubdtype(v.dtype, np.floating):
                tol = VMAP_METHODS[method]  # atol: rounding-level leaves such as cg_residual
                np.testing.assert_allclose(u, v, rtol=tol, atol=tol, err_msg=f"{method}, seed {i}")
            else:
                np.testing.assert_array_equal(u, v)
