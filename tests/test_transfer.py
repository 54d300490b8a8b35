"""jaxnets.transfer: path patterns against an independent matcher, groups, pretrained loading and
its errors, freezing (bitwise, BatchNorm statistics, no backward pass through frozen layers),
per-group learning rates against closed forms, gradual unfreezing."""

import fnmatch

import flax.linen as nn
import flax.traverse_util
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxnets import data, models, train, transfer
from jaxnets.models import VGG

# --- helpers ---------------------------------------------------------------------------------


def _vgg(classes: int = 3, cfg=(4, "M", 8)) -> VGG:
    return VGG(cfg=cfg, batch_norm=True, head="small", num_classes=classes, dropout=0.0)


def _images(n=16, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 8, 8, 1)).astype(np.float32)
    return {"x": x, "y": rng.integers(0, classes, n).astype(np.int32)}


GROUPS = transfer.ParamGroups(stage1="features/stage1", stage2="features/stage2/**", head="head")


def _copy(tree):
    return jax.tree.map(np.array, tree)


def _is_conv(eqn) -> bool:
    """XLA's convolution, or one of the oneDNN convolution calls (jaxnets.ops.onednn)."""
    if eqn.primitive.name == "ffi_call":
        return str(eqn.params.get("target_name", "")).startswith("jaxnets_onednn_conv")
    return eqn.primitive.name == "conv_general_dilated"


def _conv_count(jaxpr) -> int:
    """Convolution equations in a jaxpr (XLA's or oneDNN's), sub-jaxprs (pjit, custom_vjp,
    ...) included."""
    n = sum(_is_conv(eqn) for eqn in jaxpr.eqns)
    return n + sum(_conv_count(sub) for sub in jax.extend.core.subjaxprs(jaxpr))


# --- patterns --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pattern, path, want",
    [
        ("features/**", "features/stage1/conv0/kernel", True),
        ("features/**", "featuresX/stage1/kernel", False),
        ("features", "features/stage1/conv0/kernel", True),  # an ancestor matches
        ("head/*", "head/logits/kernel", True),
        ("head/*", "heads/logits/kernel", False),
        ("**/kernel", "kernel", True),
        ("**/kernel", "a/b/kernel", True),
        ("**/kernel", "a/kernel2", False),
        ("**/bn*", "features/stage1/bn0/scale", True),
        ("**/bn*", "features/stage1/conv0/bias", False),
        ("a/**/k", "a/k", True),
        ("a/**/k", "a/x/y/k", True),
        ("a/**/k", "b/x/k", False),
        ("stage?/conv[01]", "stage2/conv1/kernel", True),
        ("stage?/conv[!01]", "stage2/conv1/kernel", False),
        ("re:features/stage[12]", "features/stage2/conv0/kernel", True),
        ("re:features/stage[12]", "features/stage3/conv0/kernel", False),
        ("re:.*/bias", "head/logits/bias", True),
    ],
)
def test_matches_examples(pattern, path, want):
    assert transfer.matches(path, pattern) is want


def _reference_match(pattern_segs: list[str], path_segs: list[str]) -> bool:
    """Independent glob matcher: fnmatch per segment, '**' tried at every split point."""
    if not pattern_segs:
        return not path_segs
    head, rest = pattern_segs[0], pattern_segs[1:]
    if head == "**":
        return any(_reference_match(rest, path_segs[i:]) for i in range(len(path_segs) + 1))
    return (
        bool(path_segs)
        and fnmatch.fnmatchcase(path_segs[0], head)
        and _reference_match(rest, path_segs[1:])
    )


_seg = st.text(alphabet="ab", min_size=1, max_size=3)
_pat_seg = st.one_of(_seg, st.just("*"), st.just("**"), st.just("a*"), st.just("?b"))


