"""``egn_direction`` against the dense parameter-space LM direction ``−(JᵀQJ/b + λI)⁻¹ ∇L``.

Float64: 1e-8 relative for every loss, c ∈ {1, 3, 10} (c = 1 only for the binary loss), λ ∈ {1e-6,
1e-3, 1, 100}, both Gram strategies, a nested-dict MLP with two hidden layers. (Measured errors are
1e-10 or smaller; the largest come from λ = 1e-6, where the reference solve itself has condition
number ~1/λ.)

Float32: the same problems with float32 parameters and data agree with the float64 reference to
2e-3 relative for λ ≥ 1e-3 (error ~ ε₃₂ · cond, cond ≲ ‖K‖/(bλ)); at λ = 1e-6 float32 cannot resolve
the solve and only the descent property is asserted.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import dense_lm_direction, flat, init_mlp, make_labels, mlp, mlp_scalar, rel_err
from hypothesis import given, settings
from hypothesis import strategies as st

import gaussnewton as gn
from gaussnewton import linalg

LAMBDAS = [1e-6, 1e-3, 1.0, 100.0]
CASES = [
    ("squared_error", 1),
    ("squared_error", 3),
    ("squared_error", 10),
    ("softmax_cross_entropy", 3),
    ("softmax_cross_entropy", 10),
    ("sigmoid_binary_cross_entropy", 1),
]
B = 6


@functools.partial(jax.jit, static_argnames=("model_fn", "loss", "gram", "curvature"))
def _direction(params, x, y, lam, key=None, *, model_fn, loss, gram, curvature="exact"):
    d, info = gn.egn_direction(
        model_fn, params, x, y, loss=loss, damping=lam, gram=gram, curvature=curvature, key=key
    )
    return d, info


def _problem(loss, c, dtype=jnp.float64, seed=0):
    kp, kx, ky = jax.random.split(jax.random.key(seed), 3)
    params = init_mlp(kp, 4, c, dtype=dtype)
    x = jax.random.normal(kx, (B, 4), dtype)
    y = make_labels(ky, loss, B, c, dtype)
    return params, x, y


@pytest.mark.parametrize("gram", ["jacobian", "matvec"])
@pytest.mark.parametrize("loss,c", CASES)
def test_matches_dense_reference_float64(loss, c, gram):
    params, x, y = _problem(loss, c)
    for lam in LAMBDAS:
        d, info = _direction(params, x, y, lam, model_fn=mlp, loss=loss, gram=gram)
        ref, grad = dense_lm_direction(mlp, params, x, y, loss, lam)
        assert rel_err(flat(d), ref) < 1e-8, (loss, c, lam)
        assert rel_err(flat(info.grad), grad) < 1e-12
        np.testing.assert_allclose(info.directional_derivative, grad @ ref, rtol=1e-8)


def _saturated(params, x):
    """``mlp`` with example 0's class-0 logit raised by 800: its other classes have ``p = 0``
    in float64 (``e⁻⁸⁰⁰`` underflows)."""
    return mlp(params, x) + jnp.zeros((B, 3), x.dtype).at[0, 0].set(800.0)


@pytest.mark.parametrize("gram", ["jacobian", "structured"])
def test_softmax_label_outside_the_floating_point_range(gram):
    """Example 0's label (class 1) has ``p = 0``: ``g`` is not in the range of ``S`` there, so
    the range form takes its ``r ≠ 0`` branch (one more VJP + JVP, run only then). Float64
    against the dense reference to 1e-8, as the in-range cases above; the branch matters:
    skipping it (checked by hand) gives a relative error of 5."""
    params, x, _ = _problem("softmax_cross_entropy", 3)
    y = jnp.array([1, 0, 2, 1, 0, 2])
    p0 = jax.nn.softmax(_saturated(params, x)[0])
    assert p0[1] == 0.0 and p0[2] == 0.0  # the premise: the label's probability underflowed
    for lam in (1e-3, 1.0):
        d, info = _direction(
            params, x, y, lam, model_fn=_saturated, loss="softmax_cross_entropy", gram=gram
        )
        ref, grad = dense_lm_direction(_saturated, params, x, y, "softmax_cross_entropy", lam)
        assert rel_err(flat(d), ref) < 1e-8, lam
        assert rel_err(flat(info.grad), grad) < 1e-12


def test_scalar_output_model_and_convex_loss():
    """``(b,)`` outputs, and a user ConvexLoss (pseudo-Huber, non-constant Q) through the Woodbury path."""
    params, x, y = _problem("squared_error", 1)
    y = y[:, 0]
    for lam in (1e-3, 1.0):
        d, _ = _direction(
            params, x, y, lam, model_fn=mlp_scalar, loss="squared_error", gram="jacobian"
        )
        assert (
            rel_err(flat(d), dense_lm_direction(mlp_scalar, params, x, y, "squared_error", lam)[0])
            < 1e-8
        )
    huber = gn.ConvexLoss(
        lambda f, t: jnp.sum(jnp.sqrt(1.0 + (f - t) ** 2) - 1.0), name="pseudo_huber"
    )
    params, x, y = _problem("squared_error", 3)
    for lam in (1e-3, 1.0):
        d, _ = _direction(params, x, y, lam, model_fn=mlp, loss=huber, gram="jacobian")
        assert rel_err(flat(d), dense_lm_direction(mlp, params, x, y, huber, lam)[0]) < 1e-8


def test_called_without_jit_runs_compiled_and_keeps_label_errors():
    """``egn_direction`` on concrete arrays traces the model once per configuration and shapes
    (op by op it would run on every call), gives the jitted direction (float64, 1e-12: the same
    program), concrete bad labels raise the documented ValueError, and a switch of the solve
    backend (read at trace time) compiles anew."""
    params, x, y = _problem("softmax_cross_entropy", 3)
    calls = []

    def counted(p, xb):
        calls.append(1)
        return mlp(p, xb)

    kw = dict(loss="softmax_cross_entropy", damping=1e-2, gram="jacobian")
    d1, i1 = gn.egn_direction(counted, params, x, y, **kw)
    n_calls = len(calls)
    d2, i2 = gn.egn_direction(counted, params, 1.01 * x, y, **kw)
    assert len(calls) == n_calls
    d_ref, i_ref = _direction(params, x, y, 1e-2, model_fn=mlp, loss=kw["loss"], gram="jacobian")
    np.testing.assert_allclose(flat(d1), flat(d_ref), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(i1.loss, i_ref.loss, rtol=1e-12)
    with pytest.raises(ValueError, match=r"must lie in \[0, 3\)"):
        gn.egn_direction(counted, params, x, np.full(B, 3), **kw)
    # settings read at trace time are part of the cache key: a backend switch retraces
    old = linalg.set_backend("lapack" if linalg.get_backend() == "native" else "native")
    try:
        d3, _ = gn.egn_direction(counted, params, x, y, **kw)
    finally:
        linalg.set_backend(old)
    assert len(calls) > n_calls
    np.testing.assert_allclose(flat(d3), flat(d_ref), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loss,c", [("squared_error", 3), ("softmax_cross_entropy", 10)])
def test_float32_agreement(loss, c):
    p64, x64, y64 = _problem(loss, c)
    to32 = lambda t: jax.tree_util.tree_map(  # noqa: E731
        lambda a: a.astype(jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a, t
    )
    p32, x32, y32 = to32(p64), to32(x64), to32(y64)
    for lam in LAMBDAS:
        d, info = _direction(
            p32, x32, y32, jnp.float32(lam), model_fn=mlp, loss=loss, gram="jacobian"
        )
        assert jax.tree_util.tree_leaves(d)[0].dtype == jnp.float32
        ref, _ = dense_lm_direction(mlp, p64, x64, y64, loss, lam)
        if lam >= 1e-3:
            assert rel_err(flat(d), ref) < 2e-3, (loss, lam)
        assert float(info.directional_derivative) < 0


def test_sampled_curvature_is_exact_lm_for_its_factor():
    """With the sampled factor Ŝ, the direction equals the dense LM direction with Q̂ = Ŝ Ŝᵀ."""
    loss_name, c, m = "softmax_cross_entropy", 5, 2
    params, x, y = _problem(loss_name, c)
    key = jax.random.key(42)
    loss = gn.get_loss(loss_name)
    f = mlp(params, x)
    s = loss.sample_factor(f, loss.prepare_labels(f, y), key, m)
    q_hat = jnp.einsum("bcr,bdr->bcd", s, s)
    direction = jax.jit(
        lambda p, lam: gn.egn_direction(
            mlp, p, x, y, loss=loss_name, damping=lam, curvature="sampled", num_samples=m, key=key
        )
    )
    for lam in (1e-3, 1.0):
        d, _ = direction(params, lam)
        ref, _ = dense_lm_direction(mlp, params, x, y, loss_name, lam, q_override=q_hat)
        assert rel_err(flat(d), ref) < 1e-8


def test_sampled_curvature_needs_key():
    params, x, y = _problem("softmax_cross_entropy", 3)
    with pytest.raises(ValueError, match="PRNG key"):
        gn.egn_direction(
            mlp, params, x, y, loss="softmax_cross_entropy", damping=1.0, curvature="sampled"
        )


@settings(max_examples=4, deadline=None)
@given(
    b=st.integers(1, 4),
    c=st.integers(1, 3),
    width=st.integers(2, 4),
    loss=st.sampled_from(["squared_error", "softmax_cross_entropy"]),
    seed=st.integers(0, 1000),
)
def test_random_shapes(b, c, width, loss, seed):
    """Random batch sizes (including b = 1), output counts and widths."""
    kp, kx, ky = jax.random.split(jax.random.key(seed), 3)
    params = init_mlp(kp, 3, c, width=width)
    x = jax.random.normal(kx, (b, 3))
    y = make_labels(ky, loss, b, c)
    d, _ = _direction(params, x, y, 1e-2, model_fn=mlp, loss=loss, gram="jacobian")
    assert rel_err(flat(d), dense_lm_direction(mlp, params, x, y, loss, 1e-2)[0]) < 1e-8


@pytest.mark.parametrize("gram", ["jacobian", "structured", "matvec"])
@pytest.mark.parametrize("loss,c", [("squared_error", 3), ("softmax_cross_entropy", 10)])
def test_tiled_row_space_solve_matches_dense_reference(monkeypatch, loss, c, gram):
    """Tiles of 8 rows force the tiled Gram + tile Cholesky path (2 tiles for squared error with
    c = 3; one example per tile for softmax with r = 9): the same 1e-8 agreement in float64."""
    import gaussnewton.linalg as linalg

    monkeypatch.setattr(linalg, "TILE_ROWS", 8)
    params, x, y = _problem(loss, c, seed=5)

    @jax.jit
    def tiled(params, x, y, lam):
        return gn.egn_direction(mlp, params, x, y, loss=loss, damping=lam, gram=gram)[0]

    to32 = lambda t: jax.tree_util.tree_map(  # noqa: E731
        lambda a: a.astype(jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a, t
    )
    for lam in (1e-3, 1.0):
        ref, _ = dense_lm_direction(mlp, params, x, y, loss, lam)
        assert rel_err(flat(tiled(params, x, y, lam)), ref) < 1e-8, (loss, lam)
        # float32 through the tiles: the same 2e-3 as the single-Cholesky float32 test
        d32 = tiled(to32(params), to32(x), to32(y), jnp.float32(lam))
        assert rel_err(flat(d32), ref) < 2e-3, (loss, lam)


@pytest.mark.parametrize(
    "loss,c,model",
    [
        ("squared_error", 3, mlp),
        ("softmax_cross_entropy", 3, mlp),
        ("softmax_cross_entropy", 3, _saturated),  # r ≠ 0: ∇L by its own VJP
        ("sigmoid_binary_cross_entropy", 1, mlp),
    ],
)
def test_gradient_free_step_reports_the_reference_slope_and_gradient_norm(loss, c, model):
    """A step that applies ``d`` as is (no momentum, no tx) skips the gradient's backward pass:
    ``∇Lᵀd`` and ``‖∇L‖`` come from the row-space solve (``gᵀJd/b``, ``√(gᵀKg)/b``). Float64,
    against the dense reference to 1e-8 (the solve's accuracy, as above); the step itself is
    ``params + d`` exactly as with the gradient computed (momentum 0 is the other path)."""
    params, x, y = _problem(loss, c)
    if model is _saturated:
        y = jnp.array([1, 0, 2, 1, 0, 2])
    lam = 1e-2
    ref, grad = dense_lm_direction(model, params, x, y, loss, lam)
    kw = dict(loss=loss, damping=lam, damping_policy="constant", line_search=None)
    for opt in (gn.egn(model, **kw), gn.egn(model, momentum=1e-12, **kw)):
        p1, _, info = jax.jit(opt.step)(params, opt.init(params), x, y)
        assert rel_err(flat(p1) - flat(params), ref) < 1e-8
        np.testing.assert_allclose(info.grad_norm, np.linalg.norm(grad), rtol=1e-8)
        np.testing.assert_allclose(info.directional_derivative, grad @ ref, rtol=1e-8)
