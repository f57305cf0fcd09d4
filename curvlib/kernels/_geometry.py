"""A :class:`~curvlib.hyperparams.ConvGeometry` as the flat integers the kernels take.

Every kernel is written once for three spatial dimensions; a 1-d or 2-d convolution is embedded by
prepending trivial dimensions (size 1, kernel 1, stride 1, dilation 1, no padding). That keeps one
kernel per operation for all dimensionalities: index arithmetic on a trivial dimension costs a few
integer operations and changes nothing.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

from ..hyperparams import ConvGeometry

#: spatial dimensions the kernels index; lower-dimensional convolutions are embedded
KERNEL_DIMS = 3


@dataclass(frozen=True)
class KernelGeometry:
    """Per-dimension sizes of a (non-transposed) convolution, padded to :data:`KERNEL_DIMS` dims.

    ``pad_left`` is the left zero padding per dimension (the right padding only limits the output
    size, which is given). Bit ``j`` of ``check`` is set when some window leaves the input along
    dim ``j`` (padding): kernels bounds-check only those dims.
    """

    groups: int
    in_channels: int
    out_channels: int
    input_size: Tuple[int, int, int]
    kernel_size: Tuple[int, int, int]
    stride: Tuple[int, int, int]
    dilation: Tuple[int, int, int]
    pad_left: Tuple[int, int, int]
    output_size: Tuple[int, int, int]
    check: int

    @property
    def channels_per_group(self) -> int:
        return self.in_channels // self.groups

    @property
    def out_channels_per_group(self) -> int:
        return self.out_channels // self.groups

    @property
    def kernel_numel(self) -> int:
        return math.prod(self.kernel_size)

    @property
    def input_numel(self) -> int:
        return math.prod(self.input_size)

    @property
    def output_numel(self) -> int:
        return math.prod(self.output_size)

    @property
    def rows(self) -> int:
        """``D = C_in / G · ∏K``: rows of one group's Kronecker factor, columns of the flat weight."""
        return self.channels_per_group * self.kernel_numel

    def spatial_args(self) -> tuple:
        """The 21 spatial integers in the order every kernel takes them (sizes first, then offsets)."""
        return (*self.input_size, *self.kernel_size, *self.output_size, *self.stride, *self.dilation, *self.pad_left)


@functools.lru_cache(maxsize=4096)  # called on every launch; geometries are few and hashable
def kernel_geometry(geometry: ConvGeometry) -> KernelGeometry:
    """Embed ``geometry`` in :data:`KERNEL_DIMS` dims; raises ``ValueError`` for unsupported geometries."""
    if geometry.transposed:
        raise ValueError("fused kernels support non-transposed convolutions only, got transposed=True")
    extra = KERNEL_DIMS - geometry.num_dims
    if extra < 0:
        raise ValueError(f"fused kernels support up to {KERNEL_DIMS} spatial dims, got {geometry.num_dims}")

    def embed(values, fill):
        return (fill,) * extra + tuple(values)

    return KernelGeometry(
        groups=geometry.groups,
        in_channels=geometry.in_channels,
        out_channels=geometry.out_channels,
        input_size=embed(geometry.input_size, 1),
        kernel_size=embed(geometry.kernel_size, 1),
        stride=embed(geometry.stride, 1),
        dilation=embed(geometry.dilation, 1),
        pad_left=embed((left for left, _ in geometry.padding), 0),
        output_size=embed(geometry.output_size, 1),
        check=sum(1 << j for j, (left, right) in enumerate(embed(geometry.padding, (0, 0))) if left > 0 or right > 0),
    )


def trivial_geometry(groups: int, channels: int) -> KernelGeometry:
    """A kernel-size-1 'convolution' of a ``[N, channels]`` input: its KFC is the Gram of the rows."""
    ones = (1, 1, 1)
    return KernelGeometry(groups, channels, groups, ones, ones, ones, ones, (0, 0, 0), ones, 0)


