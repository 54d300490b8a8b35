"""jaxnets.rnn against independent references: PyTorch fixtures, a numpy loop, finite
differences, and the packed-sequence rules."""

from pathlib import Path

import chex
import flax.linen as nn
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from jax.test_util import check_grads

from jaxnets import rnn
from jaxnets.rnn import GRU, LSTM, RNN

FIXTURES = Path(__file__).parent / "fixtures"

LAYERS = {
    "lstm_bi2": lambda: LSTM(6, num_layers=2, bidirectional=True),
    "gru_bi2": lambda: GRU(6, num_layers=2, bidirectional=True),
    "rnn3": lambda: RNN(6, num_layers=3),
    "rnn_relu_bi": lambda: RNN(6, nonlinearity="relu", bidirectional=True),
    "lstm_proj": lambda: LSTM(6, num_layers=2, proj_size=3, bidirectional=True),
}


def load(name):
    data = dict(np.load(FIXTURES / f"rnn_{name}.npz"))
    sd = {k[3:]: v for k, v in data.items() if k.startswith("sd/")}
    return data, sd


# ---------------------------------------------------------------------------------------
# PyTorch parity
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(LAYERS))
@pytest.mark.parametrize("tag", ["full", "packed", "init", "packed_init"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_matches_pytorch(name, tag, dtype):
    data, sd = load(name)
    layer = LAYERS[name]()
    is_lstm = isinstance(layer, LSTM)
    tol = 1e-5 if dtype == "float32" else 1e-10
    with jax.enable_x64(dtype == "float64"):
        cast = lambda a: jnp.asarray(a, dtype)  # noqa: E731
        variables = jax.tree.map(cast, rnn.from_torch_state_dict(layer, sd))
        lengths = jnp.asarray(data["lengths"], jnp.int32) if "packed" in tag else None
        init = None
        if "init" in tag:
            init = (cast(data["h0"]), cast(data["c0"])) if is_lstm else cast(data["h0"])
        out, final = layer.apply(variables, cast(data["x"]), initial_state=init, lengths=lengths)
        assert out.dtype == jnp.dtype(dtype)
        np.testing.assert_allclose(out, data[f"{tag}/out"], atol=tol, rtol=tol)
        if is_lstm:
            np.testing.assert_allclose(final[0], data[f"{tag}/h_n"], atol=tol, rtol=tol)
            np.testing.assert_allclose(final[1], data[f"{tag}/c_n"], atol=tol, rtol=tol)
        else:
            np.testing.assert_allclose(final, data[f"{tag}/h_n"], atol=tol, rtol=tol)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_torch_state_dict_round_trip_is_exact(name):
    _, sd = load(name)
    layer = LAYERS[name]()
    back = rnn.to_torch_state_dict(layer, rnn.from_torch_state_dict(layer, sd))
    assert sorted(back) == sorted(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k])


def test_state_dict_errors_list_every_problem():
    _, sd = load("lstm_bi2")
    layer = LSTM(6, num_layers=2, bidirectional=True)
    bad = dict(sd)
    del bad["bias_hh_l1_reverse"]
    bad["weight_hh_l0"] = np.zeros((24, 5))
    bad["extra"] = np.zeros(3)
    with pytest.raises(ValueError) as err:
        rnn.from_torch_state_dict(layer, bad)
    msg = str(err.value)
    assert "missing key 'bias_hh_l1_reverse'" in msg
    assert "'weight_hh_l0': expected shape (24, 6), got (24, 5)" in msg
    assert "unexpected key 'extra'" in msg
    with pytest.raises(ValueError, match="weight_ih_l0"):
        rnn.from_torch_state_dict(layer, {})


# ---------------------------------------------------------------------------------------
# Independent numpy reference (float64), used by the property tests
# ---------------------------------------------------------------------------------------


def _sig(a):
    return 1.0 / (1.0 + np.exp(-a))


def np_cell(mode, p, h, c, x, nonlinearity):
    g = x @ p["weight_ih"].T + p["bias_ih"] + h @ p["weight_hh"].T + p["bias_hh"]
    if mode == "RNN":
        h = np.tanh(g) if nonlinearity == "tanh" else np.maximum(g, 0.0)
        return h, c
    if mode == "LSTM":
        H = c.shape[-1]
        i, f, gg, o = (g[:, k * H : (k + 1) * H] for k in range(4))
        c = _sig(f) * c + _sig(i) * np.tanh(gg)
        h = _sig(o) * np.tanh(c)
        if "weight_hr" in p:
            h = h @ p["weight_hr"].T
        return h, c
    H = h.shape[-1]
    gi = x @ p["weight_ih"].T + p["bias_ih"]
    gh = h @ p["weight_hh"].T + p["bias_hh"]
    r = _sig(gi[:, :H] + gh[:, :H])
    z = _sig(gi[:, H : 2 * H] + gh[:, H : 2 * H])
    n = np.tanh(gi[:, 2 * H :] + r * gh[:, 2 * H :])
    return (1 - z) * n + z * h, c


def np_layer(layer, params, x, lengths):
    """Plain loops over batch element, layer, direction and time."""
    B, T, _ = x.shape
    dirs = 2 if layer.bidirectional else 1
    H, P = layer.hidden_size, layer.output_size
    out = np.zeros((B, T, dirs * P))
    hn = np.zeros((dirs * layer.num_layers, B, P))
    cn = np.zeros((dirs * layer.num_layers, B, H))
    for b in range(B):
        L = int(lengths[b])
        inp = x[b : b + 1, :L]
        for k in range(layer.num_layers):
            outs = []
            for d in range(dirs):
                p = params[f"l{k}" + ("_reverse" if d else "")]
                h, c = np.zeros((1, P)), np.zeros((1, H))
                ys = np.zeros((L, P))
                order = range(L) if d == 0 else range(L - 1, -1, -1)
                for t in order:
                    h, c = np_cell(layer.mode, p, h, c, inp[:, t], layer.nonlinearity)
                    ys[t] = h[0]
                outs.append(ys)
                hn[k * dirs + d, b], cn[k * dirs + d, b] = h[0], c[0]
            inp = np.concatenate(outs, axis=-1)[None]
        out[b, :L] = inp[0]
    return out, hn, cn


# 12 random configurations (each a fresh compile, ~4 s here); test_matches_pytorch covers the
# named configurations exactly, in both dtypes.
@settings(max_examples=12, deadline=None)
@given(
    mode=st.sampled_from(["RNN", "LSTM", "GRU"]),
    num_layers=st.integers(1, 3),
    bidirectional=st.booleans(),
    proj=st.booleans(),
    relu=st.booleans(),
    batch=st.integers(1, 3),
    time=st.integers(1, 6),
    features=st.integers(1, 4),
    hidden=st.integers(2, 5),
    seed=st.integers(0, 2**16),
)
def test_layer_matches_numpy_loop(
    mode, num_layers, bidirectional, proj, relu, batch, time, features, hidden, seed
):
    kw = dict(num_layers=num_layers, bidirectional=bidirectional, param_dtype=jnp.float64)
    if mode == "LSTM":
        layer = LSTM(hidden, proj_size=hidden - 1 if proj else 0, **kw)
    elif mode == "GRU":
        layer = GRU(hidden, **kw)
    else:
        layer = RNN(hidden, nonlinearity="relu" if relu else "tanh", **kw)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, time, features))
    lengths = rng.integers(1, time + 1, size=batch)
    with jax.enable_x64(True):
        # init and apply in one compiled call: each example is a new configuration
        @jax.jit
        def init_and_apply(x, lengths):
            variables = layer.init(jax.random.key(seed), x)
            return variables, layer.apply(variables, x, lengths=lengths)

        variables, (out, final) = init_and_apply(jnp.asarray(x), jnp.asarray(lengths))
        params = jax.tree.map(np.asarray, variables["params"])
    ref_out, ref_h, ref_c = np_layer(layer, params, x, lengths)
    np.testing.assert_allclose(out, ref_out, atol=1e-12)
    if mode == "LSTM":
        np.testing.assert_allclose(final[0], ref_h, atol=1e-12)
        np.testing.assert_allclose(final[1], ref_c, atol=1e-12)
    else:
        np.testing.assert_allclose(final, ref_h, atol=1e-12)


