"""jaxnets.bptt against independent references: jax.grad of the layer (straight through
lax.scan with impl="scan", and through the default impl="fused"), finite differences of
layer.apply, closed forms (the tanh RNN Jacobian, the Lyapunov sum rule), a Python loop
of matrix products, a perturbed-trajectory Lyapunov exponent, and stop_gradient-built
truncations."""

import functools

import chex
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings

from jaxnets import bptt, train
from jaxnets.rnn import CELLS, GRU, LSTM, RNN


def make(
    mode="rnn",
    hidden=3,
    num_layers=1,
    bidirectional=False,
    batch=2,
    time=5,
    features=2,
    packed=False,
    seed=0,
    dtype=jnp.float64,
    **kw,
):
    """A layer, ``dtype`` variables, input and lengths (call inside enable_x64 for float64).

    Drawn with numpy (PyTorch's U(-1/sqrt(H), 1/sqrt(H)) init, shapes from
    ``jax.eval_shape(layer.init)``): eager JAX ops would each compile, and the suite must
    stay fast.
    """
    layer = CELLS[mode](hidden, num_layers=num_layers, bidirectional=bidirectional, **kw)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, time, features))
    shapes = jax.eval_shape(layer.init, jax.random.key(0), jax.ShapeDtypeStruct(x.shape, dtype))
    bound = 1.0 / np.sqrt(hidden)
    variables = jax.tree.map(
        lambda s: jnp.asarray(rng.uniform(-bound, bound, s.shape), dtype), shapes
    )
    lengths = None
    if packed:
        lengths = rng.integers(1, time + 1, batch)
        lengths[0] = time
        lengths = jnp.asarray(lengths, jnp.int32)
    return layer, variables, jnp.asarray(x, dtype), lengths


def spectral_scale(W, sigma):
    """W rescaled to largest singular value ``sigma`` (numpy: no compile)."""
    Wn = np.asarray(W)
    return jnp.asarray(Wn * (sigma / max(np.linalg.norm(Wn, 2), 1e-300)), W.dtype)


def slow(*cases):
    """Parametrize cases that run only with ``-m slow`` (the default tier keeps one or two
    representative cases so the suite stays fast)."""
    return [
        pytest.param(*(c if isinstance(c, tuple) else (c,)), marks=pytest.mark.slow) for c in cases
    ]


def rel_err(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    num = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(la, lb, strict=True))
    den = max(float(jnp.max(jnp.abs(y))) for y in lb)
    return num / max(den, 1e-300)


def _loss(outputs, final_state, many_to_many):
    """A loss reading outputs (every step, or the last state) and the final state (h, c)."""
    h_n = final_state[0] if isinstance(final_state, tuple) else final_state
    w = jnp.cos(jnp.arange(outputs.shape[-1], dtype=outputs.dtype) + 7)
    w_h = jnp.cos(jnp.arange(h_n.shape[-1], dtype=outputs.dtype) + 7)
    extra = 0.3 * jnp.sum(jnp.sin(h_n))
    if isinstance(final_state, tuple):
        extra = extra + 0.2 * jnp.sum(final_state[1] ** 2)
    if many_to_many:
        t = jnp.arange(outputs.shape[1], dtype=outputs.dtype)[None, :, None]
        return jnp.sum(jnp.tanh(outputs * w[None, None, :] + 0.1 * t) ** 2) + extra
    return jnp.sum(jnp.tanh(h_n[-1] @ w_h)) + extra


def loss_m2m(outputs, final_state):
    return _loss(outputs, final_state, True)


def loss_m2o(outputs, final_state):
    return _loss(outputs, final_state, False)


def a_loss(layer, many_to_many):
    # module-level functions: the same static argument every time, so jit caches hit
    return loss_m2m if many_to_many else loss_m2o


@functools.partial(jax.jit, static_argnames=("layer", "loss_fn"))
def _ref_grads(layer, loss_fn, params, x, lengths, initial_state):
    def f(p, x, s):
        return loss_fn(*layer.apply({"params": p}, x, lengths=lengths, initial_state=s))

    return jax.grad(f, argnums=(0, 1, 2))(params, x, initial_state)


def ref_grad(layer, variables, x, loss_fn, lengths=None, initial_state=None):
    """jax.grad of the loss through layer.apply w.r.t. the params."""
    return _ref_grads(layer, loss_fn, variables["params"], x, lengths, initial_state)[0]


