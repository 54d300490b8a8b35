"""Sequence models: shapes, lengths, autoregressive rules, generation, decoding, attention."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnets.seq import models as S

V = 11  # vocabulary of the toy problems


def _tokens(key, batch=3, time=6):
    return jax.random.randint(key, (batch, time), 4, V)


def _pad_garbage(tokens, lengths, key):
    """The same batch with random (non-zero) ids written into every padded position."""
    t = np.asarray(tokens).copy()
    junk = np.asarray(jax.random.randint(key, t.shape, 1, V))
    mask = np.arange(t.shape[1])[None, :] >= np.asarray(lengths)[:, None]
    t[mask] = junk[mask]
    return jnp.asarray(t)


# ---------------------------------------------------------------------------------------
# Many-to-one
# ---------------------------------------------------------------------------------------


def test_classifier_shapes(key):
    # shapes only: traced with eval_shape, nothing compiled
    x = jax.ShapeDtypeStruct((3, 6), jnp.int32)
    lengths = jax.ShapeDtypeStruct((3,), jnp.int32)
    for cell in ("rnn", "lstm", "gru"):
        for bidirectional in (False, True):
            m = S.SequenceClassifier(
                V,
                5,
                embed_dim=4,
                hidden_size=6,
                cell=cell,
                num_layers=2,
                bidirectional=bidirectional,
            )
            v = jax.eval_shape(m.init, key, x)
            logits, state = jax.eval_shape(
                lambda v, x, n, m=m: m.apply(v, x, n, mutable=["intermediates"]), v, x, lengths
            )
            assert logits.shape == (3, 5)
            feats = state["intermediates"]["features"][0]
            assert feats.shape == (3, 6 * (1 + bidirectional))
            rnn = v["params"]["rnn"]
            assert set(rnn) == (
                {"l0", "l1", "l0_reverse", "l1_reverse"} if bidirectional else {"l0", "l1"}
            )


@pytest.mark.parametrize(
    ("pooling", "bidirectional"), [("last", False), ("last", True), ("max", True)]
)
def test_classifier_ignores_padding(key, pooling, bidirectional):
    m = S.SequenceClassifier(
        V, 4, embed_dim=4, hidden_size=5, cell="gru", bidirectional=bidirectional, pooling=pooling
    )
    x = _tokens(key, 3, 7)
    lengths = jnp.array([7, 3, 3])
    v = jax.jit(m.init)(key, x, lengths)
    apply = jax.jit(m.apply)
    batched = apply(v, _pad_garbage(x, lengths, jax.random.key(1)), lengths)
    alone = apply(v, x[1:, :3], None)  # rows 1 and 2 unpadded, in a batch of their own
    np.testing.assert_allclose(batched[1:], alone, rtol=1e-5, atol=1e-6)
    assert not np.allclose(batched[0], batched[1])


def test_pooling_functions_closed_form():
    x = jnp.arange(2 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 3)
    lengths = jnp.array([4, 2])
    np.testing.assert_allclose(S.masked_mean(x, lengths)[1], np.asarray(x[1, :2]).mean(0))
    np.testing.assert_allclose(S.masked_max(-x, lengths)[1], -np.asarray(x[1, 0]))
    np.testing.assert_allclose(S.masked_mean(x, None), np.asarray(x).mean(1))


# ---------------------------------------------------------------------------------------
# Language model and generation
# ---------------------------------------------------------------------------------------


def test_language_model_refuses_bidirectional():
    with pytest.raises(ValueError, match="autoregressive.*cannot see the future"):
        S.LanguageModel(V, bidirectional=True)


@functools.cache
def _lm():
    """A 2-layer LSTM language model (the LSTM's (h, c) state is the hard case),
    initialised and compiled once."""
    m = S.LanguageModel(V, embed_dim=4, hidden_size=8, cell="lstm", num_layers=2)
    key = jax.random.key(0)
    v = jax.jit(m.init)(key, _tokens(key, 1, 2))
    v = jax.tree.map(lambda p: p * 3.0, v)  # peaked distributions: no argmax near-ties
    return m, v, jax.jit(m.apply)


def test_language_model_variational_dropout_masks_are_constant_in_time(key):
    """All three dropouts (embeddings, between layers, before the head) draw one mask per
    sequence with ``variational_dropout``; the zeros they leave line up over time."""
    tokens = jax.random.randint(key, (5, 9), 0, V)
    m = S.LanguageModel(
        V, embed_dim=8, hidden_size=16, num_layers=2, dropout=0.4, variational_dropout=True
    )
    v = m.init(key, tokens)
    _, state = m.apply(
        v, tokens, deterministic=False, rngs={"dropout": jax.random.key(1)},
        capture_intermediates=lambda mdl, _: isinstance(mdl, nn.Dropout),
        mutable=["intermediates"],
    )  # fmt: skip
    outs = jax.tree.leaves(state["intermediates"])
    assert sorted(o.shape for o in outs) == [(5, 9, 8), (5, 9, 16), (5, 9, 16)]
    for o in outs:
        dropped = o == 0.0
        assert 0.1 < dropped.mean() < 0.7
        assert (dropped == dropped[:, :1]).all()


def test_language_model_is_causal_and_stateful(key):
    m, v, apply = _lm()
    x = _tokens(key, 2, 8)
    logits, final = apply(v, x)
    assert logits.shape == (2, 8, V)
    # changing a future symbol never changes earlier logits
    y = x.at[:, 5].set(4 + (x[:, 5] - 3) % (V - 4))
    logits_y, _ = apply(v, y)
    np.testing.assert_allclose(logits_y[:, :5], logits[:, :5], rtol=1e-6)
    assert not np.allclose(logits_y[:, 5:], logits[:, 5:])
    # two chunks with the state carried over equal one pass (truncated-BPTT evaluation)
    a, state = apply(v, x[:, :4])
    b, final2 = apply(v, x[:, 4:], initial_state=state)
    np.testing.assert_allclose(jnp.concatenate([a, b], 1), logits, rtol=1e-5, atol=1e-6)
    jax.tree.map(lambda p, q: np.testing.assert_allclose(p, q, rtol=1e-5, atol=1e-6), final2, final)
    # padding: row 1 has length 4; its final state is the state after 4 symbols
    lengths = jnp.array([8, 4])
    _, final_pad = apply(v, _pad_garbage(x, lengths, jax.random.key(3)), lengths=lengths)
    jax.tree.map(
        lambda p, q: np.testing.assert_allclose(p[:, 1], q[:, 1], rtol=1e-5, atol=1e-6),
        final_pad,
        state,
    )


def _loop_generate(apply, v, prompt, steps, pick):
    """Reference: re-read the whole sequence every step (no state plumbing). Later
    positions hold PAD; a causal model's logits at t ignore them."""
    batch, p = prompt.shape
    toks = jnp.zeros((batch, p + steps), jnp.int32).at[:, :p].set(prompt)
    for t in range(steps):
        logits, _ = apply(v, toks)
        toks = toks.at[:, p + t].set(pick(logits[:, p + t - 1], t))
    return toks[:, p:]


def test_generate_greedy_equals_python_loop(key):
    m, v, apply = _lm()
    prompt = _tokens(key, 2, 3)
    got = S.generate(m, v, prompt, 6, key, temperature=0.0)
    want = _loop_generate(apply, v, prompt, 6, lambda lg, t: jnp.argmax(lg, -1))
    np.testing.assert_array_equal(got, want)
    # top-1 sampling is greedy whatever the temperature
    np.testing.assert_array_equal(S.generate(m, v, prompt, 6, key, 2.0, top_k=1), got)


def test_generate_sampling_equals_python_loop_and_is_deterministic(key):
    m, v, apply = _lm()
    prompt = _tokens(key, 2, 3)
    k7 = jax.random.key(7)
    got = S.generate(m, v, prompt, 6, k7, temperature=1.3, top_k=4)
    want = _loop_generate(
        apply,
        v,
        prompt,
        6,
        lambda lg, t: S.sample_logits(lg, jax.random.fold_in(k7, t), 1.3, 4),
    )
    np.testing.assert_array_equal(got, want)
    again = S.generate(m, v, prompt, 6, k7, temperature=1.3, top_k=4)
    np.testing.assert_array_equal(got, again)
    others = [S.generate(m, v, prompt, 6, jax.random.key(s), 1.3, top_k=4) for s in range(3)]
    assert any(not np.array_equal(got, o) for o in others)


def test_generate_does_not_recompile_for_new_keys_or_temperatures(key):
    m, v, _ = _lm()
    prompt = _tokens(key, 2, 3)
    S.generate(m, v, prompt, 6, key, 1.0)
    before = S._generate._cache_size()
    for s, temp in [(1, 0.5), (2, 1.5), (3, 0.0)]:
        S.generate(m, v, prompt, 6, jax.random.key(s), temp)
    assert S._generate._cache_size() == before


def test_generate_prompts_of_different_lengths(key):
    m, v, apply = _lm()
    prompt = _tokens(key, 2, 3)
    both = S.generate(m, v, prompt, 6, key, 0.0, prompt_lengths=jnp.array([3, 2]))
    full = S.generate(m, v, prompt, 6, key, 0.0)
    np.testing.assert_array_equal(both[0], full[0])
    # row 1 continues its 2-symbol prompt (7 steps keep the reference's shape)
    short = _loop_generate(apply, v, prompt[:, :2], 7, lambda lg, t: jnp.argmax(lg, -1))
    np.testing.assert_array_equal(both[1], short[1, :6])


def test_sample_logits_distribution_top_k_and_suppression(key):
    logits = jnp.log(jnp.array([[0.1, 0.2, 0.3, 0.4]]))
    keys = jax.random.split(key, 4000)
    draws = jax.vmap(lambda k: S.sample_logits(logits, k, 1.0)[0])(keys)
    freq = np.bincount(np.asarray(draws), minlength=4) / 4000
    np.testing.assert_allclose(freq, [0.1, 0.2, 0.3, 0.4], atol=0.03)  # ~4 sigma
    top2 = jax.vmap(lambda k: S.sample_logits(logits, k, 1.0, top_k=2)[0])(keys)
    freq2 = np.bincount(np.asarray(top2), minlength=4) / 4000
    np.testing.assert_allclose(freq2, [0, 0, 3 / 7, 4 / 7], atol=0.03)
    cold = jax.vmap(lambda k: S.sample_logits(logits, k, 0.01)[0])(keys[:200])
    assert np.all(np.asarray(cold) == 3)
    m, v, _ = _lm()
    hot = [S.generate(m, v, _tokens(key, 2, 3), 6, jax.random.key(s), 5.0) for s in range(4)]
    assert np.asarray(hot).min() < 4  # at this temperature specials do get drawn ...
    cool = [
        S.generate(m, v, _tokens(key, 2, 3), 6, jax.random.key(s), 5.0, suppress_ids=(0, 1, 2, 3))
        for s in range(4)
    ]
    assert np.asarray(cool).min() >= 4  # ... unless suppressed


# ---------------------------------------------------------------------------------------
# Tagger
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bidirectional", [False, True])
def test_tagger_shapes_padding_and_direction(key, bidirectional):
    m = S.Tagger(V, 3, embed_dim=4, hidden_size=5, cell="lstm", bidirectional=bidirectional)
    x = _tokens(key, 2, 6)
    lengths = jnp.array([6, 4])
    v = jax.jit(m.init)(key, x, lengths)
    apply = jax.jit(m.apply)
    out = apply(v, _pad_garbage(x, lengths, jax.random.key(2)), lengths)
    assert out.shape == (2, 6, 3)
    # row 1 (length 4) padded with garbage = row 1 cut to 4 and padded with other garbage
    other = apply(v, _pad_garbage(x, lengths, jax.random.key(5)), lengths)
    np.testing.assert_allclose(out[1, :4], other[1, :4], rtol=1e-6)
    # the tag at t = 1 depends on later symbols only when bidirectional
    changed = apply(v, x.at[:, 3].set(4 + (x[:, 3] - 3) % (V - 4)), lengths)
    assert np.allclose(changed[:, 1], out[:, 1]) != bidirectional


# ---------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------


def _memory64(rng, batch=2, src=5, m=4, a=3):
    values = rng.normal(size=(batch, src, m))
    mask = np.arange(src)[None, :] < np.array([5, 3])[:, None]
    return values, mask


def test_additive_attention_float64_reference():
    rng = np.random.default_rng(0)
    values, mask = _memory64(rng)
    wq, wk, vv = rng.normal(size=(6, 3)), rng.normal(size=(4, 3)), rng.normal(size=(3,))
    q = rng.normal(size=(2, 6))
    with jax.enable_x64(True):
        mem = S.Memory(
            jnp.asarray(values), jnp.asarray(values) @ jnp.asarray(wk), jnp.asarray(mask)
        )
        ctx, w = S.additive_attention(
            {"query": jnp.asarray(wq), "v": jnp.asarray(vv)}, jnp.asarray(q), mem
        )
    for b in range(2):
        n = mask[b].sum()
        e = np.tanh(values[b, :n] @ wk + q[b] @ wq) @ vv
        a = np.exp(e - e.max()) / np.exp(e - e.max()).sum()
        np.testing.assert_allclose(w[b, :n], a, rtol=1e-12)
        np.testing.assert_array_equal(w[b, n:], 0.0)
        np.testing.assert_allclose(ctx[b], a @ values[b, :n], rtol=1e-12)


def test_multiplicative_attention_float64_reference():
    rng = np.random.default_rng(1)
    values, mask = _memory64(rng)
    wa, q = rng.normal(size=(6, 4)), rng.normal(size=(2, 6))
    with jax.enable_x64(True):
        mem = S.Memory(jnp.asarray(values), None, jnp.asarray(mask))
        ctx, w = S.multiplicative_attention({"w": jnp.asarray(wa)}, jnp.asarray(q), mem)
    for b in range(2):
        n = mask[b].sum()
        e = values[b, :n] @ (q[b] @ wa)
        a = np.exp(e - e.max()) / np.exp(e - e.max()).sum()
        np.testing.assert_allclose(w[b, :n], a, rtol=1e-12)
        np.testing.assert_array_equal(w[b, n:], 0.0)
        np.testing.assert_allclose(ctx[b], a @ values[b, :n], rtol=1e-12)


def test_masked_softmax_gradient_is_finite_with_padding():
    mask = jnp.array([[True, True, False]])
    g = jax.grad(lambda s: jnp.sum(S.masked_softmax(s, mask) * jnp.array([[1.0, 2.0, 3.0]])))(
        jnp.zeros((1, 3))
    )
    assert np.all(np.isfinite(g)) and g[0, 2] == 0.0


# ---------------------------------------------------------------------------------------
# Seq2Seq
# ---------------------------------------------------------------------------------------

TV = 7  # target vocabulary
# Three decoder configurations cover every cell, attention kind and a 2-layer stack; each
# is initialised and compiled once per test session (compilation dominates these tests).
S2S_CONFIGS = {
    "plain-gru": dict(attention=None, cell="gru", layers=1, bidirectional=False),
    "bahdanau-lstm-2": dict(attention="bahdanau", cell="lstm", layers=2, bidirectional=True),
    "luong-rnn": dict(attention="luong", cell="rnn", layers=1, bidirectional=False),
}
_S2S_CACHE = {}


def _s2s(name):
    if name not in _S2S_CACHE:
        c = S2S_CONFIGS[name]
        m = S.Seq2Seq(
            V,
            TV,
            embed_dim=4,
            hidden_size=6,
            cell=c["cell"],
            encoder_layers=c["layers"],
            decoder_layers=c["layers"],
            bidirectional_encoder=c["bidirectional"],
            attention=c["attention"],
            attention_size=5,
        )
        key = jax.random.key(0)
        src = _tokens(key, 3, 6)
        tgt = jax.random.randint(jax.random.key(9), (3, 4), 4, TV)
        lengths = jnp.array([6, 3, 1])
        v = jax.jit(m.init)(key, src, lengths, tgt)
        # Make the decoder confident enough that decoding is not a coin toss between ties.
        v = jax.tree.map(lambda p: p * 3.0, v)
        fns = {
            "apply": jax.jit(m.apply),
            "encode": jax.jit(functools.partial(m.apply, method=S.Seq2Seq.encode)),
            "params": m.apply(v, method=S.Seq2Seq.decoder_params),
            "step": jax.jit(functools.partial(S.decoder_step, m.spec)),
        }
        _S2S_CACHE[name] = (m, v, src, lengths, tgt, fns)
    return _S2S_CACHE[name]


def test_seq2seq_shapes(key):
    src = jax.ShapeDtypeStruct((3, 6), jnp.int32)
    lengths = jax.ShapeDtypeStruct((3,), jnp.int32)
    tgt = jax.ShapeDtypeStruct((3, 4), jnp.int32)
    for attention in (None, "bahdanau", "luong"):
        for cell in ("rnn", "lstm", "gru"):
            m = S.Seq2Seq(
                V,
                TV,
                embed_dim=4,
                hidden_size=6,
                cell=cell,
                encoder_layers=2,
                decoder_layers=2,
                attention=attention,
                attention_size=5,
            )
            v = jax.eval_shape(m.init, key, src, lengths, tgt)
            logits, w = jax.eval_shape(m.apply, v, src, lengths, tgt)
            assert logits.shape == (3, 4, TV)
            assert (w is None) == (attention is None)
            if attention:
                assert w.shape == (3, 4, 6)


@pytest.mark.parametrize("name", list(S2S_CONFIGS))
def test_seq2seq_padding_and_attention_weights(name):
    m, v, src, lengths, tgt, f = _s2s(name)
    logits, w = f["apply"](v, _pad_garbage(src, lengths, jax.random.key(4)), lengths, tgt)
    # rows 1 and 2 (lengths 3 and 1) with the padding cut off and filled differently
    short = _pad_garbage(src[:, :3], jnp.minimum(lengths, 3), jax.random.key(6))
    logits_short, w_short = f["apply"](v, short, jnp.minimum(lengths, 3), tgt)
    np.testing.assert_allclose(logits[1:], logits_short[1:], rtol=1e-5, atol=1e-5)
    if w is None:
        return
    assert w.shape == (3, 4, 6)
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5)
    mask = np.arange(6)[None, None, :] >= np.asarray(lengths)[:, None, None]
    assert np.all(np.asarray(w)[np.broadcast_to(mask, w.shape)] == 0.0)
    np.testing.assert_allclose(w[1:, :, :3], w_short[1:], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(S2S_CONFIGS))
