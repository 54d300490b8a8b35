"""Train state, jit-compiled train/eval steps, the training loop, checkpoints.

The pieces, from the bottom up:

- `TrainState`: a plain pytree ``(params, batch_stats, opt_state, step, rng)``.
- `make_train_step` / `make_eval_step`: pure ``step(state, batch) -> (state, metrics)``
  functions, jitted with the state donated. A model is a Flax module plus an optional
  ``forward(module, batch, train) -> outputs`` (default: ``module(batch["x"], train=...)``);
  a loss is ``loss_fn(outputs, batch) -> (scalar, {name: scalar})``.
- `Trainer`: holds (model, loss, optimizer, forward, trainable) and runs `Trainer.fit`, the
  loop: progress bar, metrics.jsonl, periodic eval, orbax checkpoints, resume, NaN stop,
  data parallelism over ``devices``.

Batches are dicts of arrays with the batch on the leading axis (``{"x": ..., "y": ...}``
and optionally ``"mask"``). The loop asks for them by step, ``batch_fn(step) -> batch``, so
the batch of step k is the same whether the run was interrupted or not: resuming from a
checkpoint reproduces the uninterrupted run bit for bit. `jaxnets.data.Batches` is such a
function over in-memory arrays (a seeded permutation per epoch); `jaxnets.data.eval_batches`
gives padded eval batches with a ``mask`` that the losses and `evaluate` weight by.

Randomness: ``state.rng`` is fixed for the run; the dropout key of step k is
``fold_in(rng, k)``, so it too depends only on the step.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from fractions import Fraction
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct, traverse_util
from jaxtyping import Array, Float, Int

from jaxnets import distributed
from jaxnets.runs import RunDir

__all__ = [
    "TrainState",
    "Trainer",
    "FitResult",
    "NonFiniteError",
    "init_state",
    "make_train_step",
    "make_eval_step",
    "evaluate",
    "recalibrate_batch_stats",
    "make_optimizer",
    "per_member",
    "he_schedule",
    "cross_entropy",
    "masked_cross_entropy",
    "cross_entropy_loss",
    "mse_loss",
    "trainable_mask",
    "key_path_str",
    "read_checkpoint",
    "data_mesh",
    "TIMING_KEYS",
    "LoopSettings",
    "strip_timing",
    "tree_equal",
    "count_params",
]

Batch = Mapping[str, Any]
LossFn = Callable[[Any, Batch], tuple[Array, dict]]
Forward = Callable[..., Any]

# Record keys that measure wall-clock time: excluded when comparing runs for determinism.
TIMING_KEYS = ("steps_per_sec", "examples_per_sec", "wall_time")


class NonFiniteError(FloatingPointError):
    """Loss or gradients became NaN/Inf. The state in hand and on disk is the last good one.

    Attributes: ``step`` (the 0-based step whose update was rejected), ``metrics`` (that
    step's metrics), ``checkpoint_step`` (latest checkpoint on disk, or None).
    """

    def __init__(self, step: int, metrics: dict, checkpoint_step: int | None):
        self.step = step
        self.metrics = metrics
        self.checkpoint_step = checkpoint_step
        where = (
            f"the last good checkpoint is step {checkpoint_step}"
            if checkpoint_step is not None
            else "no checkpoint was saved yet"
        )
        super().__init__(
            f"non-finite loss or gradient at step {step} "
            f"(loss={metrics.get('loss')}, grad_norm={metrics.get('grad_norm')}); "
            f"training stopped, the update was not applied and {where}. "
            f"Try a smaller learning rate or gradient clipping (clip_norm)."
        )


@struct.dataclass
class TrainState:
    """Everything a run needs to continue, as one pytree (checkpointed whole).

    params: model parameters; batch_stats: BatchNorm running statistics (``{}`` if none);
    opt_state: optax state; step: int32 scalar, number of updates applied;
    rng: uint32[2] raw key data, fixed for the run (step k uses ``fold_in(rng, k)``).
    """

    params: Any
    batch_stats: Any
    opt_state: Any
    step: Int[Array, ""]
    rng: Any

    @property
    def variables(self) -> dict:
        """Flax variables dict for ``module.apply``."""
        if self.batch_stats:
            return {"params": self.params, "batch_stats": self.batch_stats}
        return {"params": self.params}


# --- model adapters --------------------------------------------------------------------------


def default_forward(module: nn.Module, batch: Batch, train: bool):
    """``module(batch["x"], train=train)``, or ``deterministic=not train``, or neither.

    Which keyword is passed is read from the module's ``__call__`` signature, so CNNs with
    ``train`` and recurrent layers with ``deterministic`` both work without an adapter.
    """
    params = inspect.signature(type(module).__call__).parameters
    if "train" in params:
        return module(batch["x"], train=train)
    if "deterministic" in params:
        return module(batch["x"], deterministic=not train)
    return module(batch["x"])


def _applier(model, forward: Forward | None):
    """``apply(variables, batch, train, rngs, mutable) -> outputs | (outputs, updates)``."""
    if isinstance(model, nn.Module):
        fwd = forward or default_forward

        def apply(variables, batch, train, rngs, mutable):
            return model.apply(variables, batch, train, rngs=rngs, mutable=mutable, method=fwd)

        return apply
    if callable(model):
        if forward is not None:
            raise ValueError(
                "forward= is only for Flax modules; a plain apply_fn is its own forward"
            )

        def apply(variables, batch, train, rngs, mutable):
            out = model(variables, batch, train=train, rngs=rngs)
            return (out, {}) if mutable else out

        return apply
    raise TypeError(f"model must be a flax.linen.Module or apply_fn callable, got {type(model)}")


def init_state(
    model: nn.Module | Callable,
    tx: optax.GradientTransformation,
    key: jax.Array,
    batch: Batch,
    *,
    forward: Forward | None = None,
    params: Any = None,
) -> TrainState:
    """Initial `TrainState`: ``model.init`` on ``batch`` (a Flax module), or the given
    ``params`` (a plain ``apply_fn(variables, batch, *, train, rngs)`` model).

    ``key`` may be a typed key or raw uint32 key data; it is split into the init key and the
    run's fixed ``rng``.
    """
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    k_init, k_drop, k_run = jax.random.split(key, 3)
    if isinstance(model, nn.Module):
        variables = model.init(
            {"params": k_init, "dropout": k_drop}, batch, False, method=forward or default_forward
        )
        variables = dict(variables)
        params = variables.pop("params")
        batch_stats = variables.pop("batch_stats", {})
    else:
        if params is None:
            raise ValueError("init_state with a plain apply_fn needs params=")
        batch_stats = {}
    return TrainState(
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        step=jnp.zeros((), jnp.int32),
        rng=k_run,
    )


# --- trainable partition ---------------------------------------------------------------------


def key_path_str(path) -> str:
    """A pytree key path as the "/"-joined string that ``trainable=`` callables and
    `jaxnets.transfer` patterns match, e.g. ``"backbone/conv1/kernel"``."""
    parts = []
    for p in path:
        for attr in ("key", "name", "idx"):
            if hasattr(p, attr):
                parts.append(str(getattr(p, attr)))
                break
        else:
            parts.append(str(p))
    return "/".join(parts)


def trainable_mask(params: Any, trainable: Any) -> Any:
    """Pytree of Python bools over ``params``: which leaves are trained.

    ``trainable`` is ``None`` (everything), a pytree of bools with the structure of
    ``params`` (a prefix is fine, e.g. ``{"backbone": False, "head": True}``), or a callable
    ``path -> bool`` where path is the "/"-joined key path, e.g. ``"l0/weight_ih"``.
    """
    if trainable is None:
        return jax.tree.map(lambda _: True, params)
    if callable(trainable):
        return jax.tree_util.tree_map_with_path(
            lambda p, _: bool(trainable(key_path_str(p))), params
        )
    try:
        return jax.tree.map(lambda t, sub: jax.tree.map(lambda _: bool(t), sub), trainable, params)
    except ValueError as e:
        raise ValueError(
            f"trainable must be a pytree of bools matching (a prefix of) params: {e}"
        ) from None


# --- losses ----------------------------------------------------------------------------------


def cross_entropy(
    logits: Float[Array, "*batch classes"],
    labels: Int[Array, "*batch"],
    weights: Float[Array, "*batch"] | None = None,
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """Mean softmax cross-entropy and accuracy.

    loss = sum_i w_i (logsumexp(z_i) - z_i[y_i]) / sum_i w_i, accuracy likewise with
    1[argmax z_i == y_i]; w = 1 without ``weights`` (use a 0/1 mask for padded sequences).
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"cross_entropy: logits {logits.shape} need labels of shape {logits.shape[:-1]}, "
            f"got {labels.shape}"
        )
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"cross_entropy: labels must be integers, got {labels.dtype}")
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    if weights is None:
        return losses.mean(), correct.mean()
    if weights.shape != labels.shape:
        raise ValueError(
            f"cross_entropy: weights must have the labels' shape {labels.shape}, got {weights.shape}"
        )
    w = weights.astype(jnp.float32)
    total = jnp.maximum(w.sum(), 1e-12)
    return (losses * w).sum() / total, (correct * w).sum() / total


