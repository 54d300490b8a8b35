"""jaxnets.ops against their reference formulations: the fused recurrent scan against
``jax.grad`` through ``scan_layer`` (float64), the conv against ``lax.conv_general_dilated``,
the max pool against ``flax.linen.max_pool``; rematerialisation against no remat; and the
benchmark's smoke mode."""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnets.ops.conv as ops_conv
from jaxnets import rnn
from jaxnets.ops.pool import max_pool
from jaxnets.ops.recurrent import fused_scan

ROOT = Path(__file__).resolve().parents[1]

STEPS = {
    "tanh": ("RNN", functools.partial(rnn.rnn_step, nonlinearity="tanh"), 1),
    "relu": ("RNN", functools.partial(rnn.rnn_step, nonlinearity="relu"), 1),
    "lstm": ("LSTM", rnn.lstm_step, 4),
    "gru": ("GRU", rnn.gru_step, 3),
}


def _cell(rng, gates, n_in, n_h, bias=True):
    p = {
        "weight_ih": rng.standard_normal((gates * n_h, n_in)) * 0.6,
        "weight_hh": rng.standard_normal((gates * n_h, n_h)) * 0.6,
    }
    if bias:
        p["bias_ih"] = rng.standard_normal(gates * n_h) * 0.5
        p["bias_hh"] = rng.standard_normal(gates * n_h) * 0.5
    return jax.tree.map(jnp.asarray, p)


# ---------------------------------------------------------------------------------------
# fused recurrent scan
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cell,packed,reverse,chunk,remat,bias",
    [
        ("lstm", False, False, 3, False, True),  # 7 steps = 2 chunks of 3 + a remainder of 1
        ("lstm", True, True, 3, True, True),
        ("gru", True, False, 10, False, False),  # chunk longer than time; no biases
        ("gru", False, True, 2, True, True),
        ("tanh", True, True, 3, False, True),
        ("tanh", False, False, 2, True, False),
        ("relu", True, False, 3, True, True),
        ("relu", False, True, 3, False, True),
    ],
)
def test_fused_scan_equals_autodiff_of_scan_layer(cell, packed, reverse, chunk, remat, bias):
    """Values and gradients (params, inputs, initial carry) equal jax.grad through
    scan_layer to 1e-10 in float64, with lengths, reverse, remainders and remat."""
    mode, step, gates = STEPS[cell]
    rng = np.random.default_rng(0)
    b, t, n_in, n_h = 3, 7, 4, 5
    with jax.enable_x64(True):
        p = _cell(rng, gates, n_in, n_h, bias)
        x = jnp.asarray(rng.standard_normal((b, t, n_in)))
        h0 = jnp.asarray(rng.standard_normal((b, n_h)))
        c0 = (h0, jnp.asarray(rng.standard_normal((b, n_h)))) if mode == "LSTM" else h0
        lengths = jnp.asarray([7, 3, 1]) if packed else None
        w_out = jnp.asarray(rng.standard_normal((b, t, n_h)))

        def ref(p, x, c0):
            res = rnn.scan_layer(step, p, x, c0, lengths, reverse=reverse)
            return res.outputs, res.final_carry

        def new(p, x, c0):
            return fused_scan(
                mode, p, x, c0, lengths, reverse=reverse, nonlinearity=cell if mode == "RNN"
                else "tanh", chunk=chunk, remat=remat,
            )  # fmt: skip

        def loss(f, p, x, c0):
            out, final = f(p, x, c0)
            return jnp.sum(out * w_out) + sum(jnp.sum(jnp.sin(a)) for a in jax.tree.leaves(final))

        v_ref, v_new = jax.jit(ref)(p, x, c0), jax.jit(new)(p, x, c0)
        g_ref = jax.jit(jax.grad(functools.partial(loss, ref), (0, 1, 2)))(p, x, c0)
        g_new = jax.jit(jax.grad(functools.partial(loss, new), (0, 1, 2)))(p, x, c0)
        for a, e in zip(jax.tree.leaves((v_new, g_new)), jax.tree.leaves((v_ref, g_ref)),
                        strict=True):  # fmt: skip
            np.testing.assert_allclose(a, e, rtol=1e-10, atol=1e-10)
        if packed:  # the layer's packed rules hold: zero outputs past each length
            assert float(jnp.max(jnp.abs(v_new[0][2, 1:]))) == 0.0


@pytest.mark.parametrize("make", [
    lambda **kw: rnn.GRU(6, num_layers=2, **kw),
    pytest.param(lambda **kw: rnn.LSTM(6, bidirectional=True, **kw), marks=pytest.mark.slow),
    pytest.param(
        lambda **kw: rnn.RNN(6, nonlinearity="relu", bidirectional=True, **kw),
        marks=pytest.mark.slow,
    ),
])  # fmt: skip
def test_layer_fused_equals_scan_and_remat_changes_nothing(make, key):
    """Whole layers in float32: impl="fused" gives the reference impl="scan" outputs and
    gradients to 1e-5, and remat_chunk (both impls) gives the same again."""
    x = jax.random.normal(key, (3, 9, 4))
    lengths = jnp.asarray([9, 5, 2])
    ref_layer = make(impl="scan")
    variables = ref_layer.init(jax.random.key(1), x)
    w = jax.random.normal(jax.random.key(2), ref_layer.apply(variables, x)[0].shape)

    def grads(layer):
        def loss(p):
            out, final = layer.apply({"params": p}, x, lengths=lengths)
            return jnp.sum(out * w) + sum(jnp.sum(f) for f in jax.tree.leaves(final))

        return jax.jit(jax.value_and_grad(loss))(variables["params"])

    expected = grads(ref_layer)
    for layer in (make(impl="fused"), make(impl="fused", remat_chunk=4),
                  make(impl="scan", remat_chunk=4)):  # fmt: skip
        got = grads(layer)
        for a, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
            np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-5)


