"""Analytic cost of one operation on one pathway: FLOPs, bytes moved at minimum, largest intermediate,
and the ideal time on a device with given ceilings (the roofline ``max(FLOPs / rate, bytes / bandwidth)``).

Used by ``pathway="auto"`` (:mod:`curvlib.pathways`) when it does not measure, and by the profiler
(:mod:`curvlib.profile`) to report computational efficiency ``ideal time / measured time``.

Counts (``N`` batch, ``G`` groups, ``E = C_out // G``, ``D = C_in // G · ∏K``, ``O`` output and
``I`` input locations of the reference convolution, ``C`` columns; a multiply-add counts 2 FLOPs):

================================  ==========================================  =======================================
operation                         FLOPs                                       minimum bytes (each operand once)
================================  ==========================================  =======================================
conv, VJPs, JVPs                  ``2·N·O·G·E·D``                             ``x + y + weight``
kfc                               ``2·N·O·G·D²``                              ``x + G·D²``
kfac_reduce                       ``N·O·G·D + 2·N·G·D²``                      ``x + G·D²``
ggn_diag                          ``2·C·N·O·G·E·D + 2·C·N·G·E·D``             ``x + s + weight``
ggn_gram                          ``2·C·N·O·G·E·D + 2·(C·N)²·G·E·D``          ``x + s + (C·N)²``
hesscale_weight_diag              ``2·N·O·G·E·D + N·O·G·D``                   ``x + d + weight``
================================  ==========================================  =======================================

The largest intermediate is pathway-specific: none beyond the result for ``native`` convolutions and
``fused`` kernels, the unfolded input ``N·G·D·O`` for ``native`` unfold-based operations, and what the
planned contraction path reports for the tensor-network pathways (:func:`network_cost`).

>>> from curvlib.hyperparams import make_geometry
>>> g = make_geometry(3, 8, (32, 32), 3, padding=1)
>>> c = operation_cost("kfac_reduce", "native", g, batch=16, element_size=4)
>>> c.flops == 16 * 1024 * 27 + 2 * 16 * 27 * 27, c.largest_intermediate_bytes == 16 * 27 * 1024 * 4
(True, True)
>>> operation_cost("kfc", "native", g, batch=16).extra_bytes == 4 * (27 * 1024 + 3 * 34 * 34) * 4  # 4 samples
True
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, replace
from typing import Dict, Optional

from .hyperparams import ConvGeometry


@dataclass(frozen=True)
class Ceilings:
    """Measured (or nominal) device ceilings: arithmetic rate, copy bandwidth and fixed per-call overhead."""

    flops_per_s: float
    bytes_per_s: float
    call_overhead_s: float = 0.0
    measured: bool = False
    #: float32 products on TF32 matrix units (``None``: the device has none; products run at ``flops_per_s``)
    tf32_flops_per_s: Optional[float] = None


#: nominal ceilings until :func:`set_ceilings` (e.g. ``curvlib.profile.measure_ceilings``) replaces them:
#: fp32 without tensor cores, TF32 on them (399 TFLOP/s measured, ``benchmarks/results/h100-kernels``) and
#: HBM3 copy bandwidth of an H100; a few cores of a CPU
_CEILINGS: Dict[str, Ceilings] = {
    "cuda": Ceilings(flops_per_s=5.0e13, bytes_per_s=2.5e12, call_overhead_s=5e-6, tf32_flops_per_s=4.0e14),
    "cpu": Ceilings(flops_per_s=5.0e10, bytes_per_s=1.0e10, call_overhead_s=2e-6),
}


def ceilings(device_type: str) -> Ceilings:
    """Ceilings of a device type (``"cuda"``, ``"cpu"``, …; unknown types get the CPU's)."""
    return _CEILINGS.get(device_type, _CEILINGS["cpu"])


def set_ceilings(device_type: str, value: Ceilings) -> None:
    """Replace the ceilings used for ``device_type`` (measured ones make the cost model sharper)."""
    if not isinstance(value, Ceilings):
        raise TypeError(f"value must be a curvlib.cost.Ceilings, got {type(value).__name__}")
    _CEILINGS[device_type] = value


#: fraction of the device's fp32 rate a pathway's arithmetic reaches, calibrated on the H100 run of
#: ``benchmarks/ops.py`` (``benchmarks/results/h100-2026-11-21-pathways``): cuBLAS/cuDNN GEMMs run near
#: the rate; the fused kernels trade rate for memory (no per-sample intermediates) except KFAC-reduce,
#: which is bandwidth-bound
FLOP_EFFICIENCY = {
    "native": 0.8,
    "tn": 0.7,
    "tn+simplify": 0.7,
    "unfold": 0.7,
    ("fused", "kfc"): 0.6,
    ("fused", "ggn_diag"): 0.65,  # the unfolded-chunk kernel, 33 TFLOP/s in float32 FMA (session 9)
    ("fused", "hesscale_weight_diag"): 0.5,
    # many small products (lag weight gradient, thin border slabs, assembly); not yet calibrated on a GPU
    "lags": 0.5,
}


#: fraction of the TF32 rate (:attr:`Ceilings.tf32_flops_per_s`) a pathway reaches when its float32 products
#: run on TF32 (``precision="tf32"``), calibrated on an H100 (``benchmarks/results/h100-2026-11-22-session12``):
#: the native GGN diagonal's batched cuBLAS products ~300 TFLOP/s, the unfolded GGN kernel 110-130. Pairs not
#: listed are priced at their float32 rate (not calibrated under TF32: their choice stays as without it)
TF32_FLOP_EFFICIENCY = {
    ("native", "ggn_diag"): 0.75,
    ("fused", "ggn_diag"): 0.3,
}

#: the same where the fused kernel runs its TMA form (a CUDA GPU of compute capability 9.0 or newer, output
#: locations filling 16-byte rows: :func:`curvlib.kernels.ggn_unfolded.tma_supported`). Measured on an H100
#: (``benchmarks/results/h100-2026-11-22-session13``): All-CNN-C's layers at 0.31 (10 columns, the chunks of
#: DiagGGNExact under a 3.5 GB budget) to 0.61 (100 columns) of the TF32 rate
TF32_FLOP_EFFICIENCY_TMA = {
    ("fused", "ggn_diag"): 0.45,
}


#: the same for 16-bit operands (bf16 column passes, half models), as fractions of the TF32 rate: measured on
#: an H100 (``benchmarks/results/h100-2026-11-22-session17``, All-CNN-C's 3×3 layers, 21 channels-last bf16
#: columns): the fused kernel's TMA form with its 16-bit tiles 250-330 TFLOP/s of useful products (0.8 of the
#: TF32 rate on its padded row tiles); the native pathway 140-230 TFLOP/s all told — its batched products run
#: near the bf16 peak, but the copies of the columns, the unfold and the squared norms around them, which the
#: roofline's max() lets overlap, run one after another (0.5 priced on the products)
SIXTEEN_BIT_FLOP_EFFICIENCY = {
    ("native", "ggn_diag"): 0.5,
    ("fused", "ggn_diag"): 0.8,  # where the TMA form runs; else the TF32 entries
}


@functools.lru_cache(maxsize=None)
def _tma_device() -> bool:
    """Whether the current CUDA device runs the GGN kernel's TMA form (Triton, compute capability >= 9.0)."""
    import torch

    from . import kernels  # here: the kernels import this module's users

    if not (torch.cuda.is_available() and kernels.available()):
        return False
    from .kernels import ggn_unfolded

    return ggn_unfolded.tma_supported(torch.device("cuda"))


def tf32_flop_efficiency(op: str, pathway: str, geometry: ConvGeometry, element_size: int) -> Optional[float]:
    """Calibrated fraction of the TF32 rate ``pathway`` reaches on ``op`` (``None``: not calibrated, priced
    at the float32 rate); :data:`TF32_FLOP_EFFICIENCY_TMA` where the TMA kernel runs,
    :data:`SIXTEEN_BIT_FLOP_EFFICIENCY` for 16-bit operands."""
    sixteen_bit = SIXTEEN_BIT_FLOP_EFFICIENCY.get((pathway, op)) if element_size == 2 else None
    if sixteen_bit is not None and pathway != "fused":
        return sixteen_bit
    if (pathway, op) in TF32_FLOP_EFFICIENCY_TMA and _tma_device():
        from .kernels._host import tma_shape_ok  # here: the kernels import this module's users

        if tma_shape_ok(math.prod(geometry.output_size), element_size):
            return TF32_FLOP_EFFICIENCY_TMA[(pathway, op)] if sixteen_bit is None else sixteen_bit
    return TF32_FLOP_EFFICIENCY.get((pathway, op))


def flop_efficiency(op: str, pathway: str) -> float:
    """Calibrated fraction of the fp32 rate that ``pathway`` reaches on ``op`` (see :data:`FLOP_EFFICIENCY`)."""
    return FLOP_EFFICIENCY.get((pathway, op), FLOP_EFFICIENCY.get(pathway, 1.0))


#: Python time a call spends before its kernels run, per pathway (measured on CPU for small layers:
#: the tensor networks are built, simplified and looked up in the plan cache on every call)
PYTHON_OVERHEAD_S = {"native": 2e-5, "fused": 3e-5, "tn": 1.5e-4, "tn+simplify": 3e-4, "unfold": 3e-4,
                     "lags": 3e-4}  # lags: ~0.3 ms on a CPU; its 30-70 kernels replay as a CUDA graph on a GPU


@dataclass(frozen=True)
class Cost:
    """Analytic cost of one call. ``bytes_moved`` is the traffic the pathway itself causes (minimum bytes
    plus writing and reading back its intermediates); ``extra_bytes`` the memory it needs beyond inputs
    and result."""

    flops: float
    min_bytes: float
    largest_intermediate_bytes: float
    bytes_moved: float
    extra_bytes: float
    overhead_s: float = 0.0
    notes: Dict[str, float] = field(default_factory=dict)
    flop_efficiency: float = 1.0
    #: the products run on TF32 matrix units at this fraction of :attr:`Ceilings.tf32_flops_per_s` (``None``: float32)
    tf32_flop_efficiency: Optional[float] = None

    def ideal_time(self, device_type: str = "cuda") -> float:
        """Roofline time on the device's ceilings from the minimum bytes (efficiency = this / measured)."""
        c = ceilings(device_type)
        return max(self.flops / c.flops_per_s, self.min_bytes / c.bytes_per_s)

    def estimated_time(self, device_type: str = "cuda") -> float:
        """Predicted time of the pathway: its own traffic on the roofline plus its fixed overhead."""
        c = ceilings(device_type)
        if self.tf32_flop_efficiency is not None and c.tf32_flops_per_s is not None:
            rate = c.tf32_flops_per_s * self.tf32_flop_efficiency
        else:
            rate = c.flops_per_s * self.flop_efficiency
        return max(self.flops / rate, self.bytes_moved / c.bytes_per_s) + self.overhead_s + c.call_overhead_s


_FORWARD_LIKE = ("conv", "conv_transpose", "weight_jvp", "input_jvp", "input_vjp", "weight_vjp", "hesscale_input_diag")


def _sizes(geometry: ConvGeometry, batch: int, columns: int):
    g = geometry.groups
    return dict(
        N=batch,
        G=g,
        E=geometry.out_channels // g,
        D=geometry.in_channels // g * math.prod(geometry.kernel_size),
        O=math.prod(geometry.output_size),
        I=math.prod(geometry.input_size),
        Ci=geometry.in_channels,
        Co=geometry.out_channels,
        C=columns,
    )


def minimum(op: str, geometry: ConvGeometry, batch: int, columns: int = 1, element_size: int = 4):
    """``(FLOPs, minimum bytes)`` of ``op`` whatever the pathway (table in the module docstring)."""
    z = _sizes(geometry, batch, columns)
    N, G, E, D, O, I, C = z["N"], z["G"], z["E"], z["D"], z["O"], z["I"], z["C"]
    x_bytes = N * z["Ci"] * I * element_size  # the i side (layer input of an ordinary layer)
    y_bytes = N * z["Co"] * O * element_size
    w_bytes = G * E * D * element_size
    gemm = 2 * N * O * G * E * D
    if op in _FORWARD_LIKE:
        return gemm, x_bytes + y_bytes + w_bytes
    if op in ("kfc", "kfac_reduce") and geometry.transposed:
        # a transposed layer's factor: D = (layer input channels / G)·∏K over the layer's output
        # locations (the reference i side); the layer input sits on the o side
        D, O = z["Co"] // G * math.prod(geometry.kernel_size), I
        x_bytes = y_bytes
    if op == "kfc":
        return 2 * N * O * G * D * D, x_bytes + G * D * D * element_size
    if op == "kfac_reduce":
        return N * O * G * D + 2 * N * G * D * D, x_bytes + G * D * D * element_size
    if op == "ggn_diag":
        return C * gemm + 2 * C * N * G * E * D, x_bytes + C * y_bytes + w_bytes
    if op == "ggn_gram":
        return C * gemm + 2 * (C * N) ** 2 * G * E * D, x_bytes + C * y_bytes + (C * N) ** 2 * element_size
    if op == "hesscale_weight_diag":
        return gemm + N * O * G * D, x_bytes + y_bytes + w_bytes
    if op in ("ggn", "ggn_mini_block"):
        return C * gemm, x_bytes + C * y_bytes + w_bytes
    if op in ("unfold", "unfold_jvp", "unfold_vjp", "unfold_kernel"):
        return N * O * G * D, x_bytes + N * G * D * O * element_size
    raise ValueError(f"op must be one of the curvlib.functional operations, got {op!r}")


def operation_cost(
    op: str,
    pathway: str,
    geometry: ConvGeometry,
    batch: int,
    columns: int = 1,
    element_size: int = 4,
    chunk_bytes: Optional[float] = None,
    precision: Optional[str] = None,
) -> Cost:
    """Analytic :class:`Cost` of ``op`` on ``pathway`` ``"native"``, ``"fused"``, ``"unfold"`` or (KFC of
    stride-1 layers) ``"lags"``.

    ``precision="tf32"`` (or ``"bf16"``) prices float32 products on the TF32 matrix units where the pair is
    calibrated (:data:`TF32_FLOP_EFFICIENCY`); on a GPU (``precision`` not ``None``: the functional
    operations pass ``None`` on CPUs) 16-bit products are priced so whatever the setting.
    (Tensor-network pathways take their FLOPs and intermediates from the planned path: :func:`network_cost`.)
    """
    cost = _operation_cost(op, pathway, geometry, batch, columns, element_size, chunk_bytes)
    # the matrix units: float32 products under "tf32" (and "bf16", whose library calls on float32 run TF32),
    # and 16-bit products on a GPU always; their rate is priced at the calibrated TF32 one (a lower bound for
    # 16-bit operands, which run at twice the TF32 rate: the choice between pathways is as under TF32)
    matrix_units = (element_size == 4 and precision in ("tf32", "bf16")) or (element_size == 2 and precision is not None)
    tf32 = tf32_flop_efficiency(op, pathway, geometry, element_size) if matrix_units else None
    if tf32 is not None:
        cost = replace(cost, tf32_flop_efficiency=tf32)
    return cost


def _operation_cost(op: str, pathway: str, geometry: ConvGeometry, batch: int, columns: int, element_size: int,
                    chunk_bytes: Optional[float]) -> Cost:
    flops, min_bytes = minimum(op, geometry, batch, columns, element_size)
    z = _sizes(geometry, batch, columns)
    unfold_bytes = z["N"] * z["G"] * z["D"] * z["O"] * element_size
    overhead = PYTHON_OVERHEAD_S.get(pathway, 0.0)
    if pathway == "lags":
        if op != "kfc":
            raise ValueError(f"pathway 'lags' computes only op='kfc', got {op!r}")
        from .lag_gram import kfc_chunk_bytes, kfc_extra_bytes, lag_flops  # here: lag_gram imports native

        x_bytes = z["N"] * z["Ci"] * z["I"] * element_size
        # a zero-padded copy of x (the GEMM form's flat layout) and the thin border slabs; the products
        # read the copy twice per lag, mostly from L2
        method = "gemm" if element_size == 4 else "conv"  # what kfc_by_lags' "auto" runs
        # the terms, the copy, the slabs and the assembly's buffers, in chunks under memory limits
        extra = kfc_extra_bytes(geometry, z["N"], element_size, kfc_chunk_bytes(geometry, z["N"], element_size))
        return Cost(2.0 * lag_flops(geometry, batch, method), min_bytes, extra,
                    min_bytes + 4 * x_bytes, extra, overhead, flop_efficiency=flop_efficiency(op, pathway))
    if pathway == "fused" and op == "ggn_diag":
        from .kernels._host import unfolded_chunk_bytes  # here: the kernels import this module's users

        # the unfolded input is written in chunks of samples (extra memory: one chunk) and read once per
        # block of rows (column, channel) — L2 hits not counted; the products run on whole row tiles, so
        # padded rows count as work. With few columns the reads dominate (All-CNN-C conv2, 4 columns)
        per_sample = z["G"] * z["D"] * z["O"] * element_size
        chunk = min(unfold_bytes, max(per_sample, unfolded_chunk_bytes()))
        rows, row_blocks = _ggn_tile_rows(z["C"], z["E"])
        padded = flops * rows / (z["C"] * z["E"])
        return Cost(padded, min_bytes, chunk, min_bytes + (1 + row_blocks) * unfold_bytes, chunk, overhead,
                    flop_efficiency=flop_efficiency(op, pathway))
    if pathway == "fused" or (pathway == "native" and op in _FORWARD_LIKE):
        return Cost(flops, min_bytes, 0.0, min_bytes, 0.0, overhead, flop_efficiency=flop_efficiency(op, pathway))
    if pathway not in ("native", "unfold"):
        raise ValueError(f"pathway must be 'native', 'fused' or 'unfold' (tensor networks: network_cost), got {pathway!r}")
    largest = unfold_bytes
    extra = unfold_bytes
    moved = min_bytes + 2 * unfold_bytes
    if op == "kfc" and pathway == "native":  # unfolded in chunks of samples straight into the product's layout
        from .native import kfc_chunk_bytes, kfc_extra_bytes  # here: native imports this module's users

        extra = kfc_extra_bytes(geometry, z["N"], element_size, kfc_chunk_bytes(geometry, z["N"], element_size))
        largest = extra
    elif op == "kfc":  # the unfolded input is permuted into a second copy before the batched product
        extra, moved = 2 * unfold_bytes, min_bytes + 4 * unfold_bytes
    elif op in ("ggn_diag", "ggn_gram", "ggn", "ggn_mini_block"):
        gradients = z["C"] * z["N"] * z["G"] * z["E"] * z["D"] * element_size
        chunk = gradients if chunk_bytes is None else min(gradients, chunk_bytes)
        largest = max(unfold_bytes, chunk)
        permuted = z["C"] * z["N"] * z["Co"] * z["O"] * element_size  # s copied sample-major for the product
        extra = unfold_bytes + chunk + permuted
        # the permuted copy of s is written and read once more: on All-CNN-C's 32×32 layers (10 columns,
        # H100) it takes 0.42 ms per call, more than conv1's whole product
        moved = min_bytes + 2 * unfold_bytes + 2 * gradients + 2 * permuted
    elif op == "hesscale_weight_diag":
        extra, moved = 2 * unfold_bytes, min_bytes + 4 * unfold_bytes
    return Cost(flops, min_bytes, largest, moved, extra, overhead, flop_efficiency=flop_efficiency(op, pathway))


def _ggn_tile_rows(columns: int, channels: int):
    """``(rows, row blocks)`` of ``(column, channel)`` rows the fused GGN kernel computes for ``columns ×
    channels`` useful ones: blocks of ``min(32, channels rounded up to a power of two)`` channels by as
    many columns as fill 128 rows (at most the columns rounded up to a power of two), as
    :func:`curvlib.kernels.ggn_unfolded.candidates` tiles them."""
    block_co = min(32, 1 << max(0, channels - 1).bit_length())
    block_c = max(-(-16 // block_co), min(128 // block_co, 1 << max(0, columns - 1).bit_length()))
    column_blocks, channel_blocks = -(-columns // block_c), -(-channels // block_co)
    return column_blocks * block_c * channel_blocks * block_co, channel_blocks


def network_cost(
    op: str, pathway: str, geometry: ConvGeometry, batch: int, plan_flops: float, plan_largest_elements: float,
    columns: int = 1, element_size: int = 4,
) -> Cost:
    """:class:`Cost` of a tensor-network pathway from its planned contraction path (FLOPs and largest
    intermediate as opt_einsum reports them, see :func:`curvlib.contract.plan`)."""
    _, min_bytes = minimum(op, geometry, batch, columns, element_size)
    largest = plan_largest_elements * element_size
    return Cost(
        flops=float(plan_flops),
        min_bytes=min_bytes,
        largest_intermediate_bytes=largest,
        bytes_moved=min_bytes + 2 * largest,
        extra_bytes=largest,
        overhead_s=PYTHON_OVERHEAD_S.get(pathway, PYTHON_OVERHEAD_S["tn"]),
        flop_efficiency=flop_efficiency(op, pathway),
    )
