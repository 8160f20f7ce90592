"""``gram=`` takes a registered strategy object as well as its name (gaussnewton.gram.strategy_name).

A strategy object (a callable class instance) registered with ``gn.register_strategy`` gives the
same EGN direction as its name, bit for bit (it is resolved to the name at construction), and the
same as the built-in it wraps; built-in strategy functions resolve to their names; an unregistered
callable and a non-callable are refused with the fix in the message. Eager, float64.
"""

import jax
import numpy as np
import pytest
from conftest import flat, init_mlp, mlp

import gaussnewton as gn
from gaussnewton.gram import PER_EXAMPLE, STRATEGIES, strategy_name
from gaussnewton.gram._jacobian import jacobian_gram


class CountingJacobian:
    """A strategy object: the Jacobian Gram, counting its calls (trace time)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, model_fn, params, x1, x2=None):
        self.calls += 1
        return jacobian_gram(model_fn, params, x1, x2)


@pytest.fixture
def registered():
    obj = CountingJacobian()
    gn.register_strategy("counting", obj)
    try:
        yield obj
    finally:
        STRATEGIES.pop("counting")
        PER_EXAMPLE.discard("counting")


def test_strategy_object_equals_its_name(registered):
    kp, kx, ky = jax.random.split(jax.random.key(0), 3)
    params, x = init_mlp(kp, 3, 2), jax.random.normal(kx, (5, 3))
    y = jax.random.normal(ky, (5, 2))
    kw = dict(loss="squared_error", damping=1e-2, solver="cholesky")
    d_obj, _ = gn.egn_direction(mlp, params, x, y, gram=registered, **kw)
    assert registered.calls > 0
    d_name, _ = gn.egn_direction(mlp, params, x, y, gram="counting", **kw)
    d_ref, _ = gn.egn_direction(mlp, params, x, y, gram="jacobian", **kw)
    np.testing.assert_array_equal(flat(d_obj), flat(d_name))
    np.testing.assert_allclose(flat(d_obj), flat(d_ref), rtol=1e-12, atol=1e-14)
    assert gn.egn(mlp, loss="squared_error", gram=registered).name == "egn"


def test_strategy_name_resolves_and_refuses():
    assert strategy_name("auto") == "auto"
    assert strategy_name(STRATEGIES["matvec"]) == "matvec"
    with pytest.raises(ValueError, match="not a registered strategy"):
        strategy_name(lambda m, p, a, b=None: None)
    with pytest.raises(TypeError, match="gram=3"):
        gn.egn(mlp, loss="squared_error", gram=3)
    with pytest.raises(ValueError, match="gram='nope' is unknown"):
        gn.dual_gn(mlp, loss="squared_error", gram="nope")
