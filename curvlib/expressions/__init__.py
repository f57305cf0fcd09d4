"""Expression builders: one function per operation, each returning a :class:`~curvlib.tensor_network.TensorNetwork`.

Builders take validated tensors and a :class:`~curvlib.hyperparams.ConvGeometry`; they do not
check user input (that is :mod:`curvlib.functional`'s job) and they do not contract.
"""

from . import convolution, ggn, hesscale, kfac, unfold, weight

__all__ = ["convolution", "ggn", "hesscale", "kfac", "unfold", "weight"]