# ---------------------------------------------------------------------------------------
# scan vs Python loop, gradients, lengths, states
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["RNN", "LSTM", "GRU"])
def test_scan_equals_python_loop_over_step(mode, key):
    layer = {"RNN": RNN(5), "LSTM": LSTM(5), "GRU": GRU(5)}[mode]
    x = jax.random.normal(key, (2, 9, 3))
    variables = layer.init(key, x)
    out, final = layer.apply(variables, x)
    step = rnn.step_function(layer)
    carry = rnn.initial_carry(layer, 2)
    ys = []
    for t in range(9):
        carry, y = step(variables["params"]["l0"], carry, x[:, t])
        ys.append(y)
    np.testing.assert_allclose(out, jnp.stack(ys, axis=1), atol=1e-6)
    if mode == "LSTM":
        np.testing.assert_allclose(final[0][0], carry[0], atol=1e-6)
        np.testing.assert_allclose(final[1][0], carry[1], atol=1e-6)
    else:
        np.testing.assert_allclose(final[0], carry, atol=1e-6)


@pytest.mark.parametrize(
    "layer",
    [
        RNN(3, num_layers=2, param_dtype=jnp.float64),
        LSTM(3, bidirectional=True, proj_size=2, param_dtype=jnp.float64),
        GRU(3, num_layers=2, bidirectional=True, param_dtype=jnp.float64),
    ],
    ids=["rnn", "lstm", "gru"],
)
def test_gradients_match_finite_differences(layer):
    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.key(1), (2, 4, 3), jnp.float64)
        lengths = jnp.array([4, 2])
        params = layer.init(jax.random.key(2), x)["params"]

        def loss(params, x):
            out, final = layer.apply({"params": params}, x, lengths=lengths)
            h = final[0] if isinstance(final, tuple) else final
            return jnp.sum(out**2) + jnp.sum(jnp.sin(h))

        # jit only saves re-tracing on each of check_grads' evaluations
        check_grads(jax.jit(loss), (params, x), order=2, modes=["rev"], atol=1e-6, rtol=1e-6)


