"""Transfer learning: parameter groups by path, pretrained weights, and the notes' three methods.

The notes' recipe: convolutional layers learn features that other tasks share, so reuse the
weights of a network trained on one task for another, in one of three ways:

1. **fine-tune** (``method="finetune"``): start from the pretrained weights, train everything;
2. **freeze** (``method="freeze"``): keep the pretrained layers fixed, train only the new ones;
3. **per-group learning rates** (``method="per_group_lr"``): new (re-initialised) layers learn
   at the base rate ``lr``, pretrained groups at ``lr * lr_factor``, or with layer-wise decay
   ``lr * decay^k`` for the k-th pretrained group counted down from the head;

plus ``"scratch"`` (the random initialisation, trained like fine-tuning) as the baseline, and
gradual unfreezing (``unfreeze_every``) as an option of 1 and 3. A `TransferConfig` picks one;
`configure` turns it into what `jaxnets.train.Trainer` takes (optimizer, trainable partition,
forward), so every method runs through the same training loop.

The pieces:

- Paths: a parameter's path is its "/"-joined key path, e.g. ``features/stage1/conv0/kernel``.
  A pattern is a glob (``*`` one path segment, ``**`` any number of segments, ``?`` one
  character) or a regex written ``"re:..."``; a pattern selects a leaf when it matches the
  leaf's path or any ancestor of it, so ``"head"``, ``"head/*"`` and ``"head/**"`` all select
  the whole head and ``"**/bn*"`` every BatchNorm layer. `ParamGroups` sorts parameters into
  named groups (first matching group wins) and prints a table of their sizes.
- Weights: `load_checkpoint` reads the variables of a `Trainer.fit` run directory (orbax),
  `from_torchvision` converts a torchvision state dict, and `load_pretrained` copies the
  ``keep`` subtree into a freshly initialised target model (whose head may have another number
  of classes), with one error listing every missing key, unexpected key and shape mismatch.
- Freezing: frozen groups are left out of the differentiated partition (``trainable``), so
  their gradients are never computed (``optax.set_to_zero`` alone would compute them and throw
  them away); their optimizer transform is ``set_to_zero`` (no optimizer state); BatchNorm
  layers whose parameters are all frozen run in inference mode (running statistics, which are
  then not updated) through `freeze_batchnorm`.
- Per-group learning rates: `group_optimizer` is ``optax.multi_transform`` over the group
  labels with one optimizer per group at its own rate.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import PyTree

from jaxnets import train
from jaxnets.runs import RunDir

__all__ = [
    "METHODS",
    "MembersResult",
    "ParamGroups",
    "Phase",
    "TransferConfig",
    "TransferSetup",
    "compile_pattern",
    "fit_members",
    "configure",
    "flatten_paths",
    "freeze_batchnorm",
    "from_torchvision",
    "frozen_modules",
    "group_optimizer",
    "layerwise_decay",
    "load_checkpoint",
    "load_pretrained",
    "matches",
    "member",
    "select",
]

Patterns = str | Sequence[str]
Forward = Callable[..., Any]

METHODS = ("scratch", "finetune", "freeze", "per_group_lr")
_MAX_LISTED = 20


# --- paths and patterns ----------------------------------------------------------------------


def flatten_paths(tree: PyTree) -> dict[str, Any]:
    """``{"a/b/c": leaf}`` for every leaf of ``tree``, in tree order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {train.key_path_str(kp): leaf for kp, leaf in flat}


def _glob_segment(seg: str) -> str:
    out, i = [], 0
    while i < len(seg):
        c = seg[i]
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[" and "]" in seg[i + 1 :]:
            j = seg.index("]", i + 1)
            body = seg[i + 1 : j]
            if body.startswith("!"):
                body = "^" + body[1:]
            out.append(f"[{body}]")
            i = j
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def compile_pattern(pattern: str) -> Callable[[str], bool]:
    """A predicate ``path -> bool`` for one path pattern: a glob, or ``"re:<regex>"``.

    Glob over "/"-separated segments: ``*`` matches within one segment, ``?`` one character,
    ``[abc]``/``[!abc]`` a class, and a ``**`` segment any number of segments (zero included):
    ``"a/**"`` matches ``a`` and everything below it, ``"**/kernel"`` every ``kernel``.
    A regex must match the whole path (``re.fullmatch``). Only the path itself is tested here;
    `matches` also tries its ancestors.
    """
    if not isinstance(pattern, str) or not pattern:
        raise TypeError(f"a path pattern must be a non-empty string, got {pattern!r}")
    if pattern.startswith("re:"):
        try:
            regex = re.compile(pattern[3:])
        except re.error as e:
            raise ValueError(f"invalid regex in path pattern {pattern!r}: {e}") from None
        return lambda path: regex.fullmatch(path) is not None
    segs = pattern.strip("/").split("/")
    if any(not s for s in segs):
        raise ValueError(f"path pattern {pattern!r} has an empty segment ('//')")
    # Matched against "/" + path, every segment carries its own leading "/", so a "**" that
    # stands for zero segments leaves no stray separator behind.
    parts = []
    for seg in segs:
        if seg == "**":
            parts.append("(?:/[^/]+)*")
        elif "**" in seg:
            raise ValueError(f"'**' must be a whole segment in path pattern {pattern!r}")
        else:
            parts.append("/" + _glob_segment(seg))
    regex = re.compile("".join(parts))
    return lambda path: regex.fullmatch("/" + path) is not None


def _as_patterns(patterns: Patterns, what: str = "patterns") -> tuple[str, ...]:
    if isinstance(patterns, str):
        patterns = (patterns,)
    patterns = tuple(patterns)
    if not patterns:
        raise ValueError(f"{what} must name at least one path pattern")
    for p in patterns:
        compile_pattern(p)  # validates
    return patterns


