"""One convolution layer, forward + both gradients: oneDNN vs XLA vs jaxnets' GEMM vs torch.

``python -m experiments.bench.conv_layers [--rounds 15] [--quick]`` times, interleaved in
one process, ``y = conv(x, w)`` and the gradients of ``sum(y * ct)`` with respect to ``x``
and ``w`` for two layers at batch 128, 32x32, 3x3, padding 1: the VGG-style net's 64->64
and ResNet-20's 16->16, and a small layer (batch 32, 8x8, 16->16). Candidates: ``onednn`` (``conv(impl="onednn")``), ``xla``
(``conv_general_dilated`` and its own gradients), ``gemm`` (XLA forward and input
gradient, jaxnets' GEMM kernel gradient) and ``torch`` (``conv2d`` channels-last), where
installed. Run it again with ``XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=`` to see
XLA without its YNNPACK fusions (a start-up flag, hence a second process).
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench import timing
from jaxnets.ops import conv, onednn

LAYERS = {
    "vgg 64->64": (128, 32, 64, 64),
    "resnet20 16->16": (128, 32, 16, 16),
    "small 16->16 8x8 batch 32": (32, 8, 16, 16),  # where a call's fixed cost shows
}


def jax_candidate(impl: str, x, w, ct):
    f = jax.jit(jax.value_and_grad(
        lambda x, w: jnp.sum(conv.conv(x, w, 1, 1, impl=impl) * ct), (0, 1)))  # fmt: skip
    return lambda: jax.block_until_ready(f(x, w))


def torch_candidate(x, w, ct):
    import torch

    xt = torch.from_numpy(np.asarray(x)).permute(0, 3, 1, 2).contiguous(
        memory_format=torch.channels_last).requires_grad_()  # fmt: skip
    wt = torch.from_numpy(np.asarray(w)).permute(3, 2, 0, 1).contiguous(
        memory_format=torch.channels_last).requires_grad_()  # fmt: skip
    ctt = torch.from_numpy(np.asarray(ct)).permute(0, 3, 1, 2).contiguous(
        memory_format=torch.channels_last)  # fmt: skip

    def run():
        xt.grad = wt.grad = None
        (torch.nn.functional.conv2d(xt, wt, padding=1) * ctt).sum().backward()

    return run


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--quick", action="store_true", help="batch 4, 2 rounds: a smoke test")
    a = p.parse_args(argv)
    out = {"xla_flags": os.environ.get("XLA_FLAGS", "")}
    for name, (n, size, cin, cout) in LAYERS.items():
        n, rounds = (4, 2) if a.quick else (n, a.rounds)
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.standard_normal((n, size, size, cin)), jnp.float32)
        w = jnp.asarray(rng.standard_normal((3, 3, cin, cout)) * 0.1, jnp.float32)
        ct = jnp.asarray(rng.standard_normal((n, size, size, cout)), jnp.float32)
        steps = {}
        if onednn.available():
            steps["onednn"] = jax_candidate("onednn", x, w, ct)
        steps["xla"] = jax_candidate("xla", x, w, ct)
        steps["gemm"] = jax_candidate("gemm", x, w, ct)
        try:
            steps["torch"] = torch_candidate(x, w, ct)
        except ImportError:
            pass
        base = "onednn" if "onednn" in steps else "xla"
        stats = timing.summary(timing.interleaved(steps, rounds), base=base)
        out[name] = stats
        cells = [f"{k} {v['median'] * 1e3:.1f} ms" + (f" ({v['ratio']:.2f}x {base})" if "ratio" in v else "")
                 for k, v in stats.items()]  # fmt: skip
        print(f"{name}: " + ", ".join(cells), flush=True)
    print(json.dumps({k: {c: s["median"] for c, s in v.items()} if isinstance(v, dict) else v
                      for k, v in out.items()}))  # fmt: skip
    return out


if __name__ == "__main__":
    main()
