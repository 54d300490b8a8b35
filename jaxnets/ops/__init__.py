"""Fast kernels behind the models, each equal to its reference formulation in the tests.

- `jaxnets.ops.recurrent.fused_scan`: one RNN/LSTM/GRU layer as ``lax.scan`` with a
  hand-written, chunked backward (reference: ``jax.grad`` through ``jaxnets.rnn.scan_layer``).
- `jaxnets.ops.conv.conv` / `Conv`: convolution whose kernel gradient is chunked matrix
  products on CPU (reference: ``jax.lax.conv_general_dilated``).
  `jaxnets.ops.conv.conv_bias`: the same plus a bias and an optional ReLU, inside the
  oneDNN call where oneDNN runs it.
- `jaxnets.ops.pool.max_pool`: max pooling with a one-pass gradient for tiled windows
  (reference: ``flax.linen.max_pool``).
- `jaxnets.ops.norm.batch_norm_train`: training-mode BatchNorm with the closed-form
  backward pass (reference: ``jax.grad`` through the two-pass formula).
"""

from jaxnets.ops.conv import Conv
from jaxnets.ops.pool import max_pool
from jaxnets.ops.recurrent import fused_scan

# the conv *function* stays jaxnets.ops.conv.conv, so jaxnets.ops.conv remains the module
__all__ = ["Conv", "fused_scan", "max_pool"]
