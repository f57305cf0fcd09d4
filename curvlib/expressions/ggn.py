"""Exact second-order information of a convolution weight from a backpropagated ``s`` (core paper B.2, C).

With ``J_{c,n}`` the weight VJP of column ``c`` of ``s`` for sample ``n``, the GGN is
``G = Σ_{c,n} J_{c,n} J_{c,n}ᵀ``. Everything here is two copies of the weight-VJP network glued along
the legs the quantity keeps together:

- mini-block diagonal (B.2): every weight axis is split into ``(block, within)``; blocks are shared
  by both copies (the diagonal), ``within`` legs are separate (the block's rows and columns). The
  full GGN (all axes in one block) and its diagonal (every element its own block) are special cases.
- Gram matrix (C): the copies share the weight legs and keep ``c, n`` separate: ``[C, N, C, N]``.

The output channel axis ``C_out = (g, co)`` is blocked together with the group leg: blocks holding
whole groups split ``g``, blocks inside a group split ``co``, and blocks that straddle groups use a
one-hot group-membership tensor ``[C_out, G]``.
"""

from __future__ import annotations

import math
from typing import List, Sequence

from torch import Tensor

from ..hyperparams import ConvGeometry
from ..patterns import group_membership
from ..tensor_network import TensorNetwork
from ._builder import COPY, NetworkBuilder, layer_sides, spatial_legs


