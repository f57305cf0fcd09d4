"""Batched backward rules of autograd nodes: the gradients of ``J`` vectors in one call per node.

A rule takes the node, the gradient at the node's output ``g [J, *out]`` (the vectors' axis first) and
which of the node's input slots need a gradient, and returns one gradient ``[J, *in]`` (or ``None``) per
entry of ``node.next_functions``. Where the node's backward works sample by sample (convolutions,
pooling) the rule folds ``J`` into the batch axis and runs one kernel on a ``J``-times larger batch;
elementwise nodes broadcast their saved ``[N, ...]`` tensors over ``J``; shape nodes act on the axes
after the first. :mod:`curvlib.engine.graph_vjp` walks the graph and calls these rules; it fits each
result to the shape and dtype the receiving node expects (summing broadcast axes, as autograd does).

The rules read the tensors a node saved for its backward (``node._saved_weight`` ...). What they derive
from them — saved tensors and weights in the channels-last layout, the nodes' hyper-parameters — is kept
in ``cache`` (one dict per backward pass of many chunks of vectors), so each is derived once per step.

Chain rules (:func:`chain_rule`) take several nodes at once where each is the only consumer of the
previous one's gradient: a strided convolution's data gradient, a zero padding's inner window and a
ReLU's mask in one launch of curvlib's polyphase kernel.

A node with no rule here, or one the rule cannot handle (a parameter's gradient, training-mode batch
norm, a node with several differentiable outputs), raises :class:`UnsupportedNode`; the engine then
runs the whole pass through ``torch.func.vmap`` over autograd instead.

>>> import torch
>>> x = torch.randn(3, 4, requires_grad=True)
>>> node = torch.relu(x).grad_fn
>>> g = torch.randn(5, 3, 4)                     # five vectors
>>> rule_for(node)(node, g, [True], {}, BackwardOptions())[0].shape
torch.Size([5, 3, 4])
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .padding import ConstantPadding, inner_window

__all__ = ["BackwardOptions", "UnsupportedNode", "chain_rule", "rule_for", "supported_node_names", "slot_shape"]


class UnsupportedNode(Exception):
    """A node (or a use of it) that :mod:`.graph_vjp` has no batched rule for; the caller falls back."""


@dataclass(frozen=True)
class BackwardOptions:
    """How the batched backward runs.

    ``channels_last``: 4-d and 5-d convolution data gradients on CUDA run on channels-last tensors (the
    weights converted once per graph, the ReLU outputs likewise), so cuDNN's tensor-core kernels need no
    layout transposes of the ``J·N``-sample gradients; the gradients handed on are channels-last.

    ``message_dtype``: the floating dtype the gradients of float32 tensors are carried in (``None``:
    their own). ``torch.bfloat16`` halves the bytes of every pass and runs the data gradients on the
    bf16 matrix units; each node's result is rounded to it (relative error about ``4e-3`` per node,
    accumulating over the depth), while products accumulate in float32. What a rule derives from
    float32 saved tensors (weights, ReLU outputs) is converted once per graph. Gradients of tensors of
    other dtypes (float64, half) keep theirs.
    """

    channels_last: bool = False
    message_dtype: Optional[torch.dtype] = None

    def __post_init__(self):
        if not isinstance(self.channels_last, bool):
            raise TypeError(f"channels_last must be a bool, got {self.channels_last!r}")
        dtype = self.message_dtype
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise TypeError(f"message_dtype must be None or a floating torch.dtype, got {dtype!r}")

    def carried(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype a gradient of a tensor of ``dtype`` is carried in."""
        return self.message_dtype if self.message_dtype is not None and dtype == torch.float32 else dtype


Rule = Callable[[object, Tensor, Sequence[bool], Dict, BackwardOptions], List[Optional[Tensor]]]


def slot_shape(node, slot: int) -> torch.Size:
    """Shape of the gradient that input slot ``slot`` of ``node`` passes on (one vector's)."""
    child, number = node.next_functions[slot]
    if child is None:
        raise UnsupportedNode(f"{type(node).__name__}: slot {slot} has no node")
    return torch.Size(child._input_metadata[number].shape)