@settings(max_examples=300, deadline=None)
@given(st.lists(_pat_seg, min_size=1, max_size=4), st.lists(_seg, min_size=1, max_size=4))
def test_glob_agrees_with_reference_matcher(pattern_segs, path_segs):
    pred = transfer.compile_pattern("/".join(pattern_segs))
    assert pred("/".join(path_segs)) == _reference_match(pattern_segs, path_segs)


@pytest.mark.parametrize(
    "bad, err", [("", TypeError), ("a//b", ValueError), ("a**/b", ValueError), ("re:(", ValueError)]
)
def test_bad_patterns_raise(bad, err):
    with pytest.raises(err, match="pattern"):
        transfer.compile_pattern(bad)


# --- groups ----------------------------------------------------------------------------------


def test_groups_counts_table_and_first_match_wins(key):
    v = _vgg().init(key, jnp.zeros((1, 8, 8, 1)))
    # By hand: stage1 conv 3*3*1*4 + 4, BN 4 + 4; stage2 conv 3*3*4*8 + 8, BN 8 + 8; head 8*3 + 3.
    want = {"stage1": 36 + 4 + 8, "stage2": 288 + 8 + 16, "head": 24 + 3}
    rows = {r["group"]: r for r in GROUPS.summary(v)}
    assert {g: rows[g]["params"] for g in want} == want
    assert sum(want.values()) == train.count_params(v["params"])

    g = transfer.ParamGroups({"bn": "**/bn*", "backbone": "features", "head": "head/*"})
    labels = transfer.flatten_paths(g.labels(v))
    assert labels["features/stage1/bn0/scale"] == "bn"  # first match wins over "features"
    assert labels["features/stage1/conv0/kernel"] == "backbone"
    assert labels["head/logits/kernel"] == "head"

    partial = transfer.ParamGroups(backbone="features/**")
    table = partial.table(v)
    assert "(unmatched)" in table and "head/logits/kernel" in table and "27" in table
    with pytest.raises(ValueError, match="head/logits/bias"):
        partial.labels(v)
    assert set(jax.tree.leaves(partial.labels(v, default="rest"))) == {"backbone", "rest"}
    assert transfer.flatten_paths(partial.mask(v, ["backbone"]))["head/logits/kernel"] is False
    with pytest.raises(ValueError, match="unknown group"):
        partial.mask(v, ["nope"])


# --- loading pretrained weights --------------------------------------------------------------


def _trained_source(tmp_path, key, classes=3, steps=3):
    model = _vgg(classes)
    trainer = train.Trainer(model, train.cross_entropy_loss, optax.adam(1e-2))
    batches = data.Batches(_images(classes=classes), 8, seed=0)
    state = trainer.init(key, batches(0))
    res = trainer.fit(
        state, batches, steps, run_dir=tmp_path / "src", checkpoint_every=2, progress=False
    )
    return res.state


def test_checkpoint_roundtrip_and_head_reinit(tmp_path, key):
    src = _trained_source(tmp_path, key)
    loaded = transfer.load_checkpoint(tmp_path / "src")
    assert train.tree_equal(_copy(loaded["params"]), _copy(src.params))
    assert train.tree_equal(_copy(loaded["batch_stats"]), _copy(src.batch_stats))
    assert transfer.load_checkpoint(tmp_path / "src" / "checkpoints", step=2)["params"] is not None

    target = _vgg(5).init(jax.random.key(7), jnp.zeros((1, 8, 8, 1)))
    out = transfer.load_pretrained(target, loaded, keep="features/**")
    assert train.tree_equal(_copy(out["params"]["features"]), _copy(src.params["features"]))
    assert train.tree_equal(_copy(out["batch_stats"]), _copy(src.batch_stats))
    assert train.tree_equal(_copy(out["params"]["head"]), _copy(target["params"]["head"]))
    assert out["params"]["head"]["logits"]["kernel"].shape == (8, 5)
    # the moved BN statistics really are the trained ones, not the initial (0, 1)
    assert not np.allclose(src.batch_stats["features"]["stage1"]["bn0"]["var"], 1.0)