def test_teacher_forced_loss_equals_step_by_step_loss(name):
    m, v, src, lengths, tgt, f = _s2s(name)
    tgt_in = jnp.concatenate([jnp.full((3, 1), 2), tgt[:, :-1]], axis=1)
    logits, _ = f["apply"](v, src, lengths, tgt_in)
    total, count = S.masked_cross_entropy(logits, tgt)
    # one decoder step at a time in a Python loop
    memory, carry = f["encode"](v, src, lengths)
    loop_total = 0.0
    for t in range(tgt.shape[1]):
        carry, step_logits, _ = f["step"](f["params"], memory, carry, tgt_in[:, t])
        logp = jax.nn.log_softmax(step_logits, -1)
        loop_total -= float(jnp.sum(jnp.take_along_axis(logp, tgt[:, t : t + 1], 1)))
    np.testing.assert_allclose(float(total), loop_total, rtol=1e-5)
    assert float(count) == tgt.size


def _teacher_logits(f, v, src, lengths, toks):
    tgt_in = jnp.concatenate([jnp.full((toks.shape[0], 1), 2), toks[:, :-1]], axis=1)
    return f["apply"](v, src, lengths, tgt_in)


@pytest.mark.parametrize("name", list(S2S_CONFIGS))
def test_greedy_decode_agrees_with_teacher_forcing_and_beam_1(name):
    m, v, src, lengths, _, f = _s2s(name)
    toks, w = S.greedy_decode(m, v, src, lengths, max_len=4)
    assert toks.shape == (3, 4)
    # teacher-forcing the greedy output reproduces it as the argmax at every step
    logits, w_tf = _teacher_logits(f, v, src, lengths, toks)
    argmax = np.asarray(jnp.argmax(logits, -1))
    live = np.cumsum(np.asarray(toks) == 3, axis=1) - (np.asarray(toks) == 3) == 0
    np.testing.assert_array_equal(argmax[live], np.asarray(toks)[live])
    if w_tf is not None:
        np.testing.assert_allclose(w[live], w_tf[live], rtol=1e-5, atol=1e-6)
    beam, _ = S.beam_search(m, v, src, lengths, max_len=4, beam_size=1)
    np.testing.assert_array_equal(beam, toks)


