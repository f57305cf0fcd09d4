"""HesScale Hessian-diagonal approximations (Becker & LeCun 1989; Elsayed & Mahmood 2023).

``HesScale()`` → ``param.diag_hesscale``, ``HesScaleGN()`` → ``param.diag_hesscale_gn`` (parameter
shape). The diagonal of the loss Hessian w.r.t. the model output is backpropagated through the
autograd graph with per-operation rules (:mod:`curvlib.engine.diagonal_backprop`), keeping only
diagonals; ``HesScale`` includes the second-derivative terms of non-linear operations, the GN
variant drops them. A layer applied several times sums its diagonals.
"""

from __future__ import annotations

from curvlib.engine.extension import Extension, add_into


class HesScale(Extension):
    """HesScale diagonal (``param.diag_hesscale``)."""

    savefield = "diag_hesscale"
    message = "hessian_diagonal"

    def accumulate(self, group, messages, state):
        from curvlib.engine.diagonal_backprop import parameter_diagonals

        for call, d in zip(group.calls, messages):
            add_into(state, parameter_diagonals(call.module, (call.x,), d))


class HesScaleGN(HesScale):
    """HesScale without second-derivative terms of non-linearities (``param.diag_hesscale_gn``)."""

    savefield = "diag_hesscale_gn"
    message = "hessian_diagonal_gn"