@functools.partial(jax.jit, static_argnames=("layer",))
def _apply(layer, variables, x, lengths=None):
    return layer.apply(variables, x, lengths=lengths, return_states=True)


# ---------------------------------------------------------------------------------------
# Trajectory
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mode,num_layers,bidirectional",
    [
        ("lstm", 1, True),
        ("gru", 2, False),
        *slow(
            ("rnn", 1, False),
            ("rnn", 2, True),
            ("gru", 2, True),
            ("lstm", 1, False),
            ("lstm", 2, False),
            ("lstm", 2, True),
        ),
    ],
)
def test_trajectory_matches_layer(mode, num_layers, bidirectional):
    with jax.enable_x64(True):
        layer, v, x, lengths = make(
            mode, num_layers=num_layers, bidirectional=bidirectional, packed=True
        )
        tr = bptt.trajectory(layer, v, x, lengths)
        out, final, states = _apply(layer, v, x, lengths)
        np.testing.assert_allclose(tr.outputs, out, atol=1e-14)
        chex.assert_trees_all_close(tr.final_state, final, atol=1e-14)
        # states after every step: forward chains in time order
        h_states = states[0] if mode == "lstm" else states
        if not bidirectional:
            n = tr.states.shape[-1] // num_layers
            for k in range(num_layers):
                np.testing.assert_allclose(
                    tr.states[0, :, 1:, k * n : k * n + 3], h_states[k], atol=1e-14
                )
        else:
            np.testing.assert_allclose(tr.states[0, :, 1:, :3], h_states[0], atol=1e-14)
        assert len(bptt.chain_names(layer)) == tr.states.shape[0]


# ---------------------------------------------------------------------------------------
# Per-step Jacobians
# ---------------------------------------------------------------------------------------


def test_tanh_rnn_jacobian_closed_form():
    """J_k = diag(1 - h_{k+1}^2) W_hh for h' = tanh(W_ih x + b + W_hh h + b)."""
    with jax.enable_x64(True):
        layer, v, x, _ = make("rnn", hidden=4, time=6)
        J = bptt.step_jacobians(layer, v, x)[0]  # (B, T, H, H)
        _, _, h = _apply(layer, v, x)
        W = v["params"]["l0"]["weight_hh"]
        expect = (1 - h[0] ** 2)[..., :, None] * W[None, None]
        np.testing.assert_allclose(J, expect, atol=1e-14)


@functools.partial(jax.jit, static_argnames=("layer",))
def _stacked_step_fd(layer, v, x_k, S, eps=1e-6):
    """Central finite differences of S_k -> S_{k+1} through layer.apply: one time step
    x_k (1, 1, I), the stacked state passed as initial_state, every perturbation of S as
    one batch. Independent of jaxnets.bptt."""
    L = layer.num_layers
    lstm = isinstance(layer, LSTM)
    H = layer.hidden_size
    N = S.shape[0]
    E = eps * jnp.eye(N, dtype=S.dtype)
    P = jnp.concatenate([S[None] + E, S[None] - E])  # (2N, N): a batch of states
    parts = jnp.swapaxes(P.reshape(2 * N, L, -1), 0, 1)  # (L, 2N, n)
    init = (parts[..., :H], parts[..., H:]) if lstm else parts
    _, final = layer.apply(v, jnp.broadcast_to(x_k, (2 * N,) + x_k.shape[1:]), initial_state=init)
    F = jnp.concatenate(final, -1) if lstm else final  # (L, 2N, n)
    F = jnp.swapaxes(F, 0, 1).reshape(2 * N, N)
    return ((F[:N] - F[N:]) / (2 * eps)).T  # column j: d S' / d S_j


@pytest.mark.parametrize(
    "mode,num_layers",
    [
        ("lstm", 2),
        ("gru", 1),
        *slow(("rnn", 1), ("rnn", 2), ("lstm", 1), ("gru", 2)),
    ],
)
def test_jacobians_match_finite_differences(mode, num_layers):
    with jax.enable_x64(True):
        layer, v, x, _ = make(mode, num_layers=num_layers, time=4)
        J = bptt.step_jacobians(layer, v, x)[0, 0]  # example 0: (T, N, N)
        S = bptt.trajectory(layer, v, x).states[0, 0]  # (T+1, N)
        for k in range(x.shape[1]):
            fd = _stacked_step_fd(layer, v, x[:1, k : k + 1], S[k])
            np.testing.assert_allclose(J[k], fd, atol=1e-8)


