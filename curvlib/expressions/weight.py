"""Weight VJP (weight gradient) of a convolution, summed or per sample (Table B2)::

    n g ci i..., i o k..., n g co o... -> [n] g co ci k...

The ``i``-side tensor is the layer input for a convolution and the backpropagated vector for a
transposed convolution; the ``o``-side tensor the other one.
"""

from __future__ import annotations

from torch import Tensor

from ..hyperparams import ConvGeometry
from ..tensor_network import TensorNetwork
from ._builder import NetworkBuilder, spatial_legs


def weight_vjp(i_side: Tensor, o_side: Tensor, geometry: ConvGeometry, per_sample: bool = False) -> TensorNetwork:
    """Network for ``Σ_n`` (or per ``n``) of the weight VJP; result ``[[N,] C_out, C_in // G, *K]``."""
    builder = NetworkBuilder(geometry, i_side.device, i_side.dtype)
    builder.data(i_side, ("n", "g", "ci", *spatial_legs(geometry, "i")), "i_side")
    builder.patterns()
    builder.data(o_side, ("n", "g", "co", *spatial_legs(geometry, "o")), "o_side")
    batch = ("n",) if per_sample else ()
    output = (*batch, "g", "co", "ci", *spatial_legs(geometry, "k"))
    shape = (*(i_side.shape[:1] if per_sample else ()), *geometry.weight_shape)
    return builder.build(output, shape, label="weight_vjp" + (" per sample" if per_sample else ""))
