"""Task glue: batch layouts, length buckets, LM windows, stateful bits per symbol."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnets.seq import models as M
from jaxnets.seq import tasks
from jaxnets.seq.text import Vocab


def test_seq2seq_arrays_teacher_forcing_layout():
    sv = Vocab.build(["ab", "abc"])
    tv = Vocab.build([("X", "Y"), ("Z",)], sep=" ")
    a = tasks.seq2seq_arrays(sv, tv, [("ab", ("X", "Y")), ("c", ("Z",))], 4, 4)
    x_id, y_id, z_id = tv.id("X"), tv.id("Y"), tv.id("Z")
    assert a["x"].tolist() == [[2, x_id, y_id, 0], [2, z_id, 0, 0]]
    assert a["y"].tolist() == [[x_id, y_id, 3, 0], [z_id, 3, 0, 0]]
    assert a["lengths"].tolist() == [3, 2]
    assert a["src_lengths"].tolist() == [2, 1]
    with pytest.raises(ValueError, match="pairs: 1 pairs exceed max_src=4 / max_tgt=3"):
        tasks.seq2seq_arrays(sv, tv, [("ab", ("X", "Y", "Z"))], 4, 3)


def test_bucket_batches_cover_each_epoch_once_and_cut_widths():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 13, 200).astype(np.int32)
    x = np.zeros((200, 12), np.int32)
    for i, n in enumerate(lengths):
        x[i, :n] = 7
    data = {"x": x, "y": x.copy(), "lengths": lengths, "id": np.arange(200)}
    bb = tasks.BucketBatches(data, 8, seed=3, bounds=(4, 8, 12))
    seen = []
    for k in range(bb.steps_per_epoch):
        b = bb(k)
        w = b["x"].shape[1]
        assert w in (4, 8, 12) and b["y"].shape[1] == w and b["id"].shape == (8,)
        assert b["lengths"].max() <= w
        lower = {4: 0, 8: 4, 12: 8}[w]
        assert b["lengths"].min() > lower  # every example is in its own bucket
        np.testing.assert_array_equal(b["x"], x[b["id"]][:, :w])
        seen += b["id"].tolist()
    assert len(seen) == len(set(seen))  # no example twice in an epoch
    sizes = np.bincount(np.searchsorted([4, 8, 12], lengths), minlength=3)
    assert len(seen) == int(np.sum(sizes // 8 * 8))  # only the partial batches left out
    again = tasks.BucketBatches(data, 8, seed=3, bounds=(4, 8, 12))
    np.testing.assert_array_equal(
        again(bb.steps_per_epoch + 2)["id"], bb(bb.steps_per_epoch + 2)["id"]
    )
    with pytest.raises(ValueError, match="exceeds the last bound"):
        tasks.BucketBatches(data, 8, seed=0, bounds=(4, 8))


def test_lm_windows_are_shifted_and_seeded():
    stream = np.arange(100, dtype=np.int32)
    w = tasks.LMWindows(stream, 4, 10, seed=1)
    b = w(5)
    assert b["x"].shape == b["y"].shape == (4, 10)
    np.testing.assert_array_equal(b["y"], b["x"] + 1)
    np.testing.assert_array_equal(tasks.LMWindows(stream, 4, 10, seed=1)(5)["x"], b["x"])
    assert not np.array_equal(w(6)["x"], b["x"])
    with pytest.raises(ValueError, match="stream"):
        tasks.LMWindows(stream[:5], 4, 10, seed=0)


def test_token_loss_masks_padding_and_padded_examples():
    logits = jax.random.normal(jax.random.key(0), (2, 3, 4))
    y = jnp.array([[1, 2, 3], [0, 1, 2]])
    batch = {"y": y, "lengths": jnp.array([3, 1]), "mask": jnp.array([True, True])}
    loss, m = tasks.token_loss(logits, batch)
    logp = np.asarray(jax.nn.log_softmax(logits, -1))
    want = -(logp[0, 0, 1] + logp[0, 1, 2] + logp[0, 2, 3] + logp[1, 0, 0]) / 4
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    np.testing.assert_allclose(m["bits"], want / np.log(2), rtol=1e-6)
    only_first, _ = tasks.token_loss(logits, {**batch, "mask": jnp.array([True, False])})
    np.testing.assert_allclose(
        only_first, -(logp[0, 0, 1] + logp[0, 1, 2] + logp[0, 2, 3]) / 3, rtol=1e-6
    )


@pytest.fixture(scope="module")
def tiny_lm():
    lm = M.LanguageModel(9, embed_dim=4, hidden_size=8, cell="gru")
    v = lm.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    stream = np.asarray(jax.random.randint(jax.random.key(1), (121,), 3, 9), np.int32)
    logits, _ = jax.jit(lm.apply)(v, stream[None, :-1])
    logp = jax.nn.log_softmax(logits[0], -1)
    one_pass = -float(jnp.mean(jnp.take_along_axis(logp, stream[1:, None], 1))) / np.log(2)
    return lm, v, stream, one_pass


def test_lm_bits_per_symbol_carries_state_across_chunks(tiny_lm):
    lm, v, stream, one_pass = tiny_lm
    got = tasks.lm_bits_per_symbol(lm, v, stream, rows=1, chunk=16, warmup=0)
    np.testing.assert_allclose(got, one_pass, rtol=1e-5)


def test_lm_bits_per_symbol_rows_with_full_warmup_equal_one_pass(tiny_lm):
    # with a warm-up as long as the stream every row re-reads from the start
    lm, v, stream, one_pass = tiny_lm
    got = tasks.lm_bits_per_symbol(lm, v, stream, rows=3, chunk=16, warmup=len(stream))
    np.testing.assert_allclose(got, one_pass, rtol=1e-5)
    # and a short warm-up only perturbs the first predictions of rows 2 and 3 slightly
    short = tasks.lm_bits_per_symbol(lm, v, stream, rows=3, chunk=16, warmup=8)
    np.testing.assert_allclose(short, one_pass, rtol=0.05)


def test_bag_of_symbols_ignores_padding():
    x = np.array([[4, 4, 5, 0], [6, 9, 9, 9]])
    f = tasks.bag_of_symbols(x, np.array([3, 1]), 10)
    np.testing.assert_allclose(f[0, [4, 5]], [2 / 3, 1 / 3])
    np.testing.assert_allclose(f[1, 6], 1.0)
    np.testing.assert_allclose(f.sum(1), 1.0)


def test_predictions_equal_argmax_and_compile_once_per_model():
    """predict_classes / predict_tags: the argmax of a direct apply (every example once,
    the padded last batch cut), and a second set of weights of the same model (another
    seed) reuses the compiled function."""
    rng = np.random.default_rng(0)
    x = rng.integers(1, 9, (7, 5)).astype(np.int32)
    lengths = rng.integers(1, 6, 7).astype(np.int32)
    data = {"x": x, "lengths": lengths}
    clf = M.SequenceClassifier(9, 3, embed_dim=4, hidden_size=6, cell="gru")
    tagger = M.Tagger(9, 2, embed_dim=4, hidden_size=6, cell="lstm")
    before = tasks._argmax_logits._cache_size()
    for seed in (0, 1):
        v = clf.init(jax.random.key(seed), x, lengths)
        want = np.argmax(np.asarray(clf.apply(v, x, lengths)), -1)
        np.testing.assert_array_equal(tasks.predict_classes(clf, v, data, batch_size=4), want)
        vt = tagger.init(jax.random.key(seed), x, lengths)
        full = np.argmax(np.asarray(tagger.apply(vt, x, lengths)), -1)
        got = tasks.predict_tags(tagger, vt, data, batch_size=4)
        assert [g.tolist() for g in got] == [full[i, : lengths[i]].tolist() for i in range(7)]
    assert tasks._argmax_logits._cache_size() - before == 2  # one per model, not per seed