@pytest.mark.parametrize("mode", ["rnn", *slow("lstm", "gru")])
def test_stacked_jacobian_is_block_lower_triangular(mode):
    """Upper blocks are exactly zero; diagonal block l is the one-layer Jacobian of layer l
    fed with layer l-1's outputs (an independent run of a one-layer layer)."""
    with jax.enable_x64(True):
        layer, v, x, _ = make(mode, num_layers=2, hidden=3)
        J = bptt.step_jacobians(layer, v, x)[0]
        n = J.shape[-1] // 2
        assert float(jnp.max(jnp.abs(J[..., :n, n:]))) == 0.0
        assert float(jnp.max(jnp.abs(J[..., n:, :n]))) > 0  # through the layer below
        one = CELLS[mode](3)
        J0 = bptt.step_jacobians(one, {"params": {"l0": v["params"]["l0"]}}, x)[0]
        h0, _ = one.apply({"params": {"l0": v["params"]["l0"]}}, x)
        J1 = bptt.step_jacobians(one, {"params": {"l0": v["params"]["l1"]}}, h0)[0]
        np.testing.assert_allclose(J[..., :n, :n], J0, atol=1e-14)
        np.testing.assert_allclose(J[..., n:, n:], J1, atol=1e-14)


@pytest.mark.parametrize(
    "mode,num_layers,bidirectional,packed",
    [
        ("lstm", 1, True, True),
        ("rnn", 2, False, True),
        *slow(
            ("rnn", 1, False, True),
            ("rnn", 2, True, True),
            ("lstm", 1, False, True),
            ("lstm", 2, False, True),
            ("lstm", 2, True, True),
            ("gru", 1, False, True),
            ("gru", 2, False, True),
            ("gru", 2, True, True),
        ),
    ],
)
def test_jacobian_methods_agree(mode, num_layers, bidirectional, packed):
    with jax.enable_x64(True):
        layer, v, x, lengths = make(
            mode, num_layers=num_layers, bidirectional=bidirectional, packed=packed, batch=3
        )
        ref = bptt.step_jacobians(layer, v, x, lengths, method="jacfwd")
        got = bptt.step_jacobians(layer, v, x, lengths, method="structured")
        np.testing.assert_allclose(got, ref, atol=1e-13)
        if bidirectional or num_layers == 1:
            F = bptt.factored_jacobians(layer, v, x, lengths)
            np.testing.assert_allclose(F.dense(), ref, atol=1e-13)
            u = jnp.asarray(np.random.default_rng(3).standard_normal(ref.shape[:-1]), ref.dtype)
            np.testing.assert_allclose(
                F.matvec(u), jnp.einsum("...ij,...j->...i", ref, u), atol=1e-13
            )
            np.testing.assert_allclose(
                F.rmatvec(u), jnp.einsum("...ij,...i->...j", ref, u), atol=1e-13
            )


def test_bidirectional_chains_are_each_directions_recurrence():
    """The reverse chain of a one-layer bidirectional layer = the forward chain of a
    unidirectional layer with the reverse weights on the time-reversed input."""
    with jax.enable_x64(True):
        layer, v, x, _ = make("gru", bidirectional=True)
        J = bptt.step_jacobians(layer, v, x)
        uni = GRU(3)
        Jr = bptt.step_jacobians(uni, {"params": {"l0": v["params"]["l0_reverse"]}}, x[:, ::-1])
        np.testing.assert_allclose(J[1], Jr[0], atol=1e-14)
        assert bptt.chain_names(layer) == ("l0", "l0_reverse")


def test_padded_steps_have_identity_jacobians():
    with jax.enable_x64(True):
        layer, v, x, _ = make("lstm", batch=2, time=5)
        lengths = jnp.array([5, 2])
        J = bptt.step_jacobians(layer, v, x, lengths)[0]
        eye = jnp.eye(J.shape[-1])
        np.testing.assert_array_equal(J[1, 2:], jnp.broadcast_to(eye, J[1, 2:].shape))
        assert float(jnp.max(jnp.abs(J[1, 1] - eye))) > 1e-3


def test_projected_lstm_uses_autodiff():
    with jax.enable_x64(True):
        layer, v, x, _ = make("lstm", hidden=4, proj_size=2)
        J = bptt.step_jacobians(layer, v, x)  # auto -> jacfwd
        assert J.shape == (1, 2, 5, 6, 6)
        np.testing.assert_allclose(J, bptt.step_jacobians(layer, v, x, method="jacrev"), atol=1e-13)
        with pytest.raises(ValueError, match="proj_size"):
            bptt.step_jacobians(layer, v, x, method="structured")
        with pytest.raises(ValueError, match="proj_size"):
            bptt.factored_jacobians(layer, v, x)


