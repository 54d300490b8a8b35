"""jaxnets.bptt.flossing: the differentiable Lyapunov exponents against the dense-Jacobian QR
of jaxnets.bptt, finite differences in float64 and closed forms; the flossing option."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnets import bptt, rnn
from jaxnets.bptt import flossing
from jaxnets.models.readout import RecurrentReadout

LAYERS = {
    "rnn": lambda: rnn.RNN(6),
    "gru": lambda: rnn.GRU(5),
    "lstm": lambda: rnn.LSTM(4),
    "rnn2": lambda: rnn.RNN(4, num_layers=2),
}


def _setup(name, key, dtype=jnp.float32, T=18, B=3):
    layer = LAYERS[name]()
    x = jax.random.normal(jax.random.fold_in(key, 1), (B, T, 3), dtype)
    v = layer.init(key, x)
    v = jax.tree.map(lambda a: a.astype(dtype), v)
    return layer, v, x


@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("qr_every", [1, 3])
def test_equals_lyapunov_spectrum_of_dense_jacobians(name, qr_every, key):
    layer, v, x = _setup(name, key)
    k = 4
    ref = bptt.lyapunov_spectrum(bptt.step_jacobians(layer, v, x)[0], num=k, burn_in=6)
    got = flossing.lyapunov_exponents(layer, v, x, k, qr_every=qr_every, burn_in=6)
    assert got.shape == (3, k)
    np.testing.assert_allclose(got, ref, atol=2e-5, rtol=1e-4)


def test_remainder_interval_and_random_frame_give_the_same_full_spectrum(key):
    layer, v, x = _setup("gru", key, T=17)
    N = flossing.state_size(layer)
    ref = bptt.lyapunov_spectrum(bptt.step_jacobians(layer, v, x)[0], num=N)
    got = flossing.lyapunov_exponents(layer, v, x, N, qr_every=4, key=jax.random.key(3))
    # the full spectrum does not depend on the starting frame (its sum is mean log|det J|)
    np.testing.assert_allclose(got.sum(-1), ref.sum(-1), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["rnn", "gru", "lstm"])
def test_gradient_matches_finite_differences_float64(name, key):
    with jax.enable_x64(True):
        layer, v, x = _setup(name, key, jnp.float64, T=12, B=2)
        w = jax.random.normal(jax.random.key(5), (2,), jnp.float64)

        def f(params):
            lam = flossing.lyapunov_exponents(layer, {"params": params}, x, 2, qr_every=2)
            return (w[None, :] * lam).sum() + flossing.flossing_loss(
                layer, {"params": params}, x, 2, target=0.1, burn_in=2
            )[0]

        f = jax.jit(f)
        p = v["params"]
        g = jax.jit(jax.grad(f))(p)
        leaves, tree = jax.tree.flatten(p)
        dirs = jax.tree.unflatten(
            tree,
            [jax.random.normal(jax.random.fold_in(key, i), a.shape, a.dtype)
             for i, a in enumerate(leaves)],
        )  # fmt: skip
        eps = 1e-6
        plus = jax.tree.map(lambda a, d: a + eps * d, p, dirs)
        minus = jax.tree.map(lambda a, d: a - eps * d, p, dirs)
        fd = (f(plus) - f(minus)) / (2 * eps)
        an = sum(
            jnp.vdot(a, d) for a, d in zip(jax.tree.leaves(g), jax.tree.leaves(dirs), strict=True)
        )
        np.testing.assert_allclose(float(an), float(fd), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("g", [0.5, 0.9, 1.3])
def test_orthogonal_weight_scaled_by_g_gives_log_g(g, key):
    """Near the origin tanh is linear: J_t = g O exactly up to O(h^2), so every exponent
    is log g."""
    with jax.enable_x64(True):
        H = 10
        layer = rnn.RNN(H)
        x = 1e-7 * jax.random.normal(key, (2, 30, 3), jnp.float64)
        orth = jnp.linalg.qr(jax.random.normal(jax.random.key(9), (H, H), jnp.float64))[0]
        params = {
            "l0": {
                "weight_ih": jnp.ones((H, 3), jnp.float64),
                "weight_hh": g * orth,
                "bias_ih": jnp.zeros(H, jnp.float64),
                "bias_hh": jnp.zeros(H, jnp.float64),
            }
        }
        lam = flossing.lyapunov_exponents(layer, {"params": params}, x, H, qr_every=5)
        np.testing.assert_allclose(lam, np.log(g), atol=1e-5)


def test_contracting_network_has_negative_exponents(key):
    """|tanh'| <= 1, so every exponent is <= log sigma_max(W_hh) = log 0.6."""
    H = 12
    layer = rnn.RNN(H)
    x = jax.random.normal(key, (4, 60, 2))
    v = layer.init(jax.random.key(1), x)
    W = jax.random.normal(jax.random.key(2), (H, H))
    W = 0.6 * W / jnp.linalg.norm(W, ord=2)
    v = {"params": {"l0": {**v["params"]["l0"], "weight_hh": W}}}
    lam = flossing.lyapunov_exponents(layer, v, x, 5, burn_in=10)
    assert np.all(lam < 0)
    assert np.all(lam <= np.log(0.6) + 1e-5)


