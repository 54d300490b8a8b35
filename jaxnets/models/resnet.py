"""ResNet (He et al. 2015, arXiv:1512.03385) and its plain twin.

A residual block learns F(x) = H(x) - x and outputs relu(F(x) + s(x)), where s is the
identity, or, when the block changes the map size or the width, either

- option A: subsample by the stride and append zero channels (no parameters; the paper's
  CIFAR-10 networks), or
- option B: a 1x1 conv with the stride + BatchNorm (torchvision's ``downsample``).

``plain=True`` builds the same network without s: relu(F(x)). That is the "plain" baseline of
the paper's Fig. 6 (the degradation problem): deeper plain nets train *worse*.

Layout of the parameter tree::

    features/stem/{conv,bn}
    features/stage{k}/block{j}/{conv1,bn1,conv2,bn2[,conv3,bn3][,shortcut_conv,shortcut_bn]}
    head/logits

The stem and every stage sow their output as ``intermediates/features/<name>/out``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp
from jaxtyping import Array, Float

from jaxnets.models.common import (
    BatchNorm,
    check_input,
    check_spatial_dims,
    conv,
    global_avg_pool,
    max_pool,
)

# torch.nn.Linear's default weight init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
_fc_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def shortcut_a(x: Float[Array, "batch *spatial c_in"], stride: int, c_out: int) -> Array:
    """Option A: ``x[:, ::stride, ..., :]`` with zero channels appended up to ``c_out``.

    ``(batch, *spatial, c_in)`` -> ``(batch, *ceil(spatial / stride), c_out)``.
    """
    c_in = x.shape[-1]
    if c_out < c_in:
        raise ValueError(f"option A shortcut cannot shrink channels ({c_in} -> {c_out})")
    if stride > 1:
        x = x[(slice(None),) + (slice(None, None, stride),) * (x.ndim - 2)]
    if c_out > c_in:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, c_out - c_in)])
    return x


class _Block(nn.Module):
    """Shared pieces of the two residual blocks."""

    planes: int
    stride: int = 1
    shortcut: str = "B"
    plain: bool = False
    zero_init_residual: bool = False
    spatial_dims: int = 2
    dtype: Any = None
    expansion: ClassVar[int] = 1

    def _conv(self, features, kernel, stride, name):
        padding = kernel // 2
        return conv(
            features, kernel, stride, padding,
            spatial_dims=self.spatial_dims, dtype=self.dtype, name=name,
        )  # fmt: skip

    def _bn(self, name, zero=False):
        return BatchNorm(zero_init=zero, dtype=self.dtype, name=name)

    def _merge(self, x: Array, residual: Array, train: bool) -> Array:
        """relu(F(x) + s(x)), or relu(F(x)) for the plain twin."""
        if self.plain:
            return nn.relu(residual)
        c_out = self.planes * self.expansion
        if self.stride == 1 and x.shape[-1] == c_out:
            short = x
        elif self.shortcut == "A":
            short = shortcut_a(x, self.stride, c_out)
        else:
            short = self._conv(c_out, 1, self.stride, "shortcut_conv")(x)
            short = self._bn("shortcut_bn")(short, train)
        return nn.relu(residual + short)


class BasicBlock(_Block):
    """Two 3x3 convs: relu(bn2(conv2(relu(bn1(conv1(x))))) + s(x)).

    ``(batch, *spatial, c_in)`` -> ``(batch, *ceil(spatial / stride), planes)``.
    """

    expansion: ClassVar[int] = 1

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        y = nn.relu(self._bn("bn1")(self._conv(self.planes, 3, self.stride, "conv1")(x), train))
        y = self._bn("bn2", self.zero_init_residual)(
            self._conv(self.planes, 3, 1, "conv2")(y), train
        )
        return self._merge(x, y, train)


class Bottleneck(_Block):
    """1x1 reduce, 3x3 (carries the stride, torchvision's "v1.5"), 1x1 expand by 4.

    ``(batch, *spatial, c_in)`` -> ``(batch, *ceil(spatial / stride), 4 * planes)``.
    """

    expansion: ClassVar[int] = 4

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        y = nn.relu(self._bn("bn1")(self._conv(self.planes, 1, 1, "conv1")(x), train))
        y = nn.relu(self._bn("bn2")(self._conv(self.planes, 3, self.stride, "conv2")(y), train))
        y = self._conv(self.planes * 4, 1, 1, "conv3")(y)
        y = self._bn("bn3", self.zero_init_residual)(y, train)
        return self._merge(x, y, train)


BLOCKS: dict[str, type[_Block]] = {"basic": BasicBlock, "bottleneck": Bottleneck}


class Stem(nn.Module):
    """The stem. imagenet: 7x7/2 conv, BN, ReLU, 3x3/2 max-pool (spatial / 4); cifar: 3x3 conv, BN, ReLU."""

    kind: str
    width: int
    spatial_dims: int = 2
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        kernel, stride = (7, 2) if self.kind == "imagenet" else (3, 1)
        x = conv(
            self.width, kernel, stride, kernel // 2,
            spatial_dims=self.spatial_dims, dtype=self.dtype, name="conv",
        )(x)  # fmt: skip
        x = nn.relu(BatchNorm(dtype=self.dtype, name="bn")(x, train))
        if self.kind == "imagenet":
            x = max_pool(x, 3, 2, 1)
        self.sow("intermediates", "out", x)
        return x


class Stage(nn.Module):
    """``num_blocks`` blocks at width ``planes``; the first one carries ``stride``."""

    block: str
    planes: int
    num_blocks: int
    stride: int
    shortcut: str = "B"
    plain: bool = False
    zero_init_residual: bool = False
    spatial_dims: int = 2
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        for j in range(self.num_blocks):
            x = BLOCKS[self.block](
                self.planes,
                self.stride if j == 0 else 1,
                self.shortcut,
                self.plain,
                self.zero_init_residual,
                self.spatial_dims,
                self.dtype,
                name=f"block{j}",
            )(x, train)
        self.sow("intermediates", "out", x)
        return x


class ResNetFeatures(nn.Module):
    """Stem + stages: ``(batch, *spatial, C)`` -> ``(batch, *spatial', widths[-1] * expansion)``."""

    stage_sizes: tuple[int, ...]
    block: str
    widths: tuple[int, ...]
    stem: str
    stem_width: int
    shortcut: str
    plain: bool
    zero_init_residual: bool
    spatial_dims: int
    dtype: Any

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        x = Stem(self.stem, self.stem_width, self.spatial_dims, self.dtype, name="stem")(x, train)
        for k, (n, planes) in enumerate(zip(self.stage_sizes, self.widths, strict=True), start=1):
            x = Stage(
                self.block,
                planes,
                n,
                1 if k == 1 else 2,
                self.shortcut,
                self.plain,
                self.zero_init_residual,
                self.spatial_dims,
                self.dtype,
                name=f"stage{k}",
            )(x, train)
        return x


class ResNet(nn.Module):
    """ResNet: ``(batch, *spatial, channels)`` float -> logits ``(batch, num_classes)``.

    Attributes:
      stage_sizes: blocks per stage; stage 1 keeps the map size, each later stage halves it.
      block: "basic" (two 3x3 convs) or "bottleneck" (1x1-3x3-1x1, output 4x wider).
      widths: the ``planes`` of each stage.
      stem: "imagenet" (7x7/2 conv + 3x3/2 max-pool) or "cifar" (one 3x3 conv).
      stem_width: channels out of the stem.
      shortcut: "A" (zero-padding identity, parameter-free) or "B" (1x1 projection + BN)
        where a block changes shape; identity elsewhere.
      plain: drop every shortcut (the plain twin).
      zero_init_residual: start each block's last BN scale at 0 (torchvision's option).
      spatial_dims: 2 for images ``(batch, H, W, C)``, 1 for sequences ``(batch, L, C)``.
      dtype: computation dtype; params stay float32.

    The head is global average pooling + ``head/logits`` (a Linear layer).
    """

    stage_sizes: tuple[int, ...] = (2, 2, 2, 2)
    block: str = "basic"
    widths: tuple[int, ...] = (64, 128, 256, 512)
    num_classes: int = 1000
    stem: str = "imagenet"
    stem_width: int = 64
    shortcut: str = "B"
    plain: bool = False
    zero_init_residual: bool = False
    spatial_dims: int = 2
    dtype: Any = None

    def __post_init__(self):
        check_spatial_dims(self.spatial_dims)
        if self.block not in BLOCKS:
            raise ValueError(f"block must be one of {sorted(BLOCKS)}, got {self.block!r}")
        if self.stem not in ("imagenet", "cifar"):
            raise ValueError(f"stem must be 'imagenet' or 'cifar', got {self.stem!r}")
        if self.shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' or 'B', got {self.shortcut!r}")
        if len(self.stage_sizes) != len(self.widths) or not self.stage_sizes:
            raise ValueError(
                f"stage_sizes and widths must be non-empty and of equal length, got "
                f"{tuple(self.stage_sizes)} and {tuple(self.widths)}"
            )
        if any(n < 1 for n in self.stage_sizes) or any(w < 1 for w in self.widths):
            raise ValueError(
                f"stage_sizes and widths must be >= 1, got {tuple(self.stage_sizes)}, "
                f"{tuple(self.widths)}"
            )
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        super().__post_init__()

    @nn.compact
    def __call__(
        self, x: Float[Array, "batch *spatial channels"], train: bool = False
    ) -> Float[Array, "batch classes"]:
        check_input(x, self.spatial_dims)
        x = ResNetFeatures(
            tuple(self.stage_sizes),
            self.block,
            tuple(self.widths),
            self.stem,
            self.stem_width,
            self.shortcut,
            self.plain,
            self.zero_init_residual,
            self.spatial_dims,
            self.dtype,
            name="features",
        )(x, train)
        return ResNetHead(self.num_classes, self.dtype, name="head")(x)


class ResNetHead(nn.Module):
    """Global average pool + Linear: ``(batch, *spatial, C)`` -> ``(batch, num_classes)``."""

    num_classes: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        return nn.Dense(self.num_classes, kernel_init=_fc_init, dtype=self.dtype, name="logits")(
            global_avg_pool(x)
        )


def _imagenet_factory(depth: int, block: str, stage_sizes: tuple[int, ...]):
    def make(num_classes: int = 1000, *, width: int = 64, **kwargs: Any) -> ResNet:
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        return ResNet(
            stage_sizes=stage_sizes,
            block=block,
            widths=(width, 2 * width, 4 * width, 8 * width),
            stem_width=width,
            num_classes=num_classes,
            **kwargs,
        )

    make.__name__ = make.__qualname__ = f"resnet{depth}"
    make.__doc__ = (
        f"ResNet-{depth} ({block} blocks {stage_sizes}), torchvision's ImageNet layout.\n\n"
        "``width`` is the stem and first-stage width (64 in the paper; stages double it).\n"
        "Other keywords go to :class:`ResNet` (``plain``, ``shortcut``, ``spatial_dims``, ...)."
    )
    return make


resnet18 = _imagenet_factory(18, "basic", (2, 2, 2, 2))
resnet34 = _imagenet_factory(34, "basic", (3, 4, 6, 3))
resnet50 = _imagenet_factory(50, "bottleneck", (3, 4, 6, 3))
resnet101 = _imagenet_factory(101, "bottleneck", (3, 4, 23, 3))
resnet152 = _imagenet_factory(152, "bottleneck", (3, 8, 36, 3))


def cifar_resnet(
    depth: int,
    num_classes: int = 10,
    *,
    width: int = 16,
    shortcut: str = "A",
    plain: bool = False,
    **kwargs: Any,
) -> ResNet:
    """The paper's CIFAR-10 ResNet: depth = 6n + 2 (20, 32, 44, 56, 110, ...).

    A 3x3 conv to ``width`` channels, three stages of n basic blocks at widths
    (w, 2w, 4w) on maps 32, 16, 8, global average pooling, a Linear layer. Option A
    shortcuts by default (0.27M parameters at depth 20); ``plain=True`` is the plain net.
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(
            f"depth must be 6n + 2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, ...), got {depth!r}"
        )
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    n = (depth - 2) // 6
    return ResNet(
        stage_sizes=(n, n, n),
        block="basic",
        widths=(width, 2 * width, 4 * width),
        num_classes=num_classes,
        stem="cifar",
        stem_width=width,
        shortcut=shortcut,
        plain=plain,
        **kwargs,
    )


__all__ = [
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "cifar_resnet",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "shortcut_a",
]
