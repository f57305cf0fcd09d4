"""Fused Triton kernels for the memory-bound convolution operations, with the tensor network as fallback.

Four operations, each with exactly the semantics, shapes and normalisation of the
:mod:`curvlib.functional` function of the same name, but taking the layer's
:class:`~curvlib.hyperparams.ConvGeometry` instead of hyper-parameters:

============================  ==================================================================
``kfc(x, geometry)``           KFAC-expand input factor ``[G, D, D]``, ``1/N Σ_{n,o} u uᵀ``
``kfac_reduce(x, geometry)``   KFAC-reduce input factor ``[G, D, D]``, ``1/N Σ_n ū ūᵀ``
``ggn_diag(x, s, geometry)``   GGN diagonal of the weight ``[[N,] C_out, C_in/G, *K]``
``hesscale_weight_diag``       HesScale weight diagonal ``[[N,] C_out, C_in/G, *K]``
============================  ==================================================================

The engine's column passes also use kernels of their own: :mod:`.input_vjp` (the data gradient of
strided convolutions, polyphase, chosen against cuDNN by measurement; with a zero padding's window and
a ReLU's mask in its epilogue where the convolution follows them), :mod:`.threshold_backward` (ReLU
masks of batched gradients) and :mod:`.unfold` (the GGN kernel's unfolded chunks).

None of them forms per-sample gradients or the whole unfolded input ``⟦X⟧``: patches are gathered from
``x`` tile by tile (implicit GEMM) and reduced in registers. The GGN diagonal also has a kernel that
unfolds sample chunks of at most 64 MiB and runs dense products on them (faster on large layers,
:mod:`.ggn_unfolded`); the autotuner picks per shape. 1-d, 2-d and 3-d convolutions, groups
(depthwise included), stride, dilation and (asymmetric) zero padding are supported; transposed
convolutions, more than three spatial dimensions, float64 and tensors with ``≥ 2³¹`` elements
(``x``; ``s`` may be larger) are not. A call that :func:`supports` rejects (also: on the CPU, or
without Triton) returns the tensor network of ``curvlib.functional`` with ``pathway="tn"``
(the same network builders), so every function works everywhere.

Precision (``precision=``): the products are accumulated in float32 in every mode. Tolerances are
relative Frobenius errors against a float32 (TF32 off) PyTorch reference, as measured on the H100 on
Table E3 layers (``benchmarks/results/h100-kernels``) and asserted against float64 in the GPU tests:

- ``"ieee"`` (default): float32 operands multiplied exactly (FMA): ``≤ 2e-5`` (measured ≤ 2.0e-5 for
  ``kfc``, where the tensor network differs from PyTorch as much; ≤ 1.3e-6 for the others). One stated
  exception: the averaging step of :func:`kfac_reduce` multiplies ``x`` by the exact 0/1 window
  indicator on the matrix units after splitting ``x`` into two TF32 parts (``x = hi + lo``); each
  term is off by at most ``2⁻²⁰·|x|`` (measured ≤ 4.2e-6).
- ``"tf32x3"``: three TF32 passes (Triton's ``input_precision="tf32x3"``), about float32 accuracy;
  slower than ``"ieee"`` in these gather-bound kernels (kept for completeness).
- ``"tf32"``: one TF32 pass: ``≤ 2e-3`` (measured ≤ 1.5e-3).
- ``"bf16"``: operands rounded to bfloat16: ``≤ 4e-2``.

float16/bfloat16 inputs always use the matrix units (their products are exact in float32); results
are returned in the input's dtype.

>>> import torch
>>> from curvlib.hyperparams import make_geometry
>>> from curvlib import kernels
>>> x = torch.randn(8, 4, 10, 10)
>>> geometry = make_geometry(4, 6, (10, 10), kernel_size=3, padding=1)
>>> kernels.kfc(x, geometry).shape                      # falls back to the TN on the CPU
torch.Size([1, 36, 36])
>>> kernels.supports("kfc", x, geometry)
False
"""

from __future__ import annotations

import importlib

import torch
from torch import Tensor

from ..contract import contract
from ..cuda_graphs import GraphCache
from ..expressions import ggn as _ggn_expr
from ..expressions import hesscale as _hesscale_expr
from ..expressions import kfac as _kfac_expr
from ..hyperparams import ConvGeometry, check_shape, check_tensor
from ..simplify import simplify as _simplify
from . import autotune
from ._geometry import KERNEL_DIMS, kernel_geometry
from ._triton import HAVE_TRITON, HAS_INPUT_PRECISION, INTERPRET

__all__ = [
    "OPS",
    "PRECISIONS",
    "available",
    "supports",
    "kfc",
    "kfac_reduce",
    "ggn_diag",
    "prepare_ggn_diag",
    "hesscale_weight_diag",
    "autotune",
]