def masked_cross_entropy(
    logits: Float[Array, "*batch classes"], targets: Int[Array, "*batch"], mask: Array | None = None
) -> tuple[Array, Array]:
    """``(sum of -log softmax(logits)[target] over mask, number of masked-in items)``: the
    per-item loss of :func:`cross_entropy`, summed rather than averaged.

    Returning the sum and the count (not the mean) lets callers average over a whole
    data set exactly; the mean loss is ``total / count``.
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"targets: expected shape {logits.shape[:-1]} (logits without the class axis), "
            f"got {targets.shape}"
        )
    nll = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), targets.astype(jnp.int32)
    )
    if mask is None:
        return jnp.sum(nll), jnp.asarray(nll.size, jnp.float32)
    mask = mask.astype(nll.dtype)
    return jnp.sum(nll * mask), jnp.sum(mask)


def cross_entropy_loss(logits, batch: Batch) -> tuple[Array, dict]:
    """Loss for classification batches: labels ``batch["y"]``, optional ``batch["mask"]``."""
    loss, acc = cross_entropy(logits, batch["y"], batch.get("mask"))
    return loss, {"accuracy": acc}


def mse_loss(preds, batch: Batch) -> tuple[Array, dict]:
    """Mean squared error against ``batch["y"]`` (optional ``batch["mask"]`` over leading axes)."""
    y = batch["y"]
    if preds.shape != y.shape:
        raise ValueError(f"mse_loss: predictions {preds.shape} vs targets {y.shape}")
    se = jnp.square(preds.astype(jnp.float32) - y.astype(jnp.float32))
    mask = batch.get("mask")
    if mask is None:
        return se.mean(), {}
    w = mask.astype(jnp.float32).reshape(mask.shape + (1,) * (se.ndim - mask.ndim))
    w = jnp.broadcast_to(w, se.shape)
    return (se * w).sum() / jnp.maximum(w.sum(), 1e-12), {}


# --- optimizer -------------------------------------------------------------------------------


def _warmup_from_fraction(fraction: float, total_steps: int | None, cap: int) -> int:
    if total_steps is None:
        raise ValueError("make_optimizer: warmup_fraction needs total_steps")
    if not 0 <= fraction <= 1:
        raise ValueError(f"make_optimizer: warmup_fraction must be in [0, 1], got {fraction!r}")
    # exact decimal arithmetic: 0.1 * 300 is 30, not 30.000000000000004 floored by luck
    steps = math.floor(Fraction(str(fraction)) * int(total_steps))
    return min(steps, cap) if cap else steps


def make_optimizer(
    name: str = "adam",
    learning_rate: float | optax.Schedule = 1e-3,
    *,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    clip_norm: float | None = None,
    warmup_steps: int = 0,
    total_steps: int | None = None,
    schedule: str = "constant",
    warmup_fraction: float | None = None,
) -> optax.GradientTransformation:
    """An optax optimizer: optional global-norm clipping first, then adam/adamw/sgd.

    ``weight_decay``: for "adamw" the decoupled decay of ``optax.adamw``; for "adam" and
    "sgd" an L2 term ``weight_decay * param`` added to the gradient before the update, as
    ``torch.optim.Adam`` / ``SGD`` do with their ``weight_decay``.

    ``schedule``: "constant" or "cosine" (needs ``total_steps``), with ``warmup_steps`` of
    linear warm-up; or pass an optax schedule as ``learning_rate``. ``warmup_fraction``
    (needs ``total_steps``): warm up for floor(warmup_fraction * total_steps) steps instead,
    at most ``warmup_steps`` when that is given too (``warmup_fraction=0.1,
    warmup_steps=200`` is min(200, total_steps // 10)).
    """
    if weight_decay < 0:
        raise ValueError(f"make_optimizer: weight_decay must be >= 0, got {weight_decay!r}")
    if warmup_fraction is not None:
        warmup_steps = _warmup_from_fraction(warmup_fraction, total_steps, warmup_steps)
    lr = learning_rate
    if not callable(lr):
        if schedule == "cosine":
            if total_steps is None:
                raise ValueError("make_optimizer: schedule='cosine' needs total_steps")
            if warmup_steps:
                lr = optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps, total_steps)
            else:
                lr = optax.cosine_decay_schedule(lr, total_steps)
        elif schedule == "constant":
            if warmup_steps:
                lr = optax.join_schedules(
                    [optax.linear_schedule(0.0, lr, warmup_steps), optax.constant_schedule(lr)],
                    [warmup_steps],
                )
        else:
            raise ValueError(
                f"make_optimizer: schedule must be 'constant' or 'cosine', got {schedule!r}"
            )
    if name == "adam":
        opt = optax.adam(lr)
    elif name == "adamw":
        opt = optax.adamw(lr, weight_decay=weight_decay)
    elif name == "sgd":
        opt = optax.sgd(lr, momentum=momentum or None)
    else:
        raise ValueError(f"make_optimizer: name must be adam, adamw or sgd, got {name!r}")
    if weight_decay and name in ("adam", "sgd"):
        opt = optax.chain(optax.add_decayed_weights(weight_decay), opt)
    if clip_norm is not None:
        opt = optax.chain(optax.clip_by_global_norm(clip_norm), opt)
    return opt


def per_member(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """``tx`` for an ensemble whose parameters are stacked on a leading member axis
    (`jaxnets.models.small.Ensemble`): each member gets its own copy of ``tx``
    (``jax.vmap`` of its init and update over axis 0), so a transformation that is not
    elementwise, such as ``clip_by_global_norm``, sees one member's gradient only and every
    member follows exactly the run it would have alone.
    """

    def init(params):
        return jax.vmap(tx.init)(params)

    def update(updates, state, params=None):
        if params is None:
            return jax.vmap(lambda u, s: tx.update(u, s))(updates, state)
        return jax.vmap(tx.update)(updates, state, params)

    return optax.GradientTransformation(init, update)


# --- steps -----------------------------------------------------------------------------------


def he_schedule(lr: float, milestones: tuple[int, ...], warmup: int = 0) -> optax.Schedule:
    """He et al. (2015)'s step schedule: ``lr``, divided by 10 at each milestone step, and
    ``lr / 10`` for the first ``warmup`` steps (their ResNet-110 warm-up). For the CIFAR-10
    recipe: ``he_schedule(0.1, (32_000, 48_000))``.
    """
    ms = tuple(milestones)
    if any(isinstance(m, bool) or not isinstance(m, int | np.integer) or m <= 0 for m in ms) or (
        list(ms) != sorted(set(ms))
    ):
        raise ValueError(
            f"he_schedule: milestones must be strictly increasing positive ints, got {ms}"
        )
    if warmup < 0 or (ms and warmup >= ms[0]):
        raise ValueError(
            f"he_schedule: warmup must be in [0, first milestone {ms[0] if ms else 'inf'}), "
            f"got {warmup}"
        )
    boundaries = {int(m): 0.1 for m in ms}
    if warmup:
        return optax.piecewise_constant_schedule(lr / 10, {warmup: 10.0, **boundaries})
    return optax.piecewise_constant_schedule(lr, boundaries)


def data_mesh(devices: int) -> jax.sharding.Mesh:
    """1-D mesh over the first ``devices`` devices with axis name ``"data"``.

    In a multi-process run (`jaxnets.distributed`) the mesh spans every device of every
    process (``jax.devices()`` is the global list, ordered by process), so ``devices`` must
    be ``jax.device_count()``.
    """
    available = jax.device_count()
    if jax.process_count() > 1 and devices != available:
        raise ValueError(
            f"devices={devices}: a multi-process run uses every device of every process "
            f"({jax.process_count()} processes, {available} devices); pass devices={available}"
        )
    if not 1 <= devices <= available:
        raise ValueError(
            f"devices must be in 1..{available} (jax.device_count() on "
            f"{jax.default_backend()}), got {devices}; to simulate N CPU devices set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count=N before starting Python"
        )
    return jax.make_mesh(
        (devices,),
        ("data",),
        devices=jax.devices()[:devices],
        axis_types=(jax.sharding.AxisType.Auto,),
    )


def _shardings(mesh):
    P = jax.sharding.PartitionSpec
    return (
        jax.sharding.NamedSharding(mesh, P()),
        jax.sharding.NamedSharding(mesh, P("data")),
    )


def make_train_step(
    model: nn.Module | Callable,
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    *,
    forward: Forward | None = None,
    trainable: Any = None,
    mesh: jax.sharding.Mesh | None = None,
    jit: bool = True,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """``step(state, batch) -> (state, metrics)``: one optimizer update.

    g = d loss(params, batch) / d params_trainable; u, opt_state = tx.update(g, opt_state,
    params); params += u. BatchNorm statistics are updated (``mutable=["batch_stats"]``)
    when the state has them; dropout uses ``fold_in(state.rng, state.step)``.

    Metrics (float32 scalars): ``loss``, the loss_fn's own metrics, ``grad_norm`` (before
    clipping), ``param_norm`` (after the update), ``update_norm`` and ``finite``. When loss
    or gradients are not finite the update is skipped (the state comes back unchanged) and
    ``finite`` is 0, so no non-finite state ever exists.

    ``trainable`` (see `trainable_mask`): only those leaves are differentiated; the others
    get zero gradients and are returned bitwise unchanged (even under weight decay).
    ``mesh``: jit with the state replicated and the batch split over the ``data`` axis.
    ``jit=False`` returns the pure function (e.g. to wrap it in ``chex.assert_max_traces``).
    """
    apply = _applier(model, forward)

    def step(state: TrainState, batch: Batch):
        rng = jax.random.fold_in(state.rng, state.step)
        has_bs = bool(state.batch_stats)
        mask = trainable_mask(state.params, trainable)
        leaves, treedef = jax.tree.flatten(state.params)
        mask_leaves = treedef.flatten_up_to(mask)
        train_idx = [i for i, m in enumerate(mask_leaves) if m]

        def loss_of(train_leaves):
            full = list(leaves)
            for i, leaf in zip(train_idx, train_leaves, strict=True):
                full[i] = leaf
            variables = {"params": jax.tree.unflatten(treedef, full)}
            if has_bs:
                variables["batch_stats"] = state.batch_stats
            out = apply(
                variables, batch, True, {"dropout": rng}, ["batch_stats"] if has_bs else False
            )
            outputs, updates = out if has_bs else (out, {})
            loss, metrics = loss_fn(outputs, batch)
            return loss, (metrics, updates)

        (loss, (metrics, updates)), g_train = jax.value_and_grad(loss_of, has_aux=True)(
            [leaves[i] for i in train_idx]
        )
        g_leaves = [jnp.zeros_like(leaf) for leaf in leaves]
        for i, g in zip(train_idx, g_train, strict=True):
            g_leaves[i] = g
        grads = jax.tree.unflatten(treedef, g_leaves)
        upd, opt_state = tx.update(grads, state.opt_state, state.params)
        upd_leaves = treedef.flatten_up_to(upd)
        # Frozen leaves keep their exact bits: the optimizer (e.g. weight decay) may move them.
        new_leaves = [
            optax.apply_updates(p, u) if m else p
            for p, u, m in zip(leaves, upd_leaves, mask_leaves, strict=True)
        ]
        params = jax.tree.unflatten(treedef, new_leaves)
        grad_norm = optax.tree.norm(g_train)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new_state = state.replace(
            params=params,
            batch_stats=updates.get("batch_stats", state.batch_stats) if has_bs else {},
            opt_state=opt_state,
            step=state.step + 1,
        )
        # A rejected (non-finite) update leaves the state as it was.
        new_state = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_state, state)
        out_metrics = {
            "loss": loss.astype(jnp.float32),
            **{k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()},
            "grad_norm": grad_norm,
            "param_norm": optax.tree.norm(params),
            "update_norm": optax.tree.norm(
                [u for u, m in zip(upd_leaves, mask_leaves, strict=True) if m]
            ),
            "finite": finite.astype(jnp.float32),
        }
        return new_state, out_metrics

    if not jit:
        return step
    if mesh is None:
        return jax.jit(step, donate_argnums=0)
    replicated, batch_sharded = _shardings(mesh)
    return jax.jit(
        step,
        in_shardings=(replicated, batch_sharded),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )


def make_eval_step(
    model: nn.Module | Callable,
    loss_fn: LossFn,
    *,
    forward: Forward | None = None,
    mesh: jax.sharding.Mesh | None = None,
    jit: bool = True,
) -> Callable[[TrainState, Batch], dict]:
    """``eval_step(state, batch) -> {"loss": ..., **metrics}`` with ``train=False``."""
    apply = _applier(model, forward)

    def eval_step(state: TrainState, batch: Batch) -> dict:
        outputs = apply(state.variables, batch, False, {}, False)
        loss, metrics = loss_fn(outputs, batch)
        return {"loss": loss, **metrics}

    if not jit:
        return eval_step
    if mesh is None:
        return jax.jit(eval_step)
    replicated, _ = _shardings(mesh)
    return jax.jit(eval_step, out_shardings=replicated)


def _batch_size(batch: Batch) -> int:
    return int(jax.tree.leaves(batch)[0].shape[0])


def _put_batch(batch: Batch, mesh, *, strict: bool):
    if mesh is None:
        return batch
    n = mesh.devices.size
    bs = _batch_size(batch)
    replicated, sharded = _shardings(mesh)
    if bs % n:
        if strict:
            raise ValueError(
                f"batch size {bs} is not divisible by devices={n}; choose a multiple of {n}"
            )
        sharding = replicated
    else:
        sharding = sharded
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)
    # Multi-process: every process holds the same global batch; each copies only the rows
    # of its own devices.
    return jax.tree.map(
        lambda v: jax.make_array_from_callback(np.shape(v), sharding, lambda ix: np.asarray(v[ix])),
        batch,
    )


def _train_batch(batch_fn, step: int, mesh) -> Batch:
    """The global batch of ``step`` on ``mesh``.

    Multi-process with a ``batch_fn`` that has ``size_at(step)`` and ``rows(step, start,
    stop)`` (`jaxnets.data.Batches`): this process builds only its own rows of the global
    batch, which is the same examples in the same order as the single-process batch. Any
    other ``batch_fn`` builds the whole batch on every process and keeps its rows.
    """
    if mesh is None or jax.process_count() == 1 or not hasattr(batch_fn, "rows"):
        return _put_batch(batch_fn(step), mesh, strict=True)
    n = mesh.devices.size
    bs = int(batch_fn.size_at(step))
    if bs % n:
        raise ValueError(
            f"batch size {bs} is not divisible by devices={n}; choose a multiple of {n}"
        )
    _, sharded = _shardings(mesh)
    start, stop = distributed.local_rows(sharded, bs)
    local = batch_fn.rows(step, start, stop)
    return {
        k: jax.make_array_from_process_local_data(sharded, np.asarray(v), (bs, *np.shape(v)[1:]))
        for k, v in local.items()
    }


def evaluate(eval_step, state: TrainState, batches: Iterable[Batch], mesh=None) -> dict:
    """Metrics of ``eval_step`` averaged over ``batches``.

    Each batch's metrics are weighted by its number of examples, or by ``sum(mask)`` when the
    batch has a ``"mask"`` (the losses here are mask-weighted means, so the result is the
    mean over all real examples or tokens).
    """
    sums: dict[str, float] = {}
    total = 0.0
    for batch in batches:
        # Padded batches (jaxnets.data.eval_batches) count only their real examples/tokens.
        n = float(np.sum(batch["mask"])) if "mask" in batch else _batch_size(batch)
        m = jax.device_get(eval_step(state, _put_batch(batch, mesh, strict=False)))
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + float(v) * n
        total += n
    if total == 0:
        raise ValueError("evaluate: no eval batches (or every mask is False)")
    return {k: v / total for k, v in sums.items()}


_MOMENTS: dict = {}


def _moments_fn(model, forward):
    """The jitted training-mode forward returning ``batch_moments``, one per (model, forward)
    (the entry keeps both alive, so their ids stay theirs)."""
    key = (id(model), id(forward))
    if key not in _MOMENTS:
        apply = _applier(model, forward)

        @jax.jit
        def moments(v, batch):
            _, upd = apply(v, batch, True, {"dropout": jax.random.key(0)},
                           ["batch_stats", "batch_moments"])  # fmt: skip
            return upd.get("batch_moments", {})

        _MOMENTS[key] = (model, forward, moments)
    return _MOMENTS[key][2]


def recalibrate_batch_stats(
    model: nn.Module,
    variables: Mapping[str, Any],
    batches: Iterable[Batch],
    *,
    forward: Forward | None = None,
) -> dict:
    """BatchNorm statistics of the current parameters, in place of the running averages.

    The running averages of training mix the statistics of the last ~1/momentum steps'
    parameters; after fast training (few steps, a high rate) they can be far from the
    statistics of the final network, and inference-mode accuracy suffers. This runs the
    training-mode forward over ``batches`` with the parameters fixed and returns
    ``batch_stats`` where every BatchNorm layer that ran in training mode holds the mean and
    the unbiased variance (n / (n - 1), PyTorch's convention) of its input over all the
    examples of all batches, combined exactly across batches of any sizes (pairwise update of
    counts, means and sums of squared deviations, in float64). Layers that ran in inference
    mode (frozen ones under a transfer ``forward``) keep theirs. PyTorch's counterpart is
    ``torch.optim.swa_utils.update_bn`` (which averages per-batch variances instead).

    Args:
      model: the Flax module (its BatchNorm layers are `jaxnets.models.BatchNorm`).
      variables: ``{"params", "batch_stats"}``.
      batches: the examples, e.g. the training set in chunks (no padding: every row counts).
      forward: as in `make_train_step`.
    Returns:
      the new ``batch_stats`` (same tree as ``variables["batch_stats"]``).
    """
    if "batch_stats" not in variables:
        raise ValueError("recalibrate_batch_stats: variables have no 'batch_stats' (no BatchNorm)")
    moments = _moments_fn(model, forward)
    # moments sown by an earlier apply (mutable=True) would be appended to: start without them
    v = {k: x for k, x in variables.items() if k != "batch_moments"}
    acc: dict = {}
    for batch in batches:
        flat = traverse_util.flatten_dict(jax.device_get(moments(v, batch)))
        for path, calls in flat.items():
            for mean_b, var_b, n_b in calls:  # one entry per call of a shared layer
                mean_b, n_b = np.asarray(mean_b, np.float64), float(n_b)
                m2_b = np.asarray(var_b, np.float64) * n_b
                if path not in acc:
                    acc[path] = [n_b, mean_b, m2_b]
                    continue
                n_a, mean_a, m2_a = acc[path]
                n = n_a + n_b
                delta = mean_b - mean_a
                acc[path] = [
                    n,
                    mean_a + delta * (n_b / n),
                    m2_a + m2_b + delta**2 * (n_a * n_b / n),
                ]
    if not acc:
        raise ValueError(
            "recalibrate_batch_stats: no BatchNorm layer ran in training mode (empty batches, or "
            "every layer frozen)"
        )
    stats = traverse_util.flatten_dict(jax.tree.map(np.asarray, dict(variables["batch_stats"])))
    for path, (n, mean, m2) in acc.items():
        module = path[:-1]  # (..., "moments") -> the layer's path
        for name, value in (("mean", mean), ("var", m2 / max(n - 1.0, 1.0))):
            old = stats[(*module, name)]
            stats[(*module, name)] = jnp.asarray(value, dtype=old.dtype)
    return traverse_util.unflatten_dict(stats)


# --- the loop --------------------------------------------------------------------------------


@dataclasses.dataclass
class FitResult:
    """What `Trainer.fit` returns: the final state, the logged records, and the fit's
    wall-clock and CPU seconds (compilation and checkpoint restore included: the cost of
    the call)."""

    state: TrainState
    history: list[dict]
    wall_s: float = 0.0
    cpu_s: float = 0.0

    @property
    def num_params(self) -> int:
        """Parameters of the trained model (`count_params` of ``state.params``)."""
        return count_params(self.state.params)

    @property
    def minutes(self) -> float:
        return self.wall_s / 60

    @property
    def cpu_minutes(self) -> float:
        return self.cpu_s / 60

    @property
    def metrics(self) -> dict:
        """Last logged training record."""
        recs = [r for r in self.history if "loss" in r]
        return recs[-1] if recs else {}

    @property
    def eval(self) -> dict:
        """Last eval record (keys without the ``eval_`` prefix)."""
        recs = [r for r in self.history if any(k.startswith("eval_") for k in r)]
        if not recs:
            return {}
        return {k[5:]: v for k, v in recs[-1].items() if k.startswith("eval_")}


def _checkpoint_manager(directory: Path):
    """orbax manager, the newest 2 kept; saves are atomic (temporary directory + rename).

    Multi-process: every process calls save/restore (orbax synchronises them over the
    `jax.distributed` client); process 0 is the primary host that writes the metadata and the
    replicated arrays and commits the rename. ``directory`` must be on a file system that
    every process sees. A save torn by a kill leaves a temporary directory that the next
    manager deletes (``cleanup_tmp_directories``); the last finished step is untouched.
    """
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(
        directory.absolute(),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=2,
            create=True,
            enable_async_checkpointing=False,
            cleanup_tmp_directories=True,
            multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=0),
        ),
    )


def _restore(manager, template: TrainState) -> TrainState:
    import orbax.checkpoint as ocp

    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    return manager.restore(manager.latest_step(), args=ocp.args.StandardRestore(abstract))


def _save(manager, step: int, state: TrainState) -> None:
    import orbax.checkpoint as ocp

    manager.save(step, args=ocp.args.StandardSave(state), force=True)
    manager.wait_until_finished()


def read_checkpoint(
    directory: str | os.PathLike, step: int | None = None, *, caller: str = "read_checkpoint"
) -> tuple[int, Any]:
    """``(step, state)``: a checkpoint written by `Trainer.fit` into ``directory`` (a run's
    ``checkpoints/``), restored without a template (the arrays come back with the shapes
    they were saved with). ``step``: which one (default: the latest). ``caller`` names the
    function in error messages."""
    import orbax.checkpoint as ocp

    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{caller}: no directory {directory}")
    manager = ocp.CheckpointManager(directory.absolute())
    try:
        steps = manager.all_steps()
        if not steps:
            raise FileNotFoundError(
                f"{caller}: {directory} holds no checkpoint (expected the "
                f"{RunDir.CHECKPOINTS}/ of a Trainer.fit run directory)"
            )
        if step is None:
            step = manager.latest_step()
        elif step not in steps:
            raise ValueError(f"{caller}: no step {step} in {directory}; steps: {sorted(steps)}")
        return step, manager.restore(step, args=ocp.args.StandardRestore())
    finally:
        manager.close()


def _to_record(step: int, metrics: dict, prefix: str = "") -> dict:
    rec: dict[str, Any] = {"step": step}
    for k, v in metrics.items():
        rec[prefix + k] = float(v)
    return rec


class Trainer:
    """Model + loss + optimizer, with the compiled steps and the training loop.

    Args:
      model: a Flax module (or ``apply_fn(variables, batch, *, train, rngs) -> outputs``).
      loss_fn: ``loss_fn(outputs, batch) -> (loss, {name: scalar})``, e.g.
        `cross_entropy_loss`, `mse_loss`.
      tx: optax optimizer (see `make_optimizer` for clipping and schedules).
      forward: ``forward(module, batch, train) -> outputs`` (default `default_forward`).
      trainable: which params train (see `trainable_mask`); the rest stay bitwise frozen.
      schedule: optional learning-rate schedule, logged as ``lr`` next to the loss.
    """

    def __init__(
        self,
        model,
        loss_fn: LossFn,
        tx: optax.GradientTransformation,
        *,
        forward: Forward | None = None,
        trainable: Any = None,
        schedule: optax.Schedule | None = None,
    ):
        self.model = model
        self.loss_fn = loss_fn
        self.tx = tx
        self.forward = forward
        self.trainable = trainable
        self.schedule = schedule
        self._steps: dict[int, tuple] = {}

    def init(self, key: jax.Array, batch: Batch, params: Any = None) -> TrainState:
        """Initial state from a sample batch (see `init_state`)."""
        return init_state(self.model, self.tx, key, batch, forward=self.forward, params=params)

    def steps(self, devices: int = 1):
        """(mesh or None, jitted train step, jitted eval step) for ``devices`` devices."""
        if jax.process_count() > 1:  # one mesh over every process's devices
            devices = jax.device_count()
        if devices not in self._steps:
            mesh = data_mesh(devices) if devices > 1 else None
            kw = {"forward": self.forward, "mesh": mesh}
            self._steps[devices] = (
                mesh,
                make_train_step(self.model, self.loss_fn, self.tx, trainable=self.trainable, **kw),
                make_eval_step(self.model, self.loss_fn, **kw),
            )
        return self._steps[devices]

    def evaluate(self, state: TrainState, batches: Iterable[Batch], devices: int = 1) -> dict:
        """Eval metrics averaged over ``batches`` (see `evaluate`)."""
        mesh, _, eval_step = self.steps(devices)
        if mesh is not None:
            state = jax.device_put(state, _shardings(mesh)[0])
        return evaluate(eval_step, state, batches, mesh)

    def fit(
        self,
        state: TrainState,
        batch_fn: Callable[[int], Batch],
        num_steps: int,
        *,
        run_dir: RunDir | str | os.PathLike | None = None,
        eval_batches: Callable[[], Iterable[Batch]] | None = None,
        eval_every: int = 0,
        log_every: int = 50,
        checkpoint_every: int = 500,
        devices: int | None = None,
        progress: bool | None = None,
        desc: str | None = None,
        eval_hook: Callable[[TrainState], Mapping[str, float]] | None = None,
    ) -> FitResult:
        """Train ``state`` for ``num_steps`` total updates on ``batch_fn(step)`` batches.

        Each iteration: step -> (every ``log_every`` and at the end) a record in
        metrics.jsonl with the window-averaged metrics -> (every ``eval_every`` and at the
        end, if ``eval_batches``) eval record ``eval_*`` -> (every ``checkpoint_every`` and
        at the end) an orbax checkpoint. With a ``run_dir`` holding a checkpoint, the latest
        one is restored first and metrics.jsonl is cut back to it, so the rest of the run (and
        the file) is what an uninterrupted run produces. A non-finite loss or gradient raises
        `NonFiniteError`; the checkpoints on disk are all finite. A ``state`` that has already
        taken k updates (``state.step == k``) continues with step k, so consecutive fits chain.

        ``devices`` (default ``run_dir.devices`` or 1): data-parallel over that many devices,
        batch size must divide evenly. ``eval_batches()`` returns a fresh iterable of batches.
        ``eval_hook(state) -> {name: float}``: extra numbers merged into every eval record
        (e.g. `jaxnets.bptt.flossing.lyapunov_hook`, the leading Lyapunov exponents).
        """
        t0, c0 = time.perf_counter(), time.process_time()
        if num_steps < 0:
            raise ValueError(f"num_steps must be >= 0, got {num_steps}")
        for name, v in (("log_every", log_every), ("checkpoint_every", checkpoint_every)):
            if v < 1:
                raise ValueError(f"{name} must be a positive number of steps, got {v}")
        if eval_every < 0:
            raise ValueError(f"eval_every must be >= 0 (0: only at the end), got {eval_every}")
        if run_dir is not None and not isinstance(run_dir, RunDir):
            run_dir = RunDir(run_dir)
        if devices is None:
            devices = run_dir.devices if run_dir is not None else 1
        if progress is None:
            progress = run_dir.progress if run_dir is not None else False
        mesh, train_step, eval_step = self.steps(devices)

        history: list[dict] = []
        manager = None
        # A state that has taken k updates goes on with step k, so fits chain (phases).
        start = int(state.step)
        # Own copies: the step donates its input, and the caller may still hold `state`
        # (device_put alone may alias the caller's buffers).
        state = jax.tree.map(jnp.array, state)
        if mesh is not None:
            state = jax.device_put(state, _shardings(mesh)[0])
        if run_dir is not None:
            manager = _checkpoint_manager(run_dir.checkpoint_dir)
            if manager.latest_step() is not None:
                # Restored onto this run's mesh: the replicated state re-shards to any
                # device count (a resume on another topology continues; topology.json
                # lists each start).
                state = _restore(manager, state)
                start = int(state.step)
            # Records past the checkpoint belong to steps that will be redone.
            history = [r for r in run_dir.metrics() if r.get("step", 0) <= start]
            if distributed.is_main():
                tmp = run_dir.metrics_path.with_suffix(".tmp")
                tmp.write_text("".join(json.dumps(r) + "\n" for r in history))
                os.replace(tmp, run_dir.metrics_path)

        def emit(rec):
            history.append(rec)
            if run_dir is not None:
                run_dir.log(rec)

        def do_eval(step):
            if eval_batches is None:
                return None
            m = evaluate(eval_step, state, eval_batches(), mesh)
            rec = _to_record(step, m, "eval_")
            if eval_hook is not None:
                rec.update({k: float(v) for k, v in eval_hook(state).items()})
            emit(rec)
            return rec

        from tqdm.auto import tqdm

        bar = tqdm(
            total=num_steps,
            initial=start,
            desc=desc,
            disable=not progress or not distributed.is_main(),
            dynamic_ncols=True,
            leave=False,
        )
        window: list[dict] = []
        t_window = time.perf_counter()
        n_examples = 0
        last_ckpt = manager.latest_step() if manager is not None else None
        try:
            for step in range(start, num_steps):
                batch = _train_batch(batch_fn, step, mesh)
                n_examples += _batch_size(batch)
                state, metrics = train_step(state, batch)
                if not float(metrics["finite"]):
                    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    emit({"step": step + 1, "event": "nonfinite", **m})
                    raise NonFiniteError(step, m, last_ckpt)
                window.append(metrics)
                done = step + 1
                last = done == num_steps
                bar.update(1)
                if done % log_every == 0 or last:
                    ms = jax.device_get(window)
                    rec = {"step": done}
                    for k in ms[0]:
                        if k != "finite":
                            rec[k] = float(np.mean([m[k] for m in ms]))
                    if self.schedule is not None:
                        rec["lr"] = float(self.schedule(step))
                    dt = max(time.perf_counter() - t_window, 1e-9)
                    rec["steps_per_sec"] = len(ms) / dt
                    rec["examples_per_sec"] = n_examples / dt
                    emit(rec)
                    bar.set_postfix(loss=f"{rec['loss']:.4g}", it_s=f"{rec['steps_per_sec']:.1f}")
                    window, n_examples = [], 0
                    t_window = time.perf_counter()
                if eval_every and (done % eval_every == 0) and not last:
                    do_eval(done)
                if last:
                    do_eval(done)
                if manager is not None and (done % checkpoint_every == 0 or last):
                    _save(manager, done, state)
                    last_ckpt = done
        finally:
            bar.close()
            if manager is not None:
                manager.close()
        return FitResult(
            state=state,
            history=history,
            wall_s=time.perf_counter() - t0,
            cpu_s=time.process_time() - c0,
        )


@dataclasses.dataclass(frozen=True)
class LoopSettings:
    """Mixin for experiment configs: the loop cadence `Trainer.fit` takes, declared once.

    ``class Config(train.LoopSettings): ...`` gets the three fields (an experiment whose
    defaults differ redeclares just the default); ``trainer.fit(..., **cfg.loop())``.

    log_every: steps between logged (window-averaged) training records.
    eval_every: steps between evaluations (0: only at the end).
    checkpoint_every: steps between checkpoints (and one at the end).
    """

    log_every: int = 50
    eval_every: int = 500
    checkpoint_every: int = 500

    def loop(self) -> dict:
        """The keyword arguments of `Trainer.fit` these settings give."""
        return {
            "log_every": self.log_every,
            "eval_every": self.eval_every,
            "checkpoint_every": self.checkpoint_every,
        }


def strip_timing(records: Iterable[dict]) -> list[dict]:
    """Records without wall-clock keys (`TIMING_KEYS`): equal across runs with one seed."""
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def tree_equal(a, b) -> bool:
    """Bitwise equality of two pytrees of arrays (same structure, dtypes, bits)."""
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    if ta != tb:
        return False
    return all(
        np.asarray(x).dtype == np.asarray(y).dtype
        and np.array_equal(np.asarray(x), np.asarray(y), equal_nan=True)
        for x, y in zip(la, lb, strict=True)
    )


def count_params(params: Any) -> int:
    """Total number of parameters."""
    return int(sum(math.prod(np.shape(x)) for x in jax.tree.leaves(params)))
