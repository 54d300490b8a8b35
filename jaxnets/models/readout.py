"""A recurrent layer with a linear readout: the long-memory experiments' model."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import flax.linen as nn
from jaxtyping import Array, Float

from jaxnets.bptt.truncated import TruncatedBPTT
from jaxnets.rnn import CELLS


class RecurrentReadout(nn.Module):
    """``cell`` layer (``hidden`` units, parameters under ``"rnn"``) -> Dense readout
    (under ``"head"``) of the last step's output (``every_step=False``, many-to-one) or of
    every step's output (many-to-many).

    ``out=0`` reads one number per sequence (or step) and drops the unit axis. Shapes:
    (B, T, I) -> (B,) / (B, out) many-to-one, (B, T) / (B, T, out) many-to-many.
    ``tbptt=(k1, k2)`` trains the recurrent layer by truncated BPTT (`TruncatedBPTT`);
    the parameters and the outputs are the same either way.
    """

    cell: str = "lstm"
    hidden: int = 64
    out: int = 0
    every_step: bool = False
    tbptt: tuple[int, int] | None = None

    def recurrent_layer(self) -> nn.Module:
        """The recurrent layer, unbound (for `readout_parts` and the analysis functions)."""
        if self.cell not in CELLS:
            raise ValueError(f"cell: expected one of {sorted(CELLS)}, got {self.cell!r}")
        return CELLS[self.cell](self.hidden, parent=None)

    @nn.compact
    def __call__(self, x: Float[Array, "batch time features"]):
        if self.cell not in CELLS:
            raise ValueError(f"cell: expected one of {sorted(CELLS)}, got {self.cell!r}")
        layer = CELLS[self.cell](self.hidden, name="rnn")
        if self.tbptt is None:
            outputs, _ = layer(x)
        else:
            outputs, _ = TruncatedBPTT(layer, *self.tbptt)(x)
        head = nn.Dense(max(self.out, 1), name="head")
        y = head(outputs if self.every_step else outputs[:, -1])
        return y[..., 0] if self.out == 0 else y


def readout_parts(model: RecurrentReadout, params: Mapping) -> tuple[nn.Module, dict, Callable]:
    """``(layer, layer_variables, head)`` of a `RecurrentReadout`: the recurrent layer and
    its variables as the functions of this module take them, and ``head(outputs)`` the
    readout, so that ``head(layer.apply(layer_variables, x)[0]) == model.apply(...)``.

    A loss for `explicit_bptt` / `state_gradients` is then
    ``lambda outputs, final: loss(head(outputs), targets)``.
    """
    layer = model.recurrent_layer()
    kernel, bias = params["head"]["kernel"], params["head"]["bias"]

    def head(outputs):
        z = outputs if model.every_step else outputs[:, -1]
        y = z @ kernel + bias.reshape((1,) * (z.ndim - 1) + bias.shape)
        return y[..., 0] if model.out == 0 else y

    return layer, {"params": params["rnn"]}, head