def _ancestors(path: str) -> list[str]:
    segs = path.split("/")
    return ["/".join(segs[: i + 1]) for i in range(len(segs))]


def matches(path: str, patterns: Patterns) -> bool:
    """Whether a pattern matches ``path`` ("a/b/c") or one of its ancestors ("a", "a/b")."""
    preds = [compile_pattern(p) for p in _as_patterns(patterns)]
    return any(f(a) for f in preds for a in _ancestors(path))


def select(tree: PyTree, patterns: Patterns) -> PyTree:
    """Pytree of Python bools over ``tree``: True where a leaf's path `matches` ``patterns``.

    The result is a ``trainable`` argument for `jaxnets.train.Trainer`.
    """
    pats = _as_patterns(patterns)
    return jax.tree_util.tree_map_with_path(
        lambda kp, _: matches(train.key_path_str(kp), pats), tree
    )


def _params_of(variables: Any) -> Any:
    """params from a variables dict ``{"params": ...}``, a TrainState, or params themselves."""
    if hasattr(variables, "params") and hasattr(variables, "batch_stats"):
        return variables.params
    if isinstance(variables, Mapping) and "params" in variables:
        return variables["params"]
    return variables


# --- groups ----------------------------------------------------------------------------------


class ParamGroups:
    """Named groups of parameters, each a set of path patterns; the first matching group wins.

    ``ParamGroups(backbone="features/**", head="head")`` or, to keep an explicit order or use
    names that are not identifiers, ``ParamGroups({"stage1": "features/stage1", ...})``. The
    order matters twice: a leaf belongs to the first group that matches it, and layer-wise
    decay and gradual unfreezing read the groups as ordered from the input to the output.
    """

    def __init__(self, groups: Mapping[str, Patterns] | None = None, /, **named: Patterns):
        spec = dict(groups or {})
        overlap = sorted(set(spec) & set(named))
        if overlap:
            raise ValueError(f"ParamGroups: groups {overlap} given twice")
        spec.update(named)
        if not spec:
            raise ValueError("ParamGroups needs at least one group, e.g. head='head/**'")
        self.groups: dict[str, tuple[str, ...]] = {}
        for name, pats in spec.items():
            if not isinstance(name, str) or not name:
                raise TypeError(f"ParamGroups: group names must be non-empty strings, got {name!r}")
            self.groups[name] = _as_patterns(pats, f"group {name!r}")
        self._preds = {n: [compile_pattern(p) for p in ps] for n, ps in self.groups.items()}

    def __repr__(self) -> str:
        inner = ", ".join(f"{n!r}: {list(p)}" for n, p in self.groups.items())
        return f"ParamGroups({{{inner}}})"

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.groups)

    def group_of(self, path: str) -> str | None:
        """The first group whose patterns match ``path`` (or an ancestor), else None."""
        anc = _ancestors(path)
        for name, preds in self._preds.items():
            if any(f(a) for f in preds for a in anc):
                return name
        return None

    def assign(self, params: PyTree) -> dict[str, str | None]:
        """``{path: group or None}`` for every leaf of ``params`` (or of ``variables["params"]``)."""
        return {p: self.group_of(p) for p in flatten_paths(_params_of(params))}

    def labels(self, params: PyTree, default: str | None = None) -> PyTree:
        """Pytree of group names over ``params``: the labels of ``optax.multi_transform``.

        Unmatched leaves get ``default``; without one they raise a ValueError listing them.
        """
        params = _params_of(params)
        unmatched = [p for p, g in self.assign(params).items() if g is None]
        if unmatched and default is None:
            shown = ", ".join(unmatched[:_MAX_LISTED])
            more = (
                f" ... and {len(unmatched) - _MAX_LISTED} more"
                if len(unmatched) > _MAX_LISTED
                else ""
            )
            raise ValueError(
                f"{len(unmatched)} parameter(s) match no group of {self!r}: {shown}{more}. "
                f"Add a pattern for them (a last catch-all group '**' works) or pass default="
            )
        return jax.tree_util.tree_map_with_path(
            lambda kp, _: self.group_of(train.key_path_str(kp)) or default, params
        )

    def mask(self, params: PyTree, names: Iterable[str]) -> PyTree:
        """Pytree of bools over ``params``: True for the leaves of the groups ``names``."""
        names = set(names)
        unknown = sorted(names - set(self.groups))
        if unknown:
            raise ValueError(f"unknown group(s) {unknown}; groups are {list(self.groups)}")
        labels = self.labels(params, default="")
        return jax.tree.map(lambda g: g in names, labels)

    def summary(self, params: PyTree) -> list[dict]:
        """One row per group, then ``(unmatched)`` if any: name, patterns, tensors, params, paths."""
        params = _params_of(params)
        flat = flatten_paths(params)
        rows = {n: {"group": n, "patterns": list(p), "tensors": 0, "params": 0, "paths": []}
                for n, p in self.groups.items()}  # fmt: skip
        rest = {"group": "(unmatched)", "patterns": [], "tensors": 0, "params": 0, "paths": []}
        for path, leaf in flat.items():
            row = rows.get(self.group_of(path), rest)
            row["tensors"] += 1
            row["params"] += math.prod(np.shape(leaf))
            row["paths"].append(path)
        out = list(rows.values())
        if rest["tensors"]:
            out.append(rest)
        return out

    def table(self, params: PyTree, extra: Mapping[str, Mapping[str, Any]] | None = None) -> str:
        """A text table of the groups with their tensor and parameter counts and share.

        Unmatched parameters appear as a row ``(unmatched)`` listing their paths. ``extra``
        adds columns: ``{column: {group: value}}`` (e.g. learning rates).
        """
        rows = self.summary(params)
        total = sum(r["params"] for r in rows) or 1
        extra = dict(extra or {})
        head = ["group", "patterns", "tensors", "params", "share", *extra]
        body = []
        for r in rows:
            cells = [
                r["group"],
                " ".join(r["patterns"]) if r["patterns"] else "-",
                str(r["tensors"]),
                f"{r['params']:,}",
                f"{100 * r['params'] / total:.1f}%",
            ]
            for col in extra.values():
                v = col.get(r["group"], "")
                cells.append(f"{v:g}" if isinstance(v, float) else str(v))
            body.append(cells)
        body.append(["total", "", str(sum(r["tensors"] for r in rows)), f"{total:,}", "100.0%"]
                    + [""] * len(extra))  # fmt: skip
        widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
                 for line in [head, *body]]  # fmt: skip
        lines.insert(1, "  ".join("-" * w for w in widths))
        for r in rows:
            if r["group"] == "(unmatched)":
                shown = ", ".join(r["paths"][:_MAX_LISTED])
                lines.append(
                    f"unmatched: {shown}" + (" ..." if len(r["paths"]) > _MAX_LISTED else "")
                )
        return "\n".join(lines)


