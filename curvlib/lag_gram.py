"""KFAC's expand input factor (KFC) of a stride-1 convolution from lag products, without unfolding.

:func:`kfc_by_lags` returns what :func:`curvlib.native.kfc` returns: per group ``g`` the ``[G, D, D]``
Gram ``1/N Σ_n Σ_o u[n,g,:,o] u[n,g,:,o]ᵀ`` of the unfolded input ``u = unfold_input(x)`` ``[N, G, D, O]``
(``D = C_in/G · ∏K`` ordered like ``weight.flatten(1)``: channel major, then kernel offsets in C order;
``O = ∏ output_size``), same dtype, same ``1/N`` normalisation. It never forms ``u``.

The math
--------
Let ``x_pad`` be the zero-padded input (``P = I + P_l + P_r`` per dim) and ``B = dil·(K-1)`` the border
width, so ``O = P - B``. With stride 1, row ``(i, a)`` of ``u`` (channel ``i``, kernel offset ``a``) is
``x_pad[i]`` on the box ``R_a = Π_dims [dil·a, dil·a + O)``, hence::

    Gram[(i,a),(j,b)] = Σ_n Σ_{q ∈ R_a} x_pad[n,i,q] · x_pad[n,j,q + dil·δ],     δ = b - a.

*Lags.* All entries of one lag ``δ`` sum the same products; only their boxes differ. The products over
the lag's full range (every ``q`` with both factors inside ``x_pad``),
``L[i,j,δ] = Σ_n Σ_q x[n,i,q]·x[n,j,q+dil·δ]``, for all ``(2K-1)^d`` lags at once are ONE weight gradient
of a convolution with kernel ``2K-1``, dilation ``dil``, stride 1, padding ``dil·(K-1)`` and ``groups=G``:
``grad_output = x`` (rows ``i``) and ``input = x`` (columns ``j``), ``[C_in, C_in/G, *(2K-1)]``, tap
``k = δ + K - 1``. The padding of the layer does not enter: its zeros add no products, so ``x`` itself
(size ``I``, not ``P``) is the operand. Or they are matrix products of slices of ``x`` (*Lag methods*,
below).

*Borders, by inclusion–exclusion.* Per dim, on the lag's full range, the indicator of ``R_a`` is
``1 - low_{a,b} - high_{a,b}`` with ``low = [0, dil·a)`` and ``high = [dil·a + O, P)`` (in ``x_pad``
coordinates; their partners ``q + dil·δ`` lie in ``[0, dil·b)`` / ``[dil·b + O, P)``). The product over the
dims expands into ``3^d`` terms ``Σ_T (-1)^{|T|} Σ_{sides}``: the dims in ``T`` restricted to a border
(low or high), the others summed over the full range. A border term only involves the first ``B`` / last
``B`` positions of ``x_pad`` along the dims in ``T`` (the low/high *slabs*, cut further to the real input
in them: 'same' padding halves them, a side that is all padding drops out; width ``w ≤ B``). For each
non-empty ``T`` (``2^d - 1`` of them) ONE batched product gives all its products: slab positions and the
channels are the rows/columns, the side combinations and groups the batch, and the other dims stay
lags over their full range — by unfolding the thin slab along at most one other dim, or, when two
other dims remain, as the lag products of the slabs (slab positions folded into the channels, side
combinations into the groups: a grouped convolution weight gradient or the GEMM form, *Lag methods*).
This yields, per slab position pair ``(q, q')`` of each dim in ``T``, the products over the full range
of the other dims.

``low`` and ``high`` never overlap (``R_a`` lies between them), also when the output is smaller than
the border (``O < B``, where the two slabs of ``x_pad`` overlap): each side is computed from its own copy
of its slab, so no special case (and no fallback) is needed there.

*Assembly.* Every term is linear in the products it holds, and per dim the map to the kernel-offset
pair ``(a, b)`` is fixed by the geometry: on a full-range dim it gathers lag ``b - a`` (a one-hot
matrix, or ``index_select`` where the dim has no border), on a border dim it sums the slab pairs
``(q, q' = q + dil·(b - a))`` of the side's border set (entries ``-1``, the inclusion–exclusion sign).
These ``[K², 2K-1 + sides·w²]`` matrices and the lag index are built once per ``(I, K, dil, padding)``
(``functools.lru_cache``, by broadcasting, no loop over ``(a, b)``) and moved to the device once. The
terms are laid out ``[C/G (rows ii), X_0, ..., X_{d-1}, C/G (jj), G]`` and the dims are mapped one after
another, each by one product from the left (no transposition); the terms that differ only in the dim
being mapped are written next to each other along it, so their count halves at every dim. The last
product is permuted into ``[G, D, D]``. On CPUs this runs in chunks of rows ``ii`` so that only the
result is a large allocation (fresh large allocations cost page faults there); under a memory bound
(``chunk_bytes``, :func:`kfc_chunk_bytes`) on every device, with the border slabs in chunks of samples.

Lag methods
-----------
``lag_method`` of :func:`kfc_by_lags` chooses how the lag products are computed (and, in 3-d, the
border terms that keep two lag dims: those are lag products of the slabs):

- ``"conv"``: the convolution weight gradient above (ATen: oneDNN on CPUs, cuDNN on CUDA). The library
  picks its algorithm. cuDNN, for float32, may pick a Winograd algorithm for the ``2K-1`` lag kernel
  (seen for the 5x5 lags of 3x3 layers on an H100 and an H200, TF32 off): about 2e-4 relative error
  (Frobenius) instead of about 1e-6, and no cuDNN flag avoids it. It also follows
  ``torch.backends.cudnn.allow_tf32`` (on by default).
- ``"gemm"``: matrix products only (cuBLAS / the CPU BLAS: plain float32 FMAs unless the caller
  allowed TF32 in ``torch.backends.cuda.matmul``; nothing here sets a flag). Per group ``L[-δ] = L[δ]ᵀ``
  (swap ``i`` and ``j``), so only ``δ = 0`` and the lags whose first non-zero component is positive are
  computed, ``((2K-1)^d + 1)/2``, and the others filled by transposition. All of them come from ONE
  zero-padded channel-major copy of ``x`` (``[C, (n, *q)]``, each dim padded by its largest shift), in
  which lag ``δ`` is a column offset: the padding turns the sum over the lag's overlap region into a
  sum over all columns, so each lag is one contiguous matrix product of two strided views of the copy
  (no slices copied), batched over slices of the reduction (cuBLAS then splits it over the GPU, and the
  float32 accumulation chains stay short: a BLAS may accumulate a long reduction in one sequence,
  measured on CPUs, MKL, ≤ 8 columns: 3e-6 at 32k rows, 2.6e-5 at 524k). The price is the products of
  the padding zeros (``∏(I + dil·(K-1))`` positions per lag: 1.13x for 3x3 kernels on 32x32 inputs).
  Depthwise (``C/G = 1``) the products are dot products (an elementwise product and a sum). On CPUs
  the samples go in chunks of ``_CPU_CHUNK_BYTES`` (small copies).
- ``"triton"``: the GEMM form's half of the lags in ONE launch (:mod:`curvlib.kernels.lag_products`,
  CUDA, float32): a lag's two operands are ``x`` at ``q`` and at ``q + dil·δ``, a constant address
  offset apart, so every program loads its tiles straight from ``x`` (no slices, no copies) while
  walking the lag's overlap region; the programs of all lags for one stretch of positions run
  together and share it through L2. Exact float32 FMAs by default (``precision=``).
- ``"auto"`` (default): for float32 on CUDA (with Triton), ``"triton"`` or ``"gemm"``, whichever ran
  faster on the first call for the input's shape (neither wins everywhere; without autotuning
  ``"triton"`` for groups of at most 64 channels — depthwise, the 3-channel first layer, 64-channel
  layers — and ``"gemm"`` for wider ones, :data:`TRITON_MAX_CHANNELS`); ``"gemm"`` for float32
  elsewhere (on every device: neither cuDNN's nor oneDNN's float32 convolution is accurate enough, see
  below), ``"conv"`` for float64 and the half-precision types (:func:`resolve_lag_method`).

Measured (float32 against float64; relative errors ``‖·‖_F`` and ``max|·|/max|ref|`` of the ``[G, D, D]``
result): cuDNN (``"conv"``, CUDA, H100/H200): ~2e-4 (Frobenius). CPU (oneDNN ``"conv"``, torch 2.13,
2 threads): 5e-7 to 1.1e-5 (max) at batch 32 on the layers of ``benchmarks/lag_kfc.py``, growing with
``N·I'``: 4.7e-5 (Frobenius) for ResNet-18's 64@56 at batch 128. ``"gemm"`` on the same CPU: 4e-8 to
6e-7 everywhere (at batch 128 too), like the unfolded Gram. The GEMM form on CUDA is not measured here:
``tests/test_lag_gram.py::test_cuda_float32_gemm`` asserts < 2e-5 (Frobenius). Time on that CPU
(whole :func:`kfc_by_lags`, batch 32): ``"gemm"`` 0.74-1.9x the time of ``"conv"`` (0.74-1.08x on
ConvNeXt's depthwise 7x7, 1.0-1.5x on the 3x3 layers, 1.9x on the 3-channel first one: 1.3 ms) — in an
earlier form that copied two slices per lag; the flat layout takes 0.5-1.16x its time there.

On CUDA, repeated calls with one input shape replay a captured CUDA graph of the whole computation
(:mod:`curvlib.cuda_graphs`): its 30-70 small kernels cost 1-2.6 ms of host time per eager call,
more than their device time on many layers (measured on an H200).

Cost (multiply-adds), per layer with ``C = C_in``, ``I' = ∏ I``::

    lags "conv"  C·C/G · (2K-1)^d · N · I'
    lags "gemm"  C·C/G · N · ((∏_t (2K_t-1) + 1)/2) · ∏_t (I_t + dil_t·(K_t-1))   (half the lags, padded box)
    lags "triton" C·C/G · N · (∏_t S_t + I') / 2,   S_t = Σ_{|δ|<K_t} max(0, I_t - dil_t·|δ|)  (overlaps only)
    border T     sides_T·C·C/G · w^{2|T|} · (2K-1)^{d-|T|} · N · ∏_{t∉T} I_t     (w ≤ B: slab width;
                 two dims not in T (3-d): their lag products by the lag method, counted as above)
    unfold       (C/G · K^d)² · G · N · O

so the lag form pays when ``(2K-1)^d · I' ≪ K^{2d} · O`` — for 3×3 kernels ``25 I'`` against ``81 O``
(≈ 3x fewer), 7×7: ``169`` against ``2401`` (≈ 14x) — and the borders are thin, ``w ≪ I``. It does not pay
for tiny inputs (``I ≈ K``), where the border terms are as large as the lag term. :func:`lag_flops`
gives the count.

Stride 1 only (:func:`supports_lags`): with stride ``S`` the boxes are strided lattices
``dil·a + S·o``; two offsets with the same lag then read the products on different residue classes
modulo ``S``, so the lag products would have to be split into ``S^d`` phases (and the kernel offsets
``a`` by ``a mod S``), which is a different algorithm.

Example
-------
>>> import torch
>>> from curvlib.hyperparams import make_geometry
>>> from curvlib.native import kfc
>>> geometry = make_geometry(4, 8, (9, 7), kernel_size=3, padding=1)
>>> x = torch.randn(2, 4, 9, 7, dtype=torch.float64)
>>> torch.allclose(kfc_by_lags(x, geometry), kfc(x, geometry))
True
>>> torch.allclose(kfc_by_lags(x, geometry, lag_method="gemm"), kfc(x, geometry))
True
>>> lag_flops(geometry, 2) < (4 * 9) ** 2 * 2 * 63
True
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .cuda_graphs import GraphCache
from .hyperparams import ConvGeometry
from .kernels.autotune import ConfigCache

__all__ = ["kfc_by_lags", "supports_lags", "lag_flops", "unfold_flops", "resolve_lag_method", "triton_usable",
           "kfc_extra_bytes", "kfc_chunk_bytes", "LAG_METHODS", "TRITON_PRECISIONS"]

_CONVOLUTION_BACKWARD = torch.ops.aten.convolution_backward.default  # the overload: no packet dispatch


def supports_lags(geometry: ConvGeometry) -> bool:
    """Whether :func:`kfc_by_lags` handles ``geometry``: an ordinary (not transposed) convolution, stride 1
    in every dim, at most 3 spatial dims (ATen's convolutions stop at 3-d).

    Stride > 1 is excluded because the unfolded rows then sample strided lattices ``dil·a + S·o``: entries
    with the same lag no longer sum the same products (they read different residues modulo ``S``), so one
    set of lag products does not serve all kernel-offset pairs.
    """
    return (not geometry.transposed) and geometry.num_dims <= 3 and all(s == 1 for s in geometry.stride)


# ----------------------------------------------------------------------------------------------
# per-dimension plan (built once per (I, K, dil, padding), cached)


class _DimPlan(NamedTuple):
    """What one spatial dim contributes: sizes, the slabs of its borders and its maps to ``(a, b)``."""

    size: int  # I, input length
    kernel: int  # K
    dilation: int
    left: int  # zero padding on the left
    lags: int  # 2K - 1
    width: int  # w: slab width (0: no border term in this dim, e.g. K = 1)
    starts: Tuple[int, ...]  # per side in use (low and/or high) the slab's first position in x_pad
    lag_index: Tensor  # [K·K] long: (a, b) ↦ lag tap b - a + K - 1
    map_t: Optional[Tensor]  # [K·K, 2K-1 + sides·w·w] float64: [one-hot gather of lag b - a | border sums]

    @property
    def border_size(self) -> int:
        """``X`` of a border term in this dim: ``(side, q, q')``."""
        return len(self.starts) * self.width ** 2


@functools.lru_cache(maxsize=1024)
def _dim_plan(size: int, kernel: int, dilation: int, left: int, right: int) -> _DimPlan:
    """Slabs and maps of one dim, from ints only (dtype and device agnostic, see :func:`_plan_tensors`)."""
    padded = size + left + right
    border = dilation * (kernel - 1)
    output = padded - border
    a = torch.arange(kernel).view(kernel, 1)
    b = torch.arange(kernel).view(1, kernel)
    lag_index = (b - a + kernel - 1).reshape(-1)

    # Slabs: the real input (padding zeros add no products) among the first B positions of x_pad (low
    # side, [P_l, min(B, P_l + I))) and among the last B ([max(O, P_l), P_l + I)); each side's border set
    # of every (a, b), both factors included, lies in its range. Both get the larger width w (zeros
    # beyond the input), so that they stack. 'same' padding halves the slabs; a side without real input
    # (padding ≥ B) drops out.
    sides = []  # (is_low, start, length)
    if border > 0:
        if left < border:
            sides.append((True, left, min(border, left + size) - left))
        first = max(output, left)
        if first < left + size:
            sides.append((False, first, left + size - first))
    if not sides:
        return _DimPlan(size, kernel, dilation, left, 2 * kernel - 1, 0, (), lag_index, None)
    width = max(length for _, _, length in sides)
    starts = tuple(start for _, start, _ in sides)

    # border[(s, q, q'), (a, b)] = -1 (the inclusion–exclusion sign) where (p, p') = (start_s + q,
    # start_s + q') is a product of side s's border set for the offsets (a, b): p' - p = dil·(b - a) and
    # p < dil·a (low) or p ≥ dil·a + O (high). Built by broadcasting: no loop over (a, b).
    start = torch.tensor(starts).view(-1, 1, 1, 1, 1)
    is_low = torch.tensor([s[0] for s in sides]).view(-1, 1, 1, 1, 1)
    q = torch.arange(width).view(1, -1, 1, 1, 1)
    q2 = torch.arange(width).view(1, 1, -1, 1, 1)
    a5, b5 = a.view(1, 1, 1, kernel, 1), b.view(1, 1, 1, 1, kernel)
    position = start + q
    on_lag = (q2 - q) == dilation * (b5 - a5)
    in_border = torch.where(is_low, position < dilation * a5, position >= dilation * a5 + output)
    border_map = -(on_lag & in_border).to(torch.float64).reshape(len(sides) * width * width, kernel * kernel)
    full_map = torch.nn.functional.one_hot(lag_index, 2 * kernel - 1).to(torch.float64).t()
    map_t = torch.cat([full_map, border_map]).t().contiguous()
    return _DimPlan(size, kernel, dilation, left, 2 * kernel - 1, width, starts, lag_index, map_t)


def _plan_key(geometry: ConvGeometry) -> Tuple[Tuple[int, ...], ...]:
    """The ints the plan depends on, per dim ``(I, K, dil, P_l, P_r)`` (not channels, dtype or device)."""
    return tuple((i, k, d, left, right) for i, k, d, (left, right) in zip(
        geometry.input_size, geometry.kernel_size, geometry.dilation, geometry.padding))


def _dim_plans(key) -> Tuple[_DimPlan, ...]:
    return tuple(_dim_plan(*args) for args in key)


def _subsets(plans) -> List[Tuple[int, ...]]:
    """The non-empty sets ``T`` of dims restricted to a border (dims without border never are)."""
    dims = [t for t, plan in enumerate(plans) if plan.width > 0]
    return [subset for m in range(1, len(dims) + 1) for subset in itertools.combinations(dims, m)]


@functools.lru_cache(maxsize=1024)
def _plan_tensors(key, dtype: torch.dtype, device: torch.device):
    """Per dim ``(lag_index, map_t)`` on ``device`` (``map_t`` in ``dtype``): moved once, not per call."""
    return tuple((plan.lag_index.to(device), None if plan.map_t is None else plan.map_t.to(device, dtype))
                 for plan in _dim_plans(key))


# ----------------------------------------------------------------------------------------------
# the products


#: bytes of the per-chunk temporaries on CPUs (the assembly's, the GEMM lag products' chunks of samples):
#: large fresh allocations cost page faults there (each first touch), small ones are recycled by the
#: allocator and stay in cache
_CPU_CHUNK_BYTES = 2**22


LAG_METHODS = ("auto", "conv", "gemm", "triton")

#: values of ``precision=`` (the Triton method's products; :mod:`curvlib.kernels`)
TRITON_PRECISIONS = ("ieee", "tf32", "tf32x3", "bf16")


def triton_usable(dtype: torch.dtype, device, numel: int = 0) -> bool:
    """Whether the ``"triton"`` lag method runs: Triton importable, float32, a CUDA device (or a CPU
    tensor under ``TRITON_INTERPRET=1``), fewer than 2³¹ elements (32-bit addresses)."""
    from . import kernels

    device = torch.device(device)
    on_device = device.type == "cuda" or (device.type == "cpu" and kernels._triton.INTERPRET)
    return kernels.available() and dtype == torch.float32 and on_device and numel < 2**31


#: groups of at most this many channels (``C/G``) take the Triton lag products on CUDA under ``"auto"``,
#: wider ones the GEMM form. Measured on an H200 (``benchmarks/diagnostics/lag_products_configs.py``,
#: whole ``kfc_by_lags``): Triton 1.3 ms against 1.8 ms at 64 channels (56x56, batch 32), a tie at 512
#: (7x7), 2x slower at 96 and 192 (its float32 FMA tiles reach ~10 TFLOP/s where cuBLAS's products of
#: wide groups reach ~20); narrow groups (depthwise, 3 channels) are dot products or tiny matrices,
#: which the GEMM form pads to whole BLAS tiles
TRITON_MAX_CHANNELS = 64


def resolve_lag_method(lag_method: str, dtype: torch.dtype, device, numel: int = 0,
                       channels_per_group: int = TRITON_MAX_CHANNELS + 1) -> str:
    """The lag method :func:`kfc_by_lags` runs for an input of ``dtype`` (``numel`` elements,
    ``channels_per_group = C/G``) on ``device``: ``"conv"``, ``"gemm"`` or ``"triton"``. ``"auto"`` is, for
    float32 on CUDA, ``"triton"`` for groups of at most :data:`TRITON_MAX_CHANNELS` channels (when Triton
    runs: :func:`triton_usable`) and ``"gemm"`` for wider ones;
    ``"gemm"`` for float32 on other devices (cuDNN may pick a Winograd algorithm for the lag weight
    gradient, about 2e-4 relative error; oneDNN's float32 error grows with the input, 4.7e-5 measured:
    module docstring, *Lag methods*); ``"conv"`` for the other dtypes (float64 is exact to rounding).
    Raises ``ValueError`` naming the allowed values for any other value, and for ``"triton"`` where it
    cannot run."""
    if lag_method not in LAG_METHODS:
        raise ValueError(f"lag_method must be one of {', '.join(map(repr, LAG_METHODS))}, got {lag_method!r}")
    if lag_method == "triton" and not triton_usable(dtype, device, numel):
        raise ValueError(
            "lag_method='triton' needs Triton, a float32 input on a CUDA device (or TRITON_INTERPRET=1) and "
            f"fewer than 2**31 elements, got {dtype} on {device} with {numel} elements; use 'gemm' or 'conv'"
        )
    if lag_method != "auto":
        return lag_method
    if (torch.device(device).type == "cuda" and channels_per_group <= TRITON_MAX_CHANNELS
            and triton_usable(dtype, device, numel)):
        return "triton"
    return "gemm" if dtype == torch.float32 else "conv"


_LAG_METHOD_CHOICE = ConfigCache("lag_method")


def _measured_lag_method(x: Tensor, kernels: Sequence[int], dilations: Sequence[int], groups: int, precision: str,
                         first: str, chunk_bytes: Optional[float] = None) -> str:
    """``"triton"`` or ``"gemm"`` for the lag products of this input shape on CUDA, whichever ran faster
    (timed once per shape on the first call, then cached; :class:`curvlib.kernels.autotune.ConfigCache`,
    off with ``CURVLIB_KERNEL_AUTOTUNE=0``, when ``first`` — the static choice — is taken). Neither
    wins everywhere: on an H100, at batch 32, Triton is 1.4-1.6x faster on ResNet-18's 3x3 layers of 64
    to 512 channels; at batch 128, cuBLAS is 1.8-2x faster on All-CNN-C's 96 and 192 channels (its
    products of long reductions reach ~15 TFLOP/s, Triton's float32 FMA tiles ~10)."""
    key = (tuple(x.shape), tuple(kernels), tuple(dilations), groups, precision, str(x.device), chunk_bytes)
    candidates = [first] + [m for m in ("triton", "gemm") if m != first]
    return _LAG_METHOD_CHOICE.choose(
        key, candidates, lambda m: _lag_products(x, kernels, dilations, groups, m, precision, chunk_bytes), x.device)


def _lag_products(x: Tensor, kernels: Sequence[int], dilations: Sequence[int], groups: int, method: str,
                  precision: str = "ieee", chunk_bytes: Optional[float] = None) -> Tensor:
    """``L[i, j, δ] = Σ_n Σ_q x[n,i,q]·x[n,j,q + dil·δ]`` ``[C, C/G, *(2K-1)]`` (``j`` within the group of
    ``i``, tap ``δ + K - 1``) over the full range of every lag, by ``method`` (``"conv"``, ``"gemm"`` or
    ``"triton"``, which alone reads ``precision``; ``"gemm"`` alone reads ``chunk_bytes``, the bound of its copy).

    ``x`` ``[N, C, *I]``: the layer's input for the lag term, a border term's slabs (:func:`_border_products`)
    otherwise. The functions are looked up here, at call time (the tests replace them to see which runs)."""
    if method == "gemm":
        return _lag_products_gemm(x, kernels, dilations, groups, chunk_bytes)
    if method == "triton":
        return _lag_products_triton(x, kernels, dilations, groups, precision)
    return _lag_products_conv(x, kernels, dilations, groups)


def _lag_products_conv(x: Tensor, kernels: Sequence[int], dilations: Sequence[int], groups: int) -> Tensor:
    """:func:`_lag_products` by one convolution weight gradient (kernel ``2K-1``).

    ``grad_output = x`` gives the rows ``i`` (output channels of the weight), ``input = x`` padded by
    ``dil·(K-1)`` the columns ``j``: ``dW[i, j, k] = Σ_{n,o} x[n,i,o]·x_ext[n,j,o + dil·k]``, lag
    ``δ = k - (K-1)``. The layer's padding is left out: its zeros add no products. Exact to rounding in
    float64; in float32, cuDNN may run a Winograd algorithm (~2e-4) and oneDNN's error grows with
    ``N·I'`` (module docstring, *Lag methods*)."""
    c, size = x.shape[1], x.shape[2:]
    d = len(kernels)
    lags = [2 * k - 1 for k in kernels]
    if (x.device.type == "cpu" and groups == c > 1 and d in (2, 3) and math.prod(size) >= math.prod(lags)):
        # depthwise on CPUs: oneDNN's weight gradient with these large kernels is 2-6x faster channels-last
        # once the input is larger than the kernel (measured; on 7x7 inputs with 13x13 lags it is slower)
        x = x.contiguous(memory_format=torch.channels_last if d == 2 else torch.channels_last_3d)
    dummy = x.new_empty(1).expand(c, c // groups, *lags)  # only its shape is read
    return _CONVOLUTION_BACKWARD(
        x, x, dummy, None, [1] * d, [dl * (k - 1) for k, dl in zip(kernels, dilations)], list(dilations),
        False, [0] * d, groups, [False, True, False],
    )[1]


#: positions per slice of the GEMM form's reduction, candidates (best guess first): a lag's product is
#: the sum of batched ``[C/G, m] @ [m, C/G]`` products over slices of ``m`` positions. The slices are
#: the GPU's parallelism (the output, ``(C/G)²``, is small against the reduction) and bound the float32
#: accumulation chain: a BLAS may accumulate a reduction in one sequence, with an error that grows with
#: its length (measured on CPUs, MKL, float32, ≤ 8 columns: 3e-6 at 32k rows, 2.6e-5 at 524k, against
#: 1e-6 at 4k). On CUDA the fastest is taken per shape (timed once, :class:`ConfigCache`; measured on an
#: H100: 512-1200 positions on All-CNN-C's and ResNet-18's 3x3 layers); elsewhere the first.
_SLICE_CANDIDATES = {"cuda": (1024, 512, 2048), "cpu": (4096,)}

_SLICE_CHOICE = ConfigCache("lag_gemm_slice")


def _slice_candidates(device: torch.device, channels_per_group: int) -> Tuple[int, ...]:
    """:data:`_SLICE_CANDIDATES` of the device type, none shorter than the channels (the partial products,
    ``(C/G)²`` per slice, would outgrow the operands, ``C/G`` per position)."""
    candidates = _SLICE_CANDIDATES["cuda" if device.type == "cuda" else "cpu"]
    return tuple(dict.fromkeys(max(m, channels_per_group) for m in candidates))


@functools.lru_cache(maxsize=1024)
def _gemm_plan(size: Tuple[int, ...], kernels: Tuple[int, ...], dilations: Tuple[int, ...]) -> Tuple[Tuple[int, ...], ...]:
    """Half the lags ``δ``: ``δ = 0`` (first) and those whose first non-zero component is positive (``L[-δ]``
    is ``L[δ]`` transposed per group), without the lags whose regions do not overlap (``dil·|δ_t| ≥ I_t``:
    zero)."""
    d = len(kernels)
    order = [(0,) * d]
    for delta in itertools.product(*(range(-(k - 1), k) for k in kernels)):
        if delta > (0,) * d and all(dl * abs(dt) < i for i, dl, dt in zip(size, dilations, delta)):
            order.append(delta)
    return tuple(order)


class _FlatLayout(NamedTuple):
    """A zero-padded channel-major copy of ``x`` in which every lag is one column offset (:func:`_flat_layout`)."""

    data: Tensor  # [C, total + max(offsets) + tail], zeros outside the copy of x
    offsets: Tuple[int, ...]  # per shift, its flat column offset (≥ 0)
    total: int  # columns holding the padded samples, N·∏(I + p)


def _flat_layout(x: Tensor, shifts: Sequence[Tuple[int, ...]], tail: int) -> _FlatLayout:
    """``x`` ``[N, C, *I]`` copied to ``data[c, (n, *q)]`` of the padded box ``I_t + p_t`` per dim, ``p_t`` the
    largest ``|s_t|`` of ``shifts``, zeros in the padding and in ``tail`` + ``max(offsets)`` columns after it.

    Then for a shift ``s`` whose first non-zero component is positive (so its flat offset
    ``o = Σ_t s_t·stride_t`` is positive), column ``q + o`` holds ``x[n, c, q + s]`` wherever ``q`` and
    ``q + s`` are inside the input, and a zero wherever ``q`` is and ``q + s`` is not: coordinates beyond
    the input land in the padding of their dim (``I_t + s_t < I_t + p_t``: no carry into the next dim),
    and the innermost negative one ``q_t + s_t ≥ -p_t`` borrows into the padding of the row before
    (``I_t + p_t + q_t + s_t ≥ I_t``). Hence ``Σ_{q < total} data[i, q]·data[j, q + o]`` is the lag product
    over the overlap region: one contiguous matrix product per lag, at a column offset, no slices."""
    n, c, *size = x.shape
    d = len(size)
    pads = [max(abs(s[t]) for s in shifts) for t in range(d)]
    padded = [i + p for i, p in zip(size, pads)]
    strides = [math.prod(padded[t + 1:]) for t in range(d)]
    offsets = tuple(sum(s * st for s, st in zip(shift, strides)) for shift in shifts)
    if min(offsets) < 0:
        raise ValueError(f"_flat_layout needs shifts whose first non-zero component is positive, got {shifts}")
    total = n * math.prod(padded)
    data = x.new_zeros(c, total + max(offsets) + tail)
    inside = data[:, :total].view(c, n, *padded)[(slice(None), slice(None), *(slice(0, i) for i in size))]
    inside.copy_(x.transpose(0, 1))
    return _FlatLayout(data, offsets, total)


def _flat_products(layout: _FlatLayout, groups: int, m: int, products: Tensor, accumulate: bool) -> None:
    """Per offset ``l`` and group, ``Σ_{q < total} data[i, q]·data[j, q + offsets[l]]`` (``i, j`` of the group)
    into ``products`` ``[lags, G, C/G, C/G]`` (added if ``accumulate``), in slices of ``m`` positions.

    Operands are strided views of ``data`` (no copies): one group, a ``[slices, C/G, m] @ [slices, m, C/G]``
    batched product per lag summed over the slices; several, a ``[G, C/G, m] @ [G, m, C/G]`` product per
    slice added in place (``baddbmm_``); depthwise (``C/G = 1``), the products are dot products: an
    elementwise product of the two ``[C, total]`` views and a sum. ``data`` needs ``m`` columns of tail
    (the last slice runs past ``total`` into zeros)."""
    data, offsets, total = layout
    c, length = data.shape
    ci = c // groups
    slices = -(-total // m)
    m = -(-total // slices)  # the same number of slices, evened out: the last one wastes fewer zeros
    base = data.storage_offset()
    for lag, offset in enumerate(offsets):
        target = products[lag]
        if ci == 1:
            dots = (data[:, :total] * data[:, offset:offset + total]).sum(1).view(groups, 1, 1)
            target.add_(dots) if accumulate else target.copy_(dots)
        elif groups == 1:
            a = data.as_strided((slices, ci, m), (m, length, 1), base)
            b = data.as_strided((slices, m, ci), (m, 1, length), base + offset)
            partial = torch.bmm(a, b).sum(0)
            target[0].add_(partial) if accumulate else target[0].copy_(partial)
        else:
            if not accumulate:
                target.zero_()
            for start in range(0, total, m):
                a = data.as_strided((groups, ci, m), (ci * length, length, 1), base + start)
                b = data.as_strided((groups, m, ci), (ci * length, 1, length), base + start + offset)
                target.baddbmm_(a, b)


def _lag_products_gemm(x: Tensor, kernels: Sequence[int], dilations: Sequence[int], groups: int,
                       chunk_bytes: Optional[float] = None) -> Tensor:
    """:func:`_lag_products` by matrix products only (exact float32 FMAs in cuBLAS unless the caller
    allowed TF32 in ``torch.backends.cuda.matmul``; this function sets no flag).

    Half the lags (:func:`_gemm_plan`); the others are their transposes. All of them from one zero-padded
    channel-major copy of ``x`` (:func:`_flat_layout`: lag ``δ`` is a column offset, the padding makes
    the product over all columns the product over the lag's overlap region) by batched products of
    strided views of it (:func:`_flat_products`, slices of the reduction: :data:`_SLICE_CANDIDATES`). On
    CPUs the samples go in chunks of ``_CPU_CHUNK_BYTES`` (small copies; their products are added), and
    everywhere in chunks whose copy takes at most ``chunk_bytes`` (at least one sample) when given.
    Temporaries: the copy (``x`` padded by the largest shift per dim) and the small partial products.
    The padding costs products of zeros: ``∏(I + dil·(K-1))`` positions per lag instead of its overlap
    (:func:`lag_flops`), 1.13x ``∏ I`` for 3x3 kernels on 32x32 inputs, 1.65x on 7x7; in exchange no
    slice is copied (the slice copies of an earlier form took longer than the products)."""
    n, c, *size = x.shape
    ci = c // groups
    order = _gemm_plan(tuple(size), tuple(kernels), tuple(dilations))
    shifts = [tuple(dl * dt for dl, dt in zip(dilations, delta)) for delta in order]
    products = x.new_empty(len(order), groups, ci, ci)
    candidates = _slice_candidates(x.device, ci)
    sample_bytes = math.prod(x.shape[1:]) * x.element_size()
    samples = n if x.device.type != "cpu" else max(1, _CPU_CHUNK_BYTES // max(1, sample_bytes))
    if chunk_bytes is not None:  # the copy of a sample: its box padded by the largest shift per dim
        padded = c * math.prod(i + max(abs(s[t]) for s in shifts) for t, i in enumerate(size)) * x.element_size()
        samples = int(max(1, min(samples, chunk_bytes // padded)))
    for n0 in range(0, n, samples):
        layout = _flat_layout(x[n0:n0 + samples], shifts, max(candidates))
        if x.is_cuda:
            key = (tuple(layout.data.shape), layout.total, groups, x.dtype, str(x.device))
            m = _SLICE_CHOICE.choose(key, candidates,
                                     lambda m: _flat_products(layout, groups, m, products, False), x.device)
        else:
            m = candidates[0]
        _flat_products(layout, groups, m, products, accumulate=n0 > 0)
    return _all_lags(products, kernels, order, c)


def _all_lags(products: Tensor, kernels: Sequence[int], order: Sequence[Tuple[int, ...]], channels: int) -> Tensor:
    """The full ``[C, C/G, *(2K-1)]`` from the computed half ``[lags, G, ci, ci]`` (lags ``order``, ``δ = 0``
    first): the computed lags at ``δ`` and, transposed, at ``-δ`` (all but ``δ = 0``); taps without overlap
    stay zero."""
    _, groups, ci, _ = products.shape
    taps, mirrored = _tap_index(tuple(kernels), tuple(order), products.device)
    result = products.new_zeros(groups, ci, ci, math.prod(2 * k - 1 for k in kernels))
    result.index_copy_(3, mirrored, products[1:].permute(1, 3, 2, 0))  # (j, i) of lag δ is (i, j) at -δ
    result.index_copy_(3, taps, products.permute(1, 2, 3, 0))
    return result.view(channels, ci, *(2 * k - 1 for k in kernels))


@functools.lru_cache(maxsize=1024)
def _tap_index(kernels: Tuple[int, ...], order: Tuple[Tuple[int, ...], ...], device: torch.device):
    """Flat taps of the lags ``order`` (``δ = 0`` first) and of their mirror images ``-δ`` (all but the
    first) in ``[*(2K-1)]``, on ``device``: moved once (a host-to-device copy per call would wait for the
    queued work on CUDA)."""
    d = len(kernels)
    strides = [math.prod(2 * k - 1 for k in kernels[t + 1:]) for t in range(d)]
    taps = [sum((dt + k - 1) * st for dt, k, st in zip(delta, kernels, strides)) for delta in order]
    mirrored = [2 * taps[0] - tap for tap in taps[1:]]  # tap(-δ) = 2·tap(0) - tap(δ)
    return tuple(torch.tensor(t, dtype=torch.long, device=device) for t in (taps, mirrored))


def _lag_products_triton(x: Tensor, kernels: Sequence[int], dilations: Sequence[int], groups: int,
                         precision: str) -> Tensor:
    """:func:`_lag_products` by one Triton launch (:mod:`curvlib.kernels.lag_products`): the half of the
    lags the GEMM form computes (:func:`_gemm_plan`), each over its overlap region, read straight from
    ``x`` (no copies), then mirrored like the GEMM form's. float32 accumulation; ``precision`` selects
    the products' mode (``"ieee"``: exact float32 FMAs)."""
    from .kernels.lag_products import lag_products  # needs Triton: imported only when this method runs

    order = _gemm_plan(tuple(x.shape[2:]), tuple(kernels), tuple(dilations))
    shifts = [tuple(dl * dt for dl, dt in zip(dilations, delta)) for delta in order]
    products = lag_products(x, shifts, groups, precision=precision)
    return _all_lags(products.to(x.dtype), kernels, order, x.shape[1])


def _window(t: Tensor, axis: int, plan: _DimPlan, start: int) -> Tensor:
    """``x_pad[start : start + w]`` along ``axis`` of an unpadded tensor (zeros outside the input)."""
    lo = start - plan.left
    hi = lo + plan.width
    first, end = max(lo, 0), min(hi, plan.size)
    piece = t.narrow(axis, first, end - first)
    if first == lo and end == hi:
        return piece
    pads = [0] * (2 * (t.dim() - axis))
    pads[-2], pads[-1] = first - lo, hi - end  # torch.nn.functional.pad lists the last dim first
    return torch.nn.functional.pad(piece, pads)


def _border_products(x: Tensor, plans, groups: int, subset: Tuple[int, ...], method: str,
                     precision: str = "ieee") -> Tensor:
    """Products of the border term ``T = subset``: ``[*sides_T, G, ci, *w_T, ci, *w_T, *(2K-1)_rest]``,
    rows ``(side..., c, q_T)`` and columns ``(c', q'_T)`` of the slabs, lags over the full range of the
    other dims.

    With at most one other dim this is one batched matrix product of the slab with its copy unfolded
    along that dim (``2K-1`` times a thin slab; several times faster than a grouped weight gradient of
    these shapes on CPUs); with two (3-d, one border dim) the unfolded copy would grow by ``(2K-1)²``, and
    they are the lag products of the slabs by ``method`` (:func:`_lag_products`: a grouped convolution
    weight gradient or the GEMM form; side combinations and groups as its groups).
    """
    n, c = x.shape[:2]
    d = len(plans)
    ci = c // groups
    m = len(subset)
    # slabs: [N, sides_T..., C, *spatial] with the dims of T cut to their slab windows
    z = x
    for k, t in enumerate(subset):
        axis = 2 + k + t  # after N, the k side axes so far, C
        z = torch.stack([_window(z, axis, plans[t], s) for s in plans[t].starts], dim=1 + k)
    sides = [len(plans[t].starts) for t in subset]
    widths = [plans[t].width for t in subset]
    rest = [t for t in range(d) if t not in subset]
    batches = math.prod(sides) * groups  # one product per (side combination, group)
    rows = ci * math.prod(widths)
    z = z.view(n, *sides, groups, ci, *z.shape[2 + m:])  # [N, sides..., G, ci, *spatial]
    side_axes = list(range(1, 1 + m))
    slab_axes = [3 + m + t for t in subset]
    rest_axes = [3 + m + t for t in rest]
    if len(rest) <= 1:
        left = z.permute(*side_axes, 1 + m, 2 + m, *slab_axes, 0, *rest_axes).reshape(batches, rows, -1)
        if rest:
            plan = plans[rest[0]]
            axis = rest_axes[0]
            pads = [0] * (2 * (z.dim() - axis))
            pads[-2] = pads[-1] = plan.dilation * (plan.kernel - 1)
            windows = torch.nn.functional.pad(z, pads).unfold(axis, plan.dilation * (plan.lags - 1) + 1, 1)
            windows = windows[..., :: plan.dilation]  # [..., I (at axis), ..., 2K-1]: lag δ at o + dil·δ
            right = windows.permute(*side_axes, 1 + m, 0, axis, 2 + m, *slab_axes, z.dim())
        else:
            right = z.permute(*side_axes, 1 + m, 0, 2 + m, *slab_axes)
        prod = torch.bmm(left, right.reshape(batches, left.shape[-1], -1))
    else:  # the lags of the two other dims, per (side combination, group): those are the groups
        z = z.permute(0, *side_axes, 1 + m, 2 + m, *slab_axes, *rest_axes)
        z = z.reshape(n, batches * rows, *(plans[t].size for t in rest))
        prod = _lag_products(z, [plans[t].kernel for t in rest], [plans[t].dilation for t in rest], batches, method,
                             precision)
    return prod.reshape(*sides, groups, ci, *widths, ci, *widths, *(plans[t].lags for t in rest))


@torch.no_grad()  # a curvature statistic; the assembly writes into buffers (out=), which autograd refuses
def kfc_by_lags(x: Tensor, geometry: ConvGeometry, lag_method: str = "auto", precision: str = "ieee",
                chunk_bytes: Optional[float] = None) -> Tensor:
    """``1/N Σ_{n,o} u uᵀ`` per group ``[G, D, D]`` (= :func:`curvlib.native.kfc`) from lag products plus
    border corrections (module docstring), without unfolding the input. Needs :func:`supports_lags`.

    ``x`` ``[N, C_in, *input_size]``, float32 or float64, any device. The result is not differentiable
    (computed under ``torch.no_grad``).

    ``lag_method`` chooses how the full-range lag products (and, in 3-d, the border terms that keep two
    lag dims) are computed:

    - ``"conv"``: one convolution weight gradient (ATen: oneDNN on CPUs, cuDNN on CUDA);
    - ``"gemm"``: half the lags (the others are transposes), each one matrix product of two strided views
      of one zero-padded channel-major copy of ``x`` (module docstring);
    - ``"triton"``: the same half of the lags in one Triton launch that reads ``x`` in place
      (:mod:`curvlib.kernels.lag_products`; CUDA, float32);
    - ``"auto"`` (default): for float32 on CUDA (with Triton) ``"triton"`` or ``"gemm"``, whichever runs
      faster for this input shape (timed on the first call, cached; without autotuning
      ``"triton"`` for groups of at most 64 channels, ``"gemm"`` for wider ones); ``"gemm"`` for other float32, ``"conv"`` otherwise
      (:func:`resolve_lag_method`).

    ``precision`` (``"ieee"``, ``"tf32"``, ``"tf32x3"``, ``"bf16"``) is the mode of the ``"triton"``
    method's products (:mod:`curvlib.kernels`): ``"ieee"`` (default) multiplies float32 exactly, ``"tf32"``
    uses the matrix units (~1e-3). The other methods follow PyTorch's flags instead.

    ``chunk_bytes`` bounds the temporaries that grow with the batch or the channels: the ``"gemm"``
    method's copy of ``x`` (with its partial products: the samples go in chunks whose copy takes at most
    half of it, their lag products added), the border terms' slabs (chunks of samples, their products
    added) and the assembly's buffers (chunks of rows). Each chunk is at least one sample or row. What
    stays is the terms themselves, ``C·C/G`` times the lag and slab axes (:func:`kfc_extra_bytes` counts
    the whole peak; :func:`kfc_chunk_bytes` picks ``chunk_bytes`` under the pathways' memory limits).
    ``None``: every sample and row at once.

    Precision: float64 agrees with the unfolded Gram to rounding either way. In float32 on CUDA, cuDNN
    may compute the lag weight gradient by Winograd — no cuDNN flag avoids it — (seen for the 5x5 lags of
    3x3 layers on an H100 and an H200, TF32 off): about 2e-4 relative error (Frobenius), against about
    1e-6 for the unfold pathway; ``"gemm"`` runs only cuBLAS products, plain float32 FMAs unless
    ``torch.backends.cuda.matmul`` allows TF32 (not set here; ``"conv"`` follows
    ``torch.backends.cudnn.allow_tf32`` instead, on by default); ``"triton"`` with ``precision="ieee"``
    runs exact float32 FMAs, each slice of the reduction at most 16384 positions long, the slices added
    atomically. On CPUs, float32: ``"gemm"`` 4e-8 to
    6e-7 measured; ``"conv"`` (oneDNN) 5e-7 to 1.1e-5 at batch 32, growing with ``N·∏I`` (4.7e-5 for a
    64-channel 56x56 layer at batch 128); module docstring, *Lag methods*.

    Raises ``ValueError`` for an unsupported geometry, a ``lag_method`` outside ``LAG_METHODS`` (or
    ``"triton"`` where it cannot run) or a ``precision`` outside ``TRITON_PRECISIONS``."""
    if precision not in TRITON_PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(map(repr, TRITON_PRECISIONS))}, got {precision!r}")
    method = resolve_lag_method(lag_method, x.dtype, x.device, x.numel(), x.shape[1] // max(geometry.groups, 1))
    if not supports_lags(geometry):
        raise ValueError(
            "kfc_by_lags needs an ordinary convolution with stride 1 and at most 3 spatial dims, got "
            f"stride={geometry.stride}, transposed={geometry.transposed}, {geometry.num_dims} spatial dims"
        )
    if chunk_bytes is not None and (isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, (int, float))
                                    or not chunk_bytes > 0):
        raise ValueError(f"chunk_bytes must be None or a positive number of bytes, got {chunk_bytes!r}")
    if lag_method == "auto" and method in ("triton", "gemm") and x.is_cuda and triton_usable(x.dtype, x.device, x.numel()):
        method = _measured_lag_method(x, geometry.kernel_size, geometry.dilation, geometry.groups, precision,
                                      first=method, chunk_bytes=chunk_bytes)
    # 30-70 small kernels per call: on CUDA, repeated calls replay them as one graph (their host time
    # otherwise exceeds their device time on small layers; curvlib.cuda_graphs)
    return _GRAPHS((geometry, method, precision, chunk_bytes),
                   lambda t: _kfc_from_lags(t, geometry, method, precision, chunk_bytes), x)


_GRAPHS = GraphCache("kfc_by_lags", copy_moving_inputs=True)  # dozens of kernels per call


def _kfc_from_lags(x: Tensor, geometry: ConvGeometry, method: str, precision: str,
                   chunk_bytes: Optional[float] = None) -> Tensor:
    """:func:`kfc_by_lags` after its checks, with the lag method resolved."""
    n, c = x.shape[:2]
    d = geometry.num_dims
    groups = geometry.groups
    ci = c // groups
    key = _plan_key(geometry)
    plans = _dim_plans(key)
    tensors = _plan_tensors(key, x.dtype, x.device)

    # The products, each viewed [ii, X_0, ..., X_{d-1}, jj, g] (rows ii first, (jj, g) last) with per dim
    # X_t either the lag axis (2K-1) or a border term's (side, q, q') axes.
    kernels, dilations = [p.kernel for p in plans], [p.dilation for p in plans]
    # chunk_bytes: the GEMM form's copy and its partial products take a half each (kfc_extra_bytes)
    lag_term = _lag_products(x, kernels, dilations, groups, method, precision,
                             None if chunk_bytes is None else chunk_bytes / 2)
    lag_term = lag_term.view(groups, ci, ci, *(p.lags for p in plans))
    terms = {(False,) * d: lag_term.permute(1, *range(3, 3 + d), 2, 0)}
    for subset in _subsets(plans):
        m = len(subset)
        samples = n
        if chunk_bytes is not None:  # a chunk of samples' slabs at a time, their products added
            per_sample = _border_sample_elements(plans, subset, c, method) * x.element_size()
            samples = max(1, min(n, int(chunk_bytes // per_sample)))
        prod = _border_products(x[:samples], plans, groups, subset, method, precision)
        for n0 in range(samples, n, samples):  # [*sides, g, ii, *q, jj, *q', *lags_rest]
            prod += _border_products(x[n0:n0 + samples], plans, groups, subset, method, precision)
        axes, rest = [], 3 * m + 3
        for t in range(d):
            if t in subset:
                k = subset.index(t)
                axes += [k, m + 2 + k, 2 * m + 3 + k]
            else:
                axes.append(rest)
                rest += 1
        terms[tuple(t in subset for t in range(d))] = prod.permute(m + 1, *axes, 2 * m + 2, m)

    # Rows ii are independent: on CPUs they go in chunks, so that the temporaries stay small (see
    # _CPU_CHUNK_BYTES) and only the result is a large allocation; with chunk_bytes, everywhere in
    # chunks whose buffers take at most that (_assembly_row_elements).
    result = x.new_empty(groups, ci, *geometry.kernel_size, ci, *geometry.kernel_size)
    # the result seen in the order the assembly produces: [ii, (a_0, b_0), ..., (a_{d-1}, b_{d-1}), jj, g]
    produced = result.permute(1, *(a for t in range(d) for a in (2 + t, 3 + d + t)), 2 + d, 0)
    per_row = math.prod(p.kernel ** 2 for p in plans) * c * x.element_size()
    chunk = ci if x.device.type != "cpu" else max(1, min(ci, _CPU_CHUNK_BYTES // per_row))
    if chunk_bytes is not None:
        chunk = max(1, min(chunk, int(chunk_bytes // (_assembly_row_elements(plans, c) * x.element_size()))))
    for i0 in range(0, ci, chunk):
        _assemble_rows(terms, plans, tensors, slice(i0, min(ci, i0 + chunk)), 1.0 / n, produced)
    size_d = ci * math.prod(geometry.kernel_size)
    return result.view(groups, size_d, size_d)


def _assemble_rows(terms: Dict[Tuple[bool, ...], Tensor], plans, tensors, rows: slice, scale: float,
                   produced: Tensor) -> None:
    """The assembly of rows ``ii`` in ``rows`` into ``produced[rows]`` (the result viewed
    ``[ii, (a_0, b_0), ..., jj, g]``), scaled by ``scale`` (``1/N``, applied while the terms are copied in,
    not on the result).

    Mapping dim t to (a_t, b_t) is a product from the left with the dim's [K², X_t] matrix (batched over
    everything before X_t), no transposition. The terms that differ only in dim t are written next to
    each other along X_t (lag part first) and mapped by one product; the count of tensors halves per dim."""
    d = len(plans)
    lag_term = terms[(False,) * d]  # [ii, lags..., jj, g]
    ci, groups = lag_term.shape[-2], lag_term.shape[-1]
    c = ci * groups
    count = rows.stop - rows.start
    kk = [p.kernel ** 2 for p in plans]

    def size(t, border):
        return plans[t].border_size if border else plans[t].lags

    def split(t, forms):  # per dim from t on: a border form's (side, q, q') or the lag axis
        return [a for s, f in zip(range(t, d), forms)
                for a in ((len(plans[s].starts), plans[s].width, plans[s].width) if f else (plans[s].lags,))]

    # step 0's inputs: per forms of dims 1.. a buffer [rows, X_0 (lag | border), rest]
    sources: Dict[Tuple[bool, ...], Tensor] = {}
    for forms, term in terms.items():
        if forms[1:] not in sources:
            after = math.prod(size(s, f) for s, f in zip(range(1, d), forms[1:]))
            sources[forms[1:]] = lag_term.new_empty(count, plans[0].lags + plans[0].border_size, after * c)
        lo = plans[0].lags if forms[0] else 0
        target = sources[forms[1:]][:, lo:lo + size(0, forms[0])]
        torch.mul(term[rows], scale, out=target.view(count, *split(0, forms), ci, groups))
    for t in range(d):
        lag_index, map_t = tensors[t]
        targets: Dict[Tuple[bool, ...], Tensor] = {}
        for forms_after, source in sources.items():  # source [batch, X_t total, rest]
            batch = source.shape[0]
            if t == d - 1:
                target = lag_term.new_empty(batch, kk[t], c)
                targets[()] = target
            else:
                key_next = forms_after[1:]
                if key_next not in targets:
                    after = math.prod(size(s, f) for s, f in zip(range(t + 2, d), key_next))
                    targets[key_next] = lag_term.new_empty(batch * kk[t], plans[t + 1].lags + plans[t + 1].border_size,
                                                           after * c)
                lo = plans[t + 1].lags if forms_after[0] else 0
                # a view (errors rather than copying): splits the leading dim, merges the contiguous rest
                target = targets[key_next][:, lo:lo + size(t + 1, forms_after[0])].view(batch, kk[t], -1)
            if map_t is None:  # no border in this dim: a gather of lag b - a
                target.copy_(source.index_select(1, lag_index))
            else:
                torch.matmul(map_t, source, out=target)
        sources = targets
    (gram,) = sources.values()
    produced[rows].copy_(gram.view(count, *(p.kernel for p in plans for _ in range(2)), ci, groups))


# ----------------------------------------------------------------------------------------------
# cost model


def unfold_flops(geometry: ConvGeometry, batch: int) -> float:
    """Multiply-adds of :func:`curvlib.native.kfc`: ``(C_in/G·∏K)²·G·N·O``."""
    d = geometry.in_channels // geometry.groups * math.prod(geometry.kernel_size)
    return float(d * d * geometry.groups * batch * math.prod(geometry.output_size))


def _lag_positions(sizes: Sequence[int], kernels: Sequence[int], dilations: Sequence[int], method: str) -> float:
    """Per sample and channel pair, the multiply-adds of :func:`_lag_products` by ``method``: the weight
    gradient ``∏(2K-1)·∏I`` (every tap over the whole input, as counted for the convolution; the zeros
    of its padding included); the GEMM form every computed lag (half, :func:`_gemm_plan`) over the padded
    box ``∏(I_t + p_t)`` of its flat layout (:func:`_flat_layout`, ``p_t`` the largest shift); Triton the
    overlap regions of the same lags, ``(∏_t S_t + ∏ I)/2`` with ``S_t = Σ_{|δ|<K_t} max(0, I_t - dil_t·|δ|)``
    (all lags' overlaps; ``δ = 0`` once, the others' mirror images not computed)."""
    if method == "conv":
        return float(math.prod(2 * k - 1 for k in kernels) * math.prod(sizes))
    if method == "gemm":
        order = _gemm_plan(tuple(sizes), tuple(kernels), tuple(dilations))
        pads = [max(dl * abs(delta[t]) for delta in order) for t, dl in enumerate(dilations)]
        return float(len(order) * math.prod(i + p for i, p in zip(sizes, pads)))
    overlap = math.prod(sum(max(0, i - dl * abs(dt)) for dt in range(-(k - 1), k))
                        for i, k, dl in zip(sizes, kernels, dilations))
    return (overlap + math.prod(sizes)) / 2


def lag_flops(geometry: ConvGeometry, batch: int, lag_method: str = "conv") -> float:
    """Multiply-adds of :func:`kfc_by_lags` with ``lag_method`` ``"conv"``, ``"gemm"`` or ``"triton"``
    (the lags of ``"gemm"`` over their overlap regions only, not the padded box; ``"auto"``
    depends on the input's dtype and device: resolve it first, :func:`resolve_lag_method`): the lag
    products (:func:`_lag_positions`), one product per border term (in 3-d those with two lag dims by
    the lag method) and the products mapping the terms to ``(a, b)`` (gathers, copies, the transposes of
    the GEMM form and the final permutation move memory only and are not counted). Compare with
    :func:`unfold_flops`."""
    if lag_method not in ("conv", "gemm", "triton"):
        raise ValueError(f"lag_method must be 'conv', 'gemm' or 'triton' (resolve 'auto' with resolve_lag_method), "
                         f"got {lag_method!r}")
    plans = _dim_plans(_plan_key(geometry))
    d = len(plans)
    c, g = geometry.in_channels, geometry.groups
    ci = c // g

    def positions(dims, method):
        return _lag_positions([plans[t].size for t in dims], [plans[t].kernel for t in dims],
                              [plans[t].dilation for t in dims], method)

    total = c * ci * positions(range(d), lag_method) * batch
    subsets = _subsets(plans)
    for subset in subsets:
        rest = [t for t in range(d) if t not in subset]
        sides = math.prod(len(plans[t].starts) for t in subset)
        width = math.prod(plans[t].width for t in subset)
        # two lag dims: by the lag method (_border_products), fewer: an unfolded product over all taps
        total += sides * c * width * ci * width * positions(rest, lag_method if len(rest) == 2 else "conv") * batch
    # assembly: per dim with a border, one [K², 2K-1 + sides·w²] product per group of terms
    after = {tuple(t in subset for t in range(d)) for subset in subsets} | {(False,) * d}
    for t in range(d):
        after = {forms[1:] for forms in after}
        if plans[t].width:
            prev = math.prod(plans[s].kernel ** 2 for s in range(t))
            for forms in after:
                rest = math.prod(plans[s].border_size if f else plans[s].lags for s, f in zip(range(t + 1, d), forms))
                total += prev * plans[t].kernel ** 2 * (plans[t].lags + plans[t].border_size) * rest * g * ci * ci
    return total


# ----------------------------------------------------------------------------------------------
# memory model and chunks (elements per term, per sample of the border temporaries, per row of the
# assembly; :func:`kfc_extra_bytes`, :func:`kfc_chunk_bytes`)


def _all_forms(plans) -> List[Tuple[bool, ...]]:
    """Per term, per dim whether it is a border form (the lag term: all ``False``)."""
    return [forms for forms in itertools.product((False, True), repeat=len(plans))
            if all(plan.width > 0 or not f for plan, f in zip(plans, forms))]


def _form_size(plan: _DimPlan, border: bool) -> int:
    return plan.border_size if border else plan.lags


def _term_elements(plans, forms: Tuple[bool, ...], channels: int, per_group: int) -> int:
    """Elements of one term: ``C·C/G`` times, per dim, the lag axis or the border's ``(side, q, q')``."""
    return channels * per_group * math.prod(_form_size(p, f) for p, f in zip(plans, forms))


def _border_sample_elements(plans, subset: Tuple[int, ...], channels: int, method: str) -> int:
    """Per sample, an upper bound on the temporaries of :func:`_border_products` for ``subset``: the
    slabs cut dim by dim (each stack, and the padded windows it is stacked from), the product's left
    operand (a permuted copy of the slabs) and its right one (with one other dim: the slabs padded and
    unfolded along it, ``2K-1`` times their size; with two: the lag method's copy of the slabs)."""
    cut = 1
    stages = []
    for t in subset:
        cut *= len(plans[t].starts) * plans[t].width
        stages.append(cut * channels * math.prod(plans[s].size for s in range(len(plans))
                                                 if s not in subset[:len(stages) + 1]))
    slabs = stages[-1]
    rest = [plans[t] for t in range(len(plans)) if t not in subset]
    if len(rest) == 1:
        right = slabs // rest[0].size * (rest[0].size + 2 * rest[0].dilation * (rest[0].kernel - 1)
                                         + rest[0].lags * rest[0].size)
    elif rest and method != "triton":  # the GEMM form's padded copy (a weight gradient's workspace: alike)
        right = slabs // math.prod(p.size for p in rest) * math.prod(p.size + p.dilation * (p.kernel - 1) for p in rest)
    else:
        right = slabs
    return sum(stages) + 2 * slabs + right


def _assembly_row_elements(plans, channels: int) -> int:
    """Per row ``ii``, the largest set of the assembly's buffers alive at once (:func:`_kfc_from_lags`):
    a step's sources and targets, and the gathered copy of a dim without border."""
    d = len(plans)
    forms = _all_forms(plans)

    def buffers(t):  # step t's inputs, per group of terms: [kk_<t, 2K-1 + border_t, rest after t, C]
        if t == d:
            return [math.prod(p.kernel ** 2 for p in plans) * channels]
        done = math.prod(p.kernel ** 2 for p in plans[:t])
        keys = {f[t + 1:] for f in forms}
        return [done * (plans[t].lags + plans[t].border_size) * channels
                * math.prod(_form_size(p, f) for p, f in zip(plans[t + 1:], key)) for key in keys]

    return max(sum(buffers(t)) + 2 * sum(buffers(t + 1)) for t in range(d))


def _lag_method_for_memory(element_size: int, method: Optional[str]) -> str:
    return method or ("gemm" if element_size == 4 else "conv")  # what "auto" runs, counting a copy


def kfc_extra_bytes(geometry: ConvGeometry, batch: int, element_size: int, chunk_bytes: Optional[float] = None,
                    lag_method: Optional[str] = None) -> float:
    """Peak extra memory of :func:`kfc_by_lags` (without its ``[G, D, D]`` result), an upper bound: the
    terms (the lag products and the border terms, ``C·C/G`` times their lag and slab axes), plus the
    largest of the phases' temporaries — the lag products' (their computed half; the GEMM form's copy of
    ``x``, in chunks of ``chunk_bytes / 2``), the border products' (one term and a chunk of samples'
    slabs) and the assembly's (a chunk of rows). ``chunk_bytes=None``: all samples and rows at once.
    ``lag_method``: ``"gemm"``, ``"triton"`` or ``"conv"``; ``None``: the GEMM form for float32 (which
    copies; Triton does not), the weight gradient otherwise (its workspace counted like the copy)."""
    method = _lag_method_for_memory(element_size, lag_method)
    plans = _dim_plans(_plan_key(geometry))
    c, g = geometry.in_channels, geometry.groups
    ci = c // g
    forms = _all_forms(plans)
    terms = sum(_term_elements(plans, f, c, ci) for f in forms)
    lag_term = _term_elements(plans, (False,) * len(plans), c, ci)
    sizes = [p.size for p in plans]
    kernels, dilations = [p.kernel for p in plans], [p.dilation for p in plans]
    order = _gemm_plan(tuple(sizes), tuple(kernels), tuple(dilations))
    lag_temps = len(order) * c * ci
    if method != "triton":
        sample = c * math.prod(i + max(dl * abs(delta[t]) for delta in order)
                               for t, (i, dl) in enumerate(zip(sizes, dilations)))
        samples = batch if chunk_bytes is None else max(1, min(batch, int(chunk_bytes / 2 // (sample * element_size))))
        lag_temps += 2 * samples * sample
    border_temps = 0
    for subset in _subsets(plans):
        per_sample = _border_sample_elements(plans, subset, c, method)
        samples = batch if chunk_bytes is None else max(1, min(batch, int(chunk_bytes // (per_sample * element_size))))
        term = _term_elements(plans, tuple(t in subset for t in range(len(plans))), c, ci)
        border_temps = max(border_temps, term + samples * per_sample)
    per_row = _assembly_row_elements(plans, c)
    rows = ci if chunk_bytes is None else max(1, min(ci, int(chunk_bytes // (per_row * element_size))))
    peak = max(lag_term + lag_temps, terms + border_temps, terms + rows * per_row)
    return float(peak * element_size)


#: the smallest chunk :func:`kfc_chunk_bytes` asks for: below it, the many small chunks cost more time
#: than they save memory
MIN_CHUNK_BYTES = 2**20


def kfc_chunk_bytes(geometry: ConvGeometry, batch: int, element_size: int) -> Optional[float]:
    """The ``chunk_bytes`` :func:`kfc_by_lags` runs with in :func:`curvlib.functional.kfc`: ``None`` (all
    at once) without memory limits; under them (:func:`curvlib.native.kfc_memory_limit`) what the limit
    leaves beside the terms (:func:`kfc_extra_bytes`), at least :data:`MIN_CHUNK_BYTES`."""
    from .native import kfc_memory_limit  # here: native's users import this module

    limit = kfc_memory_limit(geometry, batch, element_size)
    if limit is None:
        return None
    plans = _dim_plans(_plan_key(geometry))
    c, ci = geometry.in_channels, geometry.in_channels // geometry.groups
    forms = _all_forms(plans)
    largest = max(_term_elements(plans, f, c, ci) for f in forms)
    fixed = (sum(_term_elements(plans, f, c, ci) for f in forms) + largest) * element_size
    return float(max(limit - fixed, MIN_CHUNK_BYTES))
