"""HesScale / Becker & LeCun (1989) diagonal backpropagation through a convolution, core paper B.4.

Given the diagonal ``d`` of the (approximate) Hessian w.r.t. the layer output, shaped like the output:

weight diagonal (two copies of the layer input, ``d`` once, sharing the output legs)::

    n g ci i..., i o k..., n g co o..., n g ci i'..., i' o k... -> [n] g co ci k...

input diagonal (two copies of the kernel, ``d`` once, sharing the input and output legs)::

    g co ci k..., i o k..., n g co o..., g co ci k'..., i o k'... -> n g ci i...

For a transposed layer the sides swap: ``d`` lives on the ``i`` side and the input on the ``o`` side.
"""

from __future__ import annotations

from torch import Tensor

from ..hyperparams import ConvGeometry
from ..tensor_network import TensorNetwork
from ._builder import COPY, NetworkBuilder, channel_leg, layer_sides, side_sizes, spatial_legs


def weight_diag(x: Tensor, d: Tensor, geometry: ConvGeometry, per_sample: bool = False) -> TensorNetwork:
    """Approximate weight Hessian diagonal ``[[N,] C_out, C_in // G, *K]``."""
    in_side, out_side = layer_sides(geometry)
    builder = NetworkBuilder(geometry, x.device, x.dtype)
    builder.data(d, ("n", "g", channel_leg(out_side), *spatial_legs(geometry, out_side)), "d")
    for suffix in ("", COPY):
        builder.data(x, ("n", "g", channel_leg(in_side), *spatial_legs(geometry, in_side, suffix)), "x")
        if in_side == "i":
            builder.patterns(i_suffix=suffix)
        else:
            builder.patterns(o_suffix=suffix)
    batch = ("n",) if per_sample else ()
    output = (*batch, "g", "co", "ci", *spatial_legs(geometry, "k"))
    shape = (*(x.shape[:1] if per_sample else ()), *geometry.weight_shape)
    return builder.build(output, shape, label="hesscale_weight_diag")


def input_diag(weight: Tensor, d: Tensor, geometry: ConvGeometry) -> TensorNetwork:
    """Approximate input Hessian diagonal ``[N, C_layer_in, *size_in]``."""
    in_side, out_side = layer_sides(geometry)
    builder = NetworkBuilder(geometry, weight.device, weight.dtype)
    builder.data(d, ("n", "g", channel_leg(out_side), *spatial_legs(geometry, out_side)), "d")
    for suffix in ("", COPY):
        k_legs = spatial_legs(geometry, "k", suffix)
        builder.data(weight, ("g", "co", "ci", *k_legs), "weight")
        builder.patterns(k_legs=[(leg,) for leg in k_legs])
    output = ("n", "g", channel_leg(in_side), *spatial_legs(geometry, in_side))
    channels = geometry.layer_input_channels
    return builder.build(output, (d.shape[0], channels, *side_sizes(geometry, in_side)), label="hesscale_input_diag")