# --- pretrained weights ----------------------------------------------------------------------


def load_checkpoint(path: str | os.PathLike | RunDir, step: int | None = None) -> dict:
    """Variables ``{"params": ..., "batch_stats": ...}`` saved by `jaxnets.train.Trainer.fit`.

    ``path``: a run directory (holding ``checkpoints/``), or the checkpoints directory itself.
    ``step``: which checkpoint (default: the latest). No template is needed: the arrays come
    back with the shapes they were saved with.
    """
    root = Path(path.path if isinstance(path, RunDir) else path)
    ckpt = root / RunDir.CHECKPOINTS if (root / RunDir.CHECKPOINTS).is_dir() else root
    step, state = train.read_checkpoint(ckpt, step, caller="load_checkpoint")
    if not isinstance(state, Mapping) or "params" not in state:
        raise ValueError(f"load_checkpoint: {ckpt} step {step} is not a jaxnets TrainState")
    # Host arrays: restored arrays are committed to a device, and a train state mixing
    # committed and uncommitted arrays compiles its jitted step a second time.
    out = {"params": jax.tree.map(np.asarray, state["params"])}
    if state.get("batch_stats"):
        out["batch_stats"] = jax.tree.map(np.asarray, state["batch_stats"])
    return out


_TORCH_HEADS = ("fc.weight", "classifier.6.weight", "classifier.weight")


def from_torchvision(model: nn.Module, state_dict: Mapping[str, Any]) -> dict:
    """Variables of ``model``'s architecture from torchvision weights, whatever their class count.

    The number of classes is read from the state dict's last Linear (``fc`` for ResNets,
    ``classifier.6``/``classifier`` for VGGs), so ImageNet weights (1000 classes) load for a
    model built with ``num_classes=5``; `load_pretrained` then keeps the backbone and leaves
    the new head as initialised. See `jaxnets.models.from_torchvision_state_dict`.
    """
    from jaxnets import models

    state = dict(state_dict)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    head = next((k for k in _TORCH_HEADS if k in state), None)
    if head is None:
        raise ValueError(
            f"from_torchvision: state_dict has no classifier weight ({', '.join(_TORCH_HEADS)}); "
            f"got keys {sorted(state)[:_MAX_LISTED]}"
        )
    num_classes = int(np.shape(state[head])[0])
    if not hasattr(model, "num_classes"):
        raise TypeError(
            f"from_torchvision: model must be a jaxnets VGG or ResNet, got {type(model).__name__}"
        )
    source = model.clone(num_classes=num_classes) if model.num_classes != num_classes else model
    return models.from_torchvision_state_dict(source, state)


def _variables_of(v: Any, what: str) -> dict:
    if hasattr(v, "params") and hasattr(v, "batch_stats"):  # a TrainState
        return {"params": v.params, **({"batch_stats": v.batch_stats} if v.batch_stats else {})}
    if not isinstance(v, Mapping) or "params" not in v:
        raise TypeError(
            f"{what} must be a variables dict {{'params': ..., 'batch_stats': ...}} or a "
            f"TrainState, got {type(v).__name__}"
            + (f" with keys {sorted(v)}" if isinstance(v, Mapping) else "")
        )
    return dict(v)