def test_load_errors_list_every_problem(tmp_path, key):
    src = _trained_source(tmp_path, key)
    target = _vgg(5).init(key, jnp.zeros((1, 8, 8, 1)))
    with pytest.raises(ValueError) as e:
        transfer.load_pretrained(target, src, keep="**")
    msg = str(e.value)
    assert "params/head/logits/kernel: target (8, 5), pretrained (8, 3)" in msg
    assert "params/head/logits/bias: target (5,), pretrained (3,)" in msg
    assert "leave it out of keep" in msg

    deeper = _vgg(3, cfg=(4, "M", 8, 8)).init(key, jnp.zeros((1, 8, 8, 1)))
    with pytest.raises(ValueError, match="missing in pretrained: .*stage2/conv1/kernel"):
        transfer.load_pretrained(deeper, src)
    shallower = _vgg(3, cfg=(4, "M")).init(key, jnp.zeros((1, 8, 8, 1)))
    with pytest.raises(ValueError, match="unexpected .*stage2/conv0/kernel"):
        transfer.load_pretrained(shallower, src)
    with pytest.raises(ValueError, match="selects no variable"):
        transfer.load_pretrained(target, src, keep="backbone/**")
    with pytest.raises(TypeError, match="variables dict"):
        transfer.load_pretrained(target["params"], src)
    with pytest.raises(FileNotFoundError):
        transfer.load_checkpoint(tmp_path / "nothing")


def test_from_torchvision_keeps_backbone_for_new_class_count(key):
    x = jnp.zeros((1, 8, 8, 3))
    for source_model in (VGG(cfg=(4, "M", 8, "M"), num_classes=10, batch_norm=True, head="small",
                             dropout=0.0), models.cifar_resnet(8, 10, width=4)):  # fmt: skip
        src = source_model.init(jax.random.key(3), x)
        state_dict = models.to_torchvision_state_dict(source_model, src)  # torchvision names
        target_model = source_model.clone(num_classes=4)
        target = target_model.init(key, x)
        pre = transfer.from_torchvision(target_model, state_dict)
        assert pre["params"]["head"]["logits"]["kernel"].shape[-1] == 10
        out = transfer.load_pretrained(target, pre, keep="features/**")
        assert train.tree_equal(_copy(out["params"]["features"]), _copy(src["params"]["features"]))
        assert train.tree_equal(_copy(out["params"]["head"]), _copy(target["params"]["head"]))
    with pytest.raises(ValueError, match="no classifier weight"):
        transfer.from_torchvision(target_model, {"conv1.weight": np.zeros((4, 3, 3, 3))})


# --- freezing --------------------------------------------------------------------------------


def _setup_state(method, key, new=("head",), opt="adamw", **cfg):
    model = _vgg()
    v = model.init(jax.random.key(11), jnp.zeros((1, 8, 8, 1)))
    setup = transfer.configure(
        transfer.TransferConfig(method, new=new, **cfg), GROUPS, v,
        optimizer=opt, learning_rate=1e-2, **({"weight_decay": 0.5} if opt == "adamw" else {}),
    )  # fmt: skip
    batches = data.Batches(_images(), 8, seed=0)
    state = setup.init_state(key, v)
    return model, setup, state, batches


