"""Linear maps of a convolution: forward, transposed convolution, input VJP/JVP, weight JVP.

All are one network (Table B2, rows "Convolution", "input VJP", "weight JVP", "input JVP"):
a tensor on one side of the reference convolution, the index patterns and a weight-shaped tensor,
mapped to the other side::

    n g ci i..., i o k..., g co ci k... -> n g co o...     (i side → o side: conv, input JVP, weight JVP)
    n g co o..., i o k..., g co ci k... -> n g ci i...     (o side → i side: transposed conv, input VJP)
"""

from __future__ import annotations

from torch import Tensor

from ..hyperparams import ConvGeometry
from ..tensor_network import TensorNetwork
from ._builder import NetworkBuilder, channel_leg, side_sizes, spatial_legs


def propagate(source: Tensor, weight: Tensor, geometry: ConvGeometry, source_side: str) -> TensorNetwork:
    """Map ``source`` ``[N, C_side, *size_side]`` through the convolution to the other side.

    Args:
        source: tensor on side ``source_side`` (``"i"`` or ``"o"``) of the reference convolution.
        weight: ``[C_out, C_in // G, *K]`` (reference convolution layout).
        geometry: the reference convolution.
        source_side: ``"i"`` for a convolution/JVP, ``"o"`` for a transposed convolution/input VJP.

    Returns:
        Network whose result is ``[N, C_other, *size_other]``.
    """
    target_side = "o" if source_side == "i" else "i"
    builder = NetworkBuilder(geometry, source.device, source.dtype)
    builder.data(source, ("n", "g", channel_leg(source_side), *spatial_legs(geometry, source_side)), "source")
    builder.patterns()
    builder.data(weight, ("g", "co", "ci", *spatial_legs(geometry, "k")), "weight")
    channels = geometry.out_channels if target_side == "o" else geometry.in_channels
    output = ("n", "g", channel_leg(target_side), *spatial_legs(geometry, target_side))
    shape = (source.shape[0], channels, *side_sizes(geometry, target_side))
    return builder.build(output, shape, label=f"propagate {source_side}->{target_side}")