def _split_axis(builder: NetworkBuilder, name: str, size: int, blocks: int):
    """Legs of one weight axis of ``size`` split into ``blocks``: (legs per copy, block legs, within legs per copy)."""
    if blocks == size:
        builder.set_sizes(**{name: size})
        return [(name,), (name,)], (name,), [(), ()]
    if blocks == 1:
        builder.set_sizes(**{name: size, name + COPY: size})
        return [(name,), (name + COPY,)], (), [(name,), (name + COPY,)]
    block, within = name + "_b", name + "_z"
    builder.set_sizes(**{block: blocks, within: size // blocks, within + COPY: size // blocks})
    return [(block, within), (block, within + COPY)], (block,), [(within,), (within + COPY,)]


def _output_channel_axis(builder: NetworkBuilder, geometry: ConvGeometry, blocks: int):
    """Legs of the output-channel axis ``C_out = (g, co)`` split into ``blocks``.

    Returns per copy the o-side channel legs and the group legs of the i side, the block legs, the
    within legs per copy, and the legs of group-membership operands (for blocks straddling groups).
    """
    groups, per_group = geometry.groups, geometry.out_channels // geometry.groups
    within = geometry.out_channels // blocks
    if per_group % within == 0:
        # every block lies inside one group: the group leg is shared, co is split
        builder.set_sizes(g=groups)
        co_legs, co_block, co_within = _split_axis(builder, "co", per_group, per_group // within)
        channel = [("g", *co_legs[t]) for t in range(2)]
        return channel, [("g",), ("g",)], ("g", *co_block), co_within, []
    if within % per_group == 0:
        # blocks of whole groups: g is split, co belongs to the block's rows
        g_legs, g_block, g_within = _split_axis(builder, "g", groups, blocks)
        co_legs, _, co_within = _split_axis(builder, "co", per_group, 1)
        channel = [(*g_legs[t], *co_legs[t]) for t in range(2)]
        return channel, g_legs, g_block, [(*g_within[t], *co_within[t]) for t in range(2)], []
    # blocks straddle groups: full channel index, tied to the group leg by a membership tensor
    builder.set_sizes(**{"u_b": blocks, "u_z": within, "u_z" + COPY: within, "g": groups, "g" + COPY: groups})
    channel = [("u_b", "u_z"), ("u_b", "u_z" + COPY)]
    g_legs = [("g",), ("g" + COPY,)]
    return channel, g_legs, ("u_b",), [("u_z",), ("u_z" + COPY,)], [channel[t] + g_legs[t] for t in range(2)]


def ggn_blocks(
    x: Tensor, s: Tensor, geometry: ConvGeometry, blocks: Sequence[int], per_sample: bool = False
) -> TensorNetwork:
    """GGN mini-block diagonal ``[[N,] *blocks, d, d]`` (see module docstring), ``d = ∏ axis / blocks``.

    Args:
        x: layer input ``[N, C_layer_in, *size]``.
        s: backpropagated loss-Hessian square root ``[C, N, C_layer_out, *size_out]``.
        blocks: number of blocks per weight axis ``(C_out, C_in // G, *K)``.
    """
    builder = NetworkBuilder(geometry, x.device, x.dtype)
    builder.set_sizes(c=s.shape[0], n=s.shape[1])
    channel, g_legs, out_block, out_within, memberships = _output_channel_axis(builder, geometry, blocks[0])
    ci_legs, ci_block, ci_within = _split_axis(builder, "ci", geometry.in_channels // geometry.groups, blocks[1])
    k_splits = [
        _split_axis(builder, leg, size, b)
        for leg, size, b in zip(spatial_legs(geometry, "k"), geometry.kernel_size, blocks[2:])
    ]
    x_is_i_side = layer_sides(geometry)[0] == "i"
    for t, suffix in enumerate(("", COPY)):
        i_legs = ("n", *g_legs[t], *ci_legs[t], *spatial_legs(geometry, "i", suffix))
        o_legs = ("n", *channel[t], *spatial_legs(geometry, "o", suffix))
        if x_is_i_side:
            builder.data(x, i_legs, "x")
            builder.data(s, ("c", *o_legs), "s")
        else:
            builder.data(s, ("c", *i_legs), "s")
            builder.data(x, o_legs, "x")
        builder.patterns(i_suffix=suffix, o_suffix=suffix, k_legs=[split[0][t] for split in k_splits])
    for legs in memberships:
        member = group_membership(geometry.out_channels, geometry.groups, x.device, x.dtype)
        builder.data(member, legs, "group_membership")
    block_legs = (*out_block, *ci_block, *[leg for split in k_splits for leg in split[1]])
    rows = [
        (*out_within[t], *ci_within[t], *[leg for split in k_splits for leg in split[2][t]]) for t in range(2)
    ]
    d = math.prod(geometry.weight_shape) // math.prod(blocks)
    batch = ("n",) if per_sample else ()
    shape = (*(x.shape[:1] if per_sample else ()), *blocks, d, d)
    return builder.build((*batch, *block_legs, *rows[0], *rows[1]), shape, label="ggn_mini_block")


def ggn_gram(x: Tensor, s: Tensor, geometry: ConvGeometry) -> TensorNetwork:
    """GGN Gram matrix ``[C, N, C, N]``: entry ``(c, n, c', n')`` is ``⟨J_{c,n}, J_{c',n'}⟩``."""
    builder = NetworkBuilder(geometry, x.device, x.dtype)
    builder.set_sizes(**{"c": s.shape[0], "n": s.shape[1], "c" + COPY: s.shape[0], "n" + COPY: s.shape[1]})
    x_is_i_side = layer_sides(geometry)[0] == "i"
    outputs: List[str] = []
    for suffix in ("", COPY):
        n, c = "n" + suffix, "c" + suffix
        i_legs = (n, "g", "ci", *spatial_legs(geometry, "i", suffix))
        o_legs = (n, "g", "co", *spatial_legs(geometry, "o", suffix))
        if x_is_i_side:
            builder.data(x, i_legs, "x")
            builder.data(s, (c, *o_legs), "s")
        else:
            builder.data(s, (c, *i_legs), "s")
            builder.data(x, o_legs, "x")
        builder.patterns(i_suffix=suffix, o_suffix=suffix)
        outputs += [c, n]
    C, N = s.shape[:2]
    return builder.build(outputs, (C, N, C, N), label="ggn_gram")