def test_initial_state_is_used(key):
    layer, v, x = _setup("lstm", key)
    h0 = 0.5 * jnp.ones((1, 3, 4))
    c0 = -0.5 * jnp.ones((1, 3, 4))
    J = bptt.step_jacobians(layer, v, x, initial_state=(h0, c0))[0]
    ref = bptt.lyapunov_spectrum(J, num=3)
    got = flossing.lyapunov_exponents(layer, v, x, 3, initial_state=(h0, c0))
    np.testing.assert_allclose(got, ref, atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="initial_state"):
        flossing.lyapunov_exponents(layer, v, x, 3, initial_state=(h0, c0[:, :2]))


def test_flossing_drives_the_top_exponents_to_the_target(key):
    """Adam on the flossing loss moves a contracting RNN's top 3 exponents from about -0.5
    to within 0.05 of the target, on fresh input batches."""
    H = 12
    layer = rnn.RNN(H)
    xs = jax.random.normal(key, (150, 2, 30, 2))
    v = layer.init(jax.random.key(1), xs[0])
    cfg = flossing.Flossing(k=3, target=-0.05, burn_in=5, lr=2e-2, pre_steps=150)
    held_out = jax.random.normal(jax.random.key(7), (8, 30, 2))
    before = flossing.lyapunov_exponents(layer, v, held_out, 3, burn_in=5)
    assert float(before.mean(0).max()) < -0.3
    v2, _, losses, lams = flossing.floss(layer, v, xs, cfg)
    assert losses.shape == (150,) and lams.shape == (150, 2, 3)
    assert float(losses[-10:].mean()) < 0.05 * float(losses[0])
    after = flossing.lyapunov_exponents(layer, v2, held_out, 3, burn_in=5).mean(0)
    np.testing.assert_allclose(after, -0.05, atol=0.05)
    # floss_step is the same update, usable inside one's own jit/scan
    step = jax.jit(flossing.floss_step(layer, cfg))
    p, o = v["params"], cfg.tx().init(v["params"])
    for i in range(3):
        p, o, loss, _ = step(p, o, xs[i])
        np.testing.assert_allclose(loss, losses[i], rtol=1e-4)


def test_leading_exponents_record(key):
    layer, v, x = _setup("rnn", key)
    rec = flossing.leading_exponents(layer, v, x, 2, burn_in=3)
    ref = flossing.lyapunov_exponents(layer, v, x, 2, burn_in=3).mean(0)
    assert list(rec) == ["lyapunov_1", "lyapunov_2"]
    np.testing.assert_allclose([rec["lyapunov_1"], rec["lyapunov_2"]], ref, rtol=1e-6)


def test_flossing_schedule():
    cfg = flossing.Flossing(pre_steps=50, inter_every=100, inter_steps=20, inter_times=2)
    assert cfg.episodes(1000) == [(0, 50), (100, 20), (200, 20)]
    assert flossing.Flossing(pre_steps=0, inter_every=300, inter_steps=5).episodes(700) == [
        (300, 5),
        (600, 5),
    ]
    assert flossing.Flossing(pre_steps=7).episodes(10) == [(0, 7)]


