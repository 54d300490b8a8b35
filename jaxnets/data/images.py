"""Small offline image sets: scikit-learn's bundled 8x8 digits, and image resizing.

Images are (N, H, W, C) float32 in [0, 1] (channels last, as every jaxnets CNN takes them)
with int32 labels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from jaxtyping import Float

from jaxnets.data.splits import Dataset, filter_classes, train_test_split

RESIZE_METHODS = ("nearest", "bilinear")


def resize_images(
    images: Float[np.ndarray, "n h w c"],
    size: int | tuple[int, int],
    method: str = "bilinear",
) -> Float[np.ndarray, "n size_h size_w c"]:
    """Resize (N, H, W, C) images to (N, size_h, size_w, C) with `jax.image.resize`.

    Pixel centres are at half-integer coordinates (PyTorch `align_corners=False`). "nearest"
    upsampling by an integer factor f repeats every pixel f x f times; "bilinear" interpolates
    linearly between the neighbouring pixel centres and clamps at the border, so values never
    leave the input's range.
    """
    import jax

    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"resize_images: images must be (N, H, W, C), got shape {images.shape}")
    if method not in RESIZE_METHODS:
        raise ValueError(f"resize_images: method must be one of {RESIZE_METHODS}, got {method!r}")
    hw = (size, size) if isinstance(size, int | np.integer) else tuple(size)
    if len(hw) != 2 or any(int(s) < 1 for s in hw):
        raise ValueError(f"resize_images: size must be a positive int or (H, W), got {size!r}")
    shape = (images.shape[0], int(hw[0]), int(hw[1]), images.shape[3])
    out = jax.image.resize(images.astype(np.float32), shape, method=method)
    return np.asarray(out, dtype=np.float32)


def load_digits(
    *,
    size: int | tuple[int, int] | None = None,
    method: str = "bilinear",
    classes: Sequence[int] | None = None,
    relabel: bool = False,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> Dataset:
    """scikit-learn's bundled handwritten digits (1797 images, 8x8, 10 classes), offline.

    Pixels (0..16 in the original) are scaled to [0, 1]; images come as (N, 8, 8, 1) float32,
    or (N, size, size, 1) when `size` is given (see `resize_images`). `classes` keeps only
    those digits (with `relabel`, `classes[i]` becomes label i). The stratified train/test
    split is seeded by `seed`.

    Example: the first-half/second-half digits for transfer learning::

        source = load_digits(size=16, classes=range(5))
        target = load_digits(size=16, classes=range(5, 10), relabel=True)
    """
    from sklearn.datasets import load_digits as _sk_load_digits

    bunch = _sk_load_digits()
    x = (bunch.images / 16.0).astype(np.float32)[..., None]
    y = bunch.target.astype(np.int32)
    if size is not None:
        x = resize_images(x, size, method)
    num_classes = 10
    if classes is not None:
        classes = list(classes)
        x, y = filter_classes(x, y, classes, relabel=relabel)
        if relabel:
            num_classes = len(classes)
    x_train, y_train, x_test, y_test = train_test_split(
        x, y, test_fraction=test_fraction, seed=seed
    )
    return Dataset(
        x_train,
        y_train,
        x_test,
        y_test,
        num_classes=num_classes,
        name="digits",
        info={"classes": classes if classes is not None else list(range(10))},
    )
