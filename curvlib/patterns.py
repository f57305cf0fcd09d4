"""Index pattern tensors Π (core paper, Algorithm D1, D.2, G.1).

``Π(I, K, S, P, D)[i, o, k] = 1`` exactly when input element ``i`` meets kernel element ``k`` at
output location ``o``, i.e. ``i = o·S + k·D − P_left`` and ``0 <= i < I``. A convolution along
one spatial dimension is a contraction with Π; an N-d convolution uses one Π per dimension.

Patterns are described by a hashable :class:`PatternSpec` and materialised by :func:`pattern_tensor`
directly on the target device and dtype; materialised tensors are cached by their arguments
(they are small — ``I·O·K`` numbers — and reused by every call on a layer).

>>> spec = PatternSpec(input_size=5, kernel_size=3, stride=2, padding=(1, 1), dilation=1)
>>> pattern_tensor(spec).shape
torch.Size([5, 3, 3])
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Optional, Tuple

import torch
from torch import Tensor

from .hyperparams import conv_output_size

#: Values of :attr:`PatternSpec.mean_over`: which leg of Π is averaged out (G.1 of the core paper).
MEAN_OVER = (None, "output", "input")


@dataclass(frozen=True)
class PatternSpec:
    """Hyper-parameters of one index pattern along one spatial dimension.

    Attributes:
        input_size: ``I``, size of the ``i`` leg.
        kernel_size: ``K``.
        stride: ``S``.
        padding: ``(P_left, P_right)``; PyTorch's ``'same'`` may be asymmetric.
        dilation: ``D``.
        mean_over: ``None`` for the full ``[I, O, K]`` pattern; ``"output"`` for the averaged
            pattern ``1/O Σ_o Π[:, o, :]`` of shape ``[I, K]`` (KFAC-reduce); ``"input"`` for
            ``1/I Σ_i Π[i, :, :]`` of shape ``[O, K]`` (KFAC-reduce of a transposed layer).
        flip_kernel: reverse the ``k`` leg (used by transformation T6).
        output_step, kernel_step: sub-sample the ``o``/``k`` legs of the pattern with these steps
            (transformations T4/T5 write a strided/dilated pattern as a sub-sampled dense one).
        output_limit, kernel_limit: after sub-sampling keep only this many ``o``/``k`` entries.
    """

    input_size: int
    kernel_size: int
    stride: int = 1
    padding: Tuple[int, int] = (0, 0)
    dilation: int = 1
    mean_over: Optional[str] = None
    flip_kernel: bool = False
    output_step: int = 1
    kernel_step: int = 1
    output_limit: Optional[int] = None
    kernel_limit: Optional[int] = None

    def __post_init__(self):
        if self.mean_over not in MEAN_OVER:
            raise ValueError(f"mean_over must be one of {MEAN_OVER}, got {self.mean_over!r}")
        if isinstance(self.padding, int):
            object.__setattr__(self, "padding", (self.padding, self.padding))

    @property
    def base_output_size(self) -> int:
        return conv_output_size(self.input_size, self.kernel_size, self.stride, self.padding, self.dilation)

    @property
    def output_size(self) -> int:
        """Size ``O`` of the ``o`` leg after sub-sampling (Eq. D12 for plain patterns)."""
        size = -(-self.base_output_size // self.output_step)
        return size if self.output_limit is None else min(size, self.output_limit)

    @property
    def kernel_legs(self) -> int:
        """Size of the ``k`` leg after sub-sampling."""
        size = -(-self.kernel_size // self.kernel_step)
        return size if self.kernel_limit is None else min(size, self.kernel_limit)

    @property
    def is_plain(self) -> bool:
        """A full pattern exactly as Algorithm D1 builds it (no averaging, flip or sub-sampling)."""
        return (
            self.mean_over is None
            and not self.flip_kernel
            and self.output_step == 1
            and self.kernel_step == 1
            and self.output_limit is None
            and self.kernel_limit is None
        )

    @property
    def shape(self) -> Tuple[int, ...]:
        if self.mean_over == "output":
            return (self.input_size, self.kernel_legs)
        if self.mean_over == "input":
            return (self.output_size, self.kernel_legs)
        return (self.input_size, self.output_size, self.kernel_legs)

    @property
    def remainder(self) -> int:
        """Input elements past the last window (D14 holds iff 0): trailing pixels no kernel touches."""
        p_l, p_r = self.padding
        span = self.dilation * (self.kernel_size - 1) + 1
        return (self.input_size + p_l + p_r - span) % self.stride

    def plain(self) -> "PatternSpec":
        return PatternSpec(self.input_size, self.kernel_size, self.stride, self.padding, self.dilation)


def _build(spec: PatternSpec, device: torch.device, dtype: torch.dtype) -> Tensor:
    base_out = spec.base_output_size
    o = torch.arange(base_out, device=device)
    k = torch.arange(spec.kernel_size, device=device)
    i = torch.arange(spec.input_size, device=device)
    # Algorithm D1 without the loop: position of kernel element k at output o, compared to each i.
    position = o[:, None] * spec.stride + k[None, :] * spec.dilation - spec.padding[0]
    pattern = (i[:, None, None] == position[None]).to(dtype)
    pattern = pattern[:, :: spec.output_step, :: spec.kernel_step]
    pattern = pattern[:, : spec.output_size, : spec.kernel_legs]
    if spec.flip_kernel:
        pattern = pattern.flip(-1)
    if spec.mean_over == "output":
        pattern = pattern.mean(1)
    elif spec.mean_over == "input":
        pattern = pattern.mean(0)
    return pattern.contiguous()


@lru_cache(maxsize=1024)
def _cached(spec: PatternSpec, device: torch.device, dtype: torch.dtype) -> Tensor:
    return _build(spec, device, dtype)


def pattern_tensor(spec: PatternSpec, device=None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Materialise the pattern ``spec`` on ``device`` in ``dtype`` (cached; do not modify in place).

    Returns:
        ``[I, O, K]`` for full patterns, ``[I, K]`` for ``mean_over="output"`` and ``[O, K]`` for
        ``mean_over="input"``.
    """
    device = torch.device("cpu") if device is None else torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _cached(spec, device, dtype)


