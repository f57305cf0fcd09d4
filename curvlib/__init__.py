"""curvlib: second-order information of convolutional networks as index-pattern tensor networks.

Layers (each imports only those below it):

- :mod:`curvlib.patterns` — index patterns Π per spatial dimension.
- :mod:`curvlib.expressions` — one builder per operation → :class:`~curvlib.tensor_network.TensorNetwork`.
- :mod:`curvlib.simplify` — exact rewrites (core paper D.3).
- :mod:`curvlib.contract` — cached contraction plans.
- :mod:`curvlib.native`, :mod:`curvlib.kernels` — PyTorch-kernel and fused-Triton implementations.
- :mod:`curvlib.cost`, :mod:`curvlib.pathways`, :mod:`curvlib.precision` — analytic cost, the choice of
  implementation, and the float32 precision (exact or TF32) of curvlib's products on GPUs.
- :mod:`curvlib.functional` — the public functions (``pathway="auto"``).
- :mod:`curvlib.engine` — hooks: :class:`curvlib.curvature` computes :mod:`curvlib.extensions` during backward.
- :mod:`curvlib.optim` — second-order optimizers on the engine; :mod:`curvlib.profile` — per-layer profiler.
"""

from . import contract, cost, functional, pathways, patterns, precision, simplify
from .engine import curvature
from .tensor_network import TensorNetwork

__version__ = "0.2.0"

__all__ = [
    "curvature", "contract", "cost", "functional", "pathways", "patterns", "precision", "simplify", "TensorNetwork",
    "__version__",
]