#: operations with a fused kernel
OPS = ("kfc", "kfac_reduce", "ggn_diag", "hesscale_weight_diag")
#: values of ``precision=``; see the module docstring
PRECISIONS = ("ieee", "tf32", "tf32x3", "bf16")
#: input dtypes the kernels take (others fall back)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: largest index the kernels' 32-bit address arithmetic handles
_MAX_INDEX = 2**31 - 1


def available() -> bool:
    """Triton is importable (kernels can run on CUDA tensors, or on CPU tensors if ``TRITON_INTERPRET=1``)."""
    return HAVE_TRITON


def _module(name: str):
    """A kernel module, imported on first use (it needs Triton)."""
    return importlib.import_module(f"{__name__}.{name}")


def _check_precision(precision) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "tf32x3" and HAVE_TRITON and not HAS_INPUT_PRECISION:
        raise ValueError("precision='tf32x3' needs Triton >= 3.0 (tl.dot input_precision), found an older Triton")
    return precision


def _device_ok(tensor: Tensor) -> bool:
    return tensor.device.type == "cuda" or (INTERPRET and tensor.device.type == "cpu")


def supports(op: str, x: Tensor, geometry: ConvGeometry, **options) -> bool:
    """Whether the fused kernel of ``op`` runs for these arguments (else the functions fall back).

    True when Triton is importable, ``x`` is a CUDA tensor (or a CPU tensor with ``TRITON_INTERPRET=1``)
    of dtype float32/float16/bfloat16 with fewer than 2³¹ elements, and ``geometry`` is a
    non-transposed convolution with 1 to 3 spatial dimensions matching ``x``. Recognised options:
    ``precision`` (must be one of :data:`PRECISIONS`), ``s``/``d`` (the output-side tensor: same
    device and dtype as ``x``), ``per_sample`` (a bool). Unknown options are ignored. Never raises.
    """
    try:
        if op not in OPS or not HAVE_TRITON:
            return False
        if not isinstance(x, Tensor) or not isinstance(geometry, ConvGeometry):
            return False
        if x.dtype not in DTYPES or not _device_ok(x) or x.numel() > _MAX_INDEX or x.numel() == 0:
            return False
        if geometry.transposed or not 1 <= geometry.num_dims <= KERNEL_DIMS:
            return False
        if x.dim() != geometry.num_dims + 2 or x.shape[1] != geometry.in_channels:
            return False
        if tuple(x.shape[2:]) != tuple(geometry.input_size):
            return False
        if options.get("precision", "ieee") not in PRECISIONS:
            return False
        if options.get("precision") == "tf32x3" and not HAS_INPUT_PRECISION:
            return False
        if not isinstance(options.get("per_sample", False), bool):
            return False
        for name in ("s", "d"):
            other = options.get(name)
            if other is not None and (
                not isinstance(other, Tensor) or other.device != x.device or other.dtype != x.dtype
            ):
                return False
        return True
    except Exception:  # supports() is a question, never an error
        return False


# ----------------------------------------------------------------------------------------------
# validation shared by the public functions


def _check_input(x, geometry) -> None:
    check_tensor(x, "x", min_dim=3)
    if not isinstance(geometry, ConvGeometry):
        raise TypeError(f"geometry must be a curvlib.hyperparams.ConvGeometry, got {type(geometry).__name__}")
    channels, size = geometry.layer_input_channels, geometry.layer_input_size
    check_shape(x, "x", (x.shape[0], channels, *size), "[N, C_in, *I] of the geometry's layer input")


def _check_output_side(other, name: str, x: Tensor, geometry: ConvGeometry, columns: bool) -> None:
    lead = 1 if columns else 0
    check_tensor(other, name, dim=x.dim() + lead)
    if other.device != x.device:
        raise ValueError(f"{name} is on {other.device} but x is on {x.device}; move them to one device")
    if other.dtype != x.dtype:
        raise TypeError(f"{name} has dtype {other.dtype} but x has dtype {x.dtype}; use one dtype")
    leading = tuple(other.shape[:lead])
    expected = (*leading, x.shape[0], geometry.layer_output_channels, *geometry.layer_output_size)
    what = ("[C, N, C_out, *O]" if columns else "[N, C_out, *O]") + " of the layer output"
    check_shape(other, name, expected, what)


def _check_per_sample(per_sample) -> bool:
    if not isinstance(per_sample, bool):
        raise TypeError(f"per_sample must be a bool, got {per_sample!r}")
    return per_sample


#: single-input calls validated before: ``(op, geometry, shape, dtype, device, precision)`` → the kernel
#: geometry, or ``None`` where the kernel falls back. Repeated calls skip the checks: on small layers they
#: cost as much host time as the replayed kernels take on the device.
_VALIDATED: dict = {}
_MAX_VALIDATED = 4096