def index_pattern(
    input_size: int,
    kernel_size: int,
    stride: int = 1,
    padding=0,
    dilation: int = 1,
    device=None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Π(I, K, S, P, D) of shape ``[I, O, K]`` (Algorithm D1, 0-based, ``padding`` int or (left, right)).

    >>> index_pattern(4, 2, stride=2).sum().item()  # two non-overlapping windows of two elements
    4.0
    """
    return pattern_tensor(PatternSpec(input_size, kernel_size, stride, padding, dilation), device, dtype)


def transpose_index_pattern(
    output_size: int,
    kernel_size: int,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
    output_padding: int = 0,
    device=None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Pattern of a standalone transposed convolution from its input size ``O`` and ``output_padding`` A.

    Computes ``I(O, A)`` by Eq. D13 of the core paper and returns Π(I, K, S, P, D) of shape
    ``[I, O, K]``: ``i`` is the transposed convolution's output, ``o`` its input.
    """
    from .hyperparams import transpose_output_size

    size = transpose_output_size(output_size, kernel_size, stride, padding, dilation, output_padding)
    return index_pattern(size, kernel_size, stride, padding, dilation, device, dtype)


def averaged_index_pattern(
    input_size: int,
    kernel_size: int,
    stride: int = 1,
    padding=0,
    dilation: int = 1,
    over: str = "output",
    device=None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Π averaged over its output leg (``[I, K]``) or input leg (``[O, K]``), core paper G.1."""
    spec = replace(PatternSpec(input_size, kernel_size, stride, padding, dilation), mean_over=over)
    return pattern_tensor(spec, device, dtype)


@lru_cache(maxsize=256)
def _membership(channels: int, groups: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    per_group = channels // groups
    channel_group = torch.arange(channels, device=device) // per_group
    return (channel_group[:, None] == torch.arange(groups, device=device)[None]).to(dtype)


def group_membership(channels: int, groups: int, device=None, dtype=torch.float32) -> Tensor:
    """One-hot ``[channels, groups]`` tensor: entry ``(c, g)`` is 1 iff channel ``c`` belongs to group ``g``."""
    device = torch.device("cpu") if device is None else torch.device(device)
    return _membership(channels, groups, device, dtype)
