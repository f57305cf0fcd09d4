"""Convolution hyper-parameters: normalisation, validation and layer geometry.

Everything that turns user arguments (ints, tuples, ``'same'``, ``'valid'``) into per-dimension
integers lives here, so that every public function validates the same way and reports errors
that name the argument, the expected and the received value.

A convolution is always described by its *reference convolution* (core paper, D.2): the map from
the ``i`` side (input of a ``Conv``, output of a ``ConvTranspose``) to the ``o`` side. A
``ConvTranspose`` layer's weight ``[C_in_T, C_out_T // G, *K]`` has exactly the layout of its
reference convolution's weight ``[C_out, C_in // G, *K]``; only the roles of the sides swap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Tuple, Union

import torch
from torch import Tensor

IntOrTuple = Union[int, Sequence[int]]
Padding = Union[int, Sequence[int], str]

PADDING_MODES = ("zeros",)


def as_tuple(value: IntOrTuple, num_dims: int, name: str, minimum: int = 1) -> Tuple[int, ...]:
    """Expand an int to ``num_dims`` copies or check a sequence's length; all entries ``>= minimum``.

    >>> as_tuple(2, 3, "stride")
    (2, 2, 2)
    """
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a sequence of {num_dims} ints, got {value!r}")
    if isinstance(value, int):
        values = (value,) * num_dims
    elif isinstance(value, (tuple, list, torch.Size)):
        if len(value) != num_dims:
            raise ValueError(
                f"{name} must have one entry per spatial dimension ({num_dims}), got {tuple(value)!r}"
            )
        values = tuple(value)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise TypeError(f"{name} entries must be ints, got {values!r}")
    else:
        raise TypeError(
            f"{name} must be an int or a sequence of {num_dims} ints, got {type(value).__name__} {value!r}"
        )
    if any(v < minimum for v in values):
        raise ValueError(f"{name} entries must be >= {minimum}, got {values!r}")
    return values


def padding_pairs(
    padding: Padding, kernel_size: Sequence[int], stride: Sequence[int], dilation: Sequence[int]
) -> Tuple[Tuple[int, int], ...]:
    """Per spatial dimension ``(left, right)`` zero padding, as ``torch.nn.functional.conv{N}d`` pads.

    ``'same'`` pads a total of ``D·(K-1)`` per dimension, the smaller half on the left (PyTorch's
    split for even kernels) and requires stride 1; ``'valid'`` pads nothing.

    >>> padding_pairs("same", (4,), (1,), (1,))
    ((1, 2),)
    """
    num_dims = len(kernel_size)
    if isinstance(padding, str):
        if padding == "valid":
            return ((0, 0),) * num_dims
        if padding == "same":
            if any(s != 1 for s in stride):
                raise ValueError(f"padding='same' requires stride 1 in every dimension, got stride={tuple(stride)}")
            totals = [d * (k - 1) for k, d in zip(kernel_size, dilation)]
            return tuple((t // 2, t - t // 2) for t in totals)
        raise ValueError(f"padding must be an int, a tuple, 'same' or 'valid', got {padding!r}")
    return tuple((p, p) for p in as_tuple(padding, num_dims, "padding", minimum=0))


def conv_output_size(size: int, kernel: int, stride: int, pad: Tuple[int, int], dilation: int) -> int:
    """Output length of a convolution along one dimension (core paper, Eq. D12, asymmetric padding)."""
    return (size + pad[0] + pad[1] - dilation * (kernel - 1) - 1) // stride + 1


def transpose_output_size(
    size: int, kernel: int, stride: int, pad: int, dilation: int, output_padding: int
) -> int:
    """Output length of a transposed convolution: ``I(O, A)`` of the core paper, Eq. D13."""
    return (size - 1) * stride - 2 * pad + dilation * (kernel - 1) + output_padding + 1


@dataclass(frozen=True)
class ConvGeometry:
    """Shapes and hyper-parameters of one convolution, in terms of its reference convolution.

    ``input_size``/``output_size`` are the spatial sizes of the reference convolution's ``i``
    and ``o`` sides. For a transposed layer (``transposed=True``) the layer's input lives on
    the ``o`` side and its output on the ``i`` side. ``in_channels``/``out_channels`` are the
    channel counts of the ``i``/``o`` sides, so the weight is always
    ``[out_channels, in_channels // groups, *kernel_size]``.
    """

    in_channels: int
    out_channels: int
    groups: int
    kernel_size: Tuple[int, ...]
    stride: Tuple[int, ...]
    padding: Tuple[Tuple[int, int], ...]
    dilation: Tuple[int, ...]
    input_size: Tuple[int, ...]
    output_size: Tuple[int, ...]
    transposed: bool = False

    @property
    def num_dims(self) -> int:
        return len(self.kernel_size)

    @property
    def weight_shape(self) -> Tuple[int, ...]:
        return (self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    @property
    def layer_input_channels(self) -> int:
        return self.out_channels if self.transposed else self.in_channels

    @property
    def layer_output_channels(self) -> int:
        return self.in_channels if self.transposed else self.out_channels

    @property
    def layer_input_size(self) -> Tuple[int, ...]:
        return self.output_size if self.transposed else self.input_size

    @property
    def layer_output_size(self) -> Tuple[int, ...]:
        return self.input_size if self.transposed else self.output_size

    @property
    def pattern_args(self):
        """Per spatial dimension the arguments ``(I, K, S, (P_l, P_r), D)`` of the index pattern."""
        return tuple(zip(self.input_size, self.kernel_size, self.stride, self.padding, self.dilation))


def make_geometry(
    layer_input_channels: int,
    layer_output_channels: int,
    layer_input_size: Sequence[int],
    kernel_size: IntOrTuple,
    stride: IntOrTuple = 1,
    padding: Padding = 0,
    dilation: IntOrTuple = 1,
    groups: int = 1,
    transposed: bool = False,
    output_padding: IntOrTuple = 0,
    padding_mode: str = "zeros",
) -> ConvGeometry:
    """Validate hyper-parameters of a (transposed) convolution layer and derive its geometry.

    Channels and sizes are those of the *layer* (what the user sees); the result is expressed in
    terms of the reference convolution (see :class:`ConvGeometry`).
    """
    num_dims = len(layer_input_size)
    if num_dims < 1:
        raise ValueError("a convolution needs at least one spatial dimension, got input of 0 spatial dims")
    if padding_mode not in PADDING_MODES:
        raise ValueError(
            f"padding_mode must be one of {PADDING_MODES} (other modes pad the input before a 'valid' "
            f"convolution: apply torch.nn.functional.pad first), got {padding_mode!r}"
        )
    kernel = as_tuple(kernel_size, num_dims, "kernel_size")
    strides = as_tuple(stride, num_dims, "stride")
    dilations = as_tuple(dilation, num_dims, "dilation")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    for name, channels in (("input", layer_input_channels), ("output", layer_output_channels)):
        if channels % groups != 0:
            raise ValueError(f"{name} channels ({channels}) must be divisible by groups ({groups})")

    if transposed:
        if isinstance(padding, str):
            raise ValueError(f"transposed convolutions take int or tuple padding, got {padding!r}")
        pads = as_tuple(padding, num_dims, "padding", minimum=0)
        out_pads = as_tuple(output_padding, num_dims, "output_padding", minimum=0)
        for a, s, d in zip(out_pads, strides, dilations):
            if a >= max(s, d):
                raise ValueError(
                    f"output_padding must be smaller than stride or dilation, got output_padding={out_pads}, "
                    f"stride={strides}, dilation={dilations}"
                )
        ref_input = tuple(
            transpose_output_size(o, k, s, p, d, a)
            for o, k, s, p, d, a in zip(layer_input_size, kernel, strides, pads, dilations, out_pads)
        )
        if any(i < 1 for i in ref_input):
            raise ValueError(
                f"transposed convolution output size {ref_input} is not positive for input size "
                f"{tuple(layer_input_size)}, kernel_size={kernel}, stride={strides}, padding={pads}"
            )
        pad_pairs = tuple((p, p) for p in pads)
        geometry = ConvGeometry(
            in_channels=layer_output_channels,
            out_channels=layer_input_channels,
            groups=groups,
            kernel_size=kernel,
            stride=strides,
            padding=pad_pairs,
            dilation=dilations,
            input_size=ref_input,
            output_size=tuple(layer_input_size),
            transposed=True,
        )
        # The reference convolution of the size-``ref_input`` side has ``O + ⌊A/S⌋`` outputs (Eq. D12
        # with D13): for output_padding A ≥ stride (allowed when dilation > stride) the layer input
        # covers only its first ``O`` outputs (``NetworkBuilder.patterns`` sets the patterns' output_limit).
        return geometry

    if output_padding not in (0, (0,) * num_dims, [0] * num_dims):
        raise ValueError(f"output_padding is only valid with transposed=True, got {output_padding!r}")
    pad_pairs = padding_pairs(padding, kernel, strides, dilations)
    sizes = tuple(layer_input_size)
    for i, k, p, d in zip(sizes, kernel, pad_pairs, dilations):
        if i + p[0] + p[1] < d * (k - 1) + 1:
            raise ValueError(
                f"kernel (size {kernel}, dilation {dilations}) is larger than the padded input "
                f"(size {sizes}, padding {pad_pairs})"
            )
    output = tuple(conv_output_size(*args) for args in zip(sizes, kernel, strides, pad_pairs, dilations))
    return ConvGeometry(
        in_channels=layer_input_channels,
        out_channels=layer_output_channels,
        groups=groups,
        kernel_size=kernel,
        stride=strides,
        padding=pad_pairs,
        dilation=dilations,
        input_size=sizes,
        output_size=output,
        transposed=False,
    )


# ----------------------------------------------------------------------------------------------
# tensor checks


def check_tensor(tensor, name: str, min_dim: int = None, dim: int = None) -> Tensor:
    """Check that ``tensor`` is a floating-point ``torch.Tensor`` of the expected rank."""
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype, got {tensor.dtype}")
    if dim is not None and tensor.dim() != dim:
        raise ValueError(f"{name} must have {dim} dimensions, got shape {tuple(tensor.shape)}")
    if min_dim is not None and tensor.dim() < min_dim:
        raise ValueError(
            f"{name} must have at least {min_dim} dimensions ([N, C, *spatial]), got shape {tuple(tensor.shape)}"
        )
    return tensor


def check_same_device_dtype(**tensors: Tensor) -> None:
    """All given tensors (``None`` skipped) share one device and one dtype."""
    items = [(name, t) for name, t in tensors.items() if t is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}; move them to one device")
        if t.dtype != first.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {first_name} has dtype {first.dtype}; use one dtype")


def check_shape(tensor: Tensor, name: str, expected: Sequence[int], what: str = "") -> None:
    """``tensor.shape == expected`` or a ``ValueError`` naming both."""
    if tuple(tensor.shape) != tuple(expected):
        extra = f" ({what})" if what else ""
        raise ValueError(f"{name} must have shape {tuple(expected)}{extra}, got {tuple(tensor.shape)}")


def spatial_size_argument(size, num_dims: int, name: str) -> Tuple[int, ...]:
    """Accept a spatial size ``(*I)`` or a full shape ``(N, C, *I)`` and return the spatial part."""
    if isinstance(size, int):
        size = (size,) * num_dims
    size = tuple(size)
    if len(size) == num_dims + 2:
        size = size[2:]
    if len(size) != num_dims or not all(isinstance(s, int) and s > 0 for s in size):
        raise ValueError(
            f"{name} must be the spatial size ({num_dims} positive ints) or the full shape "
            f"({num_dims + 2} ints), got {size!r}"
        )
    return size


def numel(shape: Sequence[int]) -> int:
    return math.prod(shape)
