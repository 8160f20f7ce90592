"""``gn.dual_gn_transform`` with a :class:`gaussnewton.Model` (state and key channels).

The transform of a Model with a key (dropout mask) or a state (a call counter that also shifts
the outputs) equals the transform of the plain function bound to the same state and key
(``Model.bind``: the model key is ``fold_in(step key, 1)``, as in the optimizers), bit for bit;
the model state advances once per update; the state's key is split, so two updates draw two
masks; ``key=`` for a model without a key channel is refused. Eager, tiny linear model, float64.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gaussnewton as gn
from gaussnewton.dual import DualGNTransformState

X = jax.random.normal(jax.random.key(0), (6, 3))
Y = jax.random.randint(jax.random.key(1), (6,), 0, 2)
P = {"w": 0.3 * jax.random.normal(jax.random.key(2), (3, 2))}
KW = dict(loss="softmax_cross_entropy", damping=1e-2, max_inner_iters=3)


def dropout_fn(p, x, *, key):
    keep = jax.random.bernoulli(key, 0.7, x.shape)
    return jnp.where(keep, x / 0.7, 0.0) @ p["w"]


def counter_fn(p, x, *, state):
    return x @ p["w"] + 0.1 * state["calls"], {"calls": state["calls"] + 1}


def _update(tx, state, **kw):
    return tx.update(P, state, P, x=X, y=Y, **kw)


def test_model_with_key_equals_the_bound_function():
    model = gn.Model(dropout_fn, needs_key=True)
    tx = gn.dual_gn_transform(model, **KW)
    state = tx.init(P)
    assert isinstance(state, DualGNTransformState)
    k = jax.random.key(5)
    out, new_state = _update(tx, state, key=k)
    plain = gn.dual_gn_transform(model.bind(None, jax.random.fold_in(k, 1)), **KW)
    ref, _ = _update(plain, plain.init(P))
    np.testing.assert_array_equal(out["w"], ref["w"])
    np.testing.assert_array_equal(new_state.key, state.key)  # an explicit key: state key kept

    # no key: split from the state, a new mask each update (jit-able)
    update = jax.jit(lambda s: _update(tx, s))
    out1, s1 = update(state)
    out2, _ = update(s1)
    step_key = jax.random.split(jax.random.wrap_key_data(state.key))[0]
    ref1, _ = _update(tx, state, key=step_key)
    np.testing.assert_allclose(out1["w"], ref1["w"], rtol=1e-12)
    assert not np.allclose(out1["w"], out2["w"])


def test_model_with_state_advances_it():
    model = gn.Model(counter_fn, has_state=True, initial_state={"calls": jnp.asarray(2.0)})
    tx = optax.chain(gn.dual_gn_transform(model, **KW), optax.sgd(1.0))
    state = tx.init(P)
    out, state2 = _update(tx, state)
    assert float(state2[0].model_state["calls"]) == 3.0
    plain = gn.dual_gn_transform(model.bind({"calls": jnp.asarray(2.0)}), **KW)
    ref, _ = _update(plain, plain.init(P))
    np.testing.assert_array_equal(out["w"], -ref["w"])  # sgd(1.0) negates


def test_plain_function_keeps_empty_state_and_refuses_a_key():
    fn = lambda p, x: x @ p["w"]  # noqa: E731
    assert isinstance(gn.dual_gn_transform(fn, **KW).init(P), optax.EmptyState)
    with pytest.raises(ValueError, match="key="):
        gn.dual_gn_transform(fn, key=jax.random.key(0), **KW)
