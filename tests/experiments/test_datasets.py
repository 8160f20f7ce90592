"""Offline data loaders: shipped files and checksums, the split protocol, no leakage, IDX parser."""

from __future__ import annotations

import gzip
import lzma
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gaussnewton_experiments import datasets as D


@pytest.mark.parametrize("name", sorted(D.TABLES))
def test_shipped_table_checksum_and_shape(name):
    info = D.TABLES[name]
    path = D._shipped_path(info.file)
    assert path.stat().st_size == info.size_bytes
    assert D.sha256_file(path) == info.sha256
    df = D.read_table(name)  # verifies the checksum itself
    assert df.shape == info.shape
    assert info.target in df.columns
    assert not df[info.target].isna().any()


def test_checksum_mismatch_is_refused(tmp_path):
    src = D._shipped_path(D.TABLES["bikeshare"].file)
    bad = tmp_path / "bikeshare.csv.xz"
    shutil.copy(src, bad)
    with open(bad, "ab") as f:
        f.write(b"\0")
    with pytest.raises(ValueError, match="checksum mismatch"):
        D.read_table("bikeshare", path=bad, verify=True)


def test_split_protocol_is_seeded_disjoint_and_nested():
    n = 1000
    tr, te = D.split_indices(n, 0.1, 1337)
    assert len(te) == 100 and len(np.intersect1d(tr, te)) == 0
    assert np.array_equal(np.union1d(tr, te), np.arange(n))
    tr2, te2 = D.split_indices(n, 0.1, 1337)
    assert np.array_equal(te, te2)  # same seed, same split
    # validation carved from the TRAINING part only
    vtr, vval = D._train_test_index(n, "validation")
    assert len(np.intersect1d(vval, te)) == 0 and len(np.intersect1d(vtr, te)) == 0
    assert np.array_equal(np.union1d(vtr, vval), tr)
    # ... in EVERY split: a test run trains on the same examples and never sees the validation part
    ttr, tval, tte = D._split_index(n, "test")
    np.testing.assert_array_equal(ttr, vtr)
    np.testing.assert_array_equal(tval, vval)
    np.testing.assert_array_equal(tte, te)
    assert len(vval) == 90 and len(np.intersect1d(ttr, tval)) == 0
    with pytest.raises(ValueError, match="split must be"):
        D._split_index(n, "train")


@pytest.fixture(scope="module")
def california():
    return D.load_california_housing()


def test_california_no_leakage_and_units(california):
    ds = california
    df = D.read_table("california_housing")
    tr, va, te = D._split_index(len(df), "test")  # training part without the validation part
    raw = df.drop(columns=["MedHouseVal"]).to_numpy(np.float64)
    # scaler statistics are the TRAINING part's, not the full table's
    np.testing.assert_allclose(ds.x_mean, raw[tr].mean(0), rtol=1e-12)
    np.testing.assert_allclose(ds.x_std, raw[tr].std(0), rtol=1e-12)
    assert not np.allclose(ds.x_mean, raw.mean(0), rtol=1e-6)
    np.testing.assert_allclose(ds.x_train.mean(0), 0.0, atol=1e-4)
    assert abs(float(ds.x_test.mean(0).max())) > 1e-4  # test part is not re-centred on itself
    y = df["MedHouseVal"].to_numpy()
    assert ds.y_mean == pytest.approx(y[tr].mean(), rel=1e-12)
    np.testing.assert_allclose(ds.y_test[:, 0] * ds.y_std + ds.y_mean, y[te], rtol=1e-5)
    np.testing.assert_allclose(ds.y_val[:, 0] * ds.y_std + ds.y_mean, y[va], rtol=1e-5)
    np.testing.assert_allclose(ds.x_val, (raw[va] - ds.x_mean) / ds.x_std, rtol=1e-5, atol=1e-5)
    assert (ds.n_train, ds.n_val, ds.n_test) == (16718, 1858, 2064)
    assert ds.info["sha256"] == D.TABLES["california_housing"].sha256
    # RMSE in original units: predicting the training mean gives the test targets' spread
    rmse = D.rmse_original_units(np.zeros_like(ds.y_test), ds.y_test, ds)
    assert rmse == pytest.approx(np.sqrt(np.mean((y[te] - y[tr].mean()) ** 2)), rel=1e-5)