def test_factored_refuses_stacked_layers():
    layer, v, x, _ = make("rnn", num_layers=2, dtype=jnp.float32)
    with pytest.raises(ValueError, match="single-cell"):
        bptt.factored_jacobians(layer, v, x)


# ---------------------------------------------------------------------------------------
# Explicit BPTT == jax.grad
# ---------------------------------------------------------------------------------------

configs = st.fixed_dictionaries(
    {
        "mode": st.sampled_from(sorted(CELLS)),
        "num_layers": st.integers(1, 2),
        "bidirectional": st.booleans(),
        "packed": st.booleans(),
        "batch": st.integers(1, 3),
        "time": st.integers(1, 5),
        "hidden": st.integers(1, 3),
        "features": st.integers(1, 3),
        "seed": st.integers(0, 2**16),
    }
)


def _methods(cfg):
    single = cfg["bidirectional"] or cfg["num_layers"] == 1
    return st.tuples(
        st.sampled_from(["recursion", "products"]),
        st.sampled_from(["auto", "jacfwd", "jacrev"] + (["factored"] if single else [])),
    )


def _check_explicit_float64(cfg, many_to_many, method, jmethod):
    with jax.enable_x64(True):
        layer, v, x, lengths = make(**cfg)
        loss_fn = a_loss(layer, many_to_many)
        res = bptt.explicit_bptt(
            layer, v, x, loss_fn, lengths, method=method, jacobian_method=jmethod
        )
        # jax.grad through lax.scan (impl="scan"), and through the default impl="fused"
        # (whose backward pass is hand-written): explicit BPTT equals both
        for impl in ("scan", "fused"):
            g_params, g_x, _ = _ref_grads(
                layer.clone(impl=impl), loss_fn, v["params"], x, lengths, None
            )
            assert rel_err(res.grads, g_params) <= 1e-10, impl
            # the per-step contributions add up to the gradient
            summed = jax.tree.map(lambda a: a.sum(0), res.contributions)
            assert rel_err(summed, g_params) <= 1e-10, impl
            # dL/dx by the input VJPs
            assert rel_err(res.input_grads, g_x) <= 1e-10, impl


def _check_explicit_float32(cfg, many_to_many):
    layer, v, x, lengths = make(**cfg, dtype=jnp.float32)
    loss_fn = a_loss(layer, many_to_many)
    res = bptt.explicit_bptt(layer, v, x, loss_fn, lengths)
    assert res.grads["l0"]["weight_hh"].dtype == jnp.float32
    for impl in ("scan", "fused"):
        ref = ref_grad(layer.clone(impl=impl), v, x, loss_fn, lengths)
        assert rel_err(res.grads, ref) <= 1e-5, impl


@settings(max_examples=3, deadline=None, derandomize=True)
@given(cfg=configs, many_to_many=st.booleans(), data=st.data())
def test_explicit_bptt_equals_jax_grad_float64(cfg, many_to_many, data):
    _check_explicit_float64(cfg, many_to_many, *data.draw(_methods(cfg)))


@settings(max_examples=2, deadline=None, derandomize=True)
@given(cfg=configs, many_to_many=st.booleans())
def test_explicit_bptt_equals_jax_grad_float32(cfg, many_to_many):
    _check_explicit_float32(cfg, many_to_many)


@pytest.mark.slow
@settings(max_examples=60, deadline=None)
@given(cfg=configs, many_to_many=st.booleans(), data=st.data())
def test_explicit_bptt_equals_jax_grad_float64_many(cfg, many_to_many, data):
    _check_explicit_float64(cfg, many_to_many, *data.draw(_methods(cfg)))


@pytest.mark.slow
@settings(max_examples=30, deadline=None)
@given(cfg=configs, many_to_many=st.booleans())
def test_explicit_bptt_equals_jax_grad_float32_many(cfg, many_to_many):
    _check_explicit_float32(cfg, many_to_many)