def _only(slots: int, need: Sequence[bool], index: int, node) -> bool:
    """Whether slot ``index`` needs a gradient; raises where another slot of ``slots`` does."""
    for slot in range(len(need)):
        if slot != index and need[slot]:
            raise UnsupportedNode(f"{type(node).__name__}: a gradient for input slot {slot}")
    return need[index]


def _cached(cache: Dict, node, name: str, make: Callable[[], Tensor]) -> Tensor:
    key = (node, name)
    value = cache.get(key)
    if value is None:
        value = cache[key] = make()
    return value


def _memory_format(t: Tensor, options: BackwardOptions) -> Optional[torch.memory_format]:
    """The channels-last format for ``t`` (a batch of samples) where ``options`` asks for it, else ``None``."""
    if not options.channels_last or not t.is_cuda:
        return None
    return {4: torch.channels_last, 5: torch.channels_last_3d}.get(t.dim())


def _per_sample(g: Tensor) -> Tensor:
    """``[J, N, ...]`` → ``[J·N, ...]`` (the vectors' axis folded into the batch)."""
    return g.flatten(0, 1)


# ----------------------------------------------------------------------------------------------
# rules


def _convolution_operands(node, g, cache, options) -> tuple:
    """``(folded g, weight, input shape, hyper-parameters, memory format, polyphase geometry)`` of a
    convolution node's data gradient for ``g [J, N, ...]``: the gradients folded to ``[J·N, ...]`` (in
    the channels-last layout where ``options`` asks for it), the weight in their dtype and layout and
    what is read from the node, derived once per graph; the geometry is ``None`` where curvlib's
    polyphase kernel may not run the layer (:func:`_polyphase_geometry`)."""
    folded = _per_sample(g)
    shape = (folded.shape[0], *_cached(cache, node, "input_shape", lambda: slot_shape(node, 0))[1:])
    memory_format = _memory_format(folded, options)
    if memory_format is not None:
        folded = folded.contiguous(memory_format=memory_format)
    # the weight in the gradients' dtype (cuDNN multiplies equal dtypes) and layout, converted once per graph
    weight = _cached(cache, node, "weight", lambda: node._saved_weight.to(
        folded.dtype, memory_format=memory_format or torch.preserve_format))
    hyper = _cached(cache, node, "hyperparameters", lambda: (
        node._saved_stride, node._saved_padding, node._saved_dilation, node._saved_transposed,
        node._saved_output_padding, node._saved_groups))
    polyphase = _cached(cache, node, "polyphase", lambda: (_polyphase_geometry(folded, weight, shape, *hyper),))[0]
    return folded, weight, shape, hyper, memory_format, polyphase


def _convolution(node, g, need, cache, options):
    if not _only(len(need), need, 0, node):
        return [None] * len(need)
    folded, weight, shape, hyper, memory_format, polyphase = _convolution_operands(node, g, cache, options)

    def adjoint():
        return _data_gradient(folded, weight, shape, *hyper, memory_format=memory_format)

    # curvlib's kernel where it ran faster for this shape, else the adjoint
    grad = adjoint() if polyphase is None else _kernel("input_vjp").fastest(folded, weight, polyphase, adjoint)
    return [grad.unflatten(0, g.shape[:2])] + [None] * (len(need) - 1)


def _polyphase_geometry(g: Tensor, weight: Tensor, shape, stride, padding, dilation, transposed: bool, output_padding,
                        groups: int):
    """The kernel geometry for :func:`curvlib.kernels.input_vjp.fastest` where that kernel may run this
    layer's data gradient (CUDA with Triton, a strided convolution it is :func:`eligible` for), else ``None``."""
    if transposed or not g.is_cuda or all(s == 1 for s in stride) or len(stride) > 3:
        return None
    module = _kernel("input_vjp")
    if module is None or not module.supported(g, weight):
        return None
    from ..hyperparams import make_geometry
    from ..kernels._geometry import kernel_geometry

    geometry = kernel_geometry(make_geometry(shape[1], weight.shape[0], tuple(shape[2:]), tuple(weight.shape[2:]),
                                             tuple(stride), tuple(padding), tuple(dilation), groups))
    fits = geometry.output_size[3 - len(stride):] == tuple(g.shape[2:])
    return geometry if fits and module.eligible(geometry) else None


