"""CNN model zoo: VGG and ResNet families (2D images and 1D sequences), PyTorch weight import,
the small MNIST-1D baselines (``jaxnets.models.small``) and the long-memory experiments'
recurrent layer with a linear readout (``jaxnets.models.readout``).

Every model maps ``(batch, *spatial, channels)`` floats to logits ``(batch, num_classes)``::

    model = resnet18(num_classes=10)
    variables = model.init(key, x, train=False)            # {"params", "batch_stats"}
    logits = model.apply(variables, x)                      # eval: running statistics
    logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])

Pick models by name with :func:`get_model` (``"vgg16_bn"``, ``"cifar_resnet56"``, ...).
Measurements: :func:`receptive_field` (from the gradient of one output unit) and
:func:`layer_grad_norms` (per-conv gradient norms, in forward order).
"""

from __future__ import annotations

import re
from typing import Any

import flax.linen as nn

from jaxnets.models.common import BatchNorm, adaptive_avg_pool, global_avg_pool
from jaxnets.models.probes import conv_kernels, layer_grad_norms, receptive_field
from jaxnets.models.readout import RecurrentReadout, readout_parts
from jaxnets.models.resnet import (
    BasicBlock,
    Bottleneck,
    ResNet,
    cifar_resnet,
    resnet18,
    resnet34,
    resnet50,
    resnet101,
    resnet152,
)
from jaxnets.models.small import (
    MLP,
    MNIST1D_MODELS,
    ConvNet1D,
    Ensemble,
    GRUClassifier,
    LogisticRegression,
    mnist1d_model,
)
from jaxnets.models.torch_import import (
    from_torchvision_state_dict,
    to_torchvision_state_dict,
    torchvision_shapes,
)
from jaxnets.models.vgg import CFGS, VGG, vgg11, vgg13, vgg16, vgg19

_FACTORIES = {
    "vgg11": vgg11,
    "vgg13": vgg13,
    "vgg16": vgg16,
    "vgg19": vgg19,
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "resnet101": resnet101,
    "resnet152": resnet152,
}


def model_names() -> list[str]:
    """Names :func:`get_model` accepts (``cifar_resnet<6n+2>`` works for any n >= 1)."""
    names = list(_FACTORIES) + [f"{n}_bn" for n in _FACTORIES if n.startswith("vgg")]
    names += [f"cifar_resnet{d}" for d in (20, 32, 44, 56, 110)]
    return names + [f"plain_{n}" for n in names if "resnet" in n]


def get_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a model by name: ``vgg16``, ``vgg16_bn``, ``resnet50``, ``cifar_resnet20``,
    ``plain_cifar_resnet56`` (the plain twin), ... Keywords go to the factory
    (``num_classes``, ``width``, ``spatial_dims``, ``head``, ``shortcut``, ...)."""
    base = name
    if base.startswith("plain_"):
        base = base[len("plain_") :]
        if "resnet" not in base:
            raise ValueError(f"only ResNets have a plain twin, got {name!r}")
        kwargs["plain"] = True
    if base.startswith("vgg") and base.endswith("_bn"):
        base = base[: -len("_bn")]
        kwargs["batch_norm"] = True
    if m := re.fullmatch(r"cifar_resnet(\d+)", base):
        return cifar_resnet(int(m.group(1)), **kwargs)
    if base not in _FACTORIES:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(model_names())}")
    return _FACTORIES[base](**kwargs)


__all__ = [
    # MNIST-1D baselines (jaxnets.models.small)
    "MLP",
    "MNIST1D_MODELS",
    "ConvNet1D",
    "Ensemble",
    "GRUClassifier",
    "LogisticRegression",
    "mnist1d_model",
    # a recurrent layer with a linear readout (jaxnets.models.readout)
    "RecurrentReadout",
    "readout_parts",
    # CNN families
    "CFGS",
    "VGG",
    "BasicBlock",
    "BatchNorm",
    "Bottleneck",
    "ResNet",
    "adaptive_avg_pool",
    "cifar_resnet",
    "conv_kernels",
    "from_torchvision_state_dict",
    "get_model",
    "global_avg_pool",
    "layer_grad_norms",
    "model_names",
    "receptive_field",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "to_torchvision_state_dict",
    "torchvision_shapes",
    "vgg11",
    "vgg13",
    "vgg16",
    "vgg19",
]