def _listing(title: str, items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    more = f" ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return f"  {len(items)} {title}: {shown}{more}"


def load_pretrained(
    variables: Mapping[str, PyTree],
    pretrained: Mapping[str, PyTree],
    keep: Patterns = "features/**",
) -> dict:
    """``variables`` with the ``keep`` subtree replaced by the pretrained values.

    Args:
      variables: the target model's freshly initialised variables (``model.init(...)``: params
        and, with BatchNorm, batch_stats), e.g. with a head for the new number of classes.
      pretrained: the source variables (`load_checkpoint`, `from_torchvision`, a TrainState).
      keep: path patterns (see `compile_pattern`) of what to take from ``pretrained``: in every
        collection, each target leaf they select is copied (BatchNorm running statistics
        included); the others (the head) keep their fresh initialisation.

    Raises:
      ValueError listing every selected target leaf that ``pretrained`` lacks (missing), every
      selected pretrained leaf the target lacks (unexpected) and every shape mismatch; or if
      ``keep`` selects nothing.
    """
    variables = _variables_of(variables, "variables")
    pretrained = _variables_of(pretrained, "pretrained")
    keep = _as_patterns(keep, "keep")
    missing, unexpected, mismatched = [], [], []
    out: dict[str, Any] = {}
    n_kept = 0
    for coll in sorted(set(variables) | set(pretrained)):
        target = flatten_paths(variables.get(coll, {}))
        source = flatten_paths(pretrained.get(coll, {}))
        unexpected += [f"{coll}/{p}" for p in source if p not in target and matches(p, keep)]
        if coll not in variables:
            continue
        chosen: dict[str, Any] = {}
        for p, leaf in target.items():
            if not matches(p, keep):
                continue
            n_kept += 1
            if p not in source:
                missing.append(f"{coll}/{p}")
            elif tuple(np.shape(source[p])) != tuple(np.shape(leaf)):
                mismatched.append(
                    f"{coll}/{p}: target {tuple(np.shape(leaf))}, pretrained "
                    f"{tuple(np.shape(source[p]))}"
                )
            else:
                chosen[p] = jnp.asarray(np.asarray(source[p]), dtype=jnp.result_type(leaf))

        def pick(kp, leaf, chosen=chosen):
            return chosen.get(train.key_path_str(kp), leaf)

        out[coll] = jax.tree_util.tree_map_with_path(pick, variables[coll])
    if n_kept == 0:
        example = next(iter(flatten_paths(variables["params"])), "")
        raise ValueError(
            f"load_pretrained: keep={list(keep)} selects no variable of the target model "
            f"(its paths look like {example!r})"
        )
    if missing or unexpected or mismatched:
        parts = [f"load_pretrained: the pretrained weights do not fit keep={list(keep)}:"]
        if missing:
            parts.append(_listing("missing in pretrained", missing))
        if unexpected:
            parts.append(_listing("unexpected (pretrained only)", unexpected))
        if mismatched:
            parts.append(_listing("shape mismatches", mismatched))
            parts.append(
                "  (a classifier head with another number of classes: leave it out of keep, "
                "it is then re-initialised)"
            )
        raise ValueError("\n".join(parts))
    return out


# --- frozen BatchNorm ------------------------------------------------------------------------


def frozen_modules(params: PyTree, trainable: PyTree) -> frozenset[tuple[str, ...]]:
    """Paths of the modules whose own parameters are all frozen (``trainable`` False).

    A module's own parameters are the leaves directly under its path (a BatchNorm's
    ``scale`` and ``bias``); ``trainable`` is a bool pytree or anything
    `jaxnets.train.trainable_mask` takes.
    """
    mask = flatten_paths(train.trainable_mask(_params_of(params), trainable))
    state: dict[tuple[str, ...], bool] = {}
    for path, m in mask.items():
        module = tuple(path.split("/")[:-1])
        state[module] = state.get(module, True) and not m
    return frozenset(k for k, frozen in state.items() if frozen)


def _owns_batch_stats(module: nn.Module) -> bool:
    stats = module.variables.get("batch_stats") if module.scope is not None else None
    return bool(stats) and any(not isinstance(v, Mapping) for v in stats.values())


def _call_in_inference_mode(module: nn.Module, next_fun, args, kwargs):
    sig = inspect.signature(type(module).__call__)
    where = f"{type(module).__name__} at {'/'.join(module.path)}"
    if "train" in sig.parameters:  # jaxnets.models.BatchNorm and the project's convention
        bound = sig.bind(None, *args, **kwargs)
        bound.arguments["train"] = False
        return next_fun(*bound.args[1:], **bound.kwargs)
    if "use_running_average" in sig.parameters:  # flax.linen.BatchNorm
        if getattr(module, "use_running_average", None) is not None:
            raise TypeError(
                f"freeze_batchnorm: {where} fixes use_running_average at construction, so it "
                f"cannot be switched to inference mode; pass use_running_average when calling "
                f"it, use jaxnets.models.BatchNorm (train argument), or freeze_bn=False"
            )
        bound = sig.bind(None, *args, **kwargs)
        bound.arguments["use_running_average"] = True
        return next_fun(*bound.args[1:], **bound.kwargs)
    raise TypeError(
        f"freeze_batchnorm: {where} holds batch_stats but its __call__ has neither a `train` "
        f"nor a `use_running_average` argument to switch it to inference mode"
    )


def freeze_batchnorm(frozen: Iterable[Sequence[str]], forward: Forward | None = None) -> Forward:
    """A ``forward(module, batch, train)`` that runs the frozen BatchNorm layers in inference mode.

    During training (``train=True``) every module whose path is in ``frozen`` (see
    `frozen_modules`) and that owns ``batch_stats`` is called with ``train=False`` (or
    ``use_running_average=True``): it normalises with its running statistics,
    y = (x - running_mean) / sqrt(running_var + eps) * scale + bias, and leaves them unchanged.
    Other layers train as usual. Evaluation (``train=False``) is untouched. ``forward`` is the
    model's own forward (default `jaxnets.train.default_forward`).
    """
    base = forward or train.default_forward
    frozen = frozenset(tuple(p) for p in frozen)

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if (
            context.method_name == "__call__"
            and tuple(module.path) in frozen
            and _owns_batch_stats(module)
        ):
            return _call_in_inference_mode(module, next_fun, args, kwargs)
        return next_fun(*args, **kwargs)

    def frozen_bn_forward(module: nn.Module, batch, train: bool):
        if not train:
            return base(module, batch, train)
        with nn.intercept_methods(interceptor):
            return base(module, batch, train)

    frozen_bn_forward.frozen = frozen  # for inspection and tests
    return frozen_bn_forward


# --- optimizers ------------------------------------------------------------------------------


def layerwise_decay(names: Sequence[str], decay: float) -> dict[str, float]:
    """Learning-rate factors ``decay^k`` for groups ordered from the input to the output.

    The last name (next to the new layers) gets ``decay``, the one before ``decay^2``, ...,
    the first ``decay^len(names)``: deeper-down, more generic features move least.
    """
    if not 0.0 < decay <= 1.0:
        raise ValueError(f"layerwise_decay: decay must be in (0, 1], got {decay}")
    n = len(names)
    return {name: float(decay ** (n - i)) for i, name in enumerate(names)}


def _scaled_lr(lr: float | optax.Schedule, factor: float) -> float | optax.Schedule:
    if callable(lr):
        return lambda step: factor * lr(step)
    return lr * factor


def group_optimizer(
    labels: PyTree,
    learning_rates: Mapping[str, float | optax.Schedule],
    optimizer: str | Callable[[float | optax.Schedule], optax.GradientTransformation] = "adam",
    *,
    clip_norm: float | None = None,
    start_steps: Mapping[str, int] | None = None,
    **opt_kwargs: Any,
) -> optax.GradientTransformation:
    """``optax.multi_transform`` with one optimizer per group at that group's learning rate.

    Args:
      labels: pytree of group names over the params (`ParamGroups.labels`).
      learning_rates: group -> rate (a float or optax schedule). A rate of exactly 0 gives
        ``optax.set_to_zero()``: no update and no optimizer state for that group.
      optimizer: a `jaxnets.train.make_optimizer` name ("adam", "adamw", "sgd") with
        ``opt_kwargs`` (``momentum``, ``weight_decay``, ``schedule``, ...), or a function
        ``lr -> GradientTransformation``.
      clip_norm: clip the global gradient norm (over all groups) before the split.
      start_steps: group -> step at which it starts learning (gradual unfreezing). Before it
        the group's updates are zero and its optimizer state stays at its initial value
        (``optax.transforms.conditionally_mask``), so Adam starts fresh when it unfreezes.

    With plain SGD every group's update is exactly ``-rate_g * grad``, so the update ratio of
    two groups is their rate ratio.
    """
    names = sorted({g for g in jax.tree.leaves(labels)})
    missing = [g for g in names if g not in learning_rates]
    if missing:
        raise ValueError(
            f"group_optimizer: no learning rate for group(s) {missing}; got {sorted(learning_rates)}"
        )
    start_steps = dict(start_steps or {})
    if callable(optimizer):
        if opt_kwargs:
            raise ValueError(
                f"group_optimizer: options {sorted(opt_kwargs)} need an optimizer name"
            )
        make = optimizer
    else:

        def make(lr):
            return train.make_optimizer(optimizer, lr, **opt_kwargs)

    transforms = {}
    for g in names:
        lr = learning_rates[g]
        if not callable(lr) and lr == 0:
            transforms[g] = optax.set_to_zero()
            continue
        if not callable(lr) and lr < 0:
            raise ValueError(
                f"group_optimizer: learning rate of group {g!r} must be >= 0, got {lr}"
            )
        tx = make(lr)
        start = int(start_steps.get(g, 0))
        if start > 0:
            tx = optax.transforms.conditionally_mask(tx, lambda count, s=start: count >= s)
        transforms[g] = tx
    tx = optax.multi_transform(transforms, labels)
    if clip_norm is not None:
        tx = optax.chain(optax.clip_by_global_norm(clip_norm), tx)
    return tx


# --- the three methods as one configuration --------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TransferConfig:
    """Which of the notes' methods to use, and its knobs.

    Attributes:
      method: "finetune" (train everything from the pretrained weights), "freeze" (train only
        the ``new`` groups), "per_group_lr" (new groups at the base rate, pretrained ones
        slower), or "scratch" (everything from the random initialisation: the baseline).
      new: the groups that are new or re-initialised layers (typically the head); every other
        group is "pretrained".
      lr_factor: per_group_lr: pretrained groups learn at ``lr * lr_factor``.
      layer_decay: per_group_lr: instead, pretrained group k (k = 1 next to the new layers,
        counting towards the input in the groups' order) learns at ``lr * layer_decay^k``.
      unfreeze_every: gradual unfreezing (finetune, per_group_lr): at first only the new groups
        train, and every ``unfreeze_every`` steps the next pretrained group (from the top)
        joins them; frozen groups are frozen exactly as in "freeze". 0 = off.
      freeze_bn: BatchNorm layers whose parameters are all frozen run in inference mode (their
        running statistics are used and kept).
    """

    method: str = "finetune"
    new: tuple[str, ...] = ("head",)
    lr_factor: float = 0.1
    layer_decay: float | None = None
    unfreeze_every: int = 0
    freeze_bn: bool = True

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(
                f"TransferConfig: method must be one of {METHODS}, got {self.method!r}"
            )
        if isinstance(self.new, str):
            object.__setattr__(self, "new", (self.new,))
        if not self.lr_factor > 0:
            raise ValueError(
                f"TransferConfig: lr_factor must be > 0 (to stop a group, use method='freeze'), "
                f"got {self.lr_factor}"
            )
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise ValueError(
                f"TransferConfig: layer_decay must be in (0, 1], got {self.layer_decay}"
            )
        if self.unfreeze_every < 0:
            raise ValueError(
                f"TransferConfig: unfreeze_every must be >= 0, got {self.unfreeze_every}"
            )
        if self.unfreeze_every and self.method not in ("finetune", "per_group_lr"):
            raise ValueError(
                f"TransferConfig: gradual unfreezing (unfreeze_every) applies to 'finetune' and "
                f"'per_group_lr', not {self.method!r}"
            )

    @property
    def uses_pretrained(self) -> bool:
        """False for "scratch": the model keeps its random initialisation."""
        return self.method != "scratch"


@dataclasses.dataclass(frozen=True)
class Phase:
    """A stretch of training with one trainable partition: from step ``start`` on."""

    start: int
    groups: tuple[str, ...]  # the groups that train in this phase
    trainable: PyTree  # bool pytree over params, for `jaxnets.train.Trainer`
    forward: Forward | None  # with the frozen BatchNorm layers in inference mode


@dataclasses.dataclass
class TransferSetup:
    """What `configure` returns: the optimizer and the phases for `jaxnets.train.Trainer`.

    ``tx`` is shared by every phase (one optimizer state for the whole run);
    ``trainable``/``forward`` are phase 0's (the only phase without gradual unfreezing).
    """

    config: TransferConfig
    groups: ParamGroups
    tx: optax.GradientTransformation
    labels: PyTree
    learning_rates: dict[str, float | optax.Schedule]  # 0 for frozen groups
    start_steps: dict[str, int]
    phases: tuple[Phase, ...]
    params: PyTree = dataclasses.field(repr=False, default=None)
    _trainers: dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def trainable(self) -> PyTree:
        return self.phases[0].trainable

    @property
    def forward(self) -> Forward | None:
        return self.phases[0].forward

    def table(self) -> str:
        """The groups with their sizes, learning rates and the step each starts training."""
        lrs = {g: ("schedule" if callable(v) else float(v)) for g, v in self.learning_rates.items()}
        return self.groups.table(
            self.params, extra={"lr": lrs, "from step": dict(self.start_steps)}
        )

    def trainer(self, model: Any, loss_fn: train.LossFn, phase: int = 0) -> train.Trainer:
        """The `jaxnets.train.Trainer` of one phase (cached: its compiled steps are reused)."""
        key = (id(model), id(loss_fn), phase)
        if key not in self._trainers:
            p = self.phases[phase]
            self._trainers[key] = (
                model,
                loss_fn,
                train.Trainer(model, loss_fn, self.tx, forward=p.forward, trainable=p.trainable),
            )
        return self._trainers[key][2]

    def init_state(self, key: jax.Array, variables: Mapping[str, PyTree]) -> train.TrainState:
        """A fresh `jaxnets.train.TrainState` holding ``variables`` (step 0, run rng from ``key``).

        ``variables``: the model's variables, e.g. from `load_pretrained`, or ``model.init(...)``
        for training from scratch. The optimizer state is initialised for them.
        """
        v = _variables_of(variables, "variables")
        params = v["params"]
        if jax.tree.structure(params) != jax.tree.structure(self.params):
            raise ValueError(
                "init_state: variables['params'] do not have the structure of the params this "
                "setup was configured with"
            )
        for (path, a), b in zip(flatten_paths(params).items(), jax.tree.leaves(self.params),
                                strict=True):  # fmt: skip
            if np.shape(a) != np.shape(b):
                raise ValueError(
                    f"init_state: params/{path} has shape {np.shape(a)}, the configured "
                    f"params {np.shape(b)}"
                )
        # train.init_state's path for given params: the same key split (rng), no model.init.
        state = train.init_state(lambda *a, **k: None, self.tx, key, None, params=params)
        return state.replace(batch_stats=v.get("batch_stats", {}))

    def fit(
        self,
        model: Any,
        loss_fn: train.LossFn,
        state: train.TrainState,
        batch_fn: Callable[[int], Mapping],
        num_steps: int,
        *,
        run_dir: RunDir | str | os.PathLike | None = None,
        **fit_kwargs: Any,
    ) -> train.FitResult:
        """`jaxnets.train.Trainer.fit` phase after phase, up to ``num_steps`` total updates.

        One phase (no gradual unfreezing): exactly ``trainer(...).fit(...)`` in ``run_dir``.
        Several: phase k runs in ``run_dir/phase{k}`` (each resumable) from the state the
        previous phase ended with; the history is their concatenation.
        """
        if run_dir is not None and not isinstance(run_dir, RunDir):
            run_dir = RunDir(run_dir)
        history: list[dict] = []
        result = None
        for k, phase in enumerate(self.phases):
            if k > 0 and phase.start >= num_steps:
                break
            end = self.phases[k + 1].start if k + 1 < len(self.phases) else num_steps
            end = min(end, num_steps)
            sub = run_dir
            if run_dir is not None and len(self.phases) > 1:
                sub = run_dir.sub(f"phase{k}")
            trainer = self.trainer(model, loss_fn, k)
            result = trainer.fit(state, batch_fn, end, run_dir=sub, **fit_kwargs)
            state = result.state
            history += result.history
        return train.FitResult(state=result.state, history=history)


def configure(
    config: TransferConfig,
    groups: ParamGroups,
    variables: PyTree,
    *,
    optimizer: str | Callable = "adam",
    learning_rate: float | optax.Schedule = 1e-3,
    clip_norm: float | None = None,
    forward: Forward | None = None,
    **opt_kwargs: Any,
) -> TransferSetup:
    """The optimizer, trainable partition and forward that realise ``config``.

    Args:
      config: the method (`TransferConfig`).
      groups: `ParamGroups` covering every parameter (unmatched ones raise).
      variables: the target model's variables or params (only their paths matter).
      optimizer, learning_rate, clip_norm, **opt_kwargs: the base optimizer
        (see `group_optimizer`), at the base ``learning_rate``.
      forward: the model's forward (default `jaxnets.train.default_forward`).

    Learning rates: new groups ``lr``; pretrained groups ``lr`` (finetune, scratch), 0 and
    not trainable (freeze), ``lr * lr_factor`` or ``lr * layer_decay^k`` (per_group_lr).
    Use the result as ``setup.trainer(model, loss_fn)`` (a `jaxnets.train.Trainer`) or
    ``setup.fit(...)`` (which also runs the phases of gradual unfreezing).
    """
    if not isinstance(config, TransferConfig):
        raise TypeError(f"configure: config must be a TransferConfig, got {type(config).__name__}")
    if not isinstance(groups, ParamGroups):
        raise TypeError(f"configure: groups must be ParamGroups, got {type(groups).__name__}")
    params = _params_of(variables)
    labels = groups.labels(params)
    unknown = sorted(set(config.new) - set(groups.names))
    if unknown:
        raise ValueError(
            f"configure: new={list(config.new)} names group(s) {unknown} that are not in "
            f"{list(groups.names)}"
        )
    new = [g for g in groups.names if g in config.new]
    pretrained = [g for g in groups.names if g not in config.new]
    lr = learning_rate
    method = config.method
    if method == "freeze" and not new:
        raise ValueError("configure: method='freeze' needs at least one new group to train")
    if method in ("scratch", "finetune"):
        factors = dict.fromkeys(pretrained, 1.0)
    elif method == "freeze":
        factors = dict.fromkeys(pretrained, 0.0)
    elif config.layer_decay is not None:
        factors = layerwise_decay(pretrained, config.layer_decay)
    else:
        factors = dict.fromkeys(pretrained, config.lr_factor)
    factors.update(dict.fromkeys(new, 1.0))
    learning_rates = {g: (_scaled_lr(lr, factors[g]) if factors[g] != 1.0 else lr)
                      for g in groups.names}  # fmt: skip
    for g in groups.names:
        if factors[g] == 0.0:
            learning_rates[g] = 0.0

    start_steps = dict.fromkeys(groups.names, 0)
    if config.unfreeze_every:
        for i, g in enumerate(reversed(pretrained), start=1):
            start_steps[g] = i * config.unfreeze_every
    tx = group_optimizer(
        labels, learning_rates, optimizer, clip_norm=clip_norm, start_steps=start_steps,
        **opt_kwargs,
    )  # fmt: skip

    starts = sorted({s for g, s in start_steps.items() if factors[g] != 0.0})
    phases = []
    for start in starts:
        active = tuple(g for g in groups.names if factors[g] != 0.0 and start_steps[g] <= start)
        trainable = jax.tree.map(lambda g, a=active: g in a, labels)
        fwd = forward
        if config.freeze_bn and len(active) < len(groups.names):
            fwd = freeze_batchnorm(frozen_modules(params, trainable), forward)
        phases.append(Phase(start, active, trainable, fwd))
    return TransferSetup(
        config=config,
        groups=groups,
        tx=tx,
        labels=labels,
        learning_rates=learning_rates,
        start_steps=start_steps,
        phases=tuple(phases),
        params=params,
    )


# --- many small fits as one program ----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MembersResult:
    """What `fit_members` returns.

    ``state``: the members' final `jaxnets.train.TrainState`, every leaf with a leading
    member axis. ``eval_steps``: the step counts at which the ``eval_sets`` were scored.
    ``accuracy[name]``: (len(eval_steps), members) accuracy on eval set ``name`` after that
    many updates; ``loss``: (len(eval_steps), members) training loss of the last step before.
    ``snapshots``: with ``snapshots=True``, the members' variables after each of the
    ``eval_steps`` (a tuple of variables dicts with a leading member axis), e.g. to score
    only the point a validation set chose on the test set.
    """

    state: train.TrainState
    eval_steps: tuple[int, ...]
    accuracy: dict[str, np.ndarray]
    loss: np.ndarray
    snapshots: tuple[dict, ...] | None = None


def _rate_scale(rate):
    """The base learning rate as optimizer state (so that it can differ between members)."""
    return optax.inject_hyperparams(optax.scale)(step_size=rate)


def _chunked(d: Mapping[str, np.ndarray], size: int) -> tuple[np.ndarray, ...]:
    """(x, y, mask) of an eval set padded to whole chunks: (k, size, ...) each."""
    x, y = np.asarray(d["x"]), np.asarray(d["y"])
    n = len(y)
    size = min(size, n)
    k = -(-n // size)
    pad = k * size - n
    mask = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
    x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
    y = np.concatenate([y, np.zeros(pad, y.dtype)])
    return (x.reshape(k, size, *x.shape[1:]), y.reshape(k, size), mask.reshape(k, size))


def _stack_members(trees: Sequence[PyTree]) -> PyTree:
    return jax.tree.map(lambda *a: np.stack(a), *trees)


def member(tree: PyTree, m: int) -> PyTree:
    """Member ``m`` of a pytree whose leaves have a leading member axis (`fit_members`)."""
    return jax.tree.map(lambda a: a[m], tree)


def fit_members(
    setup: TransferSetup,
    model: nn.Module,
    variables: Mapping[str, PyTree],
    train_x: np.ndarray,
    train_y: np.ndarray,
    batch_index: np.ndarray,
    learning_rates: np.ndarray,
    *,
    key: jax.Array,
    eval_sets: Mapping[str, Mapping[str, np.ndarray]],
    eval_every: int,
    loss_fn: train.LossFn = train.cross_entropy_loss,
    eval_chunk: int = 250,
    snapshots: bool = False,
    recalibrate_bn: bool = False,
) -> MembersResult:
    """Train M independent copies ("members") of one transfer setup with one compiled step.

    Every member is an ordinary run of ``setup`` (`jaxnets.train.make_train_step` with the
    setup's optimizer, trainable partition and frozen-BatchNorm forward, phase after phase for
    gradual unfreezing) with its own initial variables, training set, batch order and base
    learning rate: members are seeds and points of a learning-rate grid. All members share
    the compiled step of each phase (the rate lives in the optimizer state, so it is data, not
    a constant), so a grid of small fits compiles once per phase and shape.

    Why not one vmapped or scanned program: on CPU (XLA 0.10) a vmapped convolution with
    per-member kernels lowers to a grouped convolution, measured 11x slower than running the
    members' steps one by one (small VGG, 15 members, batch 32), and the same step inside
    ``lax.scan`` / ``lax.map`` ran 4-7x slower per step than dispatched from Python.

    The learning rate: ``setup`` must be configured with ``learning_rate=1.0``; member m's
    updates are then scaled by ``learning_rates[m]`` (an ``optax.inject_hyperparams`` scale
    holding the rate in the optimizer state). For Adam and SGD, whose updates are linear in
    the rate, this is exactly the optimizer at rate ``learning_rates[m]`` (per-group factors
    kept).

    Args:
      setup: from `configure(..., learning_rate=1.0)`.
      model: the Flax module.
      variables: the members' initial variables, each leaf with a leading axis M.
      train_x, train_y: (M, n, ...) and (M, n): member m's training set.
      batch_index: (num_steps, M, B) ints in [0, n): the examples of member m's step k.
      learning_rates: (M,) base learning rates.
      key: the run key; member m's train-state rng is ``fold_in(key, m)``.
      eval_sets: ``{name: {"x", "y"}}`` (may be empty) scored (accuracy, every member) after every
        ``eval_every`` updates; ``num_steps``
        must be a multiple of ``eval_every``.
      recalibrate_bn: score (and snapshot) each member with BatchNorm statistics recomputed
        from its whole training set at the current parameters
        (`jaxnets.train.recalibrate_batch_stats`, the phase's forward, so frozen layers keep
        theirs) instead of the running averages; training itself is unchanged.
    """
    for g in setup.config.new:
        if setup.learning_rates[g] != 1.0:
            raise ValueError(
                f"fit_members: configure the setup with learning_rate=1.0 (the members' rates "
                f"come from learning_rates); group {g!r} has {setup.learning_rates[g]}"
            )
    batch_index = np.asarray(batch_index)
    lrs = np.asarray(learning_rates, np.float32)
    if batch_index.ndim != 3 or not np.issubdtype(batch_index.dtype, np.integer):
        raise ValueError(
            f"fit_members: batch_index must be ints (num_steps, members, batch), got "
            f"{batch_index.dtype} {batch_index.shape}"
        )
    num_steps, members, _ = batch_index.shape
    if lrs.shape != (members,):
        raise ValueError(
            f"fit_members: learning_rates must be ({members},) (one per member), got {lrs.shape}"
        )
    if np.shape(train_x)[:1] != (members,) or np.shape(train_y) != np.shape(train_x)[:2]:
        raise ValueError(
            f"fit_members: train_x (M, n, ...) and train_y (M, n) with M={members}, got "
            f"{np.shape(train_x)} and {np.shape(train_y)}"
        )
    n = np.shape(train_y)[1]
    if batch_index.min() < 0 or batch_index.max() >= n:
        raise ValueError(
            f"fit_members: batch_index must lie in [0, {n}), got "
            f"{batch_index.min()}..{batch_index.max()}"
        )
    starts = [p.start for p in setup.phases]
    if eval_every < 1 or num_steps % eval_every:
        raise ValueError(
            f"fit_members: eval_every must be >= 1 and divide num_steps ({num_steps}), got "
            f"{eval_every}"
        )
    v = _variables_of(variables, "variables")
    bad = [np.shape(leaf) for leaf in jax.tree.leaves(v) if np.shape(leaf)[:1] != (members,)]
    if bad:
        raise ValueError(
            f"fit_members: every variable needs a leading member axis of {members}, got "
            f"shapes {bad[:3]}"
        )

    tx = optax.chain(setup.tx, _rate_scale(1.0))
    cache = setup._trainers.setdefault(("members", id(model), id(loss_fn)), {})
    if "steps" not in cache:
        cache["steps"] = [
            train.make_train_step(model, loss_fn, tx, forward=p.forward, trainable=p.trainable)
            for p in setup.phases
        ]
        cache["opt_init"] = jax.jit(lambda params, rate: optax.chain(
            setup.tx, _rate_scale(rate)).init(params))  # fmt: skip

        def correct(variables, x, y, mask):
            logits = model.apply(variables, x, train=False)
            return jnp.sum((jnp.argmax(logits, -1) == y) * mask)

        cache["correct"] = jax.jit(correct)
    steps_of, opt_init, correct = cache["steps"], cache["opt_init"], cache["correct"]
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    evals = {name: _chunked(d, eval_chunk) for name, d in eval_sets.items()}
    phase_of = np.searchsorted(np.asarray(starts), np.arange(num_steps), side="right") - 1
    eval_steps = tuple(range(eval_every, num_steps + 1, eval_every))
    acc = {name: np.zeros((len(eval_steps), members)) for name in eval_sets}
    losses = np.zeros((len(eval_steps), members))
    finals, snaps = [], [[] for _ in eval_steps]
    for m in range(members):
        params = jax.tree.map(lambda a, m=m: jnp.asarray(a[m]), v["params"])
        state = train.TrainState(
            params=params,
            batch_stats=jax.tree.map(lambda a, m=m: jnp.asarray(a[m]), v.get("batch_stats", {})),
            opt_state=opt_init(params, lrs[m]), step=jnp.zeros((), jnp.int32),
            rng=jax.random.fold_in(key, m),
        )  # fmt: skip
        xs, ys = np.asarray(train_x[m]), np.asarray(train_y[m])
        for k in range(num_steps):
            i = batch_index[k, m]
            state, metrics = steps_of[phase_of[k]](state, {"x": xs[i], "y": ys[i]})
            if (k + 1) % eval_every == 0:
                e = (k + 1) // eval_every - 1
                losses[e, m] = float(metrics["loss"])
                scored = state.variables
                if recalibrate_bn and state.batch_stats:
                    chunks_x = [{"x": xs[j : j + eval_chunk]} for j in range(0, n, eval_chunk)]
                    scored = {"params": state.params, "batch_stats": train.recalibrate_batch_stats(
                        model, scored, chunks_x, forward=setup.phases[phase_of[k]].forward)}  # fmt: skip
                for name, chunks in evals.items():
                    hits = sum(float(correct(scored, *c)) for c in zip(*chunks, strict=True))
                    acc[name][e, m] = hits / len(eval_sets[name]["y"])
                if snapshots:
                    snaps[e].append(jax.tree.map(np.asarray, scored))
        finals.append(jax.tree.map(np.asarray, state))
    return MembersResult(
        state=_stack_members(finals), eval_steps=eval_steps,
        accuracy=acc, loss=losses,
        snapshots=tuple(_stack_members(x) for x in snaps) if snapshots else None,
    )  # fmt: skip
