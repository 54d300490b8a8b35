"""Frozen vs full training step: what freezing the backbone saves (``python -m experiments.bench.transfer``).

Three jitted `jaxnets.train` steps of the same VGG-11-BN (width 16, CIFAR-sized 32x32x3 input,
batch 64, Adam), interleaved round by round:

- ``full``: fine-tuning, every parameter differentiated and updated;
- ``frozen``: `jaxnets.transfer` "freeze": the backbone is left out of the differentiated
  partition (no backward pass through it; its BatchNorm layers in inference mode), only the
  head is trained;
- ``set_to_zero``: the naive freeze: the same optimizer (``optax.set_to_zero`` on the
  backbone through ``multi_transform``) but every gradient computed and then discarded.

``frozen`` should cost about one forward pass, ``full`` and ``set_to_zero`` a forward and a
backward pass (about three forward passes).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench import timing
from jaxnets import models, train, transfer


def _steps(quick: bool) -> tuple[dict, dict]:
    if quick:
        model = models.VGG(cfg=(4, "M", 8), num_classes=10, batch_norm=True, head="small",
                           dropout=0.0)  # fmt: skip
        shape = {"batch": 8, "size": 8, "channels": 1}
    else:
        model = models.vgg11(10, width=16, batch_norm=True, head="small")
        shape = {"batch": 64, "size": 32, "channels": 3}
    rng = np.random.default_rng(0)
    b, s, c = shape["batch"], shape["size"], shape["channels"]
    batch = {
        "x": jnp.asarray(rng.standard_normal((b, s, s, c), dtype=np.float32)),
        "y": jnp.asarray(rng.integers(0, 10, b).astype(np.int32)),
    }
    variables = model.init(jax.random.key(0), batch["x"][:1])
    groups = transfer.ParamGroups(backbone="features", head="head")
    loss = train.cross_entropy_loss
    full = transfer.configure(transfer.TransferConfig("finetune"), groups, variables)
    frozen = transfer.configure(transfer.TransferConfig("freeze"), groups, variables)
    candidates = {
        "full": (full.tx, full.trainable, full.forward),
        "frozen": (frozen.tx, frozen.trainable, frozen.forward),
        "set_to_zero": (frozen.tx, None, None),
    }
    runners = {}
    for name, (tx, trainable, forward) in candidates.items():
        step = train.make_train_step(model, loss, tx, trainable=trainable, forward=forward)
        setup = full if name == "full" else frozen
        # a private copy per candidate: the step donates its state
        holder = {"state": jax.tree.map(jnp.array, setup.init_state(jax.random.key(1), variables))}

        def run(step=step, holder=holder) -> None:
            holder["state"], metrics = step(holder["state"], batch)
            metrics["loss"].block_until_ready()

        runners[name] = run
    info = {
        **shape,
        "model": "VGG(4-M-8)-BN" if quick else "vgg11_bn width 16",
        "params": train.count_params(variables["params"]),
        "trainable_frozen": train.count_params(variables["params"]["head"]),
    }
    return runners, info


def measure(quick: bool = False, rounds: int | None = None) -> dict:
    """Seconds per step (median, min, max over interleaved rounds) and the ratios to ``full``.

    ``ratio`` = median(candidate) / median(full): below 1 is cheaper than the full step.
    """
    rounds = rounds or (3 if quick else 30)
    runners, info = _steps(quick)
    t0 = time.perf_counter()
    times = timing.interleaved(runners, rounds=rounds, warmup=2)
    out = {
        "benchmark": "transfer: frozen vs full train step",
        "device": jax.devices()[0].device_kind,
        "backend": jax.default_backend(),
        **info,
        "rounds": rounds,
        "seconds": timing.summary(times, base="full"),
        "elapsed_s": time.perf_counter() - t0,
    }
    out["frozen_speedup"] = out["seconds"]["full"]["median"] / out["seconds"]["frozen"]["median"]
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m experiments.bench.transfer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--quick", action="store_true", help="tiny shapes (a smoke test)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 30; quick 3)")
    args = p.parse_args(argv)
    result = measure(quick=args.quick, rounds=args.rounds)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
