"""HesScale / Becker–LeCun (1989) Hessian-diagonal backpropagation over any autograd graph.

Every operation ``y = f(x)`` receives a diagonal ``d_y ≈ diag(∇²_y ℓ)`` and the exact gradient
``g_y = ∂ℓ/∂y`` and passes back (core paper B.4, Eq. B11; Elsayed & Mahmood 2023)::

    d_x = diag(J_xyᵀ diag(d_y) J_xy) + diag(Σ_i g_y[i] ∇²_x y_i)     (HesScale)
    d_x = diag(J_xyᵀ diag(d_y) J_xy)                                  (HesScaleGN, gauss_newton=True)

Where a tensor feeds several consumers (residual connections, a layer used twice) the ``d`` of the
consumers are summed: the cross terms between consumers are dropped, as in BL89.

:func:`backpropagate_diagonal` walks the autograd graph from ``output.grad_fn`` in topological
order (dependencies counted first, as autograd's engine does). The gradient is propagated by
calling each node; ``d`` by a rule per node type (see ``_RULES``). A node without a rule raises
``ValueError`` rather than giving a silently wrong answer. Only the part of the graph that leads to
a watched node is traversed, so parameter branches (``W.t()`` feeding an ``addmm``, weight
re-parametrisations) and the model input's producers never need rules.

:func:`parameter_diagonals` turns the ``d`` at a layer's output into the HesScale diagonals of its
parameters (``Linear``, ``Conv{1,2,3}d``, ``ConvTranspose{1,2,3}d``, ``BatchNorm{1,2,3}d`` in eval).

>>> import torch
>>> lin = torch.nn.Linear(3, 2)
>>> x = torch.randn(5, 3, requires_grad=True)
>>> h = torch.tanh(x * 2.0)
>>> y = lin(h)
>>> found = backpropagate_diagonal(y, torch.ones_like(y), torch.randn_like(y), watch={h.grad_fn: "h"})
>>> d_h, g_h = found["h"]
>>> parameter_diagonals(lin, (h,), torch.ones_like(y))["weight"].shape
torch.Size([2, 3])
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Hashable, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import functional as _functional

__all__ = ["backpropagate_diagonal", "parameter_diagonals", "supported_nodes"]


# ----------------------------------------------------------------------------------------------
# node rules
#
# A rule is called as ``rule(ctx)`` and returns one ``d`` (or ``None``) per entry of
# ``node.next_functions``; it must return a tensor for every slot in ``ctx.need``.


class _Context:
    """What a rule sees: the node, the ``d``/``g`` at its output, the gradients it passes back."""

    __slots__ = ("node", "name", "d", "g", "grads", "need", "gauss_newton", "ds")

    def __init__(self, node, d, g, grads, need, gauss_newton, ds):
        self.node = node
        self.name = type(node).__name__
        self.d = d  # d at output 0 (single-output semantics)
        self.g = g  # g at output 0
        self.grads = grads  # node(g): gradient per next_functions slot
        self.need = need  # per slot: does this slot lead to a watched node?
        self.gauss_newton = gauss_newton
        self.ds = ds  # d per output (multi-output split family)

    def call(self, *grads) -> Tuple[Optional[Tensor], ...]:
        return _apply_node(self.node, *grads)

    def error(self, message: str) -> ValueError:
        return ValueError(f"HesScale: {self.name}: {message}")


def _apply_node(node, *grads) -> Tuple[Optional[Tensor], ...]:
    """The node's backward applied to ``grads`` (C++ nodes are callable, custom-``Function`` nodes have
    ``apply``)."""
    return _as_tuple(node(*grads) if callable(node) else node.apply(*grads))


def _as_tuple(result) -> Tuple[Optional[Tensor], ...]:
    return (result,) if isinstance(result, Tensor) or result is None else tuple(result)


def _copy_rule(ctx: _Context):
    """Jacobian entries in {0, 1} (copies, selections, sums): ``(J∘J)ᵀ d = Jᵀ d``."""
    return ctx.call(*ctx.ds)


def _scaled(coefficients_of: Callable[[_Context], Sequence[float]]) -> Callable[[_Context], List[Optional[Tensor]]]:
    """Slot ``i`` is the input times a constant ``c_i`` (plus broadcasting): ``d_i = c_i² · copy-sum(d)``."""

    def rule(ctx: _Context):
        coefficients = coefficients_of(ctx)
        passed = ctx.call(ctx.d)  # the node's own backward gives c_i · copy-sum(d); one more c_i makes c_i²
        return [passed[slot] * c if need else None for slot, (c, need) in enumerate(zip(coefficients, ctx.need))]

    return rule


def _add_coefficients(ctx):
    return (1.0, float(ctx.node._saved_alpha))


def _sub_coefficients(ctx):
    return (1.0, -float(ctx.node._saved_alpha))


def _rsub0_coefficients(ctx):  # rsub(self, other, alpha) = other - alpha * self
    return (-float(ctx.node._saved_alpha), 1.0)


def _rsub1_coefficients(ctx):
    return (-float(ctx.node._saved_alpha),)


def _neg_rule(ctx: _Context):
    return [ctx.d]


def _mean_rule(ctx: _Context):
    # y = mean over n entries: J = 1/n on the reduced entries; (J∘J)ᵀ d = Jᵀ d / n
    n = ctx.grads[0].numel() / ctx.g.numel()
    return [ctx.call(ctx.d)[0] / n]


def _reduce_like(t: Tensor, shape) -> Tensor:
    return t if tuple(t.shape) == tuple(shape) else t.sum_to_size(shape)


def _constant_factor(ctx: _Context, saved_name: str, other_slot: int) -> Tensor:
    if len(ctx.need) > other_slot and ctx.need[other_slot]:
        raise ctx.error(
            "both factors lead to watched nodes (a bilinear operation such as x * x or x / x); "
            "HesScale has no rule for products of two propagated tensors"
        )
    factor = getattr(ctx.node, saved_name)
    if factor is None:
        raise ctx.error(f"the saved factor {saved_name} is missing")
    if not isinstance(factor, Tensor):
        factor = torch.tensor(factor)
    return factor.to(dtype=ctx.d.dtype, device=ctx.d.device)


def _mul_rule(ctx: _Context):
    out: List[Optional[Tensor]] = [None] * len(ctx.need)
    for slot, (saved, other) in enumerate((("_saved_other", 1), ("_saved_self", 0))):
        if slot < len(ctx.need) and ctx.need[slot]:
            factor = _constant_factor(ctx, saved, other)
            out[slot] = _reduce_like(factor.square() * ctx.d, ctx.grads[slot].shape)
    return out


def _mul_scalar_rule(ctx: _Context):
    factor = float(ctx.node._saved_other)
    return [ctx.d * factor**2]


def _div_rule(ctx: _Context):
    if len(ctx.need) > 1 and ctx.need[1]:
        raise ctx.error(
            "the divisor leads to a watched node; HesScale only divides by constants "
            "(tensors that do not depend on the watched nodes)"
        )
    factor = _constant_factor(ctx, "_saved_other", 1)
    return [_reduce_like(ctx.d / factor.square(), ctx.grads[0].shape)]


def _div_scalar_rule(ctx: _Context):
    factor = float(ctx.node._saved_other)
    return [ctx.d / factor**2]


def _dropout_rule(ctx: _Context):
    # y = x · mask · scale: the node's backward of ones is the (diagonal) Jacobian
    jacobian = ctx.call(torch.ones_like(ctx.d))[0]
    return [jacobian.square() * ctx.d]


def _matmul_like(ctx: _Context, first: int, second: int, mat1: str, mat2: str, alpha: float):
    """``y = alpha · mat1 @ mat2``: slot ``first`` ↔ ``mat1``, ``second`` ↔ ``mat2``."""
    out: List[Optional[Tensor]] = [None] * len(ctx.need)
    need_1, need_2 = ctx.need[first], ctx.need[second]
    if need_1 and need_2:
        raise ctx.error(
            "both matrix factors lead to watched nodes (bilinear, e.g. attention scores); "
            "HesScale has no rule for products of two propagated tensors"
        )
    d = ctx.d * alpha**2
    if need_1:
        w = getattr(ctx.node, mat2)
        out[first] = d @ w.square().transpose(-1, -2)
    if need_2:
        m = getattr(ctx.node, mat1)
        out[second] = m.square().transpose(-1, -2) @ d
    return out


def _addmm_rule(ctx: _Context):
    # addmm(input, mat1, mat2, beta, alpha) = beta · input + alpha · mat1 @ mat2; slots (input, mat1, mat2)
    out = _matmul_like(ctx, 1, 2, "_saved_mat1", "_saved_mat2", float(ctx.node._saved_alpha))
    if ctx.need[0]:
        out[0] = _reduce_like(ctx.d * float(ctx.node._saved_beta) ** 2, ctx.grads[0].shape)
    return out


def _mm_rule(ctx: _Context):
    return _matmul_like(ctx, 0, 1, "_saved_self", "_saved_mat2", 1.0)


def _bmm_rule(ctx: _Context):
    return _matmul_like(ctx, 0, 1, "_saved_self", "_saved_mat2", 1.0)


def _mv_rule(ctx: _Context):
    # y = M v: slots (M, v)
    out: List[Optional[Tensor]] = [None, None]
    if ctx.need[0] and ctx.need[1]:
        raise ctx.error("both factors lead to watched nodes (bilinear); no HesScale rule")
    if ctx.need[0]:
        out[0] = ctx.d[:, None] * ctx.node._saved_vec.square()[None, :]
    if ctx.need[1]:
        out[1] = ctx.node._saved_self.square().T @ ctx.d
    return out


def _convolution_rule(ctx: _Context):
    node = ctx.node
    out: List[Optional[Tensor]] = [None] * len(ctx.need)
    if len(ctx.need) > 1 and ctx.need[1]:
        raise ctx.error("the convolution weight leads to a watched node; HesScale does not propagate into weights")
    if ctx.need[0]:
        out[0] = _functional.hesscale_input_diag(
            node._saved_weight,
            ctx.d,
            tuple(ctx.grads[0].shape),
            stride=tuple(node._saved_stride),
            padding=tuple(node._saved_padding),
            dilation=tuple(node._saved_dilation),
            groups=int(node._saved_groups),
            transposed=bool(node._saved_transposed),
            output_padding=tuple(node._saved_output_padding),
        )
    if len(ctx.need) > 2 and ctx.need[2]:
        dims = [i for i in range(ctx.d.dim()) if i != 1]
        out[2] = ctx.d.sum(dims)
    return out


# ---------------------------------------------------------------------- element-wise activations
#
# Each function returns (φ'(x), φ''(x)) from the node's saved tensors.


def _relu(node):
    r = node._saved_result
    return (r > 0).to(r.dtype), None


def _leaky_relu(node):
    t = node._saved_self if hasattr(node, "_saved_self") else node._saved_result
    slope = float(node._saved_negative_slope)
    return torch.where(t > 0, torch.ones_like(t), torch.full_like(t, slope)), None


def _sigmoid(node):
    s = node._saved_result
    first = s * (1 - s)
    return first, first * (1 - 2 * s)


def _tanh(node):
    t = node._saved_result
    first = 1 - t.square()
    return first, -2 * t * first


def _elu(node):
    alpha, scale, input_scale = float(node._saved_alpha), float(node._saved_scale), float(node._saved_input_scale)
    if hasattr(node, "_saved_result"):  # in-place elu_ saves its result
        r = node._saved_result
        positive = r > 0
        exp_part = input_scale * (r + scale * alpha)  # = scale·alpha·input_scale·exp(input_scale·x) for x <= 0
    else:
        x = node._saved_self
        positive = x > 0
        exp_part = scale * alpha * input_scale * torch.exp(input_scale * torch.clamp(x, max=0))
    first = torch.where(positive, torch.full_like(exp_part, scale), exp_part)
    second = torch.where(positive, torch.zeros_like(exp_part), exp_part * input_scale)
    return first, second


def _celu(node):
    alpha = float(node._saved_alpha)
    if hasattr(node, "_saved_result"):
        r = node._saved_result
        positive = r > 0
        e = r / alpha + 1  # exp(x / alpha) for x <= 0
    else:
        x = node._saved_self
        positive = x > 0
        e = torch.exp(torch.clamp(x, max=0) / alpha)
    first = torch.where(positive, torch.ones_like(e), e)
    second = torch.where(positive, torch.zeros_like(e), e / alpha)
    return first, second


def _gelu(node):
    x = node._saved_self
    approximate = node._saved_approximate
    if approximate == "none":
        pdf = torch.exp(-0.5 * x.square()) / math.sqrt(2 * math.pi)
        cdf = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
        return cdf + x * pdf, pdf * (2 - x.square())
    if approximate == "tanh":
        k, c = math.sqrt(2 / math.pi), 0.044715
        t = torch.tanh(k * (x + c * x**3))
        sech2 = 1 - t.square()
        du = k * (1 + 3 * c * x.square())
        ddu = 6 * k * c * x
        first = 0.5 * (1 + t) + 0.5 * x * sech2 * du
        second = sech2 * (du - x * t * du.square() + 0.5 * x * ddu)
        return first, second
    raise ValueError(f"HesScale: GeluBackward0: unknown approximate={approximate!r}")


def _silu(node):
    x = node._saved_self
    s = torch.sigmoid(x)
    return s * (1 + x * (1 - s)), s * (1 - s) * (2 + x * (1 - 2 * s))


def _softplus(node):
    x = node._saved_self
    beta, threshold = float(node._saved_beta), float(node._saved_threshold)
    s = torch.sigmoid(beta * x)
    linear = x * beta > threshold  # PyTorch switches to the identity there
    first = torch.where(linear, torch.ones_like(s), s)
    second = torch.where(linear, torch.zeros_like(s), beta * s * (1 - s))
    return first, second


def _mish(node):
    x = node._saved_self
    t = torch.tanh(F.softplus(x))
    s = torch.sigmoid(x)
    sech2 = 1 - t.square()
    return t + x * sech2 * s, sech2 * (2 * s + x * s * (1 - s) - 2 * x * t * s.square())


def _hardtanh(node):
    x = node._saved_self if hasattr(node, "_saved_self") else node._saved_result
    inside = (x > float(node._saved_min_val)) & (x < float(node._saved_max_val))
    return inside.to(x.dtype), None


def _log_sigmoid(node):
    s = torch.sigmoid(node._saved_self)
    return 1 - s, -s * (1 - s)


def _exp(node):
    r = node._saved_result
    return r, r


def _log(node):
    x = node._saved_self
    return 1 / x, -1 / x.square()


def _sqrt(node):
    r = node._saved_result
    return 0.5 / r, -0.25 / r**3


def _abs(node):
    return torch.sign(node._saved_self), None


def _pow(node):
    x, p = node._saved_self, node._saved_exponent
    if isinstance(p, Tensor):
        p = p.item()
    if p == 0:
        return torch.zeros_like(x), None
    first = p * x.pow(p - 1)
    second = None if p == 1 else p * (p - 1) * x.pow(p - 2)
    return first, second


def _elementwise(derivatives):
    def rule(ctx: _Context):
        first, second = derivatives(ctx.node)
        d = first.square() * ctx.d
        if not ctx.gauss_newton and second is not None:
            d = d + second * ctx.g
        return [d]

    return rule


# ---------------------------------------------------------------------- pooling, normalisation


def _avg_pool_rule(ctx: _Context):
    node = ctx.node
    kernel = tuple(node._saved_kernel_size)
    num_dims = len(kernel)
    pool = {2: F.avg_pool2d, 3: F.avg_pool3d}[num_dims]  # PyTorch records 1-d pooling as 2-d
    stride = tuple(node._saved_stride) or kernel
    padding = tuple(node._saved_padding)
    ceil_mode = bool(node._saved_ceil_mode)
    include = bool(node._saved_count_include_pad)
    ones = torch.ones_like(ctx.grads[0])
    kwargs = dict(stride=stride, padding=padding, ceil_mode=ceil_mode, count_include_pad=include)
    averaged = pool(ones, kernel, divisor_override=node._saved_divisor_override, **kwargs)
    summed = pool(ones, kernel, divisor_override=1, **kwargs)  # number of input entries in each window
    # every input entry of the window of y_o enters with weight 1/divisor(o) = averaged / summed
    weight = torch.where(summed > 0, averaged / summed.clamp(min=1), torch.zeros_like(summed))
    return ctx.call(weight * ctx.d)


def _adaptive_window_sizes(in_size: int, out_size: int, like: Tensor) -> Tensor:
    o = torch.arange(out_size, device=like.device)
    start = torch.div(o * in_size, out_size, rounding_mode="floor")
    end = torch.div((o + 1) * in_size + out_size - 1, out_size, rounding_mode="floor")  # ceil
    return (end - start).to(like.dtype)


def _adaptive_avg_pool_rule(ctx: _Context):
    name = ctx.name
    num_dims = 3 if "3D" in name else 2 if "2D" in name else 1
    in_sizes = ctx.grads[0].shape[-num_dims:]
    out_sizes = ctx.d.shape[-num_dims:]
    weight = torch.ones((), dtype=ctx.d.dtype, device=ctx.d.device)
    for axis, (i, o) in enumerate(zip(in_sizes, out_sizes)):
        shape = [1] * num_dims
        shape[axis] = o
        weight = weight * (1 / _adaptive_window_sizes(i, o, ctx.d)).reshape(shape)
    return ctx.call(weight * ctx.d)


def _batch_norm_rule(ctx: _Context):
    node = ctx.node
    if ctx.name == "NativeBatchNormLegitNoTrainingBackward0":
        training = False
    else:
        training = getattr(node, "_saved_training", None)
    if training is None or bool(training):
        raise ctx.error(
            "HesScale does not support BatchNorm in train mode (it normalises with batch statistics, "
            "which couples the samples); put the model in eval mode (model.eval())"
        )
    eps = getattr(node, "_saved_eps", None)
    if eps is None:
        eps = getattr(node, "_saved_epsilon")
    var = node._saved_running_var
    if var is None:
        raise ctx.error("BatchNorm without running statistics normalises with batch statistics; no HesScale rule")
    scale = 1 / (var + float(eps))
    weight = node._saved_weight
    if weight is not None:
        scale = scale * weight.square()
    shape = [1] * ctx.d.dim()
    shape[1] = -1
    out: List[Optional[Tensor]] = [None] * len(ctx.need)
    if ctx.need[0]:
        out[0] = ctx.d * scale.to(ctx.d.dtype).reshape(shape)
    if any(ctx.need[1:]):
        raise ctx.error("BatchNorm's affine parameters lead to a watched node; HesScale does not propagate into them")
    return out


# ---------------------------------------------------------------------- registry

_COPY_NODES = (
    # views, reshapes, permutations
    "ViewBackward0", "ReshapeAliasBackward0", "UnsafeViewBackward0", "AliasBackward0", "AsStridedBackward0",
    "PermuteBackward0", "TransposeBackward0", "TransposeBackward1", "TBackward0",
    "SqueezeBackward0", "SqueezeBackward1", "SqueezeBackward2", "SqueezeBackward3", "SqueezeBackward4",
    "UnsqueezeBackward0", "UnsqueezeBackward1", "ExpandBackward0", "CloneBackward0", "ToCopyBackward0",
    "PixelShuffleBackward0", "PixelUnshuffleBackward0", "FlipBackward0", "RollBackward0",
    # selections, concatenations, splits
    "CatBackward0", "StackBackward0", "SliceBackward0", "SelectBackward0", "IndexBackward0",
    "IndexSelectBackward0", "GatherBackward0", "DiagonalBackward0", "RepeatBackward0", "UnfoldBackward0",
    "SplitBackward0", "SplitWithSizesBackward0", "UnsafeSplitBackward0", "UnsafeSplitWithSizesBackward0",
    "UnbindBackward0", "ConstantPadNdBackward0", "ReflectionPad1DBackward0", "ReflectionPad2DBackward0",
    "ReflectionPad3DBackward0", "ReplicationPad1DBackward0", "ReplicationPad2DBackward0",
    "ReplicationPad3DBackward0", "Im2ColBackward0", "Col2ImBackward0",
    "UpsampleNearest1DBackward0", "UpsampleNearest2DBackward0", "UpsampleNearest3DBackward0",
    "ConstantPaddingBackward",  # the engine's padding with a view backward (curvlib.engine.padding)
    # sums and additions with unit coefficients
    "SumBackward0", "SumBackward1", "AddBackward1", "SubBackward1",
    # max selections (indices saved, no tie splitting)
    "MaxPool2DWithIndicesBackward0", "MaxPool3DWithIndicesBackward0",
    "AdaptiveMaxPool2DBackward0", "AdaptiveMaxPool3DBackward0", "MaxBackward0", "MinBackward0",
)

_ACTIVATIONS = {
    "ReluBackward0": _relu,
    "LeakyReluBackward0": _leaky_relu,
    "LeakyReluBackward1": _leaky_relu,
    "SigmoidBackward0": _sigmoid,
    "TanhBackward0": _tanh,
    "EluBackward0": _elu,
    "EluBackward1": _elu,
    "CeluBackward0": _celu,
    "CeluBackward1": _celu,
    "GeluBackward0": _gelu,
    "SiluBackward0": _silu,
    "SoftplusBackward0": _softplus,
    "MishBackward0": _mish,
    "HardtanhBackward0": _hardtanh,
    "LogSigmoidBackward0": _log_sigmoid,
    "ExpBackward0": _exp,
    "LogBackward0": _log,
    "SqrtBackward0": _sqrt,
    "AbsBackward0": _abs,
    "PowBackward0": _pow,
}

_RULES: Dict[str, Callable[[_Context], Sequence[Optional[Tensor]]]] = {
    **{name: _copy_rule for name in _COPY_NODES},
    **{name: _elementwise(derivatives) for name, derivatives in _ACTIVATIONS.items()},
    "AddBackward0": _scaled(_add_coefficients),
    "SubBackward0": _scaled(_sub_coefficients),
    "RsubBackward0": _scaled(_rsub0_coefficients),
    "RsubBackward1": _scaled(_rsub1_coefficients),
    "NegBackward0": _neg_rule,
    "MeanBackward0": _mean_rule,
    "MeanBackward1": _mean_rule,
    "MulBackward0": _mul_rule,
    "MulBackward1": _mul_scalar_rule,
    "DivBackward0": _div_rule,
    "DivBackward1": _div_scalar_rule,
    "NativeDropoutBackward0": _dropout_rule,
    "AddmmBackward0": _addmm_rule,
    "MmBackward0": _mm_rule,
    "BmmBackward0": _bmm_rule,
    "MvBackward0": _mv_rule,
    "ConvolutionBackward0": _convolution_rule,
    "AvgPool2DBackward0": _avg_pool_rule,
    "AvgPool3DBackward0": _avg_pool_rule,
    "AdaptiveAvgPool2DBackward0": _adaptive_avg_pool_rule,
    "AdaptiveAvgPool3DBackward0": _adaptive_avg_pool_rule,
    "NativeBatchNormBackward0": _batch_norm_rule,
    "NativeBatchNormLegitNoTrainingBackward0": _batch_norm_rule,
    "CudnnBatchNormBackward0": _batch_norm_rule,
    "MiopenBatchNormBackward0": _batch_norm_rule,
}

# nodes with several differentiable outputs whose outputs may all carry gradients
_MULTI_OUTPUT = frozenset(
    ("SplitBackward0", "SplitWithSizesBackward0", "UnsafeSplitBackward0", "UnsafeSplitWithSizesBackward0",
     "UnbindBackward0")
)


def supported_nodes() -> Tuple[str, ...]:
    """Names of the autograd node types :func:`backpropagate_diagonal` has a rule for."""
    return tuple(sorted(_RULES))


# ----------------------------------------------------------------------------------------------
# traversal


def _children(node) -> List[Tuple[object, int]]:
    return [(child, nr) for child, nr in node.next_functions]


def _num_outputs(node) -> int:
    metadata = getattr(node, "_input_metadata", None)
    return 1 if metadata is None else max(1, len(metadata))


def _conform(t: Tensor, child, nr: int) -> Tensor:
    """Bring a passed-back tensor to the child's output shape/dtype, as autograd's engine does."""
    metadata = getattr(child, "_input_metadata", None)
    if metadata is None or nr >= len(metadata):
        return t
    meta = metadata[nr]
    shape = tuple(meta.shape)
    if tuple(t.shape) != shape:
        t = t.sum_to_size(shape) if t.numel() != math.prod(shape) else t.reshape(shape)
    if t.dtype != meta.dtype or t.device != meta.device:
        t = t.to(dtype=meta.dtype, device=meta.device)
    return t


def _needed_nodes(root, watch: Mapping[object, Hashable]) -> set:
    """Nodes reachable from ``root`` from which a watched node can be reached (watched included)."""
    postorder, visited, stack = [], {root}, [(root, iter(_children(root)))]
    while stack:
        node, children = stack[-1]
        for child, _ in children:
            if child is not None and child not in visited:
                visited.add(child)
                stack.append((child, iter(_children(child))))
                break
        else:
            stack.pop()
            postorder.append(node)
    needed = set()
    for node in postorder:  # children before parents
        if node in watch or any(child in needed for child, _ in _children(node) if child is not None):
            needed.add(node)
    return needed


def backpropagate_diagonal(
    output: Tensor,
    d_output: Tensor,
    g_output: Tensor,
    watch: Mapping[object, Hashable] = {},
    gauss_newton: bool = False,
) -> Dict[Hashable, Tuple[Tensor, Tensor]]:
    """Backpropagate a Hessian diagonal through ``output``'s autograd graph (HesScale / BL89).

    Args:
        output: the model output (e.g. logits); traversal starts at ``output.grad_fn``.
        d_output: Hessian diagonal of the loss w.r.t. ``output`` (same shape).
        g_output: gradient of the loss w.r.t. ``output`` (same shape).
        watch: autograd node → key. For every watched node reached, the ``d`` and ``g`` arriving at
            its output (summed over its consumers) are returned under ``key``. Typically
            ``{module_output.grad_fn: name}``.
        gauss_newton: drop the second-derivative terms of non-linear element-wise operations
            (HesScaleGN); by default they are included (HesScale).

    Returns:
        ``{key: (d, g)}`` with ``d``, ``g`` shaped like the watched node's output. Watched nodes that
        ``output`` does not depend on are absent. For a watched split/unbind node (several outputs)
        ``d`` and ``g`` are tuples with one entry per output (``None`` where nothing arrived).

    Raises:
        ValueError: for a node on a path to a watched node without a HesScale rule, a product of two
            propagated tensors, BatchNorm in train mode, or a multi-output node other than
            split/chunk/unbind with gradients on several outputs.

    Only the part of the graph leading to watched nodes is visited: nothing is propagated into
    parameters (``AccumulateGrad`` leaves) or branches that only lead to them.
    """
    root = output.grad_fn
    if root is None:
        raise ValueError("backpropagate_diagonal: output has no grad_fn (does it require grad?)")
    for name, t in (("d_output", d_output), ("g_output", g_output)):
        if tuple(t.shape) != tuple(output.shape):
            raise ValueError(f"backpropagate_diagonal: {name} must have the output's shape {tuple(output.shape)}, got {tuple(t.shape)}")
    watch = dict(watch)
    for node in watch:
        if type(node).__name__ == "AccumulateGrad":
            raise ValueError("backpropagate_diagonal: cannot watch an AccumulateGrad leaf (HesScale does not propagate into parameters)")
    if not watch:
        return {}
    needed = _needed_nodes(root, watch)
    if root not in needed:
        return {}

    # dependency counts among the needed nodes (one per distinct parent → child edge)
    pending_parents: Dict[object, int] = {}
    for node in needed:
        for child in {child for child, _ in _children(node) if child is not None and child in needed}:
            pending_parents[child] = pending_parents.get(child, 0) + 1

    d_in: Dict[object, List[Optional[Tensor]]] = {}
    g_in: Dict[object, List[Optional[Tensor]]] = {}

    def deposit(node, nr, d, g):
        if node not in d_in:
            n = max(_num_outputs(node), nr + 1)
            d_in[node], g_in[node] = [None] * n, [None] * n
        ds, gs = d_in[node], g_in[node]
        ds[nr] = d if ds[nr] is None else ds[nr] + d
        gs[nr] = g if gs[nr] is None else gs[nr] + g

    found: Dict[Hashable, Tuple[Tensor, Tensor]] = {}
    with torch.no_grad():
        deposit(root, output.output_nr, d_output.detach(), g_output.detach())
        ready = [root]
        while ready:
            node = ready.pop()
            ds, gs = d_in.pop(node), g_in.pop(node)
            name = type(node).__name__
            multi = len(ds) > 1 and any(t is not None for t in ds[1:])
            if node in watch:
                found[watch[node]] = (tuple(ds), tuple(gs)) if len(ds) > 1 and name in _MULTI_OUTPUT else (ds[0], gs[0])
            children = _children(node)
            need = tuple(child is not None and child in needed for child, _ in children)
            if not any(need):
                continue
            if multi and name not in _MULTI_OUTPUT:
                raise ValueError(
                    f"HesScale: {name} has several outputs carrying gradients; only split/chunk/unbind "
                    "are supported among multi-output operations"
                )
            rule = _RULES.get(name)
            if rule is None:
                raise ValueError(
                    f"HesScale has no rule for {name} (on the path from the output to a watched node); "
                    f"supported operations: linear/conv layers, element-wise activations, pooling, eval-mode "
                    f"BatchNorm, dropout, reshapes/selections, additions and products with constants "
                    f"(see curvlib.engine.diagonal_backprop.supported_nodes())"
                )
            grads = _apply_node(node, *gs)
            ctx = _Context(node, ds[0], gs[0], grads, need, gauss_newton, ds)
            d_children = list(rule(ctx))
            for slot, (child, nr) in enumerate(children):
                if not need[slot]:
                    continue
                d_child = d_children[slot] if slot < len(d_children) else None
                if d_child is None or grads[slot] is None:
                    raise ValueError(f"HesScale: {name} cannot propagate into its input {slot} (which leads to a watched node)")
                deposit(child, nr, _conform(d_child, child, nr), _conform(grads[slot], child, nr))
            for child in {child for child, _ in children if child is not None and child in needed}:
                pending_parents[child] -= 1
                if pending_parents[child] == 0:
                    ready.append(child)
    return found


# ----------------------------------------------------------------------------------------------
# parameter side


def _sum_but_channel(t: Tensor) -> Tensor:
    return t.sum([i for i in range(t.dim()) if i != 1]) if t.dim() > 1 else t


def _transposed_output_padding(module, x: Tensor, d: Tensor) -> Tuple[int, ...]:
    """Output padding of a transposed convolution, read off its output size (covers ``output_size=``)."""
    pads = []
    for axis in range(len(module.kernel_size)):
        base = (
            (x.shape[2 + axis] - 1) * module.stride[axis]
            - 2 * module.padding[axis]
            + module.dilation[axis] * (module.kernel_size[axis] - 1)
            + 1
        )
        pads.append(d.shape[2 + axis] - base)
    return tuple(pads)


def parameter_diagonals(module: nn.Module, inputs: tuple, d_output: Tensor) -> Dict[str, Tensor]:
    """HesScale diagonals of a layer's parameters from the diagonal ``d_output`` at its output.

    ``diag(J_wᵀ diag(d_output) J_w)`` for each parameter (the layers are linear in their parameters,
    so there is no second-derivative term).

    Args:
        module: ``nn.Linear`` (any leading dims), ``nn.Conv{1,2,3}d``, ``nn.ConvTranspose{1,2,3}d``
            (``padding_mode='zeros'``) or ``nn.BatchNorm{1,2,3}d`` in eval mode.
        inputs: the module's forward inputs; ``inputs[0]`` is the layer input.
        d_output: shaped like the layer output.

    Returns:
        ``{"weight": ..., "bias": ...}`` shaped like the parameters (absent parameters omitted).
    """
    x = inputs[0].detach()
    d = d_output.detach()
    result: Dict[str, Tensor] = {}
    if isinstance(module, nn.Linear):
        x2 = x.reshape(-1, x.shape[-1])
        d2 = d.reshape(-1, d.shape[-1])
        result["weight"] = d2.T @ x2.square()
        if module.bias is not None:
            result["bias"] = d2.sum(0)
        return result
    if isinstance(module, nn.modules.conv._ConvNd):
        if module.padding_mode != "zeros":
            raise ValueError(
                f"parameter_diagonals: {type(module).__name__} with padding_mode={module.padding_mode!r} is not "
                "supported (only 'zeros'); pad the input explicitly and use padding=0"
            )
        num_dims = len(module.kernel_size)
        if x.dim() == num_dims + 1:  # unbatched
            x, d = x.unsqueeze(0), d.unsqueeze(0)
        kwargs = dict(
            stride=tuple(module.stride),
            padding=module.padding if isinstance(module.padding, str) else tuple(module.padding),
            dilation=tuple(module.dilation),
            groups=module.groups,
        )
        if module.transposed:
            kwargs.update(transposed=True, output_padding=_transposed_output_padding(module, x, d))
        result["weight"] = _functional.hesscale_weight_diag(x, d, tuple(module.kernel_size), **kwargs)
        if module.bias is not None:
            result["bias"] = _sum_but_channel(d)
        return result
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if module.training or module.running_var is None:
            raise ValueError(
                f"parameter_diagonals: {type(module).__name__} must be in eval mode with running statistics "
                "(HesScale does not support BatchNorm in train mode; call model.eval())"
            )
        shape = [1] * x.dim()
        shape[1] = -1
        normalized = (x - module.running_mean.reshape(shape)) / torch.sqrt(module.running_var.reshape(shape) + module.eps)
        if module.weight is not None:
            result["weight"] = _sum_but_channel(d * normalized.square())
        if module.bias is not None:
            result["bias"] = _sum_but_channel(d)
        return result
    raise ValueError(
        f"parameter_diagonals: no HesScale rule for the parameters of {type(module).__name__} "
        "(supported: Linear, Conv{1,2,3}d, ConvTranspose{1,2,3}d, BatchNorm{1,2,3}d in eval mode)"
    )
