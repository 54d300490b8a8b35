"""Tests for the MNIST-1D baselines (jaxnets.models.small) and experiments/mnist1d.py."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import mnist1d as E
from jaxnets import rnn, runs, train
from jaxnets.models.small import (
    MLP,
    MNIST1D_MODELS,
    ConvNet1D,
    Ensemble,
    GRUClassifier,
    LogisticRegression,
    mnist1d_model,
)


def relu(a):
    return np.maximum(a, 0.0)


def np_conv1d(x, w, b, stride, pad):
    """Direct definition: y[n, p, o] = b[o] + sum_{k,c} xpad[n, stride*p + k, c] w[k, c, o]."""
    n, length, _ = x.shape
    k = w.shape[0]
    xp = np.pad(x, ((0, 0), (pad, pad), (0, 0)))
    out_len = (length + 2 * pad - k) // stride + 1
    y = np.zeros((n, out_len, w.shape[2]))
    for p in range(out_len):
        for j in range(k):
            y[:, p] += xp[:, stride * p + j] @ w[j]
    return y + b


@pytest.fixture
def x40():
    return np.random.default_rng(0).standard_normal((4, 40, 1)).astype(np.float32)


# Parameter counts from the layer shapes, worked out by hand (length 40, 1 channel, 10 classes).
EXPECTED_PARAMS = {
    "logistic": 40 * 10 + 10,
    "mlp": (40 * 100 + 100) + (100 * 100 + 100) + (100 * 10 + 10),
    "cnn": (5 * 1 * 25 + 25) + 2 * (3 * 25 * 25 + 25) + (5 * 25 * 10 + 10),
    # per direction: W_ih (18, 1), W_hh (18, 6), two biases (18,); readout 40 * 12 -> 10
    "gru": 2 * (18 * 1 + 18 * 6 + 18 + 18) + (40 * 12 * 10 + 10),
}


@pytest.mark.parametrize("name", list(MNIST1D_MODELS))
def test_baseline_shapes_and_parameter_counts(name, x40, key):
    model = mnist1d_model(name)
    variables = jax.jit(model.init)(key, x40)  # jit: eager init compiles op by op (slow)
    apply = jax.jit(model.apply)
    assert train.count_params(variables["params"]) == EXPECTED_PARAMS[name]
    assert apply(variables, x40).shape == (4, 10)
    # (batch, length) is the same signal without the channel axis
    np.testing.assert_allclose(apply(variables, x40[..., 0]), apply(variables, x40), rtol=1e-6)


def test_pytorch_default_init_bounds(key, x40):
    params = jax.jit(MLP().init)(key, x40)["params"]
    for layer, fan_in in (("linear1", 40), ("linear2", 100), ("linear3", 100)):
        for leaf in ("kernel", "bias"):
            a = np.abs(np.asarray(params[layer][leaf]))
            bound = 1 / np.sqrt(fan_in)
            assert a.max() <= bound and a.max() > 0.8 * bound, (layer, leaf)


def test_logistic_and_mlp_match_numpy(key, x40):
    p = jax.jit(LogisticRegression().init)(key, x40)["params"]["linear"]
    flat = x40.reshape(4, -1).astype(np.float64)
    ref = flat @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"])
    out = jax.jit(LogisticRegression().apply)({"params": {"linear": p}}, x40)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    v = jax.jit(MLP().init)(key, x40)
    q = jax.tree.map(lambda a: np.asarray(a, np.float64), v["params"])
    h = relu(flat @ q["linear1"]["kernel"] + q["linear1"]["bias"])
    h = h + relu(h @ q["linear2"]["kernel"] + q["linear2"]["bias"])
    ref = h @ q["linear3"]["kernel"] + q["linear3"]["bias"]
    np.testing.assert_allclose(jax.jit(MLP().apply)(v, x40), ref, rtol=1e-5, atol=1e-5)


def test_cnn_matches_direct_strided_convolution(key, x40):
    v = jax.jit(ConvNet1D().init)(key, x40)
    q = jax.tree.map(lambda a: np.asarray(a, np.float64), v["params"])
    h = x40.astype(np.float64)
    lengths = []
    for i in (1, 2, 3):
        h = relu(np_conv1d(h, q[f"conv{i}"]["kernel"], q[f"conv{i}"]["bias"], stride=2, pad=1))
        lengths.append(h.shape[1])
    assert lengths == [19, 10, 5]  # floor((L + 2 - k) / 2) + 1
    ref = h.reshape(4, -1) @ q["linear"]["kernel"] + q["linear"]["bias"]
    np.testing.assert_allclose(jax.jit(ConvNet1D().apply)(v, x40), ref, rtol=1e-4, atol=1e-5)


def test_gru_classifier_is_gru_outputs_flattened_into_a_linear_readout(key, x40):
    v = jax.jit(GRUClassifier().init)(key, x40)
    p = v["params"]
    gru = rnn.GRU(hidden_size=6, bidirectional=True)
    outputs, _ = jax.jit(gru.apply)({"params": p["gru"]}, x40)
    assert outputs.shape == (4, 40, 12)
    flat = np.asarray(outputs, np.float64).reshape(4, -1)
    ref = flat @ np.asarray(p["linear"]["kernel"], np.float64) + np.asarray(p["linear"]["bias"])
    np.testing.assert_allclose(jax.jit(GRUClassifier().apply)(v, x40), ref, rtol=1e-5, atol=1e-5)


def test_baseline_input_errors(key):
    with pytest.raises(ValueError, match=r"ConvNet1D: x must be \(batch, length\) or"):
        ConvNet1D().init(key, jnp.zeros((2, 3, 4, 5)))
    with pytest.raises(TypeError, match="MLP: x must be a floating array, got dtype int32"):
        MLP().init(key, jnp.zeros((2, 40), jnp.int32))
    with pytest.raises(ValueError, match="too short for conv"):
        ConvNet1D().init(key, jnp.zeros((2, 2, 1)))
    with pytest.raises(ValueError, match="name must be one of"):
        mnist1d_model("transformer")


def test_ensemble_members_are_independent_models(key, x40):
    ens = Ensemble(ConvNet1D, 3)
    xs = np.stack([x40, -x40, 2 * x40], axis=1)  # (batch, members, 40, 1)
    v = jax.jit(ens.init)(key, xs)
    out = jax.jit(ens.apply)(v, xs)
    assert out.shape == (4, 3, 10)
    member = v["params"]["member"]
    single = jax.jit(ConvNet1D().apply)
    for m in range(3):
        pm = jax.tree.map(lambda a, m=m: a[m], member)
        np.testing.assert_allclose(
            out[:, m], single({"params": pm}, xs[:, m]), rtol=1e-5, atol=1e-6
        )
    k = np.asarray(member["conv1"]["kernel"])
    assert not np.allclose(k[0], k[1])  # each member has its own initialisation
    with pytest.raises(ValueError, match=r"x must be \(batch, members=3, ...\)"):
        ens.init(key, x40)


def test_ensemble_loss_gives_each_member_its_own_gradient(key):
    rng = np.random.default_rng(1)
    xs = rng.standard_normal((8, 2, 40)).astype(np.float32)
    ys = rng.integers(0, 10, (8, 2)).astype(np.int32)
    ens = Ensemble(MLP, 2, {"hidden": 16})
    params = jax.jit(ens.init)(key, xs)["params"]

    def ens_loss(p):
        return E.ensemble_loss(ens.apply({"params": p}, xs), {"x": xs, "y": ys})[0]

    def own_loss(p, x, y):
        logits = MLP(hidden=16).apply({"params": p}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    grads = jax.jit(jax.grad(ens_loss))(params)
    own_grad = jax.jit(jax.grad(own_loss))
    for m in range(2):
        pm = jax.tree.map(lambda a, m=m: a[m], params["member"])
        own = own_grad(pm, xs[:, m], ys[:, m])
        jax.tree.map(
            lambda g, o, m=m: np.testing.assert_allclose(g[m], o, rtol=1e-5, atol=1e-7),
            grads["member"], own,
        )  # fmt: skip
    # masked metrics count only the real examples
    logits = jnp.zeros((4, 2, 10)).at[:, :, 3].set(1.0)
    batch = {"y": jnp.array([[3, 3], [3, 0], [0, 0], [0, 0]]),
             "mask": jnp.array([True, True, False, False])}  # fmt: skip
    _, metrics = E.ensemble_loss(logits, batch)
    assert float(metrics["accuracy_0"]) == 1.0 and float(metrics["accuracy_1"]) == 0.5


def test_checks_encode_the_bar():
    good = {
        "default": {"logistic": [0.32], "mlp": [0.68], "cnn": [0.95], "gru": [0.92]},
        "shuffled": {"logistic": [0.33], "mlp": [0.66], "cnn": [0.60], "gru": [0.60]},
    }
    assert all(E.checks(good).values()) and len(E.checks(good)) == 6
    bad = json.loads(json.dumps(good))
    bad["default"]["cnn"] = [0.93]  # below 94, and the drop is only 33 -> still >= 25
    bad["shuffled"]["gru"] = [0.75]  # drop of 17 < 20
    bad["shuffled"]["mlp"] = [0.64]  # moved 4 points
    failed = {k for k, v in E.checks(bad).items() if not v}
    assert failed == {
        "CNN >= 94% on default",
        "shuffling costs GRU >= 20 points",
        "mlp moves < 3 points when shuffled",
    }


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("mnist1d") / "run"
    results = runs.run_experiment("mnist1d", workdir=workdir, quick=True, progress=False)
    return workdir, results


def test_quick_run_writes_everything(quick_run):
    workdir, results = quick_run
    for name in ("config.json", "results.json", "DONE", "accuracy.png", "curves.png"):
        assert (workdir / name).is_file(), name
    assert json.loads((workdir / "config.json").read_text())["steps"] == E.QUICK["steps"]
    for setting in ("default", "shuffled"):
        assert set(results[setting]) == {"logistic", "mlp", "cnn", "gru"}
        for model, accs in results[setting].items():
            assert len(accs) == E.QUICK["seeds"] and all(0.0 <= a <= 1.0 for a in accs)
            sub = workdir / f"{setting}-{model}"
            assert (sub / "metrics.jsonl").is_file() and (sub / "DONE").is_file()
            records = runs.read_jsonl(sub / "metrics.jsonl")
            assert any("eval_accuracy_1" in r for r in records)
    assert results["details"]["default"]["gru"]["params"] == EXPECTED_PARAMS["gru"]


def test_quick_run_report(quick_run):
    workdir, results = quick_run
    text = E.report(results, runs.RunDir(workdir))
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    for model in ("logistic", "mlp", "cnn", "gru"):
        cells = [c.strip() for c in rows[model].split("|")[1:-1]]
        mean = 100 * np.mean(results["default"][model])
        assert cells[1].startswith(f"{mean:.1f} ± ")
        assert cells[2] == f"{100 * E.PUBLISHED['default'][model]:.0f}"
        assert cells[4] == f"{100 * E.PUBLISHED['shuffled'][model]:.0f}"
    assert f"(A {E.QUICK['steps']}-step run: the published table is checked" in text
    assert "![accuracy](accuracy.png)" in text


def test_claims_order_matters_and_the_published_table_on_full_length_runs():
    res = {
        "default": {"logistic": [0.31] * 3, "mlp": [0.66, 0.67, 0.68], "cnn": [0.94, 0.95, 0.94],
                    "gru": [0.91, 0.92, 0.91]},
        "shuffled": {"logistic": [0.31] * 3, "mlp": [0.66, 0.66, 0.67], "cnn": [0.58, 0.6, 0.59],
                     "gru": [0.55, 0.56, 0.57]},
    }  # fmt: skip
    short = E.claims(res, E.Config(steps=1000))
    assert [c.holds for c in short] == [True, True, True] and all(c.seeds == 3 for c in short)
    assert "1000 steps of batch 100" in short[0].claim
    assert short[0].evidence.startswith("CNN 0.943 ± 0.003 vs MLP 0.670 ± 0.006 (3 seeds")
    full = E.claims(res, E.Config())
    assert len(full) == 3 + len(E.checks(res)) and all(c.holds for c in full)
    # the MLP reading the shuffled data as well as the CNN: the order claims fail
    res["default"]["cnn"] = [0.6, 0.7, 0.65]
    res["shuffled"]["cnn"] = [0.6, 0.7, 0.65]
    verdicts = [c.holds for c in E.claims(res, E.Config(steps=1000))]
    assert verdicts == [False, False, True]


def test_validation_mode_scores_on_held_out_training_examples(tmp_path):
    over = {"models": ("logistic",), "settings": ("default",), "validation": 150}
    results = runs.run_experiment(
        "mnist1d", over, workdir=tmp_path / "val", quick=True, progress=False
    )
    assert results["evaluated_on"].startswith("validation (150")
    for acc in results["default"]["logistic"]:  # a fraction of the 150 held-out examples
        assert abs(acc * 150 - round(acc * 150)) < 1e-3
    with pytest.raises(ValueError, match=r"validation must be in \[0, 760\].*got 900"):
        runs.run_experiment(
            "mnist1d", {**over, "validation": 900}, workdir=tmp_path / "bad", quick=True,
            progress=False,
        )  # fmt: skip