def _data_gradient(g: Tensor, weight: Tensor, shape, stride, padding, dilation, transposed: bool, output_padding,
                   groups: int, memory_format: Optional[torch.memory_format]) -> Tensor:
    """The input gradient ``[M, *shape[1:]]`` of a convolution for output gradients ``g``, as the adjoint
    convolution: a transposed convolution for a convolution (its output padding chosen to reach the
    input's size), a convolution for a transposed one. cuDNN runs the same data-gradient kernels either
    way, but ``convolution_backward`` wants an input tensor, and in channels-last it must be a real one
    (an expanded stand-in is copied): the size of the gradient itself, 568 MB for 20 columns of
    All-CNN-C's second layer in bfloat16 — the step's largest block. Where the adjoint cannot reach
    the shape (a transposed layer's output padding ≥ its stride), ``convolution_backward`` runs."""
    spatial, kernel = shape[2:], weight.shape[2:]
    if not transposed:
        # the input entries the last output does not reach: what the adjoint's output padding adds back
        extra = [i + 2 * p - ((o - 1) * s + d * (k - 1) + 1)
                 for i, o, k, s, p, d in zip(spatial, g.shape[2:], kernel, stride, padding, dilation)]
        if all(0 <= e < max(s, d) for e, s, d in zip(extra, stride, dilation)):
            return torch.ops.aten.convolution(g, weight, None, stride, padding, dilation, True, extra, groups)
    else:
        grad = torch.ops.aten.convolution(g, weight, None, stride, padding, dilation, False, [0] * len(spatial),
                                          groups)
        if tuple(grad.shape[2:]) == tuple(spatial):
            return grad
    if memory_format is None:
        dummy = g.new_empty(1).expand(shape)  # only the input's shape is read (as in torch.nn.grad)
    else:  # an expanded stand-in would be copied in the backend's format (see above)
        dummy = torch.empty(shape, dtype=g.dtype, device=g.device, memory_format=memory_format)
    return torch.ops.aten.convolution_backward(g, dummy, weight, None, stride, padding, dilation, transposed,
                                               output_padding, groups, [True, False, False])[0]


def _in_layout(cache: Dict, node, name: str, saved: Callable[[], Tensor], options: BackwardOptions,
               keep_dtype: bool = False) -> Tensor:
    """A saved ``[N, ...]`` tensor in the layout and dtype of the gradients it meets: as saved, or
    converted once per graph where ``options`` asks for channels-last (an elementwise kernel on mixed
    layouts runs at about half the bandwidth) or another message dtype (a float32 operand would
    promote the result back to float32); ``keep_dtype``: the layout only."""
    def convert():
        t = saved()
        memory_format = _memory_format(t, options)
        dtype = t.dtype if keep_dtype else options.carried(t.dtype)
        if memory_format is None and dtype == t.dtype:
            return t
        return t.to(dtype, memory_format=memory_format or torch.preserve_format)

    return _cached(cache, node, name, convert)


_KERNELS: Dict[str, object] = {}  # curvlib.kernels modules once looked up (None without Triton)


def _kernel(name: str):
    """The kernel module ``curvlib.kernels.<name>``, or ``None`` without Triton."""
    if name not in _KERNELS:
        from .. import kernels  # here: the kernels are optional and imported on first use

        _KERNELS[name] = kernels._module(name) if kernels.available() else None
    return _KERNELS[name]


def _threshold_backward(g: Tensor, saved: Tensor, threshold) -> Tensor:
    """``g`` where ``saved > threshold``, else zero, ``saved [N, ...]`` broadcast over the vectors: on CUDA
    curvlib's one-pass kernel (PyTorch's runs strided bfloat16 gradients at half the bandwidth), else
    autograd's own ``threshold_backward`` (a zero stays zero for NaN gradients in both)."""
    kernel = _kernel("threshold_backward") if g.is_cuda else None
    result = None if kernel is None else kernel.threshold_backward(g, saved, threshold)
    return torch.ops.aten.threshold_backward(g, saved, threshold) if result is None else result