def _validated_input_call(op: str, x, geometry, precision):
    """Check a call of a single-input kernel (once per configuration): its kernel geometry, or ``None``
    if the kernel does not take it (fall back). Raises on bad arguments, every time."""
    key = None
    if isinstance(x, Tensor) and isinstance(geometry, ConvGeometry) and isinstance(precision, str):
        key = (op, geometry, x.shape, x.dtype, x.device, precision)
        if key in _VALIDATED:
            return _VALIDATED[key]
    precision = _check_precision(precision)
    _check_input(x, geometry)
    shape = kernel_geometry(geometry) if supports(op, x, geometry, precision=precision) else None
    if key is not None:
        if len(_VALIDATED) >= _MAX_VALIDATED:
            _VALIDATED.clear()
        _VALIDATED[key] = shape
    return shape


def _tn(network) -> Tensor:
    """The fallback: the same network ``curvlib.functional`` contracts with ``pathway="tn"``."""
    return contract(_simplify(network))


# ----------------------------------------------------------------------------------------------
# public functions

#: the single-input factors replay captured CUDA graphs on repeated calls: each call's host work (checks,
#: buffers, two launches: 100-180 µs measured on an H100) exceeds its kernels' time on small layers
#: (:mod:`curvlib.cuda_graphs`)
_GRAPHS = GraphCache("kernels")


def kfc(x: Tensor, geometry: ConvGeometry, *, precision: str = "ieee") -> Tensor:
    """KFC / KFAC-expand input factor ``Ω_g = 1/N Σ_n ⟦X_{n,g}⟧ᵀ⟦X_{n,g}⟧`` (sum over output locations).

    Args:
        x: layer input ``[N, C_in, *I]``.
        geometry: the layer's :class:`~curvlib.hyperparams.ConvGeometry`.
        precision: see the module docstring.

    Returns:
        ``[G, D, D]``, ``D = C_in/G · ∏K``, rows ordered like ``weight.flatten(1)``; ``x.dtype``.
        Like :func:`curvlib.functional.kfc`.
    """
    shape = _validated_input_call("kfc", x, geometry, precision)
    if shape is None:
        return _tn(_kfac_expr.kfc(x, geometry))
    return _GRAPHS(("kfc", shape, precision),
                   lambda t: _module("gram").kfc_factor(t, shape, precision, 1.0 / t.shape[0]), x)


def kfac_reduce(x: Tensor, geometry: ConvGeometry, *, precision: str = "ieee") -> Tensor:
    """KFAC-reduce input factor ``Ω̂_g = 1/N Σ_n ū_{n,g} ū_{n,g}ᵀ``, ``ū`` the unfolded input averaged
    over output locations (one pass over ``x``, then the small Gram of ``ū``).

    Args:
        x: layer input ``[N, C_in, *I]``.
        geometry: the layer's :class:`~curvlib.hyperparams.ConvGeometry`.

    Returns:
        ``[G, D, D]`` in ``x.dtype``, like :func:`curvlib.functional.kfac_reduce`.
    """
    shape = _validated_input_call("kfac_reduce", x, geometry, precision)
    if shape is None:
        return _tn(_kfac_expr.kfac_reduce(x, geometry))
    return _GRAPHS(("kfac_reduce", shape, precision),
                   lambda t: _module("patch_mean").kfac_reduce_factor(t, shape, precision), x)


def ggn_diag(x: Tensor, s: Tensor, geometry: ConvGeometry, *, per_sample: bool = False,
             precision: str = "ieee", bias: bool = False, dtype: torch.dtype = None):
    """Diagonal of the weight's GGN ``Σ_{c,n} J_{c,n}²`` with ``J_{c,n}`` the weight VJP of column ``c``
    of ``s`` for sample ``n`` — computed per tile in registers, never written out.

    Args:
        x: layer input ``[N, C_in, *I]``.
        s: backpropagated loss-Hessian square root ``[C, N, C_out, *O]``.
        geometry: the layer's :class:`~curvlib.hyperparams.ConvGeometry`.
        per_sample: keep the batch axis (``Σ_c`` only).
        bias: also the diagonal of the bias's GGN, ``Σ_{c,n} (Σ_o s[c, n, :, o])²``, from the same pass.
        dtype: the result's dtype (default ``x.dtype``); ``torch.float32`` keeps the kernels' float32
            sums of 16-bit operands unrounded.

    Returns:
        ``[C_out, C_in // G, *K]`` (``[N, …]`` if ``per_sample``) in ``dtype``, like
        :func:`curvlib.functional.ggn_diag`; with ``bias`` the pair ``(weight diagonal, bias diagonal
        [C_out] or [N, C_out])``. Extra memory: a float32 copy of the result and, when the
        unfolded-chunk kernel is faster for this shape, a sample chunk of the unfolded input (at most
        64 MiB or one sample's patches; a third of ``pathways.configure(memory_budget=...)`` if that is
        smaller): independent of ``C`` and ``N``.
    """
    return prepare_ggn_diag(x, s, geometry, per_sample=per_sample, precision=precision, bias=bias,
                            dtype=dtype)(x, s)


