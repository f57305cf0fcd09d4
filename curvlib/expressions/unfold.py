"""Unfolding (im2col), its VJP (fold) and the unfolded kernel (Toeplitz matrix), Table B2.

::

    unfold:         n c i..., i o k... -> n (c k...) (o...)
    unfold VJP:     i o k..., n (c k...) (o...) -> n c i...
    unfolded kernel: i o k..., g co ci k... -> g (co o...) (ci i...)   (one block per group)
"""

from __future__ import annotations

import math

from torch import Tensor

from ..hyperparams import ConvGeometry
from ..tensor_network import TensorNetwork
from ._builder import NetworkBuilder, spatial_legs


def unfold(x: Tensor, geometry: ConvGeometry) -> TensorNetwork:
    """im2col of ``x`` ``[N, C, *I]`` → ``[N, C·∏K, ∏O]`` (the layout of ``torch.nn.functional.unfold``)."""
    builder = NetworkBuilder(geometry, x.device, x.dtype)
    builder.set_sizes(c=x.shape[1])
    builder.data(x, ("n", "c", *spatial_legs(geometry, "i")), "x")
    builder.patterns()
    output = ("n", "c", *spatial_legs(geometry, "k"), *spatial_legs(geometry, "o"))
    shape = (x.shape[0], x.shape[1] * math.prod(geometry.kernel_size), math.prod(geometry.output_size))
    return builder.build(output, shape, label="unfold")


def unfold_vjp(v: Tensor, geometry: ConvGeometry, channels: int) -> TensorNetwork:
    """Fold ``v`` ``[N, C·∏K, ∏O]`` back to input space ``[N, C, *I]`` (VJP of :func:`unfold`)."""
    builder = NetworkBuilder(geometry, v.device, v.dtype)
    builder.set_sizes(c=channels, n=v.shape[0])
    builder.patterns()
    builder.data(v, ("n", "c", *spatial_legs(geometry, "k"), *spatial_legs(geometry, "o")), "v")
    output = ("n", "c", *spatial_legs(geometry, "i"))
    return builder.build(output, (v.shape[0], channels, *geometry.input_size), label="unfold_vjp")


def unfold_kernel(weight: Tensor, geometry: ConvGeometry) -> TensorNetwork:
    """Per-group Toeplitz blocks ``[G, C_out/G · ∏O, C_in/G · ∏I]`` of the kernel."""
    builder = NetworkBuilder(geometry, weight.device, weight.dtype)
    builder.patterns()
    builder.data(weight, ("g", "co", "ci", *spatial_legs(geometry, "k")), "weight")
    output = ("g", "co", *spatial_legs(geometry, "o"), "ci", *spatial_legs(geometry, "i"))
    sizes = builder.sizes
    shape = (
        geometry.groups,
        sizes["co"] * math.prod(geometry.output_size),
        sizes["ci"] * math.prod(geometry.input_size),
    )
    return builder.build(output, shape, label="unfold_kernel")
