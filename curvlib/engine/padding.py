"""Constant padding whose backward is a view: no copy per backpropagated column.

PyTorch's backward of ``F.pad(x, pad, value=c)`` (``constant_pad_nd``) is another ``constant_pad_nd``
with the negated pads: it allocates the input-sized gradient and copies the inner window into it.
In a plain backward pass that is one copy per padding layer; in the engine's column
backpropagation it is one per column and layer. On All-CNN-C (four ``ZeroPad2d`` layers, 100
columns, batch 128) these copies took 13 ms of a 167 ms DiagGGNExact step on an H100.

Inside :class:`curvlib.curvature`, a forward hook on every constant-padding module
(``nn.ConstantPad{1,2,3}d``, ``nn.ZeroPad{1,2,3}d``) with non-negative pads replaces its output by
:class:`ConstantPadding`: the same values, whose backward returns the gradient's inner window as a
strided view. An output that an earlier forward hook replaced or changed in place is kept. The next backward kernel (a ReLU mask, a data gradient) reads the view directly.
Padding done with ``F.pad`` inside another module's ``forward`` keeps PyTorch's backward.

>>> import torch
>>> x = torch.randn(2, 3, 4, requires_grad=True)
>>> y = ConstantPadding.apply(x, (1, 2), 0.0)
>>> y.shape
torch.Size([2, 3, 7])
>>> grad = torch.autograd.grad(y, x, torch.ones_like(y))[0]
>>> grad.is_contiguous(), bool((grad == 1).all())
(False, True)
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import recording_suspended

#: the padding modules whose outputs the context replaces (``ZeroPad*d`` subclass ``ConstantPad*d``
#: in recent torch; both are listed for older versions)
CONSTANT_PAD_TYPES = tuple(
    getattr(nn, name) for name in ("ConstantPad1d", "ConstantPad2d", "ConstantPad3d", "ZeroPad1d", "ZeroPad2d",
                                   "ZeroPad3d") if hasattr(nn, name)
)


class ConstantPadding(torch.autograd.Function):
    """``F.pad(x, pad, mode="constant", value=value)`` for non-negative ``pad`` (``F.pad``'s order: last
    axis first, ``(left, right)`` per axis), with the gradient's inner window, a view, as its backward."""

    @staticmethod
    def forward(ctx, x: Tensor, pad: Sequence[int], value: float) -> Tensor:
        ctx.pad = tuple(pad)
        return F.pad(x, tuple(pad), mode="constant", value=value)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return inner_window(grad, ctx.pad), None, None


def inner_window(grad: Tensor, pad: Sequence[int]) -> Tensor:
    """The view of ``grad`` without the ``pad`` border (``pad`` as in ``F.pad``, non-negative)."""
    window = grad
    for position in range(len(pad) // 2):
        axis = grad.dim() - 1 - position
        left, right = pad[2 * position], pad[2 * position + 1]
        window = window.narrow(axis, left, window.shape[axis] - left - right)
    return window


def pad_with_view_backward(module: nn.Module, inputs, output):
    """Forward hook for a constant-padding module: its output recomputed by :class:`ConstantPadding`
    where that applies (gradients enabled, an input that requires them, non-negative pads), else ``None``
    (output kept)."""
    if recording_suspended() or not torch.is_grad_enabled() or not inputs or not isinstance(output, Tensor):
        return None
    x = inputs[0]
    pad = tuple(module.padding)
    if not isinstance(x, Tensor) or not x.requires_grad or any(p < 0 for p in pad) or not _padded_from(output, x):
        return None
    return ConstantPadding.apply(x, pad, module.value)


def _padded_from(output: Tensor, x: Tensor) -> bool:
    """Whether ``output`` is PyTorch's padding of ``x`` itself, not something an earlier forward hook
    returned or modified in place (that output is kept)."""
    node = output.grad_fn
    if node is None or type(node).__name__ != "ConstantPadNdBackward0" or not node.next_functions:
        return False
    source = node.next_functions[0][0]
    return source is x.grad_fn if x.grad_fn is not None else getattr(source, "variable", None) is x