def test_validation_split_refits_scaler_on_its_training_part():
    ds = D.load_california_housing(split="validation")
    df = D.read_table("california_housing")
    vtr, vval = D._train_test_index(len(df), "validation")
    raw = df.drop(columns=["MedHouseVal"]).to_numpy(np.float64)
    np.testing.assert_allclose(ds.x_mean, raw[vtr].mean(0), rtol=1e-12)
    assert ds.n_test == len(vval) and ds.split == "validation"
    np.testing.assert_array_equal(ds.x_test, ds.x_val)  # tuning scores on the validation part
    test_split = D.load_california_housing(split="test")
    np.testing.assert_array_equal(ds.x_train, test_split.x_train)  # same training examples
    np.testing.assert_array_equal(ds.x_val, test_split.x_val)


def _tiny_table(tmp_path):
    rng = np.random.default_rng(0)
    n = 200
    df = pd.DataFrame(
        {
            "a": rng.normal(5.0, 2.0, n),
            "color": rng.choice(["red", "green", "blue"], n),
            "target": rng.normal(100.0, 10.0, n),
        }
    )
    return df


def test_prepare_table_one_hot_and_training_statistics(tmp_path):
    df = _tiny_table(tmp_path)
    tr, va, te = D._split_index(len(df), "test")
    df.loc[te[0], "color"] = "purple"  # a category never seen in training
    ds = D.prepare_table(df, target="target", categorical=("color",), name="tiny")
    assert ds.feature_names == ("a", "color=blue", "color=green", "color=red")
    assert ds.x_mean[0] == pytest.approx(df["a"].to_numpy()[tr].mean(), rel=1e-12)
    onehot_test = ds.x_test[:, 1:]
    assert set(np.unique(onehot_test)) <= {0.0, 1.0}
    assert onehot_test[0].sum() == 0.0  # unseen category -> all zeros
    assert ds.x_val.shape == (len(va), 4) and np.all(ds.x_val[:, 1:].sum(1) == 1.0)
    assert np.all(ds.x_train[:, 1:].sum(1) == 1.0)
    cls = D.prepare_table(df, target="color", task="classification", name="tiny-cls")
    assert cls.num_classes == 4 and cls.num_outputs == 4 and cls.y_train.dtype == np.int32


def test_binary_tables_have_one_logit():
    ds = D.load_bikeshare()
    assert ds.num_outputs == 1 and ds.x_train.shape[1] == 58
    assert "casual" not in " ".join(ds.feature_names)
    adult = D.prepare_table(
        D.read_table("adult").iloc[:500],
        target="income",
        categorical=D.TABLES["adult"].categorical,
        task="classification",
        positive_label=">50K",
    )
    assert adult.num_outputs == 1 and set(np.unique(adult.y_train)) <= {0, 1}