@pytest.mark.parametrize("new", [("head",), ("stage2", "head")], ids=["backbone", "stage1"])
def test_freeze_keeps_params_and_bn_statistics_bitwise(key, new):
    model, setup, state, batches = _setup_state("freeze", key, new=new)
    p0, bs0 = _copy(state.params), _copy(state.batch_stats)
    trainer = setup.trainer(model, train.cross_entropy_loss)
    state = trainer.fit(state, batches, 4).state
    frozen = [g for g in ("stage1", "stage2") if g not in new]
    for g in frozen:
        stage = g  # the stage's params and running statistics, bit for bit
        assert train.tree_equal(_copy(state.params["features"][stage]), p0["features"][stage])
        assert train.tree_equal(_copy(state.batch_stats["features"][stage]), bs0["features"][stage])
    for g in new:
        where = state.params["head"] if g == "head" else state.params["features"][g]
        before = p0["head"] if g == "head" else p0["features"][g]
        assert not train.tree_equal(_copy(where), before)
    if "stage2" in new:  # a trained BN layer does update its statistics
        assert not train.tree_equal(_copy(state.batch_stats["features"]["stage2"]),
                                    bs0["features"]["stage2"])  # fmt: skip
    # frozen groups carry no optimizer state (set_to_zero), the trained ones Adam's 2 moments
    n_train = sum(train.count_params(state.params["head"] if g == "head" else
                                     state.params["features"][g]) for g in new)  # fmt: skip
    assert 2 * n_train <= train.count_params(state.opt_state) <= 2 * n_train + 8


def test_frozen_batchnorm_normalises_with_running_statistics(key):
    model, setup, state, batches = _setup_state("freeze", key)
    # make the running statistics differ from any batch's
    stats = jax.tree.map(lambda a: a + 0.5, state.batch_stats)
    variables = {"params": state.params, "batch_stats": stats}
    x = batches(0)["x"]
    eval_logits = model.apply(variables, x, train=False)
    train_logits, upd = model.apply(
        variables, {"x": x}, True, method=setup.forward, mutable=["batch_stats"]
    )
    np.testing.assert_array_equal(train_logits, eval_logits)
    assert train.tree_equal(_copy(upd["batch_stats"]), _copy(stats))
    plain, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
    assert not np.allclose(plain, eval_logits, atol=1e-3)  # the check above can fail
    # freeze_bn=False: frozen layers normalise with batch statistics
    no_bn = transfer.configure(transfer.TransferConfig("freeze", freeze_bn=False), GROUPS, state)
    assert no_bn.forward is None


def test_frozen_layers_get_no_backward_pass(key):
    """The frozen step's program holds only the 2 forward convolutions; the full step adds at
    least the input gradient of the second conv (and the kernel gradients, as convolutions or,
    with jaxnets.ops' CPU path, matrix products); set_to_zero alone keeps them all."""
    model, setup, state, batches = _setup_state("freeze", key, opt="adam")
    batch = batches(0)

    def convs(tx, trainable, forward):
        step = train.make_train_step(model, train.cross_entropy_loss, tx, trainable=trainable,
                                     forward=forward, jit=False)  # fmt: skip
        st = state.replace(opt_state=tx.init(state.params))
        return _conv_count(jax.make_jaxpr(step)(st, batch).jaxpr)

    assert convs(setup.tx, setup.trainable, setup.forward) == 2
    full = convs(optax.adam(1e-2), None, None)
    assert full > 2
    assert convs(setup.tx, None, None) == full  # the optimizer mask alone still differentiates


def test_flax_batchnorm_supported_when_mode_is_a_call_argument(key):
    class Net(nn.Module):
        fixed: bool = False

        @nn.compact
        def __call__(self, x, train: bool = False):
            h = nn.Dense(4, name="body")(x)
            if self.fixed:
                h = nn.BatchNorm(use_running_average=not train, name="bn")(h)
            else:
                h = nn.BatchNorm(name="bn")(h, use_running_average=not train)
            return nn.Dense(2, name="head")(h)

    x = jax.random.normal(key, (6, 3))
    groups = transfer.ParamGroups(body=("body", "bn"), head="head")
    for fixed in (False, True):
        net = Net(fixed)
        v = net.init(key, x)
        setup = transfer.configure(transfer.TransferConfig("freeze"), groups, v)
        if fixed:
            with pytest.raises(TypeError, match="use_running_average at construction"):
                net.apply(v, {"x": x}, True, method=setup.forward, mutable=["batch_stats"])
        else:
            out, upd = net.apply(v, {"x": x}, True, method=setup.forward, mutable=["batch_stats"])
            np.testing.assert_array_equal(out, net.apply(v, x))
            assert train.tree_equal(_copy(upd["batch_stats"]), _copy(v["batch_stats"]))


