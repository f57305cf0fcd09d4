"""curvlib: second-order information of convolutional networks as index-pattern tensor networks.

Layers (each imports only those below it):

- :mod:`curvlib.patterns` — index patterns Π per spatial dimension.
- :mod:`curvlib.expressions` — one builder per operation → :class:`~curvlib.tensor_network.TensorNetwork`.
- :mod:`curvlib.simplify` — exact rewrites (core paper D.3).
- :mod:`curvlib.contract` — cached contraction plans.
- :mod:`curvlib.functional` — the public functions.
- :mod:`curvlib.engine` — hooks: :class:`curvlib.curvature` computes :mod:`curvlib.extensions` during backward.
"""

from . import contract, functional, patterns, simplify
from .engine import curvature
from .tensor_network import TensorNetwork

__version__ = "0.1.0"

__all__ = ["curvature", "contract", "functional", "patterns", "simplify", "TensorNetwork", "__version__"]