def _mask_operand(node, cache, options) -> tuple:
    """``(saved [N, ...], threshold)`` of a ReLU or threshold node (its gradient is zero where
    ``saved <= threshold``), the saved tensor in the gradients' layout and dtype. A threshold other
    than zero keeps its input's dtype: rounded to a message dtype, inputs within half a unit of the
    threshold would compare the other way (the sign, and so a comparison with zero, survives rounding)."""
    if type(node).__name__ == "ReluBackward0":
        return _in_layout(cache, node, "result", lambda: node._saved_result, options), 0
    threshold = node._saved_threshold
    return _in_layout(cache, node, "self", lambda: node._saved_self, options, keep_dtype=threshold != 0), threshold


def _relu(node, g, need, cache, options):
    return [_threshold_backward(g, *_mask_operand(node, cache, options))]


def _threshold(node, g, need, cache, options):
    return [_threshold_backward(g, *_mask_operand(node, cache, options))] + [None] * (len(need) - 1)


def _call_node(node, g, need, cache, options):
    """Elementwise nodes: their own backward broadcasts the saved ``[N, ...]`` tensors over ``J``. It runs
    in the dtype of the node's output (some backward kernels insist on it; a gradient carried in a
    message dtype is converted back where it is handed on)."""
    expected = node._input_metadata[0].dtype
    out = node(g if g.dtype == expected else g.to(expected))
    out = (out,) if isinstance(out, Tensor) or out is None else tuple(out)
    return [o if n else None for o, n in zip(out, need)]


def _elementwise(node, g, need, cache, options):
    """Elementwise nodes. One input (activations, ``x * 2``, ``x.exp()``, dropout): the gradient is ``g``
    times the node's per-element derivative, which is the node's backward of ones — computed once per
    graph and broadcast over ``J`` (some backward kernels reject a batched gradient: oneDNN's float32
    GELU on CPUs), in the gradients' dtype and layout. (A NaN gradient times a zero derivative stays NaN,
    where a node's own masked backward may give zero.) Several inputs (products, sums of two tensors):
    :func:`_call_node`."""
    if len(need) != 1:
        return _call_node(node, g, need, cache, options)

    def derivative():
        metadata = node._input_metadata[0]
        factor = node(torch.ones(metadata.shape, dtype=metadata.dtype, device=metadata.device))
        factor = factor[0] if isinstance(factor, (tuple, list)) else factor
        memory_format = _memory_format(factor, options)
        return factor.to(options.carried(factor.dtype), memory_format=memory_format or torch.preserve_format)

    return [g * _cached(cache, node, "derivative", derivative)]


def _identity(node, g, need, cache, options):
    return [g] + [None] * (len(need) - 1)


def _reshape(node, g, need, cache, options):
    return [g.reshape(g.shape[0], *slot_shape(node, 0))] + [None] * (len(need) - 1)


def _permute(node, g, need, cache, options):
    dims = [d % len(node._saved_dims) for d in node._saved_dims]
    inverse = sorted(range(len(dims)), key=dims.__getitem__)
    return [g.permute(0, *(d + 1 for d in inverse))]


def _transpose(node, g, need, cache, options):
    rank = g.dim() - 1
    return [g.transpose(node._saved_dim0 % rank + 1, node._saved_dim1 % rank + 1)]


def _t(node, g, need, cache, options):
    return [g.transpose(1, 2) if g.dim() == 3 else g]


def _signed(value: int) -> int:
    """A saved integer as PyTorch stores it for some nodes (``_saved_pad``: unsigned 64-bit) back to its sign."""
    return value - 2**64 if value >= 2**63 else value


def _constant_pad(node, g, need, cache, options):
    pad = [_signed(p) for p in node._saved_pad]
    if all(p >= 0 for p in pad):
        return [inner_window(g, pad)]
    return [F.pad(g, [-p for p in pad])]  # negative pads cropped: their gradient is zero-padded back