def test_lengths_semantics(key):
    layer = LSTM(4, bidirectional=True)
    x = jax.random.normal(key, (3, 6, 2))
    lengths = jnp.array([6, 4, 1])
    variables = layer.init(key, x)
    out, (h, c) = layer.apply(variables, x, lengths=lengths)
    # outputs past a sequence's length are exactly zero
    assert jnp.all(out[1, 4:] == 0.0) and jnp.all(out[2, 1:] == 0.0)
    # padding content never matters
    x_noise = x.at[1, 4:].set(99.0).at[2, 1:].set(-7.0)
    out2, (h2, c2) = layer.apply(variables, x_noise, lengths=lengths)
    np.testing.assert_array_equal(out, out2)
    np.testing.assert_array_equal(h, h2)
    # each sequence equals running it alone at its own length (reverse starts at its end)
    for b, L in enumerate([6, 4, 1]):
        ob, (hb, cb) = layer.apply(variables, x[b : b + 1, :L])
        np.testing.assert_allclose(out[b, :L], ob[0], atol=1e-6)
        np.testing.assert_allclose(h[:, b], hb[:, 0], atol=1e-6)
        np.testing.assert_allclose(c[:, b], cb[:, 0], atol=1e-6)


def test_return_states_are_every_carry(key):
    layer = LSTM(4, num_layers=2, bidirectional=True)
    x = jax.random.normal(key, (2, 5, 3))
    variables = layer.init(key, x)
    out, (h_n, c_n), (hs, cs) = layer.apply(variables, x, return_states=True)
    assert hs.shape == (4, 2, 5, 4) and cs.shape == (4, 2, 5, 4)
    # last layer's forward states are the first half of outputs, reverse the second half
    np.testing.assert_allclose(hs[2], out[..., :4], atol=1e-6)
    np.testing.assert_allclose(hs[3], out[..., 4:], atol=1e-6)
    # forward final state is the last step's, reverse final is the first step's
    np.testing.assert_allclose(h_n[2], hs[2][:, -1], atol=1e-6)
    np.testing.assert_allclose(h_n[3], hs[3][:, 0], atol=1e-6)
    np.testing.assert_allclose(c_n[0], cs[0][:, -1], atol=1e-6)


def test_dropout_between_layers_only(key):
    x = jax.random.normal(key, (4, 5, 3))
    one = GRU(8, dropout=0.5)
    v = one.init(key, x)
    a, _ = one.apply(v, x)
    b, _ = one.apply(v, x, deterministic=False, rngs={"dropout": jax.random.key(3)})
    np.testing.assert_array_equal(a, b)  # single layer: nothing between layers
    two = GRU(8, num_layers=2, dropout=0.5)
    v = two.init(key, x)
    a, _ = two.apply(v, x)
    b, _ = two.apply(v, x, deterministic=False, rngs={"dropout": jax.random.key(3)})
    c, _ = two.apply(v, x, deterministic=False, rngs={"dropout": jax.random.key(3)})
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(b, c)  # same key, same mask


