"""Public functions: every convolution operation of the core paper's Table B2 as a tensor network.

Conventions (``N`` batch, ``C`` columns of ``s``, ``G`` groups, ``*I``/``*O``/``*K`` spatial input,
output and kernel sizes; any number of spatial dimensions, inferred from ``x.dim() - 2``):

- ``x`` is the layer input ``[N, C_in, *I]``; hyper-parameters ``stride``, ``padding`` (int, tuple,
  ``'same'``, ``'valid'``), ``dilation``, ``groups`` are those of ``torch.nn.functional.conv{N}d``.
- ``s`` is a backpropagated loss-Hessian square root ``[C, N, C_out, *O]`` (columns first).
- Weight-shaped results are ``[C_out, C_in // G, *K]``, with a leading ``N`` if ``per_sample``.
- Kronecker input factors are ``[G, D, D]``, ``D = C_in // G · ∏K``, rows ordered like
  ``weight.flatten(1)`` restricted to one group.
- Weight-side functions take ``transposed=True, output_padding=...`` for a ``ConvTranspose`` layer:
  then ``x`` is that layer's input, ``s``/``v``/``d`` live on its output, the weight is
  ``[C_in, C_out // G, *K]`` (PyTorch's ``ConvTranspose`` layout) and the factors' ``D`` is
  ``C_in // G · ∏K`` (the layer input's channels per group times the kernel).
- ``simplify=True`` applies the exact rewrites of :mod:`curvlib.simplify` before contracting.
- ``pathway`` chooses the implementation (:mod:`curvlib.pathways`): ``"auto"`` (default) takes the
  fastest that fits the memory budget, per configuration (measured with
  ``curvlib.pathways.configure(autotune=True)``, otherwise by the cost model of :mod:`curvlib.cost`);
  ``"native"`` uses PyTorch's kernels (cuDNN/ATen convolutions, unfold plus matrix products);
  ``"tn"`` the tensor network (``simplify=True`` first applies the exact rewrites of
  :mod:`curvlib.simplify`); ``"unfold"`` the network with overlapping windows viewed as the unfolded
  input (batched matrix products); ``"fused"`` a Triton kernel (:mod:`curvlib.kernels`, CUDA). A forced
  pathway that does not apply raises ``ValueError`` naming those that do.

Normalisation: ``kfc`` and ``kfac_reduce`` average over the batch (``1/N``); GGN quantities are
plain sums over the columns of ``s`` and the batch.

>>> import torch
>>> from curvlib import functional as F
>>> x, w = torch.randn(4, 3, 8, 8), torch.randn(6, 3, 3, 3)
>>> torch.allclose(F.conv(x, w, padding=1), torch.nn.functional.conv2d(x, w, padding=1), atol=1e-5)
True
>>> s = torch.randn(10, 4, 6, 8, 8)          # C = 10 columns
>>> F.ggn_diag(x, s, 3, padding=1).shape    # weight-shaped
torch.Size([6, 3, 3, 3])
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Optional, Sequence

import torch
from torch import Tensor

from . import cost as _cost
from . import native as _native_module
from . import pathways as _pathways
from . import lag_gram as _lag_gram
from . import precision as _precision
from . import simplify as _simplify
from .contract import contract
from .expressions import convolution, ggn as _ggn, hesscale, kfac, unfold as _unfold, weight as _weight
from .hyperparams import (
    ConvGeometry,
    check_same_device_dtype,
    check_shape,
    check_tensor,
    make_geometry,
    spatial_size_argument,
)
from .tensor_network import TensorNetwork

__all__ = [
    "conv",
    "conv_transpose",
    "unfold",
    "unfold_kernel",
    "weight_vjp",
    "input_vjp",
    "weight_jvp",
    "input_jvp",
    "unfold_vjp",
    "unfold_jvp",
    "kfc",
    "kfac_reduce",
    "ggn",
    "ggn_diag",
    "ggn_mini_block",
    "ggn_gram",
    "hesscale_weight_diag",
    "hesscale_input_diag",
]


PATHWAYS = _pathways.PATHWAYS


def _evaluate(network: TensorNetwork, simplify: bool, pathway: str = "tn") -> Tensor:
    """Contract ``network`` as built (``simplify=False``), simplified, or (``pathway="unfold"``) with
    overlapping windows viewed as the unfolded input."""
    if pathway == "unfold":
        return contract(_simplify.simplify(network, unfold_overlapping=True))
    return contract(_simplify.simplify(network) if simplify else network)


_KERNELS = None


def _kernels():
    """:mod:`curvlib.kernels` if it imports (Triton kernels), else ``False``."""
    global _KERNELS
    if _KERNELS is None:
        try:
            from . import kernels as module
        except Exception as error:  # pragma: no cover - Triton missing or broken: no fused pathway
            warnings.warn(f"curvlib.kernels unavailable ({type(error).__name__}: {error}); no fused pathway")
            module = False
        _KERNELS = module if hasattr(module, "supports") else False
    return _KERNELS


def _dispatch(
    op: str,
    pathway: str,
    simplify: bool,
    geometry: ConvGeometry,
    tensors: Sequence[Tensor],
    network,
    native=None,
    fused=None,
    lags=None,
    options: tuple = (),
    batch: Optional[int] = None,
    columns: int = 1,
    extend=None,
) -> Tensor:
    """Run ``op`` on the requested pathway (or the automatic choice among those available).

    ``network`` builds the tensor network; ``native``/``fused``/``lags`` compute the result natively /
    with a fused kernel / from lag products (``None``: not available for these arguments; a
    :class:`_Candidate`: available if its check says so); ``options`` (hashable) completes the
    configuration key; ``extend`` (optional) maps a tensor network's result to what the other
    pathways return (e.g. a quantity they compute along with it).
    """
    first = tensors[0]
    key = _config_key(op, geometry, tensors, options)
    precision = _pathways.settings().precision
    in_precision = precision is not None and first.is_cuda  # cuBLAS/cuDNN calls run under the requested precision
    if pathway == "auto":
        # fast path: a configuration seen before runs its choice directly, without the availability checks
        # (a choice was only ever made among the candidates available for this key)
        choice = _pathways.cached_choice(key)
        direct = {"native": native, "fused": fused, "lags": lags}.get(choice)
        if direct is not None:
            run = direct.run if isinstance(direct, _Candidate) else direct
            return (_in_precision(run, precision, first.device) if in_precision and choice != "fused" else run)()
    native, fused, lags = _available(native), _available(fused), _available(lags)
    if in_precision:
        native = _in_precision(native, precision, first.device)
        lags = _in_precision(lags, precision, first.device)
    runners = {
        "tn": lambda: contract(network()),
        "tn+simplify": lambda: contract(_simplify.simplify(network())),
        "unfold": lambda: contract(_simplify.simplify(network(), unfold_overlapping=True)),
    }
    if extend is not None:
        runners = {name: (lambda run=run: extend(run())) for name, run in runners.items()}
    if precision is not None and first.is_cuda:
        runners = {name: _in_precision(run, precision, first.device) for name, run in runners.items()}
    if native is not None:
        runners["native"] = native
    if fused is not None:  # takes the precision as its own argument (_kernel_precision)
        runners["fused"] = fused
    if lags is not None:
        runners["lags"] = lags
    call = _pathways.Call(
        op=op,
        key=key,
        runners=runners,
        device=first.device,
        analytic=lambda name: _cost.operation_cost(
            op, name, geometry, first.shape[0] if batch is None else batch, columns, first.element_size(),
            chunk_bytes=_native_module._chunk_bytes(),
            precision=_precision.effective_precision(precision) if first.is_cuda else None,
        ),
        element_size=first.element_size(),
        network=network,
    )
    return _pathways.run(call, pathway, simplify)


def _config_key(op: str, geometry: ConvGeometry, tensors: Sequence[Tensor], options: tuple = ()) -> tuple:
    """The configuration an automatic choice is cached for (float32 precision included: TF32 changes
    which candidate is fastest; and whether each tensor is contiguous: channels-last columns change
    what a pathway's copies cost)."""
    first = tensors[0]
    precision = _precision.effective_precision(_pathways.settings().precision) if first.is_cuda else None
    return (op, geometry, tuple(t.shape for t in tensors), first.dtype, first.device, options, precision,
            tuple(t.is_contiguous() for t in tensors))


def _in_precision(run, precision: str, device: torch.device):
    """``run`` (``None`` stays ``None``) called with cuBLAS/cuDNN float32 products in ``precision``."""
    if run is None:
        return None

    def wrapped(*args, **kwargs):
        with _precision.fp32_precision(precision, device):
            return run(*args, **kwargs)

    return wrapped


def _kfc_by_lags(x: Tensor, geometry) -> Tensor:
    """The lags pathway in the precision the setting implies (the Triton lag products take it as an
    argument, cuBLAS runs under the flags ``_dispatch`` sets); under TF32 on CUDA without Triton the
    convolution (cuDNN's Winograd error, ~2e-4, is below TF32's ~1e-3; 2x faster than the GEMM form).
    Under memory limits its temporaries go in chunks (:func:`curvlib.lag_gram.kfc_chunk_bytes`)."""
    precision = _precision.effective_precision(_pathways.settings().precision)
    chunk_bytes = _lag_gram.kfc_chunk_bytes(geometry, x.shape[0], x.element_size())
    if x.is_cuda and precision in ("tf32", "bf16") and not _lag_gram.triton_usable(x.dtype, x.device, x.numel()):
        return _lag_gram.kfc_by_lags(x, geometry, lag_method="conv", chunk_bytes=chunk_bytes)
    return _lag_gram.kfc_by_lags(x, geometry, lag_method="auto", precision=precision if x.is_cuda else "ieee",
                                 chunk_bytes=chunk_bytes)


def _kernel_precision() -> str:
    """The fused kernels' ``precision=``: the setting, or what PyTorch's matmul flag implies."""
    return _precision.effective_precision(_pathways.settings().precision)


# Shortcut for repeated calls of the forward-like operations (those PyTorch has built in): arguments
# seen before, whose pathway resolved to "native", go straight to the ATen call. Validation and the
# choice depend only on what the key holds (shapes, dtypes, devices, hyper-parameters as given,
# settings generation), so skipping them is safe; it saves the Python that dominates small layers.
_SHORTCUTS: dict = {}


def _shortcut_key(op: str, tensors, *arguments):
    arguments = tuple(tuple(a) if isinstance(a, list) else a for a in arguments)  # lists act as tuples
    try:
        key = (op, *((None, None, None) if t is None else (t.shape, t.dtype, t.device) for t in tensors), *arguments,
               _pathways.generation())
        hash(key)
    except (TypeError, AttributeError):  # unhashable arguments, or not tensors: no shortcut (validation reports)
        return None
    return key


def _shortcut(op: str, tensors, *arguments):
    """``(key, stored function or None)`` for a call with these tensors and arguments."""
    key = _shortcut_key(op, tensors, *arguments)
    return key, (None if key is None else _SHORTCUTS.get(key))


def _remember_shortcut(key, pathway: str, config: tuple, run, prepare=None) -> None:
    """Store the function a call with shortcut ``key`` resolved to: ``run`` where that is the native
    pathway, or ``run[choice]`` (a dict of functions of the tensors) for the pathway it took; where
    ``prepare`` (a dict of functions without arguments) has the choice, what its entry returns instead
    (a function for repeated calls, which did its own checks and choices once)."""
    if key is None:
        return
    choice = pathway if pathway != "auto" else _pathways.cached_choice(config)
    if _pathways.settings().precision is not None and choice != "fused":
        return  # the shortcut would call cuBLAS/cuDNN without the precision (fused kernels take it as an argument)
    run = run.get(choice) if isinstance(run, dict) else (run if choice == "native" else None)
    if run is not None and prepare and choice in prepare:
        run = prepare[choice]() or run
    if run is None:
        return
    if len(_SHORTCUTS) > 4096:
        _SHORTCUTS.clear()
    _SHORTCUTS[key] = run


def _strides(*tensors) -> tuple:
    """Each tensor's strides (part of a shortcut key where what the call runs depends on the layout beyond
    contiguity: a prepared fused kernel reads its operands as laid out at its first call)."""
    return tuple(t.stride() if isinstance(t, Tensor) else None for t in tensors)


def _fp32_key(x: Tensor):
    """What of PyTorch's float32 flags an automatic choice on ``x``'s device depends on (part of a shortcut key)."""
    return _precision.effective_precision(None) if getattr(x, "is_cuda", False) else None


class _Candidate:
    """A pathway's runner and the check whether it applies, made only when needed: the fast path of a
    cached automatic choice runs the runner without it (the checks of small layers cost as much host
    time as their kernels)."""

    __slots__ = ("applies", "run")

    def __init__(self, applies, run):
        self.applies = applies
        self.run = run


def _available(candidate):
    """The runner of ``candidate`` if it applies (a plain callable always does), else ``None``."""
    if isinstance(candidate, _Candidate):
        return candidate.run if candidate.applies() else None
    return candidate


def _fused(op: str, x: Tensor, geometry: ConvGeometry, run, **options) -> _Candidate:
    """``run``, applicable if a fused kernel handles ``op`` here."""
    return _Candidate(lambda: bool(_kernels()) and _kernels().supports(op, x, geometry, **options), run)


def _native(op: str, geometry: ConvGeometry, run, **options) -> _Candidate:
    return _Candidate(lambda: _native_module.supports(op, geometry, **options), run)


def _layer_geometry(*args) -> ConvGeometry:
    """:func:`_make_layer_geometry`, cached: validating hyper-parameters dominates the cost of a small call."""
    try:
        return _cached_layer_geometry(*args)
    except TypeError as error:  # unhashable arguments (lists): validate without the cache
        if "unhashable" not in str(error):
            raise
        return _make_layer_geometry(*args)


def _make_layer_geometry(
    x_shape: Sequence[int],
    out_channels: int,
    kernel_size,
    stride,
    padding,
    dilation,
    groups,
    transposed,
    output_padding,
    padding_mode="zeros",
) -> ConvGeometry:
    return make_geometry(
        layer_input_channels=x_shape[1],
        layer_output_channels=out_channels,
        layer_input_size=tuple(x_shape[2:]),
        kernel_size=kernel_size,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        transposed=transposed,
        output_padding=output_padding,
        padding_mode=padding_mode,
    )


_cached_layer_geometry = functools.lru_cache(maxsize=4096)(_make_layer_geometry)


def _check_output_like(tensor: Tensor, name: str, geometry: ConvGeometry, batch: int, leading=()) -> None:
    expected = (*leading, batch, geometry.layer_output_channels, *geometry.layer_output_size)
    check_shape(tensor, name, expected, "[" + ", ".join(["C"] * len(leading) + ["N", "C_out", "*O"]) + "] of the layer output")


def _weight_geometry(weight: Tensor, num_dims: int, groups: int, transposed: bool):
    """Layer channel counts ``(in, out)`` implied by a weight of the (transposed) convolution layout."""
    check_tensor(weight, "weight", dim=num_dims + 2)
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    if weight.shape[0] % groups != 0:
        raise ValueError(f"weight.shape[0] ({weight.shape[0]}) must be divisible by groups ({groups})")
    if transposed:
        return weight.shape[0], weight.shape[1] * groups
    return weight.shape[1] * groups, weight.shape[0]


def _add_bias(result: Tensor, bias: Optional[Tensor], channels: int) -> Tensor:
    if bias is None:
        return result
    check_tensor(bias, "bias", dim=1)
    check_shape(bias, "bias", (channels,), "one entry per output channel")
    check_same_device_dtype(result=result, bias=bias)
    return result + bias.reshape(channels, *([1] * (result.dim() - 2)))


# ----------------------------------------------------------------------------------------------
# forward maps


def conv(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    *,
    padding_mode: str = "zeros",
    simplify: bool = True,
    pathway: str = "auto",
) -> Tensor:
    """N-d convolution, same signature and result as ``torch.nn.functional.conv{N}d``.

    Args:
        x: ``[N, C_in, *I]``.
        weight: ``[C_out, C_in // G, *K]``.
        bias: optional ``[C_out]``.

    Returns:
        ``[N, C_out, *O]``.
    """
    shortcut, run = _shortcut("conv", (x, weight, bias), stride, padding, dilation, groups, padding_mode, simplify, pathway)
    if run is not None:
        return run(x, weight, bias)
    check_tensor(x, "x", min_dim=3)
    c_in, c_out = _weight_geometry(weight, x.dim() - 2, groups, transposed=False)
    check_same_device_dtype(x=x, weight=weight)
    if x.shape[1] != c_in:
        raise ValueError(f"x has {x.shape[1]} channels, weight {tuple(weight.shape)} with groups={groups} expects {c_in}")
    geometry = _layer_geometry(
        x.shape, c_out, weight.shape[2:], stride, padding, dilation, groups, False, 0, padding_mode
    )
    result = _dispatch(
        "conv", pathway, simplify, geometry, (x, weight),
        network=lambda: convolution.propagate(x, weight, geometry, "i"),
        native=_native("conv", geometry, lambda: _native_module.to_output_side(x, weight, geometry)),
    )
    result = _add_bias(result, bias, c_out)
    _remember_shortcut(shortcut, pathway, _config_key("conv", geometry, (x, weight)),
                       _native_module.prepared_to_output_side(geometry))
    return result


def conv_transpose(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    stride=1,
    padding=0,
    output_padding=0,
    groups: int = 1,
    dilation=1,
    *,
    simplify: bool = True,
    pathway: str = "auto",
) -> Tensor:
    """N-d transposed convolution, as ``torch.nn.functional.conv_transpose{N}d``.

    Args:
        x: ``[N, C_in, *I]``.
        weight: ``[C_in, C_out // G, *K]``.
        bias: optional ``[C_out]``.

    Returns:
        ``[N, C_out, *O]`` with ``O = (I−1)·S − 2P + D·(K−1) + output_padding + 1``.
    """
    shortcut, run = _shortcut(
        "conv_transpose", (x, weight, bias), stride, padding, output_padding, groups, dilation, simplify, pathway
    )
    if run is not None:
        return run(x, weight, bias)
    check_tensor(x, "x", min_dim=3)
    c_in, c_out = _weight_geometry(weight, x.dim() - 2, groups, transposed=True)
    check_same_device_dtype(x=x, weight=weight)
    if x.shape[1] != c_in:
        raise ValueError(f"x has {x.shape[1]} channels, weight {tuple(weight.shape)} expects {c_in}")
    geometry = _layer_geometry(x.shape, c_out, weight.shape[2:], stride, padding, dilation, groups, True, output_padding)
    result = _dispatch(
        "conv_transpose", pathway, simplify, geometry, (x, weight),
        network=lambda: convolution.propagate(x, weight, geometry, "o"),
        native=_native("conv_transpose", geometry, lambda: _native_module.to_input_side(x, weight, geometry)),
    )
    result = _add_bias(result, bias, c_out)
    to_input = _native_module.prepared_to_input_side(geometry)
    _remember_shortcut(shortcut, pathway, _config_key("conv_transpose", geometry, (x, weight)),
                       lambda x, w, b: _add_bias(to_input(x, w), b, c_out))
    return result


def weight_jvp(
    x: Tensor,
    v_weight: Tensor,
    *,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    transposed: bool = False,
    output_padding=0,
    simplify: bool = True,
    pathway: str = "auto",
) -> Tensor:
    """Weight JVP: the layer output's change ``[N, C_out, *O]`` for a weight perturbation ``v_weight``.

    ``v_weight`` is weight-shaped; the result is the (transposed) convolution of ``x`` with it, no bias.
    """
    if transposed:
        return conv_transpose(
            x, v_weight, None, stride, padding, output_padding, groups, dilation, simplify=simplify, pathway=pathway
        )
    return conv(x, v_weight, None, stride, padding, dilation, groups, simplify=simplify, pathway=pathway)


def input_jvp(
    weight: Tensor,
    v_x: Tensor,
    *,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    transposed: bool = False,
    output_padding=0,
    simplify: bool = True,
    pathway: str = "auto",
) -> Tensor:
    """Input JVP: the layer output's change ``[N, C_out, *O]`` for an input perturbation ``v_x`` ``[N, C_in, *I]``."""
    return weight_jvp(
        v_x, weight, stride=stride, padding=padding, dilation=dilation, groups=groups,
        transposed=transposed, output_padding=output_padding, simplify=simplify, pathway=pathway,
    )


def input_vjp(
    weight: Tensor,
    v: Tensor,
    input_size,
    *,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    transposed: bool = False,
    output_padding=0,
    simplify: bool = True,
    pathway: str = "auto",
) -> Tensor:
    """Input VJP (for a convolution: the transposed convolution), as ``torch.nn.grad.conv{N}d_input``.

    Args:
        weight: ``[C_out, C_in // G, *K]`` (``[C_in, C_out // G, *K]`` if ``transposed``).
        v: vector on the layer output ``[N, C_out, *O]``.
        input_size: the layer input's spatial size ``(*I)`` or full shape ``(N, C_in, *I)``.

    Returns:
        ``[N, C_in, *I]``.
    """
    shortcut, run = _shortcut(
        "input_vjp", (weight, v), input_size, stride, padding, dilation, groups, transposed, output_padding, simplify,
        pathway,
    )
    if run is not None:
        return run(weight, v)
    check_tensor(v, "v", min_dim=3)
    num_dims = v.dim() - 2
    c_in, c_out = _weight_geometry(weight, num_dims, groups, transposed)
    check_same_device_dtype(v=v, weight=weight)
    size = spatial_size_argument(input_size, num_dims, "input_size")
    geometry = _layer_geometry(
        (v.shape[0], c_in, *size), c_out, weight.shape[2:], stride, padding, dilation, groups, transposed, output_padding
    )
    _check_output_like(v, "v", geometry, v.shape[0])
    source_side = "i" if transposed else "o"
    propagate = _native_module.to_output_side if transposed else _native_module.to_input_side
    result = _dispatch(
        "input_vjp", pathway, simplify, geometry, (v, weight),
        network=lambda: convolution.propagate(v, weight, geometry, source_side),
        native=_native("input_vjp", geometry, lambda: propagate(v, weight, geometry)),
    )
    prepared = (_native_module.prepared_to_output_side if transposed else _native_module.prepared_to_input_side)(geometry)
    _remember_shortcut(shortcut, pathway, _config_key("input_vjp", geometry, (v, weight)), lambda w, v: prepared(v, w))
    return result


# ----------------------------------------------------------------------------------------------
# unfolding


def _unfold_geometry(x_shape, kernel_size, stride, padding, dilation) -> ConvGeometry:
    return _layer_geometry(x_shape, x_shape[1], kernel_size, stride, padding, dilation, 1, False, 0)


def unfold(x: Tensor, kernel_size, *, dilation=1, padding=0, stride=1, simplify: bool = True, pathway: str = "auto") -> Tensor:
    """im2col: ``[N, C, *I]`` → ``[N, C·∏K, ∏O]``, the layout of ``torch.nn.functional.unfold`` (any N-d).

    Row ``(c, k_1, …)`` and column ``(o_1, …)`` are ordered row-major.
    """
    check_tensor(x, "x", min_dim=3)
    geometry = _unfold_geometry(x.shape, kernel_size, stride, padding, dilation)
    return _dispatch(
        "unfold", pathway, simplify, geometry, (x,),
        network=lambda: _unfold.unfold(x, geometry),
        native=lambda: _native_module.unfold_input(x, geometry).flatten(1, 2),
    )


def unfold_jvp(v_x: Tensor, kernel_size, *, dilation=1, padding=0, stride=1, simplify: bool = True, pathway: str = "auto") -> Tensor:
    """JVP of :func:`unfold` (which is linear): the unfolded perturbation ``[N, C·∏K, ∏O]``."""
    return unfold(v_x, kernel_size, dilation=dilation, padding=padding, stride=stride, simplify=simplify, pathway=pathway)


def unfold_vjp(
    v: Tensor, input_size, kernel_size, *, dilation=1, padding=0, stride=1, simplify: bool = True,
    pathway: str = "auto"
) -> Tensor:
    """VJP of :func:`unfold` (``fold`` / col2im): ``v`` ``[N, C·∏K, ∏O]`` → ``[N, C, *I]``.

    Args:
        input_size: spatial size ``(*I)`` (like ``output_size`` of ``torch.nn.functional.fold``); the full
            shape ``(N, C, *I)`` is accepted when ``kernel_size`` is a tuple. ``C = v.shape[1] / ∏K``.
    """
    check_tensor(v, "v", dim=3)
    if isinstance(kernel_size, int):
        num_dims = 1 if isinstance(input_size, int) else len(tuple(input_size))
    else:
        num_dims = len(tuple(kernel_size))
    size = spatial_size_argument(input_size, num_dims, "input_size")
    kernel = make_geometry(1, 1, size, kernel_size, stride, padding, dilation).kernel_size
    if v.shape[1] % math.prod(kernel) != 0:
        raise ValueError(f"v.shape[1] ({v.shape[1]}) must be C·∏kernel_size with ∏kernel_size = {math.prod(kernel)}")
    channels = v.shape[1] // math.prod(kernel)
    geometry = _unfold_geometry((v.shape[0], channels, *size), kernel_size, stride, padding, dilation)
    check_shape(v, "v", (v.shape[0], channels * math.prod(kernel), math.prod(geometry.output_size)), "[N, C·∏K, ∏O]")
    return _dispatch(
        "unfold_vjp", pathway, simplify, geometry, (v,), network=lambda: _unfold.unfold_vjp(v, geometry, channels)
    )


def unfold_kernel(
    weight: Tensor, input_size, *, stride=1, padding=0, dilation=1, groups: int = 1, simplify: bool = True,
    pathway: str = "auto"
) -> Tensor:
    """Toeplitz matrix of the kernel: ``[C_out·∏O, C_in·∏I]`` with ``conv(x)[n].flatten() = T @ x[n].flatten()``.

    Channel groups give a block-diagonal matrix (zeros between groups).
    """
    num_dims = weight.dim() - 2
    c_in, c_out = _weight_geometry(weight, num_dims, groups, transposed=False)
    size = spatial_size_argument(input_size, num_dims, "input_size")
    geometry = _layer_geometry((1, c_in, *size), c_out, weight.shape[2:], stride, padding, dilation, groups, False, 0)
    blocks = _dispatch(
        "unfold_kernel", pathway, simplify, geometry, (weight,), network=lambda: _unfold.unfold_kernel(weight, geometry),
        batch=1,
    )
    if groups == 1:
        return blocks[0]
    return torch.block_diag(*blocks.unbind(0))


# ----------------------------------------------------------------------------------------------
# weight-side quantities


def _weight_side(
    x, other, other_name, kernel_size, stride, padding, dilation, groups, transposed, output_padding, leading=0
) -> ConvGeometry:
    """Validate ``x`` and the output-side tensor ``other`` (``leading`` extra axes in front) and build the geometry."""
    check_tensor(x, "x", min_dim=3)
    check_tensor(other, other_name, dim=x.dim() + leading)
    check_same_device_dtype(x=x, **{other_name: other})
    geometry = _layer_geometry(
        x.shape, other.shape[leading + 1], kernel_size, stride, padding, dilation, groups, transposed, output_padding
    )
    _check_output_like(other, other_name, geometry, x.shape[0], leading=tuple(other.shape[:leading]))
    return geometry


def _sides(x: Tensor, other: Tensor, geometry: ConvGeometry):
    """``(i-side tensor, o-side tensor)`` of the reference convolution."""
    return (other, x) if geometry.transposed else (x, other)


def weight_vjp(
    x: Tensor,
    v: Tensor,
    kernel_size,
    *,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    per_sample: bool = False,
    columns: bool = False,
    transposed: bool = False,
    output_padding=0,
    simplify: bool = True,
    pathway: str = "auto",
) -> Tensor:
    """Weight VJP (the weight gradient for output gradient ``v``), as ``torch.nn.grad.conv{N}d_weight``.

    Args:
        x: layer input ``[N, C_in, *I]``.
        v: vector on the layer output ``[N, C_out, *O]``, or ``[C, N, C_out, *O]`` with ``columns=True``.
        kernel_size: int or tuple.
        per_sample: keep the batch axis (per-sample gradients).
        columns: ``v`` holds ``C`` vectors (leading axis); one weight VJP per column.

    Returns:
        ``[[C,] [N,] C_out, C_in // G, *K]`` (``C`` if ``columns``, ``N`` if ``per_sample``);
        for a transposed layer the weight is ``[C_in, C_out // G, *K]``.
    """
    shortcut, run = _shortcut(
        "weight_vjp", (x, v), kernel_size, stride, padding, dilation, groups, per_sample, columns, transposed,
        output_padding, simplify, pathway,
    )
    if run is not None:
        return run(x, v)
    lead = 1 if columns else 0
    geometry = _weight_side(x, v, "v", kernel_size, stride, padding, dilation, groups, transposed, output_padding, lead)
    side = ("i" if transposed else "o") if columns else None
    result = _dispatch(
        "weight_vjp", pathway, simplify, geometry, (x, v),
        network=lambda: _weight.weight_vjp(*_sides(x, v, geometry), geometry, per_sample, columns=side),
        native=_native(
            "weight_vjp", geometry, lambda: _native_module.reference_weight_vjp(*_sides(x, v, geometry), geometry),
            per_sample=per_sample, columns=columns,
        ),
        options=(per_sample, columns),
        columns=v.shape[0] if columns else 1,
    )
    prepared = _native_module.prepared_reference_weight_vjp(geometry)
    _remember_shortcut(shortcut, pathway, _config_key("weight_vjp", geometry, (x, v), (per_sample, columns)),
                       (lambda x, v: prepared(v, x)) if transposed else prepared)
    return result


def kfc(
    x: Tensor,
    kernel_size,
    *,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    transposed: bool = False,
    output_padding=0,
    simplify: bool = True,
    pathway: str = "auto",
) -> Tensor:
    """KFC / KFAC-expand input factor ``Ω_g = 1/N Σ_n ⟦X_{n,g}⟧ᵀ⟦X_{n,g}⟧`` (sum over output locations).

    Args:
        x: layer input ``[N, C_in, *I]``.

    Returns:
        ``[G, D, D]`` with ``D = C_in // G · ∏K``.
    """
    hyper = (kernel_size, stride, padding, dilation, groups, transposed, output_padding)
    shortcut, run = _shortcut("kfc", (x,), *hyper, simplify, pathway, _fp32_key(x))
    if run is not None:
        return run(x)
    check_tensor(x, "x", min_dim=3)
    geometry = _layer_geometry(x.shape, groups, kernel_size, stride, padding, dilation, groups, transposed, output_padding)
    runs = {
        "native": lambda t: _native_module.kfc(
            t, geometry, chunk_bytes=_native_module.kfc_chunk_bytes(geometry, t.shape[0], t.element_size())),
        "fused": lambda t: _kernels().kfc(t, geometry, precision=_kernel_precision()),
        "lags": lambda t: _kfc_by_lags(t, geometry),
    }
    result = _dispatch(
        "kfc", pathway, simplify, geometry, (x,),
        network=lambda: kfac.kfc(x, geometry),
        native=_native("kfc", geometry, lambda: runs["native"](x)),
        fused=_fused("kfc", x, geometry, lambda: runs["fused"](x)),
        lags=(lambda: runs["lags"](x)) if _lag_gram.supports_lags(geometry) else None,
    )
    _remember_shortcut(shortcut, pathway, _config_key("kfc", geometry, (x,)), runs)
    return result


def kfac_reduce(
    x: Tensor,
    kernel_size,
    *,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    transposed: bool = False,
    output_padding=0,
    simplify: bool = True,
    pathway: str = "auto",
) -> Tensor:
    """KFAC-reduce input factor ``Ω̂_g = 1/N Σ_n ū_{n,g} ū_{n,g}ᵀ``, ``ū`` the unfolded input averaged over output locations.

    Returns:
        ``[G, D, D]`` with ``D = C_in // G · ∏K``.
    """
    hyper = (kernel_size, stride, padding, dilation, groups, transposed, output_padding)
    shortcut, run = _shortcut("kfac_reduce", (x,), *hyper, simplify, pathway, _fp32_key(x))
    if run is not None:
        return run(x)
    check_tensor(x, "x", min_dim=3)
    geometry = _layer_geometry(x.shape, groups, kernel_size, stride, padding, dilation, groups, transposed, output_padding)
    runs = {
        "native": lambda t: _native_module.kfac_reduce(t, geometry),
        "fused": lambda t: _kernels().kfac_reduce(t, geometry, precision=_kernel_precision()),
    }
    result = _dispatch(
        "kfac_reduce", pathway, simplify, geometry, (x,),
        network=lambda: kfac.kfac_reduce(x, geometry),
        native=_native("kfac_reduce", geometry, lambda: runs["native"](x)),
        fused=_fused("kfac_reduce", x, geometry, lambda: runs["fused"](x)),
    )
    _remember_shortcut(shortcut, pathway, _config_key("kfac_reduce", geometry, (x,)), runs)
    return result


def _check_blocks(blocks, weight_shape) -> tuple:
    if blocks is None:
        raise ValueError(f"blocks must be given: one int per weight axis {tuple(weight_shape)}")
    blocks = tuple(blocks)
    if len(blocks) != len(weight_shape) or not all(isinstance(b, int) and b >= 1 for b in blocks):
        raise ValueError(f"blocks must have one positive int per weight axis {tuple(weight_shape)}, got {blocks!r}")
    for axis, (size, b) in enumerate(zip(weight_shape, blocks)):
        if size % b != 0:
            raise ValueError(f"blocks[{axis}] = {b} does not divide weight axis {axis} of size {size}")
    return blocks


def ggn_mini_block(
    x: Tensor,
    s: Tensor,
    kernel_size,
    *,
    blocks: Sequence[int],
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    transposed: bool = False,
    output_padding=0,
    simplify: bool = True,
    pathway: str = "auto",
) -> Tensor:
    """GGN mini-block diagonal (core paper B.2) of a convolution weight.

    Args:
        x: layer input ``[N, C_in, *I]``.
        s: backpropagated loss-Hessian square root ``[C, N, C_out, *O]``.
        blocks: number of blocks per weight axis ``(C_out, C_in // G, *K)``, each dividing its axis.

    Returns:
        ``[*blocks, d, d]`` with ``d = |w| / ∏blocks``; entry ``b`` is the GGN of the weight sub-tensor
        ``w[b_0·z_0:(b_0+1)·z_0, b_1·z_1:…, …]`` (``z = axis / blocks``, flattened row-major).
        ``blocks = (1, …, 1)`` is the full GGN, ``blocks = weight.shape`` the diagonal.
    """
    geometry = _weight_side(x, s, "s", kernel_size, stride, padding, dilation, groups, transposed, output_padding, leading=1)
    blocks = _check_blocks(blocks, geometry.weight_shape)
    return _dispatch(
        "ggn_mini_block", pathway, simplify, geometry, (x, s),
        network=lambda: _ggn.ggn_blocks(x, s, geometry, blocks), options=(blocks,), columns=s.shape[0],
    )


def ggn(
    x: Tensor,
    s: Tensor,
    kernel_size,
    *,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    transposed: bool = False,
    output_padding=0,
    simplify: bool = True,
    pathway: str = "auto",
) -> Tensor:
    """Full GGN of the weight, ``Σ_{c,n} J_{c,n} J_{c,n}ᵀ``: ``[|w|, |w|]`` in ``weight.flatten()`` order.

    Args:
        x: layer input ``[N, C_in, *I]``.
        s: ``[C, N, C_out, *O]``.
    """
    geometry = _weight_side(x, s, "s", kernel_size, stride, padding, dilation, groups, transposed, output_padding, leading=1)
    blocks = (1,) * len(geometry.weight_shape)
    size = math.prod(geometry.weight_shape)
    return _dispatch(
        "ggn", pathway, simplify, geometry, (x, s), network=lambda: _ggn.ggn_blocks(x, s, geometry, blocks),
        columns=s.shape[0],
    ).reshape(size, size)


def ggn_diag(
    x: Tensor,
    s: Tensor,
    kernel_size,
    *,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    per_sample: bool = False,
    bias: bool = False,
    transposed: bool = False,
    output_padding=0,
    simplify: bool = True,
    pathway: str = "auto",
    dtype: Optional[torch.dtype] = None,
):
    """Diagonal of the weight's GGN, weight-shaped ``[C_out, C_in // G, *K]`` (``[N, …]`` if ``per_sample``).

    Args:
        x: layer input ``[N, C_in, *I]``.
        s: ``[C, N, C_out, *O]``.
        bias: also the diagonal of the bias's GGN, ``Σ_{c[,n]} (Σ_o s[c, n, :, o])²`` (``[C_out]``, ``[N,
            C_out]`` if ``per_sample``): returns the pair ``(weight diagonal, bias diagonal)``. The fused
            kernel computes it in the same pass over ``s`` (a row of ones among the unfolded input's).
        dtype: the result's dtype (default ``x.dtype``). ``torch.float32`` for bfloat16 or float16
            operands keeps the fused kernel's float32 sums as they are (other pathways convert their
            result).

    >>> x, s = torch.randn(2, 3, 8, 8), torch.randn(4, 2, 5, 8, 8)
    >>> weight, bias = ggn_diag(x, s, 3, padding=1, bias=True)
    >>> weight.shape, bias.shape
    (torch.Size([5, 3, 3, 3]), torch.Size([5]))
    """
    if not isinstance(bias, bool):
        raise TypeError(f"bias must be a bool, got {type(bias).__name__}")
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype or None, got {type(dtype).__name__}")
    shortcut, run = _shortcut(
        "ggn_diag", (x, s), kernel_size, stride, padding, dilation, groups, per_sample, bias, transposed,
        output_padding, simplify, pathway, dtype, _fp32_key(x), _strides(x, s),
    )
    if run is not None:
        return run(x, s)
    geometry = _weight_side(x, s, "s", kernel_size, stride, padding, dilation, groups, transposed, output_padding, leading=1)
    shape = geometry.weight_shape
    lead = (x.shape[0],) if per_sample else ()
    numel = math.prod(shape)

    def with_bias(weight: Tensor, s: Tensor) -> Tensor:
        """A pathway's weight diagonal, joined with the bias's from the columns' sums over locations:
        ``[*lead, weight numel + C_out]``, one tensor, as every pathway returns one."""
        if not bias:
            return weight
        # [C, N, C_out]: the bias's per-(column, sample) gradients, summed in float32 at least
        sums = s.flatten(3).sum(3, dtype=torch.promote_types(s.dtype, torch.float32))
        bias_diag = sums.square_().sum(0) if per_sample else sums.square_().sum((0, 1))
        return torch.cat([weight.reshape(*lead, -1), bias_diag.to(weight.dtype)], -1)

    def split(result: Tensor):
        """One pathway's tensor as the caller gets it: weight-shaped, with the bias's diagonal apart."""
        if not bias:
            return result.reshape(*lead, *shape)
        return result[..., :numel].reshape(*lead, *shape), result[..., numel:]

    def converted(result):
        """A pathway's result (weight diagonal, or the pair with the bias's) in ``dtype``."""
        if dtype is None:
            return result
        return tuple(t.to(dtype) for t in result) if isinstance(result, tuple) else result.to(dtype)

    def fused(x: Tensor, s: Tensor):
        # the pair as the kernel returns it (no joined copy: repeated calls take this through the shortcut)
        return _kernels().ggn_diag(x, s, geometry, per_sample=per_sample, precision=_kernel_precision(), bias=bias,
                                   dtype=dtype)

    def joined(result) -> Tensor:
        return torch.cat([result[0].reshape(*lead, -1), result[1]], -1) if bias else result

    runs = {
        "native": lambda x, s: converted(split(with_bias(_native_module.ggn_diag(x, s, geometry, per_sample), s))),
        "fused": fused,
    }
    # repeated calls of the fused kernel skip its checks and its tile choice too
    prepare = {"fused": lambda: _kernels().prepare_ggn_diag(x, s, geometry, per_sample=per_sample,
                                                            precision=_kernel_precision(), bias=bias, dtype=dtype)}
    result = _dispatch(
        "ggn_diag", pathway, simplify, geometry, (x, s),
        network=lambda: _ggn.ggn_blocks(x, s, geometry, shape, per_sample=per_sample),
        native=_native("ggn_diag", geometry, lambda: with_bias(_native_module.ggn_diag(x, s, geometry, per_sample), s)),
        fused=_fused("ggn_diag", x, geometry, lambda: joined(fused(x, s)), per_sample=per_sample, s=s),
        options=(per_sample, bias),
        columns=s.shape[0],
        extend=(lambda weight: with_bias(weight, s)) if bias else None,
    )
    _remember_shortcut(shortcut, pathway, _config_key("ggn_diag", geometry, (x, s), (per_sample, bias)), runs,
                       prepare)
    return converted(split(result))


def ggn_gram(
    x: Tensor,
    s: Tensor,
    kernel_size,
    *,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    transposed: bool = False,
    output_padding=0,
    simplify: bool = True,
    pathway: str = "auto",
) -> Tensor:
    """GGN Gram matrix (empirical NTK for square loss) of the weight: ``[C, N, C, N]``.

    Entry ``(c, n, c', n')`` is ``⟨J_{c,n}, J_{c',n'}⟩`` with ``J_{c,n}`` the weight VJP of column ``c``, sample ``n``.
    """
    geometry = _weight_side(x, s, "s", kernel_size, stride, padding, dilation, groups, transposed, output_padding, leading=1)
    return _dispatch(
        "ggn_gram", pathway, simplify, geometry, (x, s),
        network=lambda: _ggn.ggn_gram(x, s, geometry),
        native=_native("ggn_gram", geometry, lambda: _native_module.ggn_gram(x, s, geometry)),
        columns=s.shape[0],
    )


def hesscale_weight_diag(
    x: Tensor,
    d: Tensor,
    kernel_size,
    *,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    per_sample: bool = False,
    transposed: bool = False,
    output_padding=0,
    simplify: bool = True,
    pathway: str = "auto",
) -> Tensor:
    """HesScale/BL89 weight Hessian diagonal ``diag(Jᵀ diag(d) J)`` (core paper B.4).

    Args:
        x: layer input ``[N, C_in, *I]``.
        d: diagonal of the Hessian w.r.t. the layer output, shaped like it ``[N, C_out, *O]``.

    Returns:
        ``[C_out, C_in // G, *K]`` (``[N, …]`` if ``per_sample``).
    """
    geometry = _weight_side(x, d, "d", kernel_size, stride, padding, dilation, groups, transposed, output_padding)
    return _dispatch(
        "hesscale_weight_diag", pathway, simplify, geometry, (x, d),
        network=lambda: hesscale.weight_diag(x, d, geometry, per_sample),
        native=_native(
            "hesscale_weight_diag", geometry, lambda: _native_module.hesscale_weight_diag(x, d, geometry, per_sample)
        ),
        fused=_fused(
            "hesscale_weight_diag", x, geometry,
            lambda: _kernels().hesscale_weight_diag(x, d, geometry, per_sample=per_sample,
                                                     precision=_kernel_precision()),
            per_sample=per_sample,
            d=d,
        ),
        options=(per_sample,),
    )


def hesscale_input_diag(
    weight: Tensor,
    d: Tensor,
    input_size,
    *,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    transposed: bool = False,
    output_padding=0,
    simplify: bool = True,
    pathway: str = "auto",
) -> Tensor:
    """HesScale/BL89 input Hessian diagonal ``diag(J_xᵀ diag(d) J_x)``: ``[N, C_in, *I]``.

    Args:
        weight: ``[C_out, C_in // G, *K]`` (``[C_in, C_out // G, *K]`` if ``transposed``).
        d: ``[N, C_out, *O]``, shaped like the layer output.
        input_size: the layer input's spatial size ``(*I)`` or full shape ``(N, C_in, *I)``.
    """
    check_tensor(d, "d", min_dim=3)
    num_dims = d.dim() - 2
    c_in, c_out = _weight_geometry(weight, num_dims, groups, transposed)
    check_same_device_dtype(d=d, weight=weight)
    size = spatial_size_argument(input_size, num_dims, "input_size")
    geometry = _layer_geometry(
        (d.shape[0], c_in, *size), c_out, weight.shape[2:], stride, padding, dilation, groups, transposed, output_padding
    )
    _check_output_like(d, "d", geometry, d.shape[0])
    propagate = _native_module.to_output_side if transposed else _native_module.to_input_side
    return _dispatch(
        "hesscale_input_diag", pathway, simplify, geometry, (d, weight),
        network=lambda: hesscale.input_diag(weight, d, geometry),
        native=_native("input_vjp", geometry, lambda: propagate(d, weight.square(), geometry)),
    )