def _constant_padding(node, g, need, cache, options):
    return [inner_window(g, node.pad), None, None][: len(need)]


def _addmm(node, g, need, cache, options):
    if not _only(len(need), need, 1, node):
        return [None] * len(need)
    mat2 = node._saved_mat2
    grad = g @ mat2.transpose(0, 1).to(g.dtype)
    alpha = node._saved_alpha
    return [None, grad if alpha == 1 else grad * alpha, None]


def _mm(node, g, need, cache, options):
    if not _only(len(need), need, 0, node):
        return [None] * len(need)
    return [g @ node._saved_mat2.transpose(0, 1).to(g.dtype), None]


def _reduce_dims(node, rank: int) -> List[int]:
    dims = node._saved_dim
    dims = list(range(rank)) if dims is None or len(dims) == 0 else [d % rank for d in dims]
    return sorted(set(dims))


def _expand_reduced(node, g, divide: bool):
    sizes = list(node._saved_self_sym_sizes)
    dims = _reduce_dims(node, len(sizes))
    if not node._saved_keepdim:
        for d in dims:
            g = g.unsqueeze(d + 1)
    g = g.expand(g.shape[0], *sizes)
    return g / math.prod(sizes[d] for d in dims) if divide else g


def _mean_dims(node, g, need, cache, options):
    return [_expand_reduced(node, g, divide=True)]


def _sum_dims(node, g, need, cache, options):
    return [_expand_reduced(node, g, divide=False)]


def _reduce_all(divide: bool) -> Rule:
    def rule(node, g, need, cache, options):
        sizes = slot_shape(node, 0)
        g = g.reshape(g.shape[0], *([1] * len(sizes))).expand(g.shape[0], *sizes)
        return [g / max(1, math.prod(sizes)) if divide else g]

    return rule


def _shape_only_input(node, folded: Tensor) -> Tensor:
    """An uninitialised ``[J·N, ...]`` stand-in for the node's input: pooling backward kernels read only its
    shape (and make it contiguous, which an expanded tensor is not: this one is, and costs no traffic)."""
    return folded.new_empty((folded.shape[0], *slot_shape(node, 0)[1:]))


def _avg_pool(op) -> Rule:
    def rule(node, g, need, cache, options):
        folded = _per_sample(g).contiguous()
        grad = op(folded, _shape_only_input(node, folded), node._saved_kernel_size, node._saved_stride,
                  node._saved_padding, node._saved_ceil_mode, node._saved_count_include_pad,
                  node._saved_divisor_override)
        return [grad.unflatten(0, g.shape[:2])]

    return rule


def _adaptive_avg_pool(op) -> Rule:
    def rule(node, g, need, cache, options):
        folded = _per_sample(g).contiguous()
        return [op(folded, _shape_only_input(node, folded)).unflatten(0, g.shape[:2])]

    return rule


def _max_pool(spatial: int) -> Rule:
    def rule(node, g, need, cache, options):
        indices = node._saved_result1  # flat index of each window's maximum within its sample-channel
        shape = slot_shape(node, 0)
        locations = math.prod(shape[-spatial:])
        flat_g = g.flatten(-spatial)
        flat_i = indices.flatten(-spatial).expand_as(flat_g)
        grad = flat_g.new_zeros((*flat_g.shape[:-1], locations)).scatter_add_(-1, flat_i, flat_g)
        return [grad.reshape(g.shape[0], *shape)]

    return rule


def _batch_norm_eval(node, g, need, cache, options):
    if getattr(node, "_saved_training", False):
        raise UnsupportedNode(f"{type(node).__name__}: batch norm in training mode couples the samples")
    if not _only(len(need), need, 0, node):
        return [None] * len(need)

    def scale():
        eps = getattr(node, "_saved_eps", None)
        eps = getattr(node, "_saved_epsilon", 1e-5) if eps is None else eps
        running_var = node._saved_running_var
        if running_var is None:
            raise UnsupportedNode(f"{type(node).__name__}: no running variance")
        factor = torch.rsqrt(running_var + eps)
        weight = node._saved_weight
        return factor if weight is None else factor * weight

    factor = _cached(cache, node, "scale", scale).to(g.dtype)
    shape = [1] * g.dim()
    shape[2] = -1
    return [g * factor.reshape(shape)] + [None] * (len(need) - 1)


