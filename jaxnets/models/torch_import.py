"""Convert between torchvision state dicts and our Flax variables (VGG and ResNet).

A state dict maps torchvision names to arrays (``{k: v.numpy() for k, v in
torch.load(path).items()}`` or ``np.load(npz)``); no torch import is needed here.

Layout conversions (d = spatial dims):

- conv weight ``(out, in, *kernel)`` (OIHW) <-> Flax kernel ``(*kernel, in, out)`` (HWIO);
- linear weight ``(out, in)`` <-> Flax kernel ``(in, out)``;
- VGG's first classifier Linear: torchvision flattens the pooled map as (C, *P), we flatten
  (*P, C), so its input axis is permuted exactly like a conv kernel with kernel size P;
- BatchNorm ``weight``/``bias`` -> params ``scale``/``bias``, ``running_mean``/``running_var``
  -> batch_stats ``mean``/``var``; ``num_batches_tracked`` is ignored on import.

Names: VGG ``features.<i>`` (torchvision's Sequential indices, conv then BN then ReLU, pools
take an index too), ``classifier.0/3/6``; with ``head="small"`` the Linear is ``classifier``.
ResNet ``conv1``, ``bn1``, ``layer<k>.<j>.{conv1,bn1,...,downsample.0,downsample.1}``, ``fc``;
the CIFAR ResNet uses the same names (its option-A shortcuts have no parameters).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxnets.models.resnet import ResNet
from jaxnets.models.vgg import VGG, vgg_stages

_BN_LEAVES = {
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}
_MAX_LISTED = 20


def _vgg_modules(model: VGG) -> dict[tuple[str, ...], tuple[str, str]]:
    """Flax module path -> (torch module name, layer kind) for a VGG."""
    out: dict[tuple[str, ...], tuple[str, str]] = {}
    idx = 0
    for k, (widths, down) in enumerate(vgg_stages(model.cfg), start=1):
        names = [(f"conv{i}", f"bn{i}") for i in range(len(widths))]
        if down and model.downsample == "conv":
            names.append(("down", "down_bn"))
        for c, b in names:
            out[("features", f"stage{k}", c)] = (f"features.{idx}", "conv")
            if model.batch_norm:
                out[("features", f"stage{k}", b)] = (f"features.{idx + 1}", "bn")
            idx += 3 if model.batch_norm else 2
        if down and model.downsample == "maxpool":
            idx += 1
    if model.head == "imagenet":
        out[("head", "fc1")] = ("classifier.0", "dense_chw")
        out[("head", "fc2")] = ("classifier.3", "dense")
        out[("head", "logits")] = ("classifier.6", "dense")
    else:
        out[("head", "logits")] = ("classifier", "dense")
    return out


def _resnet_module(path: tuple[str, ...]) -> tuple[str, str] | None:
    """Flax module path -> (torch module name, layer kind) for a ResNet, by rule."""
    if path == ("features", "stem", "conv"):
        return "conv1", "conv"
    if path == ("features", "stem", "bn"):
        return "bn1", "bn"
    if path == ("head", "logits"):
        return "fc", "dense"
    if len(path) == 4 and path[0] == "features" and path[1].startswith("stage"):
        stage, block, layer = path[1][len("stage") :], path[2][len("block") :], path[3]
        layer = {"shortcut_conv": "downsample.0", "shortcut_bn": "downsample.1"}.get(layer, layer)
        kind = "bn" if layer.startswith("bn") or layer == "downsample.1" else "conv"
        return f"layer{stage}.{block}.{layer}", kind
    return None


def _first_conv(model: Any) -> str:
    if isinstance(model, VGG):
        return "features.0.weight"
    if isinstance(model, ResNet):
        return "conv1.weight"
    raise TypeError(f"model must be a jaxnets VGG or ResNet, got {type(model).__name__}")


def _expected_variables(model: VGG | ResNet, in_channels: int) -> dict[str, Any]:
    """Shapes of ``model.init`` without allocating (``jax.eval_shape``)."""
    size = max(32, model.min_input_size) if isinstance(model, VGG) else 32
    x = jax.ShapeDtypeStruct((1,) + (size,) * model.spatial_dims + (in_channels,), jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)


def _layout(
    model: VGG | ResNet, expected: Mapping[str, Any]
) -> dict[str, tuple[str, tuple[str, ...], str, tuple[int, ...]]]:
    """torch key -> (collection, flax path, kind, flax shape) for every variable of ``model``."""
    modules = _vgg_modules(model) if isinstance(model, VGG) else None
    layout: dict[str, tuple[str, tuple[str, ...], str, tuple[int, ...]]] = {}
    for collection in ("params", "batch_stats"):
        flat = jax.tree_util.tree_flatten_with_path(expected.get(collection, {}))[0]
        for keypath, leaf in flat:
            path = tuple(k.key for k in keypath)
            module, leaf_name = path[:-1], path[-1]
            found = modules.get(module) if modules is not None else _resnet_module(module)
            if found is None:  # a layer this converter does not know: a bug here, not the user's
                raise NotImplementedError(f"no torchvision name for {'/'.join(path)}")
            torch_module, kind = found
            if kind == "bn":
                torch_leaf, kind = _BN_LEAVES[(collection, leaf_name)], "vector"
            elif leaf_name == "kernel":
                torch_leaf = "weight"
            else:
                torch_leaf, kind = "bias", "vector"
            layout[f"{torch_module}.{torch_leaf}"] = (collection, path, kind, tuple(leaf.shape))
    return layout


def _to_torch_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if kind == "conv":  # (*K, I, O) -> (O, I, *K)
        return (shape[-1], shape[-2], *shape[:-2])
    if kind in ("dense", "dense_chw"):
        return (shape[1], shape[0])
    return shape


def torchvision_shapes(model: VGG | ResNet, in_channels: int = 3) -> dict[str, tuple[int, ...]]:
    """torchvision state-dict keys of ``model`` -> their torch shapes (no weights allocated).

    ``num_batches_tracked`` is left out. Useful to see what a ``.pth`` must contain.
    """
    _first_conv(model)
    layout = _layout(model, _expected_variables(model, in_channels))
    return {k: _to_torch_shape(kind, shape) for k, (_, _, kind, shape) in layout.items()}


def from_torchvision_state_dict(
    model: VGG | ResNet, state_dict: Mapping[str, Any]
) -> dict[str, dict[str, Any]]:
    """Variables ``{"params": ..., "batch_stats": ...}`` for ``model`` from torchvision weights.

    Args:
      model: a jaxnets ``VGG`` or ``ResNet`` whose configuration matches the weights (e.g.
        ``vgg16(batch_norm=True)`` for ``vgg16_bn``); ``num_classes`` must match ``fc``.
      state_dict: torchvision parameter names -> arrays (numpy, or anything ``np.asarray``
        accepts). A ``module.`` prefix (DataParallel) is stripped.

    Returns:
      float32 variables that give torchvision's logits: ``model.apply(variables, x)`` with
      ``x`` the NCHW input transposed to NHWC.

    Raises:
      ValueError listing every missing key, unexpected key and shape mismatch.
    """
    state = dict(state_dict)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    first = _first_conv(model)
    if first not in state:
        raise ValueError(
            f"state_dict has no {first!r} (the first conv, which sets the input channels); "
            f"got keys {sorted(state)[:_MAX_LISTED]}"
        )
    in_channels = int(np.shape(state[first])[1])
    layout = _layout(model, _expected_variables(model, in_channels))
    d, positions = model.spatial_dims, _positions(model)

    missing = [k for k in layout if k not in state]
    unexpected = [k for k in state if k not in layout and not k.endswith("num_batches_tracked")]
    mismatched = [
        f"{k}: expected {_to_torch_shape(kind, shape)}, got {tuple(np.shape(state[k]))}"
        for k, (_, _, kind, shape) in layout.items()
        if k in state and tuple(np.shape(state[k])) != _to_torch_shape(kind, shape)
    ]
    if missing or unexpected or mismatched:
        parts = [f"state_dict does not fit {type(model).__name__}:"]
        for title, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches (torch layout)", mismatched),
        ):
            if items:
                shown = ", ".join(items[:_MAX_LISTED])
                more = (
                    f" ... and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
                )
                parts.append(f"  {len(items)} {title}: {shown}{more}")
        raise ValueError("\n".join(parts))

    variables: dict[str, dict[str, Any]] = {}
    for k, (collection, path, kind, _) in layout.items():
        w = _convert_in(kind, np.asarray(state[k], dtype=np.float32), d, positions)
        node = variables.setdefault(collection, {})
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = jnp.asarray(w)
    return variables


def _convert_in(kind: str, w: np.ndarray, d: int, positions: int) -> np.ndarray:
    """torch layout -> Flax layout."""
    if kind == "conv":  # (O, I, *K) -> (*K, I, O)
        return np.transpose(w, (*range(2, 2 + d), 1, 0))
    if kind == "dense":
        return w.T
    if kind == "dense_chw":
        # torch's input index is c * positions + p, ours p * C + c (positions = P^d pooled cells).
        out, n_in = w.shape
        return np.transpose(w.reshape(out, n_in // positions, positions), (2, 1, 0)).reshape(
            n_in, out
        )
    return w


def _convert_out(kind: str, w: np.ndarray, d: int, positions: int) -> np.ndarray:
    """Flax layout -> torch layout (inverse of :func:`_convert_in`)."""
    if kind == "conv":  # (*K, I, O) -> (O, I, *K)
        return np.transpose(w, (d + 1, d, *range(d)))
    if kind == "dense":
        return w.T
    if kind == "dense_chw":
        n_in, out = w.shape
        return np.transpose(w.reshape(positions, n_in // positions, out), (2, 1, 0)).reshape(
            out, n_in
        )
    return w


def _positions(model: VGG | ResNet) -> int:
    """Cells of VGG's adaptive-pooled map, P^d (the first classifier Linear's permutation)."""
    return model.pool_size**model.spatial_dims if isinstance(model, VGG) else 1


def to_torchvision_state_dict(
    model: VGG | ResNet, variables: Mapping[str, Any]
) -> dict[str, np.ndarray]:
    """The inverse of :func:`from_torchvision_state_dict`: torchvision names -> numpy arrays.

    BatchNorm layers get ``num_batches_tracked = 0`` so ``torch_module.load_state_dict`` in
    strict mode accepts the result.
    """
    _first_conv(model)  # type check
    params = variables.get("params")
    if params is None:
        raise ValueError(f"variables must contain 'params', got {sorted(variables)}")
    kernel = (
        params["features"]["stage1"]["conv0"]["kernel"]
        if isinstance(model, VGG)
        else (params["features"]["stem"]["conv"]["kernel"])
    )
    layout = _layout(model, _expected_variables(model, int(np.shape(kernel)[-2])))
    d, positions = model.spatial_dims, _positions(model)
    out: dict[str, np.ndarray] = {}
    for k, (collection, path, kind, shape) in layout.items():
        node = variables.get(collection)
        try:
            for name in path:
                node = node[name]
        except (KeyError, TypeError):
            raise ValueError(f"variables lack {collection}/{'/'.join(path)}") from None
        if tuple(np.shape(node)) != shape:
            raise ValueError(
                f"{collection}/{'/'.join(path)} has shape {tuple(np.shape(node))}, expected {shape}"
            )
        out[k] = _convert_out(kind, np.asarray(node, dtype=np.float32), d, positions)
        if k.endswith("running_var"):
            out[k[: -len("running_var")] + "num_batches_tracked"] = np.array(0, dtype=np.int64)
    return out