# --- per-group learning rates ----------------------------------------------------------------


class TwoLayer(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        h = jnp.tanh(nn.Dense(6, param_dtype=jnp.float64, name="body")(x))
        return nn.Dense(3, param_dtype=jnp.float64, name="head")(h)


def test_sgd_updates_differ_exactly_by_the_factor(key):
    """SGD: delta_g = -lr * f_g * grad_g, with grad from jax.grad (float64)."""
    with jax.enable_x64(True):
        model = TwoLayer()
        batch = {"x": np.random.default_rng(0).standard_normal((10, 4)),
                 "y": np.arange(10, dtype=np.int32) % 3}  # fmt: skip
        v = model.init(key, batch["x"])
        groups = transfer.ParamGroups(body="body", head="head")
        cfg = transfer.TransferConfig("per_group_lr", lr_factor=0.25)
        setup = transfer.configure(cfg, groups, v, optimizer="sgd", learning_rate=0.5, momentum=0)
        assert setup.learning_rates == {"body": 0.125, "head": 0.5}
        state = setup.init_state(key, v)
        p0 = _copy(state.params)
        grads = jax.grad(
            lambda p: train.cross_entropy_loss(model.apply({"params": p}, batch["x"]), batch)[0]
        )(v["params"])
        step = setup.trainer(model, train.cross_entropy_loss).steps()[1]
        state, _ = step(state, batch)
        for g, lr in (("body", 0.125), ("head", 0.5)):
            for name in ("kernel", "bias"):
                delta = np.asarray(state.params[g][name]) - p0[g][name]
                np.testing.assert_allclose(delta, -lr * np.asarray(grads[g][name]),
                                           rtol=1e-9, atol=1e-15)  # fmt: skip
        ratio = (np.asarray(state.params["body"]["kernel"]) - p0["body"]["kernel"]) / (
            -np.asarray(grads["body"]["kernel"])
        )
        np.testing.assert_allclose(ratio / 0.5, 0.25, rtol=1e-9)


def test_adam_first_step_moves_each_group_by_its_rate(key):
    """Adam's first update is lr * g / (|g| + eps): every coordinate moves by ~ its group's rate."""
    model, setup, state, batches = _setup_state("per_group_lr", key, opt="adam", lr_factor=0.1)
    p0 = _copy(state.params)
    state = setup.trainer(model, train.cross_entropy_loss).fit(state, batches, 1).state
    for g, lr in (("stage1", 1e-3), ("stage2", 1e-3), ("head", 1e-2)):
        after = state.params["head"] if g == "head" else state.params["features"][g]
        before = p0["head"] if g == "head" else p0["features"][g]
        moved = np.concatenate([np.abs(np.asarray(a) - b).ravel()
                                for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before),
                                                strict=True)])  # fmt: skip
        np.testing.assert_allclose(np.max(moved), lr, rtol=1e-3)


def test_layerwise_decay_by_depth(key):
    assert transfer.layerwise_decay(["a", "b", "c"], 0.5) == {"a": 0.125, "b": 0.25, "c": 0.5}
    v = _vgg().init(key, jnp.zeros((1, 8, 8, 1)))
    setup = transfer.configure(transfer.TransferConfig("per_group_lr", layer_decay=0.5), GROUPS, v,
                               learning_rate=0.4)  # fmt: skip
    assert setup.learning_rates == {"stage1": 0.1, "stage2": 0.2, "head": 0.4}
    assert "0.1" in setup.table() and "lr" in setup.table()
    with pytest.raises(ValueError, match="decay"):
        transfer.layerwise_decay(["a"], 1.5)