def test_remat_shrinks_the_step_memory():
    """XLA's buffer assignment for a T = 400 LSTM gradient: remat_chunk=20 needs far less
    temporary memory than keeping every step's residuals (both implementations)."""
    x = jnp.zeros((8, 400, 4))

    def temp_bytes(layer):
        params = layer.init(jax.random.key(0), x[:, :2])["params"]

        def loss(p):
            return jnp.mean(layer.apply({"params": p}, x)[0] ** 2)

        analysis = jax.jit(jax.grad(loss)).lower(params).compile().memory_analysis()
        return analysis.temp_size_in_bytes

    for impl in ("fused", "scan"):
        full = temp_bytes(rnn.LSTM(32, impl=impl))
        remat = temp_bytes(rnn.LSTM(32, impl=impl, remat_chunk=20))
        assert remat < 0.5 * full, (impl, remat, full)


def test_fused_scan_errors():
    p = {"weight_ih": jnp.zeros((4, 2)), "weight_hh": jnp.zeros((4, 1))}
    x, h = jnp.zeros((1, 3, 2)), jnp.zeros((1, 1))
    with pytest.raises(ValueError, match="mode: expected one of"):
        fused_scan("LSTMX", p, x, h)
    with pytest.raises(ValueError, match="chunk: expected a positive int, got 0"):
        fused_scan("RNN", p, x, h, chunk=0)
    with pytest.raises(ValueError, match="weight_hr"):
        fused_scan("LSTM", {**p, "weight_hr": jnp.zeros((1, 1))}, x, (h, h))
    with pytest.raises(ValueError, match="impl: expected one of"):
        rnn.LSTM(3, impl="cudnn").init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="remat_chunk: expected an int >= 0"):
        rnn.GRU(3, remat_chunk=-1).init(jax.random.key(0), x)


# ---------------------------------------------------------------------------------------
# conv and pool
# ---------------------------------------------------------------------------------------

CONVS = [
    # (input shape, window, stride, padding)
    ((3, 9, 9, 4), (3, 3), 1, 1),
    ((5, 8, 7, 3), (3, 3), 2, 1),
    ((2, 6, 6, 2), (1, 1), 2, 0),
    ((2, 7, 7, 3), (7, 7), 2, 3),
    ((4, 11, 5), (5,), 1, 2),
    ((3, 10, 4), (3,), 2, 1),
    ((300, 5, 5, 2), (3, 3), 1, 1),  # several batch chunks plus a remainder chunk
]


@pytest.mark.parametrize("shape,window,stride,pad", CONVS)
def test_conv_gemm_equals_conv_general_dilated(shape, window, stride, pad):
    """Values, input gradient and kernel gradient equal XLA's convolution (float64)."""
    rng = np.random.default_rng(len(shape) * 100 + shape[0])
    d = len(window)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.standard_normal(shape))
        w = jnp.asarray(rng.standard_normal(window + (shape[-1], 6)))

        def ref(x, w):
            return jax.lax.conv_general_dilated(
                x, w, (stride,) * d, ((pad, pad),) * d, dimension_numbers=ops_conv._DIMS[d]
            )

        def new(x, w):
            return ops_conv.conv(x, w, stride, pad, impl="gemm")

        y = ref(x, w)
        ct = jnp.asarray(rng.standard_normal(y.shape))
        np.testing.assert_allclose(jax.jit(new)(x, w), y, rtol=1e-12, atol=1e-12)
        for f in (new, functools.partial(ops_conv.conv, strides=stride, padding=pad, impl="xla")):
            got = jax.jit(jax.grad(lambda x, w, f=f: jnp.sum(f(x, w) * ct), (0, 1)))(x, w)
            want = jax.grad(lambda x, w: jnp.sum(ref(x, w) * ct), (0, 1))(x, w)
            for a, e in zip(got, want, strict=True):
                np.testing.assert_allclose(a, e, rtol=1e-10, atol=1e-10)


def test_conv_module_matches_flax_conv(key):
    """Same parameter tree (names, shapes) as nn.Conv, and the same outputs on it."""
    x = jax.random.normal(key, (2, 8, 8, 3))
    ours = ops_conv.Conv(5, (3, 3), (2, 2), ((1, 1), (1, 1)))
    theirs = nn.Conv(5, (3, 3), (2, 2), ((1, 1), (1, 1)))
    v = theirs.init(jax.random.key(1), x)
    shapes = jax.tree.map(jnp.shape, ours.init(jax.random.key(1), x))
    assert shapes == jax.tree.map(jnp.shape, v)
    np.testing.assert_allclose(ours.apply(v, x), theirs.apply(v, x), rtol=1e-5, atol=1e-5)


