"""CNN training steps: jaxnets models vs PyTorch (channels-last, CPU) vs the same nets in Flax.

Two workloads at batch 128 on 32x32x3 inputs, 10 classes:

- ``vgg``: a VGG-style net, 3x3 convs (padding 1) 64-64-pool-128-128-pool-256-256-pool, ReLU,
  no BatchNorm, then global average pooling and one Linear layer
  (``jaxnets.models.VGG(cfg=VGG_CFG, head="small")``).
- ``resnet20``: He et al.'s CIFAR ResNet-20 (option A shortcuts, BatchNorm in training
  mode; ``jaxnets.models.cifar_resnet(20)``).

One training step = forward, mean softmax cross-entropy against fixed labels, backward and
a plain SGD update (lr 0.01), BatchNorm statistics updated, the same in every framework.
The Flax references are the same architectures written with ``flax.linen.Conv`` and
``flax.linen.BatchNorm``; the PyTorch ones use ``torch.nn`` in ``channels_last`` memory
format (PyTorch's fastest CPU layout for convolutions), on CUDA when JAX runs on a GPU.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxnets import models
from jaxnets.ops import conv, onednn

WORKLOADS = ("vgg", "resnet20")
VGG_CFG = (64, 64, "M", 128, 128, "M", 256, 256, "M")
LR = 0.01


@dataclasses.dataclass(frozen=True)
class Shape:
    batch: int = 128
    size: int = 32
    classes: int = 10


QUICK = Shape(batch=4, size=8)


def data(shape: Shape, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(B, size, size, 3)`` (standard normal, float32) and integer labels ``(B,)``."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((shape.batch, shape.size, shape.size, 3), dtype=np.float32)
    y = rng.integers(0, shape.classes, shape.batch).astype(np.int32)
    return x, y


def jax_step(model: nn.Module, x: np.ndarray, y: np.ndarray) -> Callable[[], None]:
    """A blocking closure running one jitted SGD step of ``model`` (state donated)."""
    xb, yb = jnp.asarray(x), jnp.asarray(y)
    variables = model.init(jax.random.key(0), xb, train=False)
    params = variables["params"]
    stats = variables.get("batch_stats", {})
    tx = optax.sgd(LR)

    def loss_fn(p, bs):
        if bs:
            logits, upd = model.apply(
                {"params": p, "batch_stats": bs}, xb, train=True, mutable=["batch_stats"]
            )
            bs = upd["batch_stats"]
        else:
            logits = model.apply({"params": p}, xb, train=True)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
        return loss, bs

    def step(p, bs, opt):
        (loss, bs), g = jax.value_and_grad(loss_fn, has_aux=True)(p, bs)
        updates, opt = tx.update(g, opt, p)
        return optax.apply_updates(p, updates), bs, opt, loss

    step = jax.jit(step, donate_argnums=(0, 1, 2))
    state = {"p": params, "bs": stats, "opt": tx.init(params)}

    def run() -> None:
        p, bs, opt, loss = step(state["p"], state["bs"], state["opt"])
        loss.block_until_ready()
        state.update(p=p, bs=bs, opt=opt)

    return run


# --- jaxnets -------------------------------------------------------------------------------


def jaxnets_model(name: str, shape: Shape, **kwargs) -> nn.Module:
    if name == "vgg":
        return models.VGG(
            cfg=VGG_CFG, num_classes=shape.classes, head="small", dropout=0.0, **kwargs
        )
    return models.cifar_resnet(20, num_classes=shape.classes, **kwargs)


def jaxnets_step(name: str, shape: Shape, **kwargs) -> Callable[[], None]:
    x, y = data(shape)
    return jax_step(jaxnets_model(name, shape, **kwargs), x, y)


def jaxnets_xla_step(name: str, shape: Shape) -> Callable[[], None] | None:
    """The jaxnets step with XLA's convolutions (and the GEMM kernel gradient), as jaxnets
    runs where the oneDNN extension is not built; None where it is not built anyway."""
    if not onednn.available():
        return None
    step = jaxnets_step(name, shape)

    def run() -> None:
        with conv.onednn_disabled():  # traced on the first call, so inside the block
            step()

    return run


# --- Flax references -----------------------------------------------------------------------


class FlaxVGG(nn.Module):
    """The VGG-style net with ``nn.Conv`` (3x3, padding 1, bias) and ``nn.max_pool``."""

    classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False):
        for item in VGG_CFG:
            if item == "M":
                x = nn.max_pool(x, (2, 2), (2, 2))
            else:
                x = nn.relu(nn.Conv(item, (3, 3), padding=((1, 1), (1, 1)))(x))
        return nn.Dense(self.classes)(jnp.mean(x, axis=(1, 2)))


class FlaxBlock(nn.Module):
    planes: int
    stride: int

    @nn.compact
    def __call__(self, x, train: bool):
        bn = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)  # noqa: E731
        conv = lambda s: nn.Conv(  # noqa: E731
            self.planes, (3, 3), (s, s), padding=((1, 1), (1, 1)), use_bias=False
        )
        h = nn.relu(bn()(conv(self.stride)(x)))
        h = bn()(conv(1)(h))
        short = x
        if self.stride != 1 or x.shape[-1] != self.planes:  # option A: subsample, zero channels
            short = x[:, :: self.stride, :: self.stride, :]
            short = jnp.pad(short, ((0, 0), (0, 0), (0, 0), (0, self.planes - x.shape[-1])))
        return nn.relu(h + short)


class FlaxResNet20(nn.Module):
    classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(16, (3, 3), padding=((1, 1), (1, 1)), use_bias=False)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)(x))
        for k, planes in enumerate((16, 32, 64)):
            for j in range(3):
                x = FlaxBlock(planes, 2 if (k > 0 and j == 0) else 1)(x, train)
        return nn.Dense(self.classes)(jnp.mean(x, axis=(1, 2)))


def flax_step(name: str, shape: Shape) -> Callable[[], None]:
    x, y = data(shape)
    model = FlaxVGG(shape.classes) if name == "vgg" else FlaxResNet20(shape.classes)
    return jax_step(model, x, y)


# --- PyTorch references --------------------------------------------------------------------


def _torch_models():
    import torch
    from torch import nn as tnn

    class VGG(tnn.Module):
        def __init__(self, classes):
            super().__init__()
            layers, c = [], 3
            for item in VGG_CFG:
                if item == "M":
                    layers.append(tnn.MaxPool2d(2))
                else:
                    layers += [tnn.Conv2d(c, item, 3, padding=1), tnn.ReLU(inplace=True)]
                    c = item
            self.features = tnn.Sequential(*layers)
            self.fc = tnn.Linear(c, classes)

        def forward(self, x):
            return self.fc(self.features(x).mean(dim=(2, 3)))

    class Block(tnn.Module):
        def __init__(self, cin, planes, stride):
            super().__init__()
            self.c1 = tnn.Conv2d(cin, planes, 3, stride, 1, bias=False)
            self.b1 = tnn.BatchNorm2d(planes)
            self.c2 = tnn.Conv2d(planes, planes, 3, 1, 1, bias=False)
            self.b2 = tnn.BatchNorm2d(planes)
            self.stride, self.extra = stride, planes - cin

        def forward(self, x):
            h = torch.relu(self.b1(self.c1(x)))
            h = self.b2(self.c2(h))
            short = x
            if self.stride != 1 or self.extra:
                short = tnn.functional.pad(x[:, :, :: self.stride, :: self.stride],
                                           (0, 0, 0, 0, 0, self.extra))  # fmt: skip
            return torch.relu(h + short)

    class ResNet20(tnn.Module):
        def __init__(self, classes):
            super().__init__()
            self.stem = tnn.Sequential(
                tnn.Conv2d(3, 16, 3, 1, 1, bias=False), tnn.BatchNorm2d(16), tnn.ReLU()
            )
            blocks, c = [], 16
            for k, planes in enumerate((16, 32, 64)):
                for j in range(3):
                    blocks.append(Block(c, planes, 2 if (k > 0 and j == 0) else 1))
                    c = planes
            self.blocks = tnn.Sequential(*blocks)
            self.fc = tnn.Linear(64, classes)

        def forward(self, x):
            return self.fc(self.blocks(self.stem(x)).mean(dim=(2, 3)))

    return {"vgg": VGG, "resnet20": ResNet20}


def torch_step(name: str, shape: Shape) -> Callable[[], None]:
    """Training step of the PyTorch twin in channels-last format. ImportError without torch."""
    import torch

    from experiments.bench.rnn import torch_device

    dev = torch_device()
    x, y = data(shape)
    torch.manual_seed(0)
    model = _torch_models()[name](shape.classes).to(dev, memory_format=torch.channels_last)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).to(dev)
    xt = xt.contiguous(memory_format=torch.channels_last)
    yt = torch.from_numpy(y).long().to(dev)
    loss_fn = torch.nn.CrossEntropyLoss()

    def run() -> None:
        loss = loss_fn(model(xt), yt)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev == "cuda":
            torch.cuda.synchronize()

    return run