def prepare_ggn_diag(x: Tensor, s: Tensor, geometry: ConvGeometry, *, per_sample: bool = False,
                     precision: str = "ieee", bias: bool = False, dtype: torch.dtype = None):
    """:func:`ggn_diag` for repeated calls: ``run = prepare_ggn_diag(x, s, ...)`` validates the arguments,
    decides between the kernel and the fallback and chooses the kernel's tile (timing it on ``x`` and
    ``s`` the first time a shape is seen); ``run(x2, s2)`` then computes the diagonal of operands with
    the shapes, strides, dtypes and device of ``x`` and ``s`` without doing any of that again (the
    engine calls it for every chunk of columns; on small layers the checks cost more host time than the
    kernels take on the device). Operands of another kind need their own ``prepare_ggn_diag``.

    >>> from curvlib.hyperparams import make_geometry
    >>> geometry = make_geometry(3, 5, (8, 8), kernel_size=3, padding=1)
    >>> run = prepare_ggn_diag(torch.randn(2, 3, 8, 8), torch.randn(4, 2, 5, 8, 8), geometry)
    >>> run(torch.randn(2, 3, 8, 8), torch.randn(4, 2, 5, 8, 8)).shape
    torch.Size([5, 3, 3, 3])
    """
    precision = _check_precision(precision)
    per_sample = _check_per_sample(per_sample)
    if not isinstance(bias, bool):
        raise TypeError(f"bias must be a bool, got {type(bias).__name__}")
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype or None, got {type(dtype).__name__}")
    _check_input(x, geometry)
    _check_output_side(s, "s", x, geometry, columns=True)
    lead = (x.shape[0],) if per_sample else ()
    shape = (*lead, *geometry.weight_shape)

    def result(weight: Tensor, bias_diag: Tensor = None):
        weight = weight if dtype is None else weight.to(dtype)
        return weight if bias_diag is None else (weight, bias_diag if dtype is None else bias_diag.to(dtype))

    if not supports("ggn_diag", x, geometry, s=s, per_sample=per_sample, precision=precision):
        def fallback(x: Tensor, s: Tensor):
            network = _ggn_expr.ggn_blocks(x, s, geometry, geometry.weight_shape, per_sample=per_sample)
            weight = _tn(network).reshape(shape)
            if not bias:
                return result(weight)
            sums = s.flatten(3).sum(3)  # [C, N, C_out]
            return result(weight, sums.square().sum(0) if per_sample else sums.square().sum((0, 1)))
        return fallback
    inner = _module("weight_diag").prepare_ggn_diag(x, s, kernel_geometry(geometry), per_sample, precision,
                                                    bias=bias, dtype=dtype)
    out_channels = geometry.out_channels

    def fused(x: Tensor, s: Tensor):
        out = inner(x, s)
        if not bias:
            return out.reshape(shape)
        return out[..., :-1].reshape(shape), out[..., -1].reshape(*lead, out_channels)

    return fused


def hesscale_weight_diag(x: Tensor, d: Tensor, geometry: ConvGeometry, *, per_sample: bool = False,
                         precision: str = "ieee") -> Tensor:
    """HesScale/BL89 weight Hessian diagonal ``Σ_{n,o} d[n, co, o] · ⟦X⟧[n, g, (ci, k), o]²``.

    Args:
        x: layer input ``[N, C_in, *I]``.
        d: diagonal of the Hessian w.r.t. the layer output, ``[N, C_out, *O]``.
        geometry: the layer's :class:`~curvlib.hyperparams.ConvGeometry`.
        per_sample: keep the batch axis.

    Returns:
        ``[C_out, C_in // G, *K]`` (``[N, …]`` if ``per_sample``) in ``x.dtype``, like
        :func:`curvlib.functional.hesscale_weight_diag`.
    """
    precision = _check_precision(precision)
    per_sample = _check_per_sample(per_sample)
    _check_input(x, geometry)
    _check_output_side(d, "d", x, geometry, columns=False)
    shape = (*((x.shape[0],) if per_sample else ()), *geometry.weight_shape)
    if not supports("hesscale_weight_diag", x, geometry, d=d, per_sample=per_sample, precision=precision):
        return _tn(_hesscale_expr.weight_diag(x, d, geometry, per_sample)).reshape(shape)
    result = _module("weight_diag").hesscale_weight_diag(x, d, kernel_geometry(geometry), per_sample, precision)
    return result.reshape(shape)