def test_conv_errors():
    with pytest.raises(ValueError, match="1 or 2 spatial axes"):
        ops_conv.conv(jnp.zeros((1, 2, 2, 2, 1)), jnp.zeros((1, 1, 1, 1, 1)))
    with pytest.raises(ValueError, match="kernel: expected rank 4"):
        ops_conv.conv(jnp.zeros((1, 4, 4, 2)), jnp.zeros((3, 2, 5)))
    with pytest.raises(ValueError, match="expected 2 input channels"):
        ops_conv.conv(jnp.zeros((1, 4, 4, 2)), jnp.zeros((3, 3, 3, 5)))
    with pytest.raises(ValueError, match="impl: expected one of"):
        ops_conv.conv(jnp.zeros((1, 4, 4, 2)), jnp.zeros((3, 3, 2, 5)), impl="cudnn")


@pytest.mark.parametrize("shape,k", [((2, 8, 6, 3), 2), ((2, 9, 3), 3), ((1, 6, 6, 2), 3)])
def test_max_pool_equals_flax_with_ties(shape, k):
    """Tiled windows: value and gradient equal nn.max_pool's, including ties (the first
    maximal element of a window gets the gradient, as select_and_scatter does)."""
    rng = np.random.default_rng(k)
    x = rng.standard_normal(shape)
    x = np.where(rng.random(shape) < 0.5, 0.0, x)  # ties, as after a ReLU
    x[0, ..., 0] = 1.0  # windows of equal values
    with jax.enable_x64(True):
        x = jnp.asarray(x)
        d = x.ndim - 2

        def ref(x):
            return nn.max_pool(x, (k,) * d, strides=(k,) * d)

        g = jnp.asarray(rng.standard_normal(ref(x).shape))
        np.testing.assert_array_equal(max_pool(x, k), ref(x))
        np.testing.assert_array_equal(
            jax.vjp(lambda a: max_pool(a, k), x)[1](g)[0], jax.vjp(ref, x)[1](g)[0]
        )


def test_max_pool_overlapping_falls_back_to_flax(key):
    x = jax.random.normal(key, (2, 9, 9, 3))
    ref = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    np.testing.assert_array_equal(max_pool(x, 3, 2, 1), ref)


# ---------------------------------------------------------------------------------------
# the benchmark's smoke mode
# ---------------------------------------------------------------------------------------


def test_bench_quick_runs_and_writes_json(tmp_path):
    """`python -m experiments.bench --quick --only rnn` prints the table and writes the
    JSON with a median time per candidate (no timing assertions)."""
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.bench", "--quick", "--only", "rnn", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| rnn |" in proc.stdout
    result = json.loads(out.read_text())
    assert result["rnn"]["jaxnets"] > 0 and result["rnn"]["flax"] > 0
    torch_installed = "torch" in result["meta"]
    assert (result["rnn"]["torch"] is not None) == torch_installed
    assert result["details"]["rnn"]["jaxnets"]["n"] == 2


def test_cnn_parts_quick_times_every_variant_and_restores_the_defaults():
    """`python -m experiments.bench.cnn_parts --quick`: every variant timed, and the
    functions it swaps in while tracing are the models' own again afterwards."""
    import jaxnets.models.common as models_common
    import jaxnets.ops.conv as ops_conv
    from experiments.bench import cnn_parts

    before = (models_common.batch_norm_train, ops_conv.conv_bias)
    times = cnn_parts.main(["--quick"])
    assert set(times["resnet20"]) == {"ops", "two_pass_vjp", "autodiff"}
    assert set(times["vgg"]) == {"fused", "separate"}
    assert all(len(t) == 2 and min(t) > 0 for g in times.values() for t in g.values())
    assert (models_common.batch_norm_train, ops_conv.conv_bias) == before


def test_bench_hugepages_environment():
    """--hugepages adds glibc's huge-page tunable, keeps the others, and is a no-op when
    it is already set (no restart loop)."""
    from experiments.bench.__main__ import hugepages_env, main

    assert hugepages_env({"A": "1"}) == {"A": "1", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    env = hugepages_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=1"})
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=1:glibc.malloc.hugetlb=1"
    assert hugepages_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=2"}) is None
    if sys.platform.startswith("linux") and hugepages_env(dict(os.environ)) is not None:
        with pytest.raises(ValueError, match="command line only"):
            main(["--quick", "--hugepages"])  # would replace this interpreter


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a glibc setting")
def test_bench_hugepages_restarts_with_the_setting(tmp_path):
    """`--hugepages` re-executes the command with the tunable set, from any directory."""
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.bench", "--quick", "--only", "rnn", "--hugepages",
         "--rounds", "1", "--out", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads(out.read_text())["meta"]
    assert "glibc.malloc.hugetlb=1" in meta["glibc_tunables"]
    assert meta["options"]["hugepages"] is True
