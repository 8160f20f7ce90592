"""Tiny character-level LM: the ``reviews_chars`` data set, the ``transformer`` model, per-token
evaluation in the supervised runner and a short EGN (sampled curvature) run of ``tiny_lm``.

Sizes are tiny (a few hundred sequences, batch 8) but go through the experiment's own code path.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gaussnewton_experiments import registry as R
from gaussnewton_experiments.datasets import (
    CHAR_VOCAB,
    Dataset,
    encode_chars,
    load_dataset,
    load_reviews_chars,
)
from gaussnewton_experiments.models import make_model
from gaussnewton_experiments.supervised import _make_eval, run_supervised

V = len(CHAR_VOCAB) + 1  # + "other"
SMALL = {"max_train": 128, "max_eval": 32}


@pytest.fixture(scope="module")
def small():
    return load_reviews_chars(**SMALL)


def test_encode_chars_vocabulary():
    assert V == 34
    ids = encode_chars("Hi 5!\nÉ-a")
    # lower-cased, digit and non-ASCII -> "other" (33), newline -> space (0)
    assert ids.tolist() == [8, 9, 0, 33, 29, 0, 33, 32, 1]
    assert ids.dtype == np.int32


def test_reviews_chars_shapes_and_shifted_targets(small):
    ds = small
    assert ds.task == "classification" and ds.num_outputs == V == ds.num_classes
    assert ds.x_train.shape == ds.y_train.shape == (128, 32)
    assert ds.x_val.shape == ds.x_test.shape == (32, 32)
    for x, y in ((ds.x_train, ds.y_train), (ds.x_val, ds.y_val), (ds.x_test, ds.y_test)):
        assert x.dtype == y.dtype == np.int32
        assert x.min() >= 0 and x.max() < V
        np.testing.assert_array_equal(y[:, :-1], x[:, 1:])  # targets = inputs shifted by one
    assert not np.array_equal(ds.x_val, ds.x_test)
    assert "Clothing Reviews" in ds.info["source"]
    assert ds.info["license"] and ds.info["vocabulary"].startswith(CHAR_VOCAB)
    # the registry path gives the same arrays; "validation" evaluates on the validation part
    val = load_dataset("reviews_chars", split="validation", **SMALL)
    np.testing.assert_array_equal(val.x_train, ds.x_train)
    np.testing.assert_array_equal(val.x_test, ds.x_val)
    assert R.get_dataset("reviews_chars").task == "classification"


def test_transformer_shapes_and_causality():
    fn, p = make_model("transformer", jax.random.key(0), (12,), V)
    ids = jax.random.randint(jax.random.key(1), (3, 12), 0, V)
    out = fn(p, ids)
    assert out.shape == (3, 12, V) and bool(jnp.isfinite(out).all())
    # position t sees ids <= t only: changing ids from position 7 on leaves logits 0..6 unchanged
    ids2 = ids.at[:, 7:].set((ids[:, 7:] + 1) % V)
    out2 = fn(p, ids2)
    np.testing.assert_allclose(out2[:, :7], out[:, :7], rtol=0, atol=1e-6)
    assert float(jnp.max(jnp.abs(out2[:, 7] - out[:, 7]))) > 1e-3
    with pytest.raises(ValueError, match="token-id inputs"):
        make_model("transformer", jax.random.key(0), (4, 4), V)


def test_per_token_evaluation_matches_dense_reference():
    """Token accuracy and mean per-token loss over all tokens (n = 10, eval batch 4: the last
    batch is padded and masked). float64 reference; the loss is summed in float64 (tolerance
    1e-10, sums of 50 O(1) terms), correct-token counts in float32 like the harness's mask
    (1e-6)."""
    rng = np.random.default_rng(0)
    n, t, v = 10, 5, 6
    x = rng.integers(0, v, (n, t)).astype(np.int32)
    y = rng.integers(0, v, (n, t)).astype(np.int32)
    table = rng.standard_normal((v, t, v))

    def model_fn(w, ids):  # logits of token (i, s) depend on (ids[i, s], s)
        return w[ids, jnp.arange(ids.shape[1])]

    ds = Dataset(
        "toy", "classification", x, y, x, y, num_outputs=v, num_classes=v, x_val=x, y_val=y
    )
    m = _make_eval(model_fn, ds, "softmax_cross_entropy", eval_batch=4)(jnp.asarray(table))
    f = table[x, np.arange(t)]  # (n, t, v)
    logp = f - np.log(np.exp(f).sum(-1, keepdims=True))
    ref_loss = -np.take_along_axis(logp, y[..., None], -1).mean()
    ref_acc = (f.argmax(-1) == y).mean()
    assert abs(m["test_loss"] - ref_loss) < 1e-10 * ref_loss
    assert abs(m["test_accuracy"] - ref_acc) < 1e-6
    assert m["metric"] == m["test_accuracy"]


def test_tiny_lm_egn_run_lowers_the_loss():
    """``tiny_lm``'s EGN configuration (sampled curvature, m = 1) for 12 steps, batch 8."""
    spec = R.get_experiment("tiny_lm")
    assert spec.options["model"] == "transformer" and spec.options["dataset"] == "reviews_chars"
    hp = {**R.get_optimizer("egn").defaults, **spec.default_hparams["egn"]}
    assert hp["curvature"] == "sampled" and hp["num_samples"] == 1
    cfg = R.RunConfig(
        experiment="tiny_lm",
        optimizer="egn",
        seed=0,
        steps=12,
        batch_size=8,
        eval_every=6,
        hparams=hp,
        options={**spec.options, "dataset_kwargs": SMALL, "eval_batch": 24},
    )
    rows = list(run_supervised(cfg))
    assert [r["step"] for r in rows] == [0, 6, 12]
    first, last = rows[0], rows[-1]
    assert abs(first["test_loss"] - math.log(V)) < 0.5  # near uniform at initialisation
    for r in rows:
        for k in ("test_accuracy", "val_accuracy", "test_loss"):
            assert math.isfinite(r[k]) and (0.0 <= r[k] <= 1.0 or k == "test_loss")
    assert last["train_loss"] < rows[1]["train_loss"] < first["test_loss"]
    assert last["test_loss"] < first["test_loss"] - 0.3
    assert last["test_accuracy"] > first["test_accuracy"]