def test_beam_scores_are_sequence_log_probabilities():
    m, v, src, lengths, _, f = _s2s("luong-rnn")
    beam, scores = S.beam_search(m, v, src, lengths, max_len=4, beam_size=TV)
    logits, _ = _teacher_logits(f, v, src, lengths, beam)
    lp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), beam[..., None], -1)[..., 0]
    live = jnp.cumsum(beam == 3, axis=1) - (beam == 3) == 0  # up to and with EOS
    np.testing.assert_allclose(scores, jnp.sum(jnp.where(live, lp, 0.0), axis=1), rtol=1e-5)


def test_exhaustive_search_on_two_steps():
    # With beam_size = vocab and two steps, the first step keeps every prefix, so the
    # result is the best of the top |V| of all |V|^2 continuations (EOS then PAD is a
    # finished hypothesis; finished ones rank first).
    m, v, src, lengths, _, f = _s2s("bahdanau-lstm-2")
    beam, _ = S.beam_search(m, v, src, lengths, max_len=2, beam_size=TV)
    # score all TV*TV two-symbol sequences of every source by teacher forcing
    first = jnp.repeat(jnp.arange(TV), TV)
    second = jnp.tile(jnp.arange(TV), TV)
    pairs = jnp.stack([first, second], axis=1)
    for b in range(3):
        src_b = jnp.repeat(src[b : b + 1], TV * TV, axis=0)
        len_b = jnp.repeat(lengths[b : b + 1], TV * TV)
        logits, _ = _teacher_logits(f, v, src_b, len_b, pairs)
        lp = np.asarray(jax.nn.log_softmax(logits, -1))
        cands = {}
        for i, (a, c) in enumerate(np.asarray(pairs).tolist()):
            if a == 3:
                cands[(3, 0)] = (lp[i, 0, 3], True)
            else:
                cands[(a, c)] = (lp[i, 0, a] + lp[i, 1, c], c == 3)
        kept = sorted(cands.items(), key=lambda kv: -kv[1][0])[:TV]
        best = max(kept, key=lambda kv: (kv[1][1], kv[1][0]))[0]
        assert tuple(np.asarray(beam[b]).tolist()) == best