#: nodes whose own backward broadcasts correctly over a leading vectors' axis (elementwise, no reshapes)
_ELEMENTWISE = (
    "SigmoidBackward0", "TanhBackward0", "GeluBackward0", "SiluBackward0", "LeakyReluBackward0",
    "LeakyReluBackward1", "EluBackward0", "EluBackward1", "CeluBackward0", "CeluBackward1",
    "SoftplusBackward0", "HardtanhBackward0", "HardswishBackward0", "HardsigmoidBackward0", "MishBackward0",
    "LogSigmoidBackward0", "ExpBackward0", "LogBackward0", "SqrtBackward0", "AbsBackward0", "PowBackward0",
    "NegBackward0", "MulBackward0", "MulBackward1", "DivBackward0", "DivBackward1", "AddBackward0",
    "AddBackward1", "SubBackward0", "SubBackward1", "RsubBackward0", "RsubBackward1", "NativeDropoutBackward0",
    "ToCopyBackward0",
)

_RULES: Dict[str, Rule] = {
    "ConvolutionBackward0": _convolution,
    "ReluBackward0": _relu,
    "ThresholdBackward0": _threshold,
    **{name: _elementwise for name in _ELEMENTWISE},
    "CloneBackward0": _identity,
    "AliasBackward0": _identity,
    "ExpandBackward0": _identity,  # the broadcast axes are summed where the gradient is handed on
    **{name: _reshape for name in (
        "ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "SqueezeBackward0", "SqueezeBackward1",
        "SqueezeBackward2", "SqueezeBackward3", "SqueezeBackward4", "UnsqueezeBackward0", "UnsqueezeBackward1")},
    "PermuteBackward0": _permute,
    "TransposeBackward0": _transpose,
    "TBackward0": _t,
    "ConstantPadNdBackward0": _constant_pad,
    "AddmmBackward0": _addmm,
    "MmBackward0": _mm,
    "MeanBackward0": _reduce_all(divide=True),
    "SumBackward0": _reduce_all(divide=False),
    "MeanBackward1": _mean_dims,
    "SumBackward1": _sum_dims,
    "AvgPool2DBackward0": _avg_pool(torch.ops.aten.avg_pool2d_backward),
    "AvgPool3DBackward0": _avg_pool(torch.ops.aten.avg_pool3d_backward),
    "AdaptiveAvgPool2DBackward0": _adaptive_avg_pool(torch.ops.aten._adaptive_avg_pool2d_backward),
    "AdaptiveAvgPool3DBackward0": _adaptive_avg_pool(torch.ops.aten._adaptive_avg_pool3d_backward),
    "MaxPool2DWithIndicesBackward0": _max_pool(2),
    "MaxPool3DWithIndicesBackward0": _max_pool(3),
    "NativeBatchNormBackward0": _batch_norm_eval,
    "NativeBatchNormLegitNoTrainingBackward0": _batch_norm_eval,
    "CudnnBatchNormBackward0": _batch_norm_eval,
}


# ----------------------------------------------------------------------------------------------
# chain rules: several nodes, each the only consumer of the previous one's gradient, in one kernel

#: a chain rule takes the chain's nodes, the gradient at the first node's output and the cache and
#: options, and returns the gradients the last node passes on, or ``None`` where it cannot run them
#: (the walk then applies the nodes' own rules one by one)
ChainRule = Callable[[Sequence, Tensor, Dict, BackwardOptions], Optional[List[Optional[Tensor]]]]

_MASKS = ("ReluBackward0", "ThresholdBackward0")