@pytest.mark.parametrize(
    "mode,num_layers", [("lstm", 1), *slow(("lstm", 2), ("rnn", 2), ("gru", 2))]
)
def test_state_grads_at_zero_are_the_initial_state_gradient(mode, num_layers):
    """g_0 = dL/dS_0, checked against jax.grad w.r.t. layer.apply's initial_state; the
    matrix-free state gradients agree at every step."""
    with jax.enable_x64(True):
        L = num_layers
        layer, v, x, _ = make(mode, num_layers=L, time=4)
        loss_fn = a_loss(layer, True)
        h0 = jnp.asarray(np.random.default_rng(9).standard_normal((L, 2, 3)))
        init = (h0, jnp.cos(h0)) if mode == "lstm" else h0
        res = bptt.explicit_bptt(layer, v, x, loss_fn, initial_state=init)
        sg = bptt.state_gradients(layer, v, x, loss_fn, initial_state=init)
        np.testing.assert_allclose(sg.state_grads, res.state_grads, atol=1e-12)
        g_init = _ref_grads(layer, loss_fn, v["params"], x, None, init)[2]
        g0 = res.state_grads[0, :, 0].reshape(2, L, -1)  # (B, layers, n)
        gh = g_init[0] if mode == "lstm" else g_init
        np.testing.assert_allclose(g0[:, :, :3], jnp.swapaxes(gh, 0, 1), atol=1e-12)
        if mode == "lstm":
            np.testing.assert_allclose(g0[:, :, 3:], jnp.swapaxes(g_init[1], 0, 1), atol=1e-12)
        assert rel_err(res.grads, ref_grad(layer, v, x, loss_fn, initial_state=init)) <= 1e-10


def test_many_to_one_is_the_notes_product_formula():
    """Many-to-one: dL/dS_k = (J_{T-1} ... J_k)^T dL/dS_T, products by a Python loop."""
    with jax.enable_x64(True):
        layer, v, x, _ = make("lstm", hidden=2, time=5, batch=1)
        loss_fn = lambda out, fin: jnp.sum(jnp.sin(fin[1]))  # noqa: E731  (reads c_T only)
        res = bptt.explicit_bptt(layer, v, x, loss_fn)
        J = np.asarray(res.jacobians[0, 0])
        gT = np.asarray(res.state_grads[0, 0, -1])
        np.testing.assert_array_equal(np.asarray(res.direct_grads[0, 0, :-1]), 0.0)
        P = np.eye(J.shape[-1])
        for k in range(J.shape[0] - 1, -1, -1):
            P = P @ J[k]
            np.testing.assert_allclose(res.state_grads[0, 0, k], P.T @ gT, atol=1e-14)


def test_explicit_bptt_jits_once(key):
    layer, v, x, _ = make("gru", hidden=4, time=6, features=3, dtype=jnp.float32)
    loss_fn = a_loss(layer, False)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def grads(v, x):
        return bptt.explicit_bptt(layer, v, x, loss_fn).grads

    g1 = grads(v, x)
    g2 = grads(v, x + 1.0)
    assert rel_err(g1, ref_grad(layer, v, x, loss_fn)) <= 1e-5
    assert rel_err(g2, ref_grad(layer, v, x + 1.0, loss_fn)) <= 1e-5


def test_explicit_bptt_without_per_step(key):
    layer, v, x, _ = make("lstm", time=4, dtype=jnp.float32)
    loss_fn = a_loss(layer, True)
    res = bptt.explicit_bptt(layer, v, x, loss_fn, per_step=False, jacobian_method="factored")
    assert res.contributions is None
    assert isinstance(res.jacobians, bptt.FactoredJacobians)
    assert rel_err(res.grads, ref_grad(layer, v, x, loss_fn)) <= 1e-5


# ---------------------------------------------------------------------------------------
# Lag curves, products, spectra
# ---------------------------------------------------------------------------------------


def test_lag_curve_indexing_and_reductions():
    g = jnp.zeros((1, 2, 4, 2)).at[0, :, :, 0].set(jnp.array([[1.0, 2, 3, 4], [3, 6, 9, 12]]))
    np.testing.assert_allclose(bptt.lag_curve(g)[0], [8, 6, 4, 2])  # lag 0 = last state
    np.testing.assert_allclose(
        bptt.lag_curve(g, reduce="geomean")[0],
        np.sqrt(np.array([4, 3, 2, 1]) * [12, 9, 6, 3]),
        rtol=1e-6,
    )
    assert bptt.lag_curve(g, reduce="none").shape == (1, 2, 4)
    with pytest.raises(ValueError, match="reduce"):
        bptt.lag_curve(g, reduce="max")


def test_log_slope_of_a_geometric_curve():
    curve = 3.0 * 0.7 ** np.arange(20)
    assert bptt.log_slope(curve) == pytest.approx(np.log(0.7), rel=1e-12)
    curve[15:] = 0.0  # underflow is left out
    assert bptt.log_slope(curve) == pytest.approx(np.log(0.7), rel=1e-12)
    with pytest.raises(ValueError, match="at least two"):
        bptt.log_slope(np.zeros(5))


