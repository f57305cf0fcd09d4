"""Input-based Kronecker factors of KFAC for (grouped, transposed) convolutions, core paper B.3.

KFC / KFAC-expand (sum over output locations, mean over the batch)::

    n g ci i..., i o k..., n g ci' i'..., i' o k'... -> g (ci k...) (ci' k'...)     · 1/N

KFAC-reduce (unfolded input averaged over output locations with the averaged pattern of G.1)::

    n g ci i..., i k..., n g ci' i'..., i' k'... -> g (ci k...) (ci' k'...)           · 1/N

For a transposed layer the layer input lives on the ``o`` side: ``co``/``o`` take the roles of
``ci``/``i`` and the averaged pattern averages over ``i`` (the layer's output locations).
"""

from __future__ import annotations

import math

from torch import Tensor

from ..hyperparams import ConvGeometry
from ..tensor_network import TensorNetwork
from ._builder import COPY, NetworkBuilder, channel_leg, layer_sides, spatial_legs


def _factor_network(x: Tensor, geometry: ConvGeometry, reduce: bool) -> TensorNetwork:
    in_side, _ = layer_sides(geometry)
    channel = channel_leg(in_side)
    builder = NetworkBuilder(geometry, x.device, x.dtype)
    rows = []
    for suffix in ("", COPY):
        builder.data(x, ("n", "g", channel + suffix, *spatial_legs(geometry, in_side, suffix)), "x")
        k_legs = [(leg,) for leg in spatial_legs(geometry, "k", suffix)]
        if reduce:
            mean_over = "input" if geometry.transposed else "output"
            builder.patterns(i_suffix=suffix, o_suffix=suffix, k_legs=k_legs, mean_over=mean_over)
        elif geometry.transposed:
            builder.patterns(o_suffix=suffix, k_legs=k_legs)
        else:
            builder.patterns(i_suffix=suffix, k_legs=k_legs)
        rows += [channel + suffix, *spatial_legs(geometry, "k", suffix)]
    dim = builder.sizes[channel] * math.prod(geometry.kernel_size)
    return builder.build(
        ("g", *rows), (geometry.groups, dim, dim), scale=1.0 / x.shape[0], label="kfac_reduce" if reduce else "kfc"
    )


def kfc(x: Tensor, geometry: ConvGeometry) -> TensorNetwork:
    """KFAC-expand input factor ``[G, D, D]`` of the layer input ``x``, ``D = C_in/G · ∏K``."""
    return _factor_network(x, geometry, reduce=False)


def kfac_reduce(x: Tensor, geometry: ConvGeometry) -> TensorNetwork:
    """KFAC-reduce input factor ``[G, D, D]`` of the layer input ``x``."""
    return _factor_network(x, geometry, reduce=True)