def test_bad_arguments_are_named(key):
    layer, v, x = _setup("rnn", key)
    with pytest.raises(TypeError, match="layer"):
        flossing.lyapunov_exponents(object(), v, x, 2)
    with pytest.raises(ValueError, match="bidirectional"):
        flossing.lyapunov_exponents(rnn.RNN(6, bidirectional=True), v, x, 2)
    with pytest.raises(ValueError, match="k: expected 1..6"):
        flossing.lyapunov_exponents(layer, v, x, 7)
    with pytest.raises(ValueError, match="x: expected a 3-D"):
        flossing.lyapunov_exponents(layer, v, x[0], 2)
    with pytest.raises(ValueError, match="x: expected 3 features"):
        flossing.lyapunov_exponents(layer, v, x[..., :2], 2)
    with pytest.raises(ValueError, match="burn_in"):
        flossing.lyapunov_exponents(layer, v, x, 2, burn_in=18)
    with pytest.raises(ValueError, match="qr_every"):
        flossing.lyapunov_exponents(layer, v, x, 2, qr_every=0)
    with pytest.raises(TypeError, match="variables"):
        flossing.lyapunov_exponents(layer, v["params"], x, 2)
    with pytest.raises(ValueError, match="Flossing.k"):
        flossing.Flossing(k=0)
    with pytest.raises(ValueError, match="Flossing.inter_steps"):
        flossing.Flossing(inter_every=10)
    with pytest.raises(ValueError, match="Flossing.lr"):
        flossing.Flossing(lr=-1.0)


def test_qr_vjp_matches_jax_qr_vjp_float64(key):
    """The QR used inside the scan has its own VJP (matrix products instead of XLA's slow
    CPU triangular solve); it must equal the VJP of jnp.linalg.qr."""
    from jaxnets.bptt.flossing import _qr, _r_inverse

    with jax.enable_x64(True):
        A = jax.random.normal(key, (12, 7), jnp.float64)
        cq = jax.random.normal(jax.random.key(1), (12, 7), jnp.float64)
        cr = jax.random.normal(jax.random.key(2), (7, 7), jnp.float64)

        def f(qr):
            return lambda a: jnp.vdot(qr(a)[0], cq) + jnp.vdot(jnp.triu(qr(a)[1]), cr)

        np.testing.assert_allclose(jax.grad(f(_qr))(A), jax.grad(f(jnp.linalg.qr))(A), rtol=1e-10)
        R = jnp.linalg.qr(A)[1]
        np.testing.assert_allclose(_r_inverse(R), np.linalg.inv(np.asarray(R)), rtol=1e-10)


def test_track_lyapunov_hook_logs_the_exponent_at_eval(tmp_path, key):
    from jaxnets import runs, train

    model = RecurrentReadout("gru", 6)
    x = jax.random.normal(key, (8, 10, 2))
    batch = {"x": x, "y": x[:, -1, 0]}
    trainer = train.Trainer(model, train.mse_loss, train.make_optimizer("adam", 1e-2))
    state = trainer.init(jax.random.key(1), batch)
    hook = flossing.lyapunov_hook(model.recurrent_layer(), x[:4], 2, burn_in=2)
    res = trainer.fit(
        state, lambda s: batch, 4, run_dir=runs.RunDir(tmp_path), eval_every=2,
        eval_batches=lambda: [batch], eval_hook=hook,
    )  # fmt: skip
    evals = [r for r in runs.RunDir(tmp_path).metrics() if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    want = flossing.leading_exponents(
        model.recurrent_layer(), {"params": res.state.params["rnn"]}, x[:4], 2, burn_in=2
    )
    np.testing.assert_allclose([evals[-1]["lyapunov_1"], evals[-1]["lyapunov_2"]],
                               [want["lyapunov_1"], want["lyapunov_2"]], rtol=1e-6)  # fmt: skip
