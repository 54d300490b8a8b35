"""VGG (Simonyan & Zisserman 2014, arXiv:1409.1556): stacks of 3x3 convolutions.

The network is the notes' recipe repeated: (1) a 3x3 conv with padding 1, which keeps the map
size; (2) BatchNorm (optional) and ReLU; (3) repeat; (4) halve the map with 2x2 max-pooling or
a stride-2 3x3 conv. Two stacked 3x3 convs see a 5x5 window (h -> h-2 -> h-4 without padding)
with 2*9*C^2 weights instead of 25*C^2; three see 7x7 with 27*C^2 instead of 49*C^2.

Layout of the parameter tree (a clean backbone/head split, for transfer learning)::

    features/stage1/conv0/{kernel,bias}, features/stage1/bn0/{scale,bias}, ...
    features/stage1/down, features/stage1/down_bn     (only with downsample="conv")
    head/fc1, head/fc2, head/logits                    (head="imagenet", torchvision's)
    head/logits                                        (head="small")

Each stage sows its output as ``intermediates/features/stage{k}/out``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
from jaxtyping import Array, Float

from jaxnets.models.common import (
    BatchNorm,
    adaptive_avg_pool,
    check_input,
    check_spatial_dims,
    conv,
    global_avg_pool,
    max_pool,
)

# The paper's Table 1 configurations: channel counts of the 3x3 convs, "M" = halve the map.
CFGS: dict[str, tuple[int | str, ...]] = {
    "A": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "B": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "D": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
    "E": (
        64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
        512, 512, 512, 512, "M", 512, 512, 512, 512, "M",
    ),
}  # fmt: skip

# torchvision: Linear layers ~ N(0, 0.01^2), biases 0.
_dense_init = nn.initializers.normal(0.01)


def vgg_stages(cfg: Sequence[int | str]) -> list[tuple[tuple[int, ...], bool]]:
    """Split a VGG configuration into stages: ``[(conv widths, ends with a downsample), ...]``."""
    stages: list[tuple[tuple[int, ...], bool]] = []
    widths: list[int] = []
    for item in cfg:
        if item == "M":
            if not widths:
                raise ValueError(f"cfg must have a conv before every 'M', got {tuple(cfg)}")
            stages.append((tuple(widths), True))
            widths = []
        elif isinstance(item, int) and not isinstance(item, bool) and item > 0:
            widths.append(item)
        else:
            raise ValueError(f"cfg entries must be positive ints or 'M', got {item!r}")
    if widths:
        stages.append((tuple(widths), False))
    if not stages:
        raise ValueError("cfg must contain at least one conv")
    return stages


class VGGStage(nn.Module):
    """k x k conv (+BN) + ReLU, repeated, then an optional downsample (k = ``kernel_size``, 3).

    Padding k // 2 keeps the map size, so stacking is free: n stacked 3x3 layers see a
    (2n + 1)-wide window, the receptive field of one (2n + 1) x (2n + 1) layer.

    ``(batch, *spatial, in)`` -> ``(batch, *spatial', widths[-1])`` with spatial' = spatial // 2
    after a 2x2 max-pool, ceil(spatial / 2) after a stride-2 conv, spatial without downsample.
    """

    widths: tuple[int, ...]
    downsample: str | None  # "maxpool", "conv" or None
    batch_norm: bool = False
    spatial_dims: int = 2
    dtype: Any = None
    kernel_size: int = 3

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        k = self.kernel_size

        def conv_bn_relu(x, width, stride, name, bn_name):
            # torchvision keeps the conv bias even when BatchNorm follows (param parity).
            # Without BatchNorm the ReLU goes into the convolution (one oneDNN call).
            x = conv(
                width, k, stride, k // 2,
                spatial_dims=self.spatial_dims, use_bias=True, dtype=self.dtype,
                activation=None if self.batch_norm else "relu", name=name,
            )(x)  # fmt: skip
            if self.batch_norm:
                x = nn.relu(BatchNorm(dtype=self.dtype, name=bn_name)(x, train))
            return x

        for i, width in enumerate(self.widths):
            x = conv_bn_relu(x, width, 1, f"conv{i}", f"bn{i}")
        if self.downsample == "maxpool":
            x = max_pool(x, 2, 2)
        elif self.downsample == "conv":
            x = conv_bn_relu(x, self.widths[-1], 2, "down", "down_bn")
        self.sow("intermediates", "out", x)
        return x


class VGGFeatures(nn.Module):
    """The convolutional backbone: one :class:`VGGStage` per downsample in ``cfg``."""

    cfg: tuple[int | str, ...]
    batch_norm: bool = False
    downsample: str = "maxpool"
    spatial_dims: int = 2
    dtype: Any = None
    kernel_size: int = 3

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        for k, (widths, down) in enumerate(vgg_stages(self.cfg), start=1):
            x = VGGStage(
                widths,
                self.downsample if down else None,
                self.batch_norm,
                self.spatial_dims,
                self.dtype,
                self.kernel_size,
                name=f"stage{k}",
            )(x, train)
        return x


class VGG(nn.Module):
    """VGG: ``(batch, *spatial, channels)`` float -> logits ``(batch, num_classes)``.

    Attributes:
      cfg: conv widths and "M" marks (see ``CFGS``).
      num_classes: output logits.
      batch_norm: BatchNorm after every conv (torchvision's ``vgg*_bn``).
      downsample: "maxpool" (2x2, stride 2; the paper) or "conv" (stride-2 3x3 conv + BN + ReLU
        at the same width; adds parameters, so torchvision's counts no longer apply).
      head: "imagenet" = torchvision's classifier: adaptive average pool to
        ``pool_size`` per axis, flatten, Linear(hidden) ReLU Dropout, Linear(hidden) ReLU
        Dropout, Linear(num_classes). "small" = global average pool + one Linear, for 32x32
        inputs (the map is 1x1 there, so this is flatten + Linear) and MNIST-1D.
      hidden, pool_size, dropout: the ImageNet head's sizes; dropout applies when ``train``
        and needs ``rngs={"dropout": key}``.
      spatial_dims: 2 for images ``(batch, H, W, C)``, 1 for sequences ``(batch, L, C)``.
      dtype: computation dtype (e.g. ``jnp.bfloat16`` on GPU); params stay float32.
      kernel_size: the conv size, 3 in VGG (odd; padding kernel_size // 2 keeps the map
        size). Other sizes exist for the receptive-field experiment's 5x5 and 7x7 baselines.

    ``train=True`` normalises with batch statistics (apply with ``mutable=["batch_stats"]``);
    ``train=False`` with the running averages.
    """

    cfg: tuple[int | str, ...] = CFGS["D"]
    num_classes: int = 1000
    batch_norm: bool = False
    downsample: str = "maxpool"
    head: str = "imagenet"
    hidden: int = 4096
    pool_size: int = 7
    dropout: float = 0.5
    spatial_dims: int = 2
    dtype: Any = None
    kernel_size: int = 3

    def __post_init__(self):
        check_spatial_dims(self.spatial_dims)
        vgg_stages(self.cfg)
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and >= 1, got {self.kernel_size}")
        if self.downsample not in ("maxpool", "conv"):
            raise ValueError(f"downsample must be 'maxpool' or 'conv', got {self.downsample!r}")
        if self.head not in ("imagenet", "small"):
            raise ValueError(f"head must be 'imagenet' or 'small', got {self.head!r}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        super().__post_init__()

    @property
    def min_input_size(self) -> int:
        """Smallest spatial extent that survives every 2x2 max-pool (1 with conv downsampling)."""
        if self.downsample == "conv":
            return 1
        return 2 ** sum(down for _, down in vgg_stages(self.cfg))

    @nn.compact
    def __call__(
        self, x: Float[Array, "batch *spatial channels"], train: bool = False
    ) -> Float[Array, "batch classes"]:
        check_input(x, self.spatial_dims, self.min_input_size)
        x = VGGFeatures(
            tuple(self.cfg),
            self.batch_norm,
            self.downsample,
            self.spatial_dims,
            self.dtype,
            self.kernel_size,
            name="features",
        )(x, train)
        head = VGGImageNetHead if self.head == "imagenet" else VGGSmallHead
        return head(
            self.num_classes, self.hidden, self.pool_size, self.dropout, self.dtype, name="head"
        )(x, train)


class VGGImageNetHead(nn.Module):
    """torchvision's classifier: ``(batch, *spatial, C)`` -> ``(batch, num_classes)``.

    The pooled map is flattened in (spatial..., C) order; torchvision flattens (C, spatial...),
    which :func:`jaxnets.models.from_torchvision_state_dict` accounts for.
    """

    num_classes: int
    hidden: int = 4096
    pool_size: int = 7
    dropout: float = 0.5
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        x = adaptive_avg_pool(x, (self.pool_size,) * (x.ndim - 2))
        x = x.reshape(x.shape[0], -1)
        for name in ("fc1", "fc2"):
            x = nn.Dense(self.hidden, kernel_init=_dense_init, dtype=self.dtype, name=name)(x)
            x = nn.relu(x)
            if self.dropout > 0:
                x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(self.num_classes, kernel_init=_dense_init, dtype=self.dtype, name="logits")(
            x
        )


class VGGSmallHead(nn.Module):
    """Global average pool + Linear: ``(batch, *spatial, C)`` -> ``(batch, num_classes)``."""

    num_classes: int
    hidden: int = 0  # unused; same signature as the ImageNet head
    pool_size: int = 0
    dropout: float = 0.0
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        x = global_avg_pool(x)
        if self.dropout > 0:
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(self.num_classes, kernel_init=_dense_init, dtype=self.dtype, name="logits")(
            x
        )


def _scaled(cfg: tuple[int | str, ...], width: int) -> tuple[int | str, ...]:
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    return tuple(c if c == "M" else max(1, c * width // 64) for c in cfg)


def _factory(letter: str, depth: int):
    def make(
        num_classes: int = 1000,
        *,
        batch_norm: bool = False,
        width: int = 64,
        head: str = "imagenet",
        **kwargs: Any,
    ) -> VGG:
        return VGG(
            cfg=_scaled(CFGS[letter], width),
            num_classes=num_classes,
            batch_norm=batch_norm,
            head=head,
            dropout=kwargs.pop("dropout", 0.5 if head == "imagenet" else 0.0),
            **kwargs,
        )

    make.__name__ = make.__qualname__ = f"vgg{depth}"
    make.__doc__ = (
        f"VGG-{depth} (configuration {letter} of the paper).\n\n"
        "``width`` is the first stage's channel count (64 in the paper); every stage scales\n"
        "with it (``width=16`` gives 16-32-64-128-128). Other keywords go to :class:`VGG`\n"
        "(``downsample``, ``hidden``, ``pool_size``, ``dropout``, ``spatial_dims``, ``dtype``).\n"
        "``head='small'`` defaults to no dropout."
    )
    return make


vgg11 = _factory("A", 11)
vgg13 = _factory("B", 13)
vgg16 = _factory("D", 16)
vgg19 = _factory("E", 19)

__all__ = ["CFGS", "VGG", "vgg11", "vgg13", "vgg16", "vgg19", "vgg_stages"]