def test_gradual_unfreezing_schedule_and_chaining(key, tmp_path):
    model, setup, state, batches = _setup_state("finetune", key, opt="adam", unfreeze_every=2)
    assert [(p.start, p.groups) for p in setup.phases] == [
        (0, ("head",)),
        (2, ("stage2", "head")),
        (4, ("stage1", "stage2", "head")),
    ]
    p0 = _copy(state.params)
    loss = train.cross_entropy_loss
    trace = [p0]
    s = state
    for end in (2, 3, 4, 6):  # chained fits, each continuing at s.step
        s = setup.fit(model, loss, s, batches, end).state
        trace.append(_copy(s.params))
    assert int(s.step) == 6
    feats = [t["features"] for t in trace]
    assert train.tree_equal(feats[1], feats[0])  # steps 0-1: backbone frozen
    assert train.tree_equal(feats[3]["stage1"], feats[0]["stage1"])  # stage1 frozen until 4
    assert not train.tree_equal(feats[2]["stage2"], feats[1]["stage2"])  # stage2 from step 2
    assert not train.tree_equal(feats[4]["stage1"], feats[3]["stage1"])
    # stage2's Adam starts fresh at its unfreezing: its first step moves it by ~lr exactly
    moved = max(np.max(np.abs(a - b)) for a, b in zip(jax.tree.leaves(feats[2]["stage2"]),
                                                      jax.tree.leaves(feats[1]["stage2"]),
                                                      strict=True))  # fmt: skip
    np.testing.assert_allclose(moved, 1e-2, rtol=1e-3)
    # one fit over every phase, in a run directory, gives the same bits and resumes to a no-op
    res = setup.fit(model, loss, state, batches, 6, run_dir=tmp_path / "run")
    assert train.tree_equal(_copy(res.state.params), trace[-1])
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["phase0", "phase1", "phase2"]
    again = setup.fit(model, loss, state, batches, 6, run_dir=tmp_path / "run")
    assert train.tree_equal(_copy(again.state.params), trace[-1])


def test_configure_errors(key):
    v = _vgg().init(key, jnp.zeros((1, 8, 8, 1)))
    with pytest.raises(ValueError, match="method"):
        transfer.TransferConfig("transfer")
    with pytest.raises(ValueError, match="unfreeze_every"):
        transfer.TransferConfig("freeze", unfreeze_every=10)
    with pytest.raises(ValueError, match="lr_factor"):
        transfer.TransferConfig("per_group_lr", lr_factor=0.0)
    with pytest.raises(ValueError, match=r"\['body'\]"):
        transfer.configure(transfer.TransferConfig(new=("body",)), GROUPS, v)
    with pytest.raises(ValueError, match="at least one new group"):
        transfer.configure(transfer.TransferConfig("freeze", new=()), GROUPS, v)
    with pytest.raises(ValueError, match="match no group"):
        transfer.configure(transfer.TransferConfig(), transfer.ParamGroups(head="head"), v)
    with pytest.raises(ValueError, match="no learning rate"):
        transfer.group_optimizer({"a": "x"}, {"y": 1.0})
    setup = transfer.configure(transfer.TransferConfig("freeze"), GROUPS, v)
    other = _vgg(5).init(key, jnp.zeros((1, 8, 8, 1)))
    with pytest.raises(ValueError, match=r"params/head/logits/bias has shape \(5,\)"):
        setup.init_state(key, other)


# --- many small fits: fit_members ------------------------------------------------------------


