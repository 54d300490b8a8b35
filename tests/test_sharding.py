"""Data parallelism: on 8 simulated CPU devices a sharded train step equals the
single-device step (BatchNorm included: its batch statistics are over the global batch)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxnets import data, train

N_DEV = 8


class BNNet(nn.Module):
    """Dense -> BatchNorm -> relu -> Dropout -> Dense: BatchNorm's batch statistics are the
    subtle case (they must be over the global batch, not each device's shard)."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        h = nn.Dense(16)(x)
        h = nn.BatchNorm(use_running_average=not train, momentum=0.9)(h)
        h = nn.Dropout(0.25, deterministic=not train)(nn.relu(h))
        return nn.Dense(3)(h)


def _batch(n=32, seed=0):
    rng = np.random.default_rng(seed)
    # shifted inputs: batch statistics far from the running ones, so a per-shard mean would show
    return {
        "x": (rng.standard_normal((n, 6)) + np.arange(6)[None, :]).astype(np.float32),
        "y": rng.integers(0, 3, n).astype(np.int32),
    }


@pytest.fixture(scope="module")
def setup():
    assert jax.device_count() >= N_DEV, "conftest should provide 8 simulated CPU devices"
    # SGD, not Adam: Adam's first steps are ~lr * sign(g), which turns float rounding in tiny
    # gradient entries into O(lr) differences and would test Adam, not the sharding.
    trainer = train.Trainer(BNNet(), train.cross_entropy_loss, optax.sgd(0.1, momentum=0.9))
    d = _batch(n=64, seed=1)
    batches = data.Batches(d, 32, seed=0)
    state = trainer.init(jax.random.key(0), batches(0))
    return trainer, d, batches, state


def test_sharded_step_equals_single_device(setup):
    trainer, _, batches, state = setup
    # the Trainer's jitted steps: plain jit, and jit over a 1-D "data" mesh of 8 devices
    _, single, _ = trainer.steps(1)
    mesh, sharded, _ = trainer.steps(N_DEV)
    assert mesh.shape == {"data": N_DEV}
    batch = batches(0)
    s1, m1 = single(jax.tree.map(jnp.array, state), batch)
    s8, m8 = sharded(jax.tree.map(jnp.array, state), batch)
    # the sharded step really ran data-parallel and kept the state replicated
    assert s8.params["Dense_0"]["kernel"].sharding.is_fully_replicated
    assert len(s8.params["Dense_0"]["kernel"].sharding.device_set) == N_DEV
    for k in m1:
        np.testing.assert_allclose(m8[k], m1[k], rtol=2e-5, atol=1e-6, err_msg=k)
    for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s8), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(
        s8.batch_stats["BatchNorm_0"]["var"], s1.batch_stats["BatchNorm_0"]["var"], rtol=1e-5
    )


def test_fit_on_devices_matches_single_device(setup, tmp_path):
    trainer, d, batches, state = setup
    kw = {"eval_batches": lambda: data.eval_batches(d, 24), "log_every": 3}
    r1 = trainer.fit(state, batches, 6, devices=1, **kw)
    r8 = trainer.fit(state, batches, 6, run_dir=tmp_path / "r8", devices=N_DEV, **kw)
    for a, b in zip(jax.tree.leaves(r1.state), jax.tree.leaves(r8.state), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5)
    # eval batches of 24 split 3 per device, the padded last one too
    np.testing.assert_allclose(r8.eval["accuracy"], r1.eval["accuracy"], atol=1e-6)
    np.testing.assert_allclose(r8.eval["loss"], r1.eval["loss"], rtol=1e-4)
    # a checkpoint written by the sharded run restores on one device
    r_back = trainer.fit(state, batches, 6, run_dir=tmp_path / "r8", devices=1)
    assert int(r_back.state.step) == 6
    assert train.tree_equal(r_back.state.params, r8.state.params)


def test_batch_not_divisible_by_devices_is_a_clear_error(setup):
    trainer, _, _, state = setup
    batches = data.Batches(_batch(n=40), 12, seed=0)
    with pytest.raises(ValueError, match="batch size 12 is not divisible by devices=8"):
        trainer.fit(state, batches, 2, devices=N_DEV)
    with pytest.raises(ValueError, match="devices must be in 1.."):
        train.data_mesh(jax.device_count() + 1)