@functools.lru_cache(maxsize=4096)
def phase_taps(size: int, kernel: int, stride: int, dilation: int, pad_left: int, phase: int) -> Tuple[int, ...]:
    """One phase of a convolution's input positions along one dim, for its data gradient
    (:mod:`.input_vjp`): ``(positions, first tap, tap step, taps, first δ, δ step)``.

    The phase holds the input positions ``i = phase + stride·a`` (``a < positions``). The kernel entries
    whose windows reach them are ``k = first tap + m·tap step`` (``m < taps``): those with
    ``(phase + pad_left − k·dilation) ≡ 0 (mod stride)``, an arithmetic progression of step
    ``stride / gcd(stride, dilation)``. Entry ``m`` reads output location ``q = a + first δ − m·δ step``
    (the caller bounds-checks ``q``). No taps (``taps = 0``): no window reaches the phase.

    >>> phase_taps(33, 3, 2, 1, 0, 0)   # a 3-tap stride-2 layer: even positions see taps 0 and 2
    (17, 0, 2, 2, 0, 1)
    >>> phase_taps(33, 3, 2, 1, 0, 1)   # odd positions see tap 1 only
    (16, 1, 2, 1, 0, 1)
    """
    positions = max(0, -(-(size - phase) // stride))
    taps = [k for k in range(kernel) if (phase + pad_left - k * dilation) % stride == 0]
    if not taps:
        return positions, 0, 1, 0, 0, 0
    step = stride // math.gcd(stride, dilation)
    first_delta = (phase + pad_left - taps[0] * dilation) // stride
    return positions, taps[0], step, len(taps), first_delta, step * dilation // stride


@functools.lru_cache(maxsize=4096)
def polyphase(geometry: KernelGeometry, window: Optional[Tuple[Tuple[int, int], ...]] = None
              ) -> List[Tuple[Tuple[int, Tuple[int, ...]], ...]]:
    """The phases of the input positions (see :func:`phase_taps`): one entry per phase
    ``((r0, taps0), (r1, taps1), (r2, taps2))`` with ``r_j = i_j mod stride_j`` and ``taps_j`` the
    :func:`phase_taps` of that dim; ``∏ min(stride_j, size_j)`` entries covering every input position once.

    ``window``: ``(first, size)`` per embedded dim, the box of input positions wanted (a data gradient
    cropped to the inner window of a zero padding: the positions outside are not computed). Each phase
    then lists only its positions inside the box, and ``r_j`` is the box coordinate of the first of them
    (``i = first + r_j + stride_j·a``, ``r_j`` possibly ``≥ stride_j``); the first output location moves
    with it. ``None``: the whole input."""
    dims = []
    for j in range(KERNEL_DIMS):
        first, size = (0, geometry.input_size[j]) if window is None else window[j]
        phases = []
        for r in range(min(geometry.stride[j], geometry.input_size[j])):
            taps = phase_taps(geometry.input_size[j], geometry.kernel_size[j], geometry.stride[j],
                              geometry.dilation[j], geometry.pad_left[j], r)
            phases.append(_inside(r, taps, geometry.stride[j], first, size))
        dims.append(phases)
    return [(d0, d1, d2) for d0 in dims[0] for d1 in dims[1] for d2 in dims[2]]


def _inside(phase: int, taps: Tuple[int, ...], stride: int, first: int, size: int) -> Tuple[int, Tuple[int, ...]]:
    """One dim's phase restricted to positions ``first ≤ i < first + size``: ``(r, taps)`` with ``r`` the
    first such position's box coordinate and the count and first δ of ``taps`` adjusted."""
    positions, tap, tap_step, count, delta, delta_step = taps
    lowest = max(0, -(-(first - phase) // stride))              # first a with phase + stride·a ≥ first
    highest = min(positions - 1, (first + size - 1 - phase) // stride)
    inside = max(0, highest - lowest + 1)
    return phase + stride * lowest - first, (inside, tap, tap_step, count, delta + lowest, delta_step)