def test_reviews_featurization_on_a_generated_table(tmp_path, monkeypatch):
    monkeypatch.setenv("GAUSSNEWTON_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    words = np.array(["good", "bad", "fit", "small", "love", "return", "nice", "poor"])
    text = [" ".join(rng.choice(words, 6)) for _ in range(120)]
    label = [int("good" in t or "love" in t) for t in text]
    path = tmp_path / "reviews.csv.xz"
    path.write_bytes(
        lzma.compress(
            pd.DataFrame({"text": text, "recommended": label}).to_csv(index=False).encode()
        )
    )
    ds = D.load_reviews(path=str(path), dims=5)
    assert ds.x_train.shape == (97, 5) and ds.x_val.shape == (11, 5) and ds.x_test.shape == (12, 5)
    tr, va, te = D._split_index(120, "test")
    np.testing.assert_array_equal(ds.y_train, np.asarray(label)[tr])
    np.testing.assert_array_equal(ds.y_val, np.asarray(label)[va])
    np.testing.assert_allclose(ds.x_train.mean(0), 0.0, atol=1e-5)  # standardised on train
    cached = list((tmp_path / "cache").glob("reviews-*.npz"))
    assert len(cached) == 1
    again = D.load_reviews(path=str(path), dims=5)  # from the cache
    np.testing.assert_array_equal(again.x_train, ds.x_train)


def _write_idx(path: Path, arr: np.ndarray):
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_fashion_mnist_parser_on_generated_idx(tmp_path):
    rng = np.random.default_rng(0)
    imgs = {"train": rng.integers(0, 256, (30, 28, 28)), "t10k": rng.integers(0, 256, (10, 28, 28))}
    for part, x in imgs.items():
        _write_idx(tmp_path / f"{part}-images-idx3-ubyte.gz", x)
        _write_idx(tmp_path / f"{part}-labels-idx1-ubyte.gz", np.arange(len(x)) % 10)
    ds = D.load_fashion_mnist(data_dir=str(tmp_path))
    assert ds.x_train.shape == (27, 28, 28, 1) and ds.x_test.shape == (10, 28, 28, 1)
    keep, val = D.split_indices(30, 0.1, 1337)  # validation carved from the official training set
    np.testing.assert_allclose(ds.x_train[..., 0], imgs["train"][keep] / 255.0, rtol=1e-6)
    np.testing.assert_allclose(ds.x_val[..., 0], imgs["train"][val] / 255.0, rtol=1e-6)
    assert ds.x_train.min() >= 0.0 and ds.x_train.max() <= 1.0
    np.testing.assert_array_equal(ds.y_test, np.arange(10))
    with pytest.raises(ValueError, match="checksum mismatch"):
        D.load_fashion_mnist(data_dir=str(tmp_path), verify=True)
    bad = tmp_path / "bad.idx"
    bad.write_bytes(b"\x01\x02\x08\x01" + (3).to_bytes(4, "big") + b"abc")
    with pytest.raises(ValueError, match="magic"):
        D.read_idx(bad)


def test_fashion_mnist_missing_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "FASHION_MNIST_SEARCH_PATHS", ())
    monkeypatch.delenv("GAUSSNEWTON_FASHION_MNIST", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        D.load_fashion_mnist(data_dir=str(tmp_path / "nowhere"))


def test_fashion_mnist_real_files_when_present():
    try:
        D._find_fashion_mnist(None)
    except FileNotFoundError:
        pytest.skip(
            "dataset-fashion-mnist not installed (the generated-IDX test covers the parser)"
        )
    ds = D.load_fashion_mnist()  # verifies the release checksums
    assert ds.x_train.shape == (54000, 28, 28, 1) and ds.x_test.shape == (10000, 28, 28, 1)
    assert ds.n_val == 6000
    assert np.bincount(ds.y_test).tolist() == [1000] * 10


def test_digits_and_sine():
    dg = D.load_digits()
    assert dg.x_train.shape == (1455, 8, 8, 1) and dg.n_val == 162 and dg.n_test == 180
    assert dg.x_train.min() >= 0.0 and dg.x_train.max() <= 1.0
    s1, s2 = D.load_sine(), D.load_sine()
    np.testing.assert_array_equal(s1.x_train, s2.x_train)  # seeded
    assert s1.x_train.shape == (6300, 1) and s1.n_val == 700 and s1.x_test.shape == (3000, 1)
    resid = s1.y_test[:, 0] - np.sin(10.0 * s1.x_test[:, 0])
    assert 0.005 < resid.std() < 0.02
    hard = D.load_sine(omega=30.0)
    assert not np.allclose(hard.y_train, s1.y_train)