def test_product_spectra_match_a_python_loop():
    with jax.enable_x64(True):
        layer, v, x, _ = make("gru", hidden=3, time=6)
        J = bptt.step_jacobians(layer, v, x)
        logsv = bptt.product_log_singular_values(J)
        assert logsv.shape == (1, 2, 7, 3)
        Jn = np.asarray(J[0, 1])
        P = np.eye(3)
        np.testing.assert_allclose(logsv[0, 1, 0], 0.0, atol=1e-14)
        for lag in range(1, 7):
            P = P @ Jn[6 - lag]
            np.testing.assert_allclose(
                np.exp(logsv[0, 1, lag]), np.linalg.svd(P, compute_uv=False), rtol=1e-10
            )
        np.testing.assert_allclose(bptt.product_log_norms(J), logsv[..., 0])
        np.testing.assert_allclose(
            bptt.singular_values(J)[0, 1, 2], np.linalg.svd(Jn[2], compute_uv=False), rtol=1e-12
        )


def test_long_products_do_not_underflow(key):
    """sigma_max(W_hh) = 0.5 over 300 steps: the product is ~1e-90, far below float32."""
    layer, v, x, _ = make("rnn", hidden=8, batch=1, time=300, dtype=jnp.float32)
    v["params"]["l0"]["weight_hh"] = spectral_scale(v["params"]["l0"]["weight_hh"], 0.5)
    logn = bptt.product_log_norms(bptt.step_jacobians(layer, v, x))[0, 0]
    assert bool(jnp.all(jnp.isfinite(logn)))
    assert float(logn[-1]) < 300 * np.log(0.5) + 1e-3  # under the Pascanu bound


@settings(max_examples=10, deadline=None, derandomize=True)
@given(
    sigma=st.floats(0.2, 2.0),
    scale=st.floats(0.1, 5.0),
    seed=st.integers(0, 2**16),
    hidden=st.integers(1, 4),
)
def test_pascanu_bound_holds(sigma, scale, seed, hidden):
    """||dh_t/dh_k||_2 <= (sigma_max(W_hh) * 1)^(t-k) for every pair k < t (tanh RNN)."""
    with jax.enable_x64(True):
        layer, v, x, _ = make("rnn", hidden=hidden, time=8, batch=2, seed=seed)
        v["params"]["l0"]["weight_hh"] = spectral_scale(v["params"]["l0"]["weight_hh"], sigma)
        x = scale * x
        J = np.asarray(bptt.step_jacobians(layer, v, x)[0])
        bound = np.asarray(bptt.pascanu_bound(v["params"]["l0"]["weight_hh"], np.arange(9)))
        np.testing.assert_allclose(bound, min(sigma, 1e300) ** np.arange(9), rtol=1e-8)
        for b in range(J.shape[0]):
            for k in range(8):
                P = np.eye(hidden)
                for t in range(k, 8):
                    P = J[b, t] @ P  # dh_{t+1}/dh_k
                    assert np.linalg.norm(P, 2) <= bound[t + 1 - k] * (1 + 1e-9)


def test_pascanu_bound_rejects_non_square():
    with pytest.raises(ValueError, match="weight_hh"):
        bptt.pascanu_bound(jnp.ones((4, 3)), [1, 2])


def test_lyapunov_sum_rule_and_bruteforce():
    """Sum of the full spectrum = mean log|det J_k| (closed form); the largest exponent =
    the growth of a perturbed trajectory under the nonlinear step (no Jacobians)."""
    with jax.enable_x64(True):
        layer, v, x, _ = make("rnn", hidden=4, time=200, batch=2)
        v["params"]["l0"]["weight_hh"] = spectral_scale(v["params"]["l0"]["weight_hh"], 2.5)
        x = 0.3 * x
        J = bptt.step_jacobians(layer, v, x)
        lam = bptt.lyapunov_spectrum(J)
        assert lam.shape == (1, 2, 4)
        assert bool(jnp.all(jnp.diff(lam, axis=-1) <= 1e-12))  # ordered
        logdet = jnp.linalg.slogdet(J)[1].mean(axis=-1)
        np.testing.assert_allclose(lam.sum(-1), logdet, rtol=1e-10)
        brute = bptt.largest_lyapunov_bruteforce(layer, v, x, eps=1e-8)
        np.testing.assert_allclose(brute, lam[..., 0], atol=1e-6)  # same start e_1
        d = jnp.asarray(np.random.default_rng(4).standard_normal(4))
        brute_r = bptt.largest_lyapunov_bruteforce(layer, v, x, direction=d, burn_in=20)
        lam_b = bptt.lyapunov_spectrum(J, 1, burn_in=20)
        np.testing.assert_allclose(brute_r, lam_b[..., 0], atol=0.02)  # any start converges
    with pytest.raises(ValueError, match="num"):
        bptt.lyapunov_spectrum(J, 5)