def _spatial_pad(node) -> Optional[tuple]:
    """The pads (``F.pad``'s order) of a constant-padding node whose backward is the inner window
    (curvlib's :class:`.ConstantPadding`, or PyTorch's with non-negative pads); ``None`` for other nodes."""
    if getattr(node, "_forward_cls", None) is ConstantPadding:
        return tuple(node.pad)
    if type(node).__name__ == "ConstantPadNdBackward0":
        pad = tuple(_signed(p) for p in node._saved_pad)
        return pad if all(p >= 0 for p in pad) else None
    return None


def chain_rule(nodes: Sequence) -> Optional[ChainRule]:
    """The rule that runs the backward of ``nodes`` at once, or ``None`` where there is none. Chains:
    a convolution, optionally a constant padding of its spatial dims only, then a ReLU or threshold
    (``conv(pad(relu(x)))`` or ``conv(relu(x))``, the convolution's data gradient cropped and masked in
    the epilogue of curvlib's polyphase kernel, :func:`_convolution_then_mask`)."""
    if len(nodes) not in (2, 3) or type(nodes[0]).__name__ != "ConvolutionBackward0":
        return None
    if type(nodes[-1]).__name__ not in _MASKS:
        return None
    if len(nodes) == 3:
        pad = _spatial_pad(nodes[1])
        spatial = len(nodes[0]._saved_stride)
        if pad is None or len(pad) > 2 * spatial:  # a padded channel or batch axis is no spatial window
            return None
    return _convolution_then_mask


def _window(pad: Sequence[int], shape: Sequence[int]) -> tuple:
    """``(first, size)`` per spatial dim of ``shape [M, C, *spatial]`` inside the ``pad`` border (``F.pad``'s order)."""
    spatial = len(shape) - 2
    window = []
    for d in range(spatial):
        position = spatial - 1 - d  # F.pad lists the last axis first
        left = pad[2 * position] if 2 * position < len(pad) else 0
        right = pad[2 * position + 1] if 2 * position + 1 < len(pad) else 0
        window.append((left, shape[2 + d] - left - right))
    return tuple(window)


def _convolution_then_mask(nodes, g, cache, options) -> Optional[list]:
    """The gradient at the input of ``relu`` in ``conv(pad(relu(x)))`` (or ``conv(relu(x))``): the
    convolution's data gradient, its inner window and the mask in one launch of curvlib's polyphase
    kernel (``window`` and ``mask`` of :func:`curvlib.kernels.input_vjp.input_vjp`: the input-sized
    gradient of the padded tensor is neither written nor read back), where that kernel may run the
    layer and ran faster than cuDNN's data gradient followed by the mask kernel (measured per shape,
    the same result either way); ``None`` elsewhere (CPU, stride 1, float64)."""
    conv, mask_node = nodes[0], nodes[-1]
    if not g.is_cuda or cache.get((conv, "declined chain")):  # before folding: the rules would fold again
        return None
    folded, weight, shape, hyper, memory_format, polyphase = _convolution_operands(conv, g, cache, options)
    saved, threshold = _mask_operand(mask_node, cache, options)
    if polyphase is None or saved.dtype not in (folded.dtype, torch.float32):
        cache[(conv, "declined chain")] = True  # the same for every chunk of this graph
        return None
    pad = _spatial_pad(nodes[1]) if len(nodes) == 3 else None
    window = None if pad is None else _cached(cache, nodes[1], "window", lambda: _window(pad, shape))

    def separately():
        grad = _data_gradient(folded, weight, shape, *hyper, memory_format=memory_format).unflatten(0, g.shape[:2])
        if pad is not None:
            grad = inner_window(grad, pad)
        return _threshold_backward(grad, saved, threshold).flatten(0, 1)

    grad = _kernel("input_vjp").fastest(folded, weight, polyphase, separately, window=window, mask=saved,
                                        threshold=threshold)
    return [grad.unflatten(0, g.shape[:2])]


def rule_for(node) -> Optional[Rule]:
    """The batched rule of ``node``, or ``None`` where there is none."""
    if getattr(node, "_forward_cls", None) is ConstantPadding:
        return _constant_padding
    return _RULES.get(type(node).__name__)


def supported_node_names() -> tuple:
    """Names of the autograd node types with a batched rule (besides the engine's own padding)."""
    return tuple(sorted(_RULES))
