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


def weight_vjp(
    i_side: Tensor, o_side: Tensor, geometry: ConvGeometry, per_sample: bool = False, columns: str = None
) -> TensorNetwork:
    """Network for ``Σ_n`` (or per ``n``) of the weight VJP; result ``[[C,] [N,] C_out, C_in // G, *K]``.

    ``columns`` (``"i"`` or ``"o"``) names the side whose tensor has a leading column axis ``C``
    (several vectors backpropagated at once); the result then keeps it in front.
    """
    builder = NetworkBuilder(geometry, i_side.device, i_side.dtype)
    column = {"i": ("c",) if columns == "i" else (), "o": ("c",) if columns == "o" else ()}
    carrier = i_side if columns == "i" else o_side
    if columns is not None:
        builder.set_sizes(c=carrier.shape[0], n=carrier.shape[1])
    builder.data(i_side, (*column["i"], "n", "g", "ci", *spatial_legs(geometry, "i")), "i_side")
    builder.patterns()
    builder.data(o_side, (*column["o"], "n", "g", "co", *spatial_legs(geometry, "o")), "o_side")
    batch = ("n",) if per_sample else ()
    lead = ("c",) if columns is not None else ()
    output = (*lead, *batch, "g", "co", "ci", *spatial_legs(geometry, "k"))
    sizes = builder.sizes
    shape = (*(sizes[leg] for leg in lead + batch), *geometry.weight_shape)
    return builder.build(output, shape, label="weight_vjp" + (" per sample" if per_sample else ""))