# ---------------------------------------------------------------------------------------
# Matrix-free
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode,bidirectional", [("gru", False), *slow(("lstm", True))])
def test_matrix_free_matches_dense(mode, bidirectional):
    with jax.enable_x64(True):
        layer, v, x, lengths = make(
            mode, hidden=3, time=5, packed=True, bidirectional=bidirectional
        )
        J = bptt.step_jacobians(layer, v, x, lengths)
        sv = bptt.matrix_free_singular_values(layer, v, x, lengths, k=2, iters=60)
        np.testing.assert_allclose(sv, bptt.singular_values(J)[..., :2], rtol=1e-7)
        lags = [0, 2, 5]
        pn = bptt.matrix_free_product_norms(layer, v, x, lags, lengths, iters=200)
        dense = jnp.exp(bptt.product_log_norms(J))[..., jnp.array(lags)]
        np.testing.assert_allclose(pn, dense, rtol=1e-6)
        with pytest.raises(ValueError, match="lags"):
            bptt.matrix_free_product_norms(layer, v, x, [6])


# ---------------------------------------------------------------------------------------
# Truncated BPTT
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mode,num_layers,bidirectional,packed,k1,k2",
    [
        ("lstm", 2, False, True, 2, 3),
        ("rnn", 1, True, True, 2, 6),
        *slow(
            ("rnn", 1, False, False, 1, 1),
            ("rnn", 1, False, False, 2, 6),
            ("lstm", 2, False, True, 1, 1),
            ("lstm", 2, False, True, 2, 6),
            ("gru", 2, True, True, 1, 1),
            ("gru", 2, True, True, 2, 3),
            ("gru", 2, True, True, 2, 6),
        ),
    ],
)
def test_truncated_values_and_full_gradient(mode, num_layers, bidirectional, packed, k1, k2):
    with jax.enable_x64(True):
        layer, v, x, lengths = make(
            mode, num_layers=num_layers, bidirectional=bidirectional, packed=packed, time=6
        )
        out, final = bptt.truncated_apply(layer, v, x, k1, k2, lengths)
        ref_out, ref_final, _ = _apply(layer, v, x, lengths)
        np.testing.assert_allclose(out, ref_out, atol=1e-13)
        chex.assert_trees_all_close(final, ref_final, atol=1e-13)
        if k2 >= x.shape[1]:  # full BPTT
            loss_fn = a_loss(layer, True)
            loss, g = bptt.truncated_grad(layer, v, x, loss_fn, k1, k2, lengths)
            assert rel_err(g, ref_grad(layer, v, x, loss_fn, lengths)) <= 1e-10


@pytest.mark.parametrize("mode,num_layers", [("rnn", 2), *slow(("rnn", 1), ("lstm", 2))])
def test_truncation_cuts_the_gradient_beyond_k2(mode, num_layers):
    """Many-to-one on the last step: the TBPTT gradient is that of a run whose state is
    stop_gradient-ed k2 steps before the end (built from two layer.apply calls), and
    dL/dx_t is exactly zero for t < T - k2."""
    with jax.enable_x64(True):
        T, k2 = 9, 4
        layer, v, x, _ = make(mode, num_layers=num_layers, time=T)
        loss_fn = a_loss(layer, False)
        _, g = bptt.truncated_grad(layer, v, x, loss_fn, 2, k2)

        @jax.jit
        def cut(p):
            _, mid = layer.apply({"params": p}, x[:, : T - k2])
            mid = jax.lax.stop_gradient(mid)
            return loss_fn(*layer.apply({"params": p}, x[:, T - k2 :], initial_state=mid))

        assert rel_err(g, jax.jit(jax.grad(cut))(v["params"])) <= 1e-10
        assert rel_err(g, ref_grad(layer, v, x, loss_fn)) > 1e-6  # it is not full BPTT

        def by_x(x):
            return loss_fn(*bptt.truncated_apply(layer, v, x, 2, k2))

        gx = jnp.abs(jax.jit(jax.grad(by_x))(x)).sum(axis=(0, 2))
        np.testing.assert_array_equal(gx[: T - k2], 0.0)
        assert bool(jnp.all(gx[T - k2 :] > 0))