@pytest.mark.parametrize(
    "method, cfg, opt",
    [("per_group_lr", {"unfreeze_every": 2}, "sgd"), ("per_group_lr", {"unfreeze_every": 2}, "adam"),
     ("freeze", {}, "adam")],
    ids=["per_group_lr+gradual-sgd", "per_group_lr+gradual-adam", "freeze-adam"],
)  # fmt: skip
def test_fit_members_equals_separate_runs_at_each_rate(key, method, cfg, opt):
    """Each member ends where an ordinary setup.fit at its own learning rate ends (reference:
    the setup configured at that rate, so no rate trick), on its own data and batches.

    With Adam the conv biases in front of a training BatchNorm are left out: BN removes them,
    so their gradient is float32 rounding noise that Adam normalises into +-lr steps (and so
    the running mean after them); every other parameter and statistic must agree."""
    model = _vgg()
    rates, steps = (1e-2, 3e-3), 6
    inits = [model.init(jax.random.key(20 + m), jnp.zeros((1, 8, 8, 1))) for m in range(2)]
    sets = [_images(12, seed=m) for m in range(2)]
    orders = [data.Batches({"i": np.arange(12)}, 4, seed=m) for m in range(2)]
    index = np.stack([[o.batch_at(k)["i"] for o in orders] for k in range(steps)])
    tc = transfer.TransferConfig(method, new=("stage2", "head"), **cfg)
    unit = transfer.configure(tc, GROUPS, inits[0], optimizer=opt, learning_rate=1.0)
    evals = {"a": sets[0], "b": _images(7, seed=5)}

    def noisy(path):  # conv bias before a BatchNorm in training mode, and what it shifts
        return opt == "adam" and (path.endswith("conv0/bias") or path.endswith("bn0/mean"))

    res = transfer.fit_members(
        unit, model, jax.tree.map(lambda *a: np.stack(a), *inits),
        np.stack([s["x"] for s in sets]), np.stack([s["y"] for s in sets]), index,
        np.array(rates), key=key, eval_sets=evals, eval_every=3, snapshots=True,
    )  # fmt: skip
    assert res.eval_steps == (3, 6) and res.accuracy["b"].shape == (2, 2)
    for m in range(2):
        ref = transfer.configure(tc, GROUPS, inits[m], optimizer=opt, learning_rate=rates[m])
        batches = lambda k, m=m: {kk: v[orders[m].batch_at(k)["i"]] for kk, v in sets[m].items()}  # noqa: E731
        state = ref.init_state(key, inits[m])
        for end in (3, 6):
            state = ref.fit(model, train.cross_entropy_loss, state, batches, end,
                            progress=False).state  # fmt: skip
            e = end // 3 - 1
            got = transfer.member(res.snapshots[e], m)
            # a wrong rate or phase would move parameters by ~lr = 1e-2 / 3e-3 per step
            want_flat = transfer.flatten_paths(state.variables)
            for path, a in transfer.flatten_paths(got).items():
                if not noisy(path):
                    np.testing.assert_allclose(a, want_flat[path], rtol=1e-4, atol=1e-6,
                                               err_msg=path)  # fmt: skip
            for name, d in evals.items():  # accuracy: argmax of the snapshot's logits
                logits = model.apply(got, d["x"], train=False)
                want = float(np.mean(np.argmax(logits, -1) == d["y"]))
                np.testing.assert_allclose(res.accuracy[name][e, m], want)
        final = transfer.member(res.state, m)
        assert train.tree_equal(final.params, got["params"])


def test_fit_members_errors(key):
    model = _vgg()
    v = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
    stacked = jax.tree.map(lambda a: np.stack([a, a]), v)
    x, y = np.zeros((2, 4, 8, 8, 1), np.float32), np.zeros((2, 4), np.int32)
    index = np.zeros((4, 2, 2), np.int32)
    tc = transfer.TransferConfig("finetune")
    unit = transfer.configure(tc, GROUPS, v, learning_rate=1.0)
    args = dict(key=key, eval_sets={}, eval_every=2)
    slow = transfer.configure(tc, GROUPS, v, learning_rate=1e-3)
    with pytest.raises(ValueError, match="learning_rate=1.0"):
        transfer.fit_members(slow, model, stacked, x, y, index, np.ones(2), **args)
    with pytest.raises(ValueError, match=r"learning_rates must be \(2,\)"):
        transfer.fit_members(unit, model, stacked, x, y, index, np.ones(3), **args)
    with pytest.raises(ValueError, match=r"batch_index must lie in \[0, 4\)"):
        transfer.fit_members(unit, model, stacked, x, y, index + 4, np.ones(2), **args)
    with pytest.raises(ValueError, match="batch_index must be ints"):
        transfer.fit_members(unit, model, stacked, x, y, index[0], np.ones(2), **args)
    with pytest.raises(ValueError, match="train_x"):
        transfer.fit_members(unit, model, stacked, x[:1], y, index, np.ones(2), **args)
    with pytest.raises(ValueError, match="leading member axis of 2"):
        transfer.fit_members(unit, model, v, x, y, index, np.ones(2), **args)
    with pytest.raises(ValueError, match=r"divide num_steps \(4\), got 3"):
        transfer.fit_members(unit, model, stacked, x, y, index, np.ones(2),
                             **{**args, "eval_every": 3})  # fmt: skip


