"""Shared machinery of the expression builders: leg names and network assembly.

Leg names: ``n`` batch, ``c`` columns of ``s``, ``g`` channel group, ``ci``/``co`` channels per
group on the ``i``/``o`` side of the reference convolution, ``i{j}``, ``o{j}``, ``k{j}`` the
spatial input, output and kernel legs of spatial dimension ``j``. A second copy of a leg (two
copies of a Jacobian in a GGN, say) carries the suffix ``'``.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..hyperparams import ConvGeometry
from ..patterns import PatternSpec
from ..tensor_network import Operand, TensorNetwork

COPY = "'"


def spatial_legs(geometry: ConvGeometry, side: str, suffix: str = "") -> Tuple[str, ...]:
    """Leg names of one side (``"i"``, ``"o"`` or ``"k"``) for every spatial dimension."""
    return tuple(f"{side}{j}{suffix}" for j in range(geometry.num_dims))


def side_sizes(geometry: ConvGeometry, side: str) -> Tuple[int, ...]:
    return {"i": geometry.input_size, "o": geometry.output_size, "k": geometry.kernel_size}[side]


def layer_sides(geometry: ConvGeometry) -> Tuple[str, str]:
    """``(side of the layer input, side of the layer output)``: ``("i", "o")``, swapped if transposed."""
    return ("o", "i") if geometry.transposed else ("i", "o")


def channel_leg(side: str) -> str:
    """Channels-per-group leg of a side: ``ci`` on the ``i`` side, ``co`` on the ``o`` side."""
    return "ci" if side == "i" else "co"


class NetworkBuilder:
    """Collects operands and leg sizes, then builds a :class:`TensorNetwork`."""

    def __init__(self, geometry: Optional[ConvGeometry], device, dtype):
        self.geometry = geometry
        self.device = torch.device(device)
        self.dtype = dtype
        self.operands: List[Operand] = []
        self.sizes: Dict[str, int] = {}
        self._views: Dict[tuple, tuple] = {}
        if geometry is not None:
            for side in "iok":
                for suffix in ("", COPY):
                    for leg, size in zip(spatial_legs(geometry, side, suffix), side_sizes(geometry, side)):
                        self.sizes[leg] = size
            groups = geometry.groups
            self.set_sizes(g=groups, ci=geometry.in_channels // groups, co=geometry.out_channels // groups)
            self.set_sizes(**{"g" + COPY: groups, "ci" + COPY: self.sizes["ci"], "co" + COPY: self.sizes["co"]})

    def set_sizes(self, **sizes: int) -> None:
        self.sizes.update(sizes)

    def data(self, tensor: Tensor, legs: Sequence[str], name: str) -> None:
        """Add a data operand; ``tensor`` is reshaped (a view for contiguous data) to the legs' sizes.

        Legs whose size is not yet known take it from ``tensor`` when ranks match.
        """
        legs = tuple(legs)
        if tensor.dim() == len(legs):
            for leg, size in zip(legs, tensor.shape):
                self.sizes.setdefault(leg, size)
        unknown = [leg for leg in legs if leg not in self.sizes]
        if len(unknown) == 1:  # infer the one missing size from the number of elements
            known = math.prod(self.sizes[leg] for leg in legs if leg != unknown[0])
            self.sizes[unknown[0]] = tensor.numel() // max(known, 1)
        shape = tuple(self.sizes[leg] for leg in legs)
        # one view object per (tensor, shape): copies of an operand stay recognisably identical
        key = (id(tensor), shape)
        if key not in self._views:
            self._views[key] = (tensor, tensor.reshape(shape))
        self.operands.append(Operand(legs=legs, tensor=self._views[key][1], name=name))

    def patterns(
        self,
        i_suffix: str = "",
        o_suffix: str = "",
        k_legs: Optional[Sequence[Sequence[str]]] = None,
        mean_over: Optional[str] = None,
    ) -> None:
        """Add one index pattern per spatial dimension with legs ``(i, o, k)`` (``mean_over`` drops one).

        ``k_legs[j]`` may split the kernel leg of dimension ``j`` into several legs (mini-blocks).
        """
        geometry = self.geometry
        i_legs = spatial_legs(geometry, "i", i_suffix)
        o_legs = spatial_legs(geometry, "o", o_suffix)
        if k_legs is None:
            k_legs = [(leg,) for leg in spatial_legs(geometry, "k")]
        for j, (size, kernel, stride, pad, dilation) in enumerate(geometry.pattern_args):
            spec = PatternSpec(size, kernel, stride, pad, dilation, mean_over=mean_over)
            if spec.output_size != geometry.output_size[j]:
                # transposed layer with output_padding >= stride: its input is the reference
                # convolution's first O outputs only (the rest are cut off, not summed)
                spec = PatternSpec(size, kernel, stride, pad, dilation, mean_over=mean_over,
                                   output_limit=geometry.output_size[j])
            if mean_over == "output":
                legs = (i_legs[j], *k_legs[j])
            elif mean_over == "input":
                legs = (o_legs[j], *k_legs[j])
            else:
                legs = (i_legs[j], o_legs[j], *k_legs[j])
            self.operands.append(Operand(legs=legs, pattern=spec, name=f"Π{j}"))

    def build(
        self, output: Sequence[str], output_shape: Sequence[int], scale: float = 1.0, label: str = ""
    ) -> TensorNetwork:
        return TensorNetwork(
            operands=tuple(self.operands),
            output=tuple(output),
            sizes=dict(self.sizes),
            output_shape=tuple(output_shape),
            device=self.device,
            dtype=self.dtype,
            scale=scale,
            label=label,
        )

