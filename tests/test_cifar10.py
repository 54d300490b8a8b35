"""experiments.cifar10: augmentation, schedule, and a run on a tiny generated CIFAR-10 directory."""

import pickle

import numpy as np
import pytest

from experiments import cifar10
from jaxnets import runs, train


def _write_fake_cifar(directory, n_per_batch=8, seed=0):
    """The python-version layout: data_batch_1..5 and test_batch, pickled dicts of bytes keys."""
    rng = np.random.default_rng(seed)
    directory.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
            b"labels": rng.integers(0, 10, n_per_batch).tolist(),
        }
        with open(directory / name, "wb") as f:
            pickle.dump(batch, f)


def test_quick_run_on_a_tiny_cifar_directory(tmp_path):
    _write_fake_cifar(tmp_path / "cifar")
    results = runs.run_experiment(
        "cifar10", {"data_dir": str(tmp_path / "cifar"), "model": "cifar_resnet8"},
        tmp_path / "r", quick=True, progress=False,
    )  # fmt: skip
    assert results["steps"] == 20 and results["train_examples"] == 40
    assert 0.0 <= results["test_error"] <= 1.0 and np.isfinite(results["test_loss"])
    # cifar_resnet(8): stem 27*16 + 32, one block per stage (convs + BN), Linear 64*10 + 10.
    assert (
        results["params"]
        == (27 * 16 + 32)
        + (2 * 9 * 16 * 16 + 64)
        + (9 * 16 * 32 + 9 * 32 * 32 + 128)
        + (9 * 32 * 64 + 9 * 64 * 64 + 256)
        + 650
    )
    assert (tmp_path / "r" / "curves.png").exists()
    assert "| cifar_resnet8 |" in cifar10.report(results, runs.RunDir(tmp_path / "r"))


@pytest.mark.slow
def test_vgg_runs_with_the_small_head(tmp_path):
    _write_fake_cifar(tmp_path / "cifar")
    results = runs.run_experiment(
        "cifar10",
        {"data_dir": str(tmp_path / "cifar"), "model": "vgg11_bn", "width": 4, "steps": 2,
         "milestones": ()},
        tmp_path / "r", quick=True, progress=False,
    )  # fmt: skip
    assert 0.0 <= results["test_error"] <= 1.0


def test_without_data_the_run_is_skipped_with_instructions(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CIFAR10_DIR", raising=False)
    results = runs.run_experiment("cifar10", {}, tmp_path / "r", quick=True, progress=False)
    assert "--data-dir" in results["skipped"]
    assert cifar10.report(results, runs.RunDir(tmp_path / "r")).startswith("Skipped")
    with pytest.raises(FileNotFoundError):  # an explicit --data-dir must exist
        runs.run_experiment(
            "cifar10", {"data_dir": str(tmp_path / "nope")}, tmp_path / "r2", quick=True,
            progress=False,
        )  # fmt: skip


def test_augment_is_pad_crop_flip():
    x = np.arange(2 * 5 * 6 * 1, dtype=np.float32).reshape(2, 5, 6, 1) + 1.0
    rng = np.random.default_rng(3)
    out = cifar10.augment(x, np.random.default_rng(3), pad=2)
    # The same draws, applied one image at a time by slicing.
    oy, ox, flip = rng.integers(0, 5, 2), rng.integers(0, 5, 2), rng.random(2) < 0.5
    padded = np.zeros((2, 9, 10, 1), np.float32)
    padded[:, 2:7, 2:8] = x
    for i in range(2):
        crop = padded[i, oy[i] : oy[i] + 5, ox[i] : ox[i] + 6]
        np.testing.assert_array_equal(out[i], crop[:, ::-1] if flip[i] else crop)
    assert out.shape == x.shape


def test_he_schedule_steps_and_warmup():
    s = train.he_schedule(0.1, (32_000, 48_000))
    assert [float(s(t)) for t in (0, 31_999, 32_000, 48_000)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.001]
    )
    w = train.he_schedule(0.1, (32_000, 48_000), warmup=400)
    assert [float(w(t)) for t in (0, 399, 400, 40_000)] == pytest.approx([0.01, 0.01, 0.1, 0.01])
    with pytest.raises(
        ValueError, match=r"milestones must be strictly increasing.*\(48000, 32000\)"
    ):
        train.he_schedule(0.1, (48_000, 32_000))
    with pytest.raises(ValueError, match=r"warmup must be in \[0, first milestone 100\), got 100"):
        train.he_schedule(0.1, (100, 200), warmup=100)