def test_truncation_windows_follow_williams_peng():
    """A loss on the output at step t reaches back to (end of t's k1-chunk) - k2."""
    with jax.enable_x64(True):
        T, k1, k2 = 10, 3, 5
        layer, v, x, _ = make("gru", time=T)

        def outputs(x):  # (T,) <- (B, T, I): one number per step
            out, _ = bptt.truncated_apply(layer, v, x, k1, k2)
            return jnp.tanh(out).sum(axis=(0, 2))

        reach_all = jnp.abs(jax.jit(jax.jacrev(outputs))(x)).sum(axis=(1, 3))  # (t, t')
        for t in range(T):
            end = min((t // k1 + 1) * k1, T)
            reach = reach_all[t]
            first = max(end - k2, 0)
            np.testing.assert_array_equal(reach[:first], 0.0)
            assert bool(jnp.all(reach[first : t + 1] > 0))
            np.testing.assert_array_equal(reach[t + 1 :], 0.0)


def test_truncated_module_trains_with_the_train_step(key):
    import flax.linen as nn

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            out, _ = bptt.TruncatedBPTT(LSTM(4), k1=2, k2=3)(x)
            return nn.Dense(1)(out[:, -1])[:, 0]

    x = jax.random.normal(key, (4, 7, 2))
    batch = {"x": x, "y": x.sum(axis=(1, 2))}
    model = Model()
    tx = optax.sgd(0.1)
    state = train.init_state(model, tx, key, batch)
    plain = LSTM(4)
    assert jax.tree.map(jnp.shape, state.params["LSTM_0"]) == jax.tree.map(
        jnp.shape, plain.init(key, x)["params"]
    )
    step = train.make_train_step(model, train.mse_loss, tx)

    def loss(p):  # the same model written by hand around truncated_apply
        out, _ = bptt.truncated_apply(plain, {"params": p["LSTM_0"]}, x, 2, 3)
        pred = out[:, -1] @ p["Dense_0"]["kernel"][:, 0] + p["Dense_0"]["bias"][0]
        return jnp.mean((pred - batch["y"]) ** 2)

    g = jax.jit(jax.grad(loss))(state.params)
    new, metrics = step(jax.tree.map(jnp.copy, state), batch)
    assert bool(metrics["finite"])
    expect = jax.tree.map(lambda p, d: p - 0.1 * d, state.params, g)
    chex.assert_trees_all_close(new.params, expect, rtol=1e-5, atol=1e-6)
    assert float(optax.tree.norm(g["LSTM_0"])) > 0


def test_truncation_argument_errors(key):
    layer, v, x, _ = make("rnn", dtype=jnp.float32)
    with pytest.raises(ValueError, match="k1 <= k2"):
        bptt.truncated_apply(layer, v, x, 3, 2)
    with pytest.raises(ValueError, match="k1"):
        bptt.truncated_apply(layer, v, x, 0, 2)
    with pytest.raises(ValueError, match="dropout"):
        bptt.TruncatedBPTT(RNN(3, num_layers=2, dropout=0.5), 1, 2).init(key, x)


# ---------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------


def test_clear_errors(key):
    import flax.linen as nn

    layer, v, x, _ = make("lstm", dtype=jnp.float32)
    with pytest.raises(TypeError, match="layer"):
        bptt.step_jacobians(nn.Dense(3), v, x)
    with pytest.raises(ValueError, match="loss_fn.*scalar"):
        bptt.explicit_bptt(layer, v, x, lambda out, fin: out)
    with pytest.raises(ValueError, match="method"):
        bptt.explicit_bptt(layer, v, x, a_loss(layer, True), method="magic")
    with pytest.raises(ValueError, match="jacobian method"):
        bptt.step_jacobians(layer, v, x, method="magic")
    with pytest.raises(ValueError, match="x"):
        bptt.step_jacobians(layer, v, x[0])
    with pytest.raises(ValueError, match="missing"):
        bptt.step_jacobians(LSTM(3, num_layers=2), v, x)
    with pytest.raises(ValueError, match="lengths"):
        bptt.step_jacobians(layer, v, x, jnp.array([0, 9]))
    with pytest.raises(TypeError, match="variables"):
        bptt.step_jacobians(layer, v["params"], x)
