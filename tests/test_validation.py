"""Bad arguments fail where they enter, with a message naming the argument, the value and the fix.

Construction-time checks (no compilation): float32 overflow, schedules checked on their first
value, λ schedules; call-time checks: egn_direction's damping, integer parameter leaves or model
outputs, an empty batch.
"""

import jax
import jax.numpy as jnp
import optax
import pytest

import gaussnewton as gn

FN = lambda p, x: x @ p["w"]  # noqa: E731
P = {"w": jnp.ones((3, 1))}
X, Y = jnp.ones((4, 3)), jnp.zeros(4)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"learning_rate": 1e39}, "overflows float32"),
        ({"damping": 1e39}, "overflows float32"),
        ({"learning_rate": lambda count: -1.0}, r"learning_rate\(0\) = -1.0 must be finite and > 0"),
        ({"learning_rate": lambda count: jnp.nan}, r"learning_rate\(0\) = nan"),
        ({"learning_rate": optax.constant_schedule(-0.5)}, "learning_rate"),
        (
            {"damping_policy": lambda count: -1e-3},
            r"damping_policy\(0\) = -0.001 must be finite and >= 0",
        ),
    ],
)
def test_numbers_and_schedules_checked_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        gn.egn(FN, loss="squared_error", **kwargs)


def test_schedule_that_cannot_be_called():
    with pytest.raises(TypeError, match=r"learning_rate\(0\) failed"):
        gn.egn(FN, loss="squared_error", learning_rate=lambda a, b: 1.0)


@pytest.mark.parametrize("damping", [-1.0, float("nan"), jnp.asarray(-2.0)])
def test_egn_direction_refuses_bad_damping(damping):
    with pytest.raises(ValueError, match="damping="):
        gn.egn_direction(FN, P, X, Y, loss="squared_error", damping=damping)


def test_egn_direction_refuses_zero_damping_for_curved_losses():
    with pytest.raises(ValueError, match="damping=0"):
        gn.egn_direction(
            FN, P, X, jnp.zeros(4), loss="sigmoid_binary_cross_entropy", damping=0.0
        )


def test_integer_parameter_leaf_refused_clearly():
    params = {"w": jnp.ones((3, 1)), "n": jnp.asarray(3)}
    opt = gn.egn(lambda p, x: x @ p["w"], loss="squared_error")
    with pytest.raises(TypeError, match=r"params\['n'\] has dtype int"):
        opt.init(params)
    with pytest.raises(TypeError, match=r"params\['n'\] has dtype int"):
        gn.egn_direction(lambda p, x: x @ p["w"], params, X, Y, loss="squared_error", damping=1e-3)


def test_integer_model_output_refused_clearly():
    fn = lambda p, x: jnp.round(x @ p["w"]).astype(jnp.int32)  # noqa: E731
    with pytest.raises(TypeError, match="outputs of dtype int32"):
        gn.egn_direction(fn, P, X, Y, loss="squared_error", damping=1e-3)


def test_empty_batch_refused_clearly():
    opt = gn.egn(FN, loss="squared_error")
    with pytest.raises(ValueError, match="batch is empty"):
        opt.step(P, opt.init(P), jnp.ones((0, 3)), jnp.zeros(0))


def test_jitted_step_rejects_when_labels_are_out_of_range_under_jit():
    """Traced labels cannot raise: the step is rejected (params unchanged) and flagged."""
    fn = lambda p, x: x @ p["w"]  # noqa: E731
    params = {"w": 0.1 * jnp.ones((3, 4))}
    opt = gn.egn(fn, loss="softmax_cross_entropy")
    state = opt.init(params)
    step = jax.jit(opt.step)
    new, _, info = step(params, state, X, jnp.array([0, 1, 4, 2]))  # 4 is not a class of 4
    assert bool(info.rejected)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(jnp.array_equal, new, params))
    _, _, ok = step(params, state, X, jnp.array([0, 1, 3, 2]))
    assert not bool(ok.rejected)