def _is_dropout(module, method_name):
    """``capture_intermediates`` filter: keep only what ``nn.Dropout`` modules return."""
    return isinstance(module, nn.Dropout)


@pytest.mark.parametrize("variational", [False, True])
def test_variational_dropout_shares_one_mask_across_time(key, variational):
    """The zeros the dropout between layers leaves in the layer-1 outputs (which are never
    exactly 0 themselves): with ``variational_dropout`` the same features of a sequence at
    every time step; without it, a different set per step."""
    x = jax.random.normal(key, (6, 12, 3))
    layer = LSTM(16, num_layers=2, dropout=0.5, variational_dropout=variational)
    v = layer.init(key, x)
    _, state = layer.apply(
        v, x, deterministic=False, rngs={"dropout": jax.random.key(5)},
        capture_intermediates=_is_dropout, mutable=["intermediates"],
    )  # fmt: skip
    (out,) = jax.tree.leaves(state["intermediates"])
    dropped = out == 0.0
    assert out.shape == (6, 12, 16) and 0.3 < dropped.mean() < 0.7
    same_every_step = (dropped == dropped[:, :1]).all()
    assert same_every_step == variational


def test_jitted_forward_does_not_retrace(key):
    layer = LSTM(8, num_layers=2)
    x = jax.random.normal(key, (4, 10, 3))
    variables = layer.init(key, x)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def forward(variables, x):
        return layer.apply(variables, x)

    for i in range(3):
        forward(variables, jax.random.normal(jax.random.key(i), (4, 10, 3)))


# ---------------------------------------------------------------------------------------
# Clear errors
# ---------------------------------------------------------------------------------------


@pytest.fixture
def lstm_vars(key):
    layer = LSTM(4, num_layers=2)
    return layer, layer.init(key, jnp.zeros((2, 5, 3)))


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(x=np.zeros((5, 3))), ValueError, r"x: expected a 3-D array .* got shape \(5, 3\)"),
        (dict(x=np.zeros((2, 5, 3), np.int32)), TypeError, "x: expected a floating-point"),
        (dict(x=np.zeros((2, 5, 7))), ValueError, "x: expected 3 features .* got 7"),
        (dict(lengths=np.array([5, 0])), ValueError, r"lengths: expected values in 1\.\.5"),
        (dict(lengths=np.array([5, 6])), ValueError, r"lengths: expected values in 1\.\.5"),
        (dict(lengths=np.array([5])), ValueError, r"lengths: expected shape \(2,\)"),
        (dict(lengths=np.array([5.0, 2.0])), TypeError, "lengths: expected an integer"),
        (dict(initial_state=np.zeros((2, 2, 4))), ValueError, "expected a pair"),
        (
            dict(initial_state=(np.zeros((1, 2, 4)), np.zeros((2, 2, 4)))),
            ValueError,
            r"expected h_0 of shape \(2, 2, 4\), got \(1, 2, 4\)",
        ),
        (
            dict(initial_state=(np.zeros((2, 2, 4)), np.zeros((2, 2, 5)))),
            ValueError,
            r"expected c_0 of shape \(2, 2, 4\)",
        ),
    ],
)
def test_bad_input_errors(lstm_vars, kwargs, err, match):
    layer, variables = lstm_vars
    x = kwargs.pop("x", np.zeros((2, 5, 3), np.float32))
    with pytest.raises(err, match=match):
        layer.apply(variables, x, **kwargs)


def test_bad_config_errors(key):
    x = jnp.zeros((1, 2, 3))
    with pytest.raises(ValueError, match="proj_size"):
        LSTM(4, proj_size=4).init(key, x)
    with pytest.raises(ValueError, match="nonlinearity"):
        RNN(4, nonlinearity="sigmoid").init(key, x)
    with pytest.raises(ValueError, match="dropout"):
        GRU(4, dropout=1.5).init(key, x)
    with pytest.raises(ValueError, match="hidden_size"):
        GRU(0).init(key, x)
    with pytest.raises(ValueError, match="initial_state: expected h_0 of shape"):
        v = GRU(4).init(key, x)
        GRU(4).apply(v, x, initial_state=jnp.zeros((1, 1, 5)))