# ---------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------


def test_errors_name_the_argument(key):
    m = S.SequenceClassifier(V, 3, embed_dim=4, hidden_size=5)
    x = _tokens(key)
    # the checks run before any computation, so init (which runs __call__) reports them
    with pytest.raises(TypeError, match="tokens: expected integer ids"):
        m.init(key, x.astype(jnp.float32))
    with pytest.raises(ValueError, match=r"tokens: expected a 2-D \(batch, time\)"):
        m.init(key, x[0])
    with pytest.raises(ValueError, match=r"lengths: expected shape \(3,\)"):
        m.init(key, x, jnp.array([1, 2]))
    with pytest.raises(ValueError, match="lengths: expected values in 1..6"):
        m.init(key, x, jnp.array([0, 2, 7]))
    with pytest.raises(ValueError, match="cell: expected one of"):
        S.SequenceClassifier(V, 3, cell="transformer")
    with pytest.raises(ValueError, match="pooling: expected one of"):
        S.SequenceClassifier(V, 3, pooling="attention")
    with pytest.raises(ValueError, match="attention: expected one of"):
        S.Seq2Seq(V, TV, attention="dot")
    s2s, sv, src, lengths, _, _ = _s2s("plain-gru")
    with pytest.raises(ValueError, match=r"beam_size: expected an int in 1..7"):
        S.beam_search(s2s, sv, src, lengths, 4, beam_size=8)
    with pytest.raises(ValueError, match="max_len: expected a positive int"):
        S.greedy_decode(s2s, sv, src, lengths, 0)
    lm, lv, _ = _lm()
    with pytest.raises(ValueError, match="top_k: expected 1..11"):
        S.generate(lm, lv, x, 3, key, top_k=0)
    with pytest.raises(TypeError, match="model: expected a LanguageModel"):
        S.generate(m, lv, x, 3, key)
    with pytest.raises(ValueError, match="targets: expected shape"):
        S.masked_cross_entropy(jnp.zeros((2, 3, 4)), jnp.zeros((2, 4), jnp.int32))