def test_fit_members_recalibrated_bn_scores_with_each_training_sets_statistics(key):
    """recalibrate_bn=True: training is the plain run's (parameters bitwise equal); each
    snapshot's trained BatchNorm layers hold the mean and unbiased variance of their input
    over the member's whole training set, read here through the layer's own running update
    (zero statistics, momentum 0.1, one full-set batch, the freeze forward); the frozen
    layers keep the initial statistics bitwise; the accuracies are those snapshots'."""
    model = _vgg()
    inits = [model.init(jax.random.key(30 + m), jnp.zeros((1, 8, 8, 1))) for m in range(2)]
    sets = [_images(12, seed=m) for m in range(2)]
    index = np.stack([np.stack([np.arange(4) + 4 * (k % 3)] * 2) for k in range(6)])
    tc = transfer.TransferConfig("freeze", new=("stage2", "head"))
    unit = transfer.configure(tc, GROUPS, inits[0], optimizer="adam", learning_rate=1.0)
    evals = {"a": _images(7, seed=5)}
    args = (unit, model, jax.tree.map(lambda *a: np.stack(a), *inits),
            np.stack([s["x"] for s in sets]), np.stack([s["y"] for s in sets]), index,
            np.array([1e-2, 3e-3]))  # fmt: skip
    kw = dict(key=key, eval_sets=evals, eval_every=3, snapshots=True)
    plain = transfer.fit_members(*args, **kw)
    recal = transfer.fit_members(*args, **kw, recalibrate_bn=True)
    forward = unit.phases[0].forward
    for e in range(2):
        for m in range(2):
            got = transfer.member(recal.snapshots[e], m)
            ref = transfer.member(plain.snapshots[e], m)
            for a, b in zip(jax.tree.leaves(got["params"]), jax.tree.leaves(ref["params"]),
                            strict=True):  # fmt: skip
                np.testing.assert_array_equal(a, b)
            zero = {  # the trained layers' statistics zeroed, the frozen ones' kept
                k: jax.tree.map(np.zeros_like, v) if "stage2" in k else v
                for k, v in transfer.flatten_paths(ref["batch_stats"]).items()
            }
            zero = flax.traverse_util.unflatten_dict(
                {tuple(k.split("/")): v for k, v in zero.items()}
            )
            _, upd = model.apply({"params": ref["params"], "batch_stats": zero}, sets[m], True,
                                 mutable=["batch_stats"], method=forward)  # fmt: skip
            want = transfer.flatten_paths(upd["batch_stats"])
            init_stats = transfer.flatten_paths(inits[m]["batch_stats"])
            checked = 0
            for path, a in transfer.flatten_paths(got["batch_stats"]).items():
                if "stage1" in path:  # frozen: inference mode, untouched
                    np.testing.assert_array_equal(a, init_stats[path], err_msg=path)
                else:
                    np.testing.assert_allclose(a, want[path] / 0.1, rtol=1e-4, atol=1e-6,
                                               err_msg=path)  # fmt: skip
                    checked += 1
            assert checked == 2  # stage2's BatchNorm: mean and var
            logits = model.apply(got, evals["a"]["x"], train=False)
            want_acc = float(np.mean(np.argmax(logits, -1) == evals["a"]["y"]))
            np.testing.assert_allclose(recal.accuracy["a"][e, m], want_acc)
