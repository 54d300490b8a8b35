"""Backpropagation through time made explicit: per-step Jacobians, the product-of-Jacobians
gradient, gradient-norm-versus-lag curves, spectra, Lyapunov exponents, truncated BPTT.

One module per idea, each with its maths in its docstring:

- `jaxnets.bptt.chains`: chains (the recurrences everything works on), validation, the
  forward pass and `trajectory`.
- `jaxnets.bptt.jacobians`: `step_jacobians` (dense J) and `factored_jacobians` (the same
  J exactly, O(T n) memory).
- `jaxnets.bptt.explicit`: `explicit_bptt`, `state_gradients` (matrix-free dL/ds_k),
  `lag_curve`, `log_slope`.
- `jaxnets.bptt.spectra`: `singular_values`, `product_log_singular_values`,
  `pascanu_bound`, `lyapunov_spectrum` / `largest_lyapunov_bruteforce`,
  `matrix_free_singular_values` / `matrix_free_product_norms`.
- `jaxnets.bptt.truncated`: `truncated_apply` / `truncated_grad` / `TruncatedBPTT`
  (truncated BPTT(k1, k2) as a training option).
- `jaxnets.bptt.flossing`: gradient flossing (Engelken 2023): `lyapunov_exponents`
  (differentiable top-k exponents from JVPs and QR), `flossing_loss`, `Flossing` (the
  training option), `floss_step` / `floss`, `leading_exponents` / `lyapunov_hook`.

`RecurrentReadout` / `readout_parts` (the long-memory experiments' model) live in
`jaxnets.models.readout`; ``jaxnets.bptt.RecurrentReadout`` still finds them.

The functions taking ``(layer, variables, x, ...)`` validate their arguments eagerly
(clear errors) and then run as one ``jax.jit`` executable with the layer and the options
static: pass the same (module-level) ``loss_fn`` to reuse the compilation, and the data it
needs (targets, a readout's weights) as ``loss_args``. They can also be called inside
your own ``jit``.
"""

# The chain machinery's private names as well: they were module-level names of the single
# file jaxnets.bptt, and code that extends the analysis reaches them as jaxnets.bptt._setup.
from jaxnets.bptt.chains import (  # noqa: F401
    LossFn,
    Trajectory,
    _batch_first,
    _Cell,
    _cell,
    _chain_step,
    _check_layer,
    _compiled,
    _flip,
    _Forward,
    _forward,
    _readout,
    _run,
    _scalar_loss,
    _Setup,
    _setup,
    _stack,
    _top_h,
    chain_names,
    trajectory,
)
from jaxnets.bptt.explicit import (
    METHODS,
    BPTTResult,
    StateGradients,
    explicit_bptt,
    lag_curve,
    log_slope,
    state_gradients,
)
from jaxnets.bptt.flossing import (
    Flossing,
    floss,
    floss_step,
    flossing_loss,
    leading_exponents,
    lyapunov_exponents,
    lyapunov_hook,
)
from jaxnets.bptt.jacobians import (  # noqa: F401
    JACOBIAN_METHODS,
    FactoredJacobians,
    _cell_factors,
    _chain_factors,
    _chain_jacobians,
    _resolve_method,
    factored_jacobians,
    step_jacobians,
)
from jaxnets.bptt.spectra import (
    largest_lyapunov_bruteforce,
    lyapunov_spectrum,
    matrix_free_product_norms,
    matrix_free_singular_values,
    pascanu_bound,
    product_log_norms,
    product_log_singular_values,
    singular_values,
)
from jaxnets.bptt.truncated import TruncatedBPTT, truncated_apply, truncated_grad
from jaxnets.rnn import CELLS

__all__ = [
    "JACOBIAN_METHODS",
    "LossFn",
    "METHODS",
    "BPTTResult",
    "CELLS",
    "RecurrentReadout",
    "readout_parts",
    "StateGradients",
    "TruncatedBPTT",
    "chain_names",
    "explicit_bptt",
    "factored_jacobians",
    "FactoredJacobians",
    "Flossing",
    "floss",
    "floss_step",
    "flossing_loss",
    "leading_exponents",
    "lyapunov_exponents",
    "lyapunov_hook",
    "largest_lyapunov_bruteforce",
    "lag_curve",
    "log_slope",
    "lyapunov_spectrum",
    "matrix_free_product_norms",
    "matrix_free_singular_values",
    "pascanu_bound",
    "product_log_norms",
    "product_log_singular_values",
    "singular_values",
    "state_gradients",
    "step_jacobians",
    "trajectory",
    "Trajectory",
    "truncated_apply",
    "truncated_grad",
]

_MOVED = ("RecurrentReadout", "readout_parts")


def __getattr__(name: str):
    # jaxnets.models.readout imports this package (TruncatedBPTT), so the names that moved
    # there are looked up when asked for rather than imported here, which would be a cycle.
    if name in _MOVED:
        from jaxnets.models import readout

        return getattr(readout, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
