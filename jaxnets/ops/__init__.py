"""Fast kernels behind the models: a fused recurrent scan with a hand-written backward pass
(`jaxnets.ops.recurrent`) and convolutions lowered to matrix products on CPU
(`jaxnets.ops.conv`). Each one equals its reference formulation (``jax.grad`` of
``lax.scan``; ``lax.conv_general_dilated``) in the tests."""

from jaxnets.ops.recurrent import fused_scan

__all__ = ["fused_scan"]
