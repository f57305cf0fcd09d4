"""The engine: hooks on modules, backpropagated curvature messages, losses.

- :mod:`~curvlib.engine.losses` — loss-Hessian square roots (exact, MC, empirical) and diagonals.
- :mod:`~curvlib.engine.layers` — per-layer quantities from a backpropagated message.
- :mod:`~curvlib.engine.extension` — the interface of a curvature quantity.
- :mod:`~curvlib.engine.diagonal_backprop` — HesScale's diagonal backpropagation over the autograd graph.
- :mod:`~curvlib.engine.context` — the :class:`curvature` context manager tying them together.
"""

from .context import curvature

__all__ = ["curvature"]
