"""KFAC-reduce input factor: patches averaged straight from the input, then their small Gram.

Step 1 (one pass over ``x``): ``ū[n, c, k] = 1/O Σ_o x[n, c, o·S + k·DIL − P]``. For fixed ``(n, c)``
this is the input row ``x[n, c, :]`` times a 0/1 *window indicator* ``W[i, k]`` (1 where input
location ``i`` is the ``k``-th entry of some window), so ``ū = X W / O`` is one matrix product with
``X = x.view(N·C_in, ∏I)`` read once and ``W`` generated in registers, tile by tile, from the index
arithmetic (per spatial dim: ``i + P − k·DIL`` is a multiple of ``S`` in ``[0, (O−1)·S]``). Large inputs
are split along ``∏I`` over several programs that add into ``ū`` atomically.

Kernel size 1 (pointwise and strided down-sampling layers): every window is one input location, ``ū`` is
the mean over the locations ``o·S − P`` inside the input, a strided view of ``x``: PyTorch's reduction
reads it at about the copy bandwidth, where the kernel above pads ``W`` to 16 columns of which one is
used (measured on an H200, 512 channels of 32x32 at batch 32: 34 µs against 94 µs).

Step 2: ``Ω̂_g = 1/N Σ_n ū_{n,g} ū_{n,g}ᵀ`` is the Gram kernel of :mod:`.gram` applied to ``ū`` as a
kernel-size-1 input. ``ū`` has ``N·C_in·∏K`` entries, up to 6 MiB on Table E3's layers (ConvNeXt's
depthwise 7×7 of 1024 channels at batch 32): when it would exceed :data:`MEANS_CHUNK_BYTES` the two
steps run on chunks of samples, each chunk's Gram added into the factor.

Precision of step 1: ``W`` is exact in every format, so the default splits float32 ``x`` into two
TF32 parts (``hi`` = ``x`` with the 13 low mantissa bits cleared, ``lo = x − hi``) and runs two
matrix-unit products: each term is off by at most ``2⁻²⁰·|x|``. ``mode="fma"`` multiplies in float32
FMA instead (slower on large kernels; kept for comparison).

Imported only when Triton is importable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import kernel_offsets, unravel3
from ._geometry import KernelGeometry, trivial_geometry
from ._host import cdiv, finish, multiprocessors, next_power_of_2
from ._launch import Launcher
from .autotune import ConfigCache
from .gram import kfc_factor

# IT (locations per row) stays specialised: divisible by 16, rows start 64-byte aligned and loads vectorise
_INT_ARGS = [
    "R", "KT", "i_per_split",
    "I0", "I1", "I2", "K0", "K1", "K2", "O0", "O1", "O2", "S0", "S1", "S2", "DL0", "DL1", "DL2", "P0", "P1", "P2",
    "use_atomic",
]

#: the low 13 mantissa bits of a float32, cleared: the TF32 part of a value
_TF32_MASK = tl.constexpr(-8192)  # 0xFFFFE000 as int32


@triton.jit
def _window_hits(q, a, r, S, L):
    """``[BLOCK_I, BLOCK_K]``: padded input location ``q`` is kernel entry ``a`` (residue ``r = a mod S``)
    of some window along one dim: its origin ``q − a`` is a multiple of ``S`` in ``[0, L]``."""
    t = q[:, None] - a[None, :]
    return (t.to(tl.uint32, bitcast=True) <= L.to(tl.uint32)) & ((q % S)[:, None] == r[None, :])


@triton.jit(do_not_specialize=_INT_ARGS)
def _patch_mean_kernel(
    x_ptr, out_ptr, scale,
    R, IT, KT, i_per_split,
    I0, I1, I2, K0, K1, K2, O0, O1, O2, S0, S1, S2, DL0, DL1, DL2, P0, P1, P2,
    use_atomic,
    BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr, MODE: tl.constexpr,
    ACTIVE: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    valid_r = rows < R
    valid_k = k < KT
    a0, a1, a2 = kernel_offsets(k, K1, K2, DL0, DL1, DL2)
    # last window origin per dim, in padded coordinates
    L0 = (O0 - 1) * S0
    L1 = (O1 - 1) * S1
    L2 = (O2 - 1) * S2

    i_start = tl.program_id(2) * i_per_split
    i_end = tl.minimum(IT, i_start + i_per_split)
    row_ptr = x_ptr + rows.to(tl.int64) * IT
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for i_base in range(i_start, i_end, BLOCK_I):
        i = i_base + tl.arange(0, BLOCK_I)
        valid_i = i < i_end
        i0, i1, i2 = unravel3(i, I1, I2)
        hit = valid_i[:, None] & valid_k[None, :]
        # dims of size 1 with kernel 1 (the embedding of 1-d/2-d convolutions) always hit
        if ACTIVE & 1:
            hit = hit & _window_hits(i0 + P0, a0, a0 % S0, S0, L0)
        if ACTIVE & 2:
            hit = hit & _window_hits(i1 + P1, a1, a1 % S1, S1, L1)
        if ACTIVE & 4:
            hit = hit & _window_hits(i2 + P2, a2, a2 % S2, S2, L2)
        xs = tl.load(row_ptr[:, None] + i[None, :], mask=valid_r[:, None] & valid_i[None, :], other=0.0)
        if MODE == "split":  # exact 0/1 weights: two TF32 products carry float32 accuracy
            w = hit.to(tl.float32)
            hi = (xs.to(tl.int32, bitcast=True) & _TF32_MASK).to(tl.float32, bitcast=True)
            acc = tl.dot(hi, w, acc, input_precision="tf32")
            acc = tl.dot(xs - hi, w, acc, input_precision="tf32")
        elif MODE == "fma":
            acc = tl.dot(xs, hit.to(tl.float32), acc, input_precision="ieee")
        elif MODE == "tf32":
            acc = tl.dot(xs, hit.to(tl.float32), acc, input_precision="tf32")
        else:  # "bf16", and half-precision inputs (exact products)
            half = tl.bfloat16 if MODE == "bf16" else xs.dtype
            acc = tl.dot(xs.to(half), hit.to(half), acc)

    acc = acc * scale
    ptrs = out_ptr + rows[:, None] * KT + k[None, :]
    mask = valid_r[:, None] & valid_k[None, :]
    if use_atomic != 0:
        tl.atomic_add(ptrs, acc, mask=mask, sem="relaxed")
    else:
        tl.store(ptrs, acc, mask=mask)


_launch_patch_mean = Launcher(_patch_mean_kernel, specialised=["IT"])


@dataclass(frozen=True)
class MeanConfig:
    block_r: int
    block_i: int
    block_k: int
    num_warps: int
    split: int


_CACHE = ConfigCache("patch_mean")

#: step-1 mode for ``precision="ieee"`` on float32 inputs ("split": two TF32 parts, or "fma")
IEEE_MODE = "split"


def _mode(precision: str, dtype: torch.dtype) -> str:
    if dtype != torch.float32:
        return "bf16" if precision == "bf16" else "half"
    return {"ieee": IEEE_MODE, "tf32x3": "split", "tf32": "tf32", "bf16": "bf16"}[precision]


#: (block_r, block_i, num_warps) per step-1 mode class and kernel tile ``block_k``, best guess first;
#: chosen from the compiler's report for sm_90 (no register spills) and, for ``block_k = 16`` (3×3
#: kernels), from device times of graph replays on an H100: ``block_i = 32`` is 1.3–1.5x faster on
#: grouped and depthwise 3×3 layers of 32–64 locations per row, ``64`` on a 147×147 input
_TILES = {
    "mma": {16: [(128, 64, 8), (128, 32, 8)], 32: [(128, 64, 8), (128, 32, 8)], 64: [(128, 32, 8), (64, 32, 4)],
            128: [(128, 32, 8), (64, 32, 8)]},
    "fma": {16: [(64, 16, 4)], 32: [(64, 16, 8)], 64: [(64, 16, 8), (32, 16, 4)], 128: [(64, 16, 8)]},
}


def candidates(rows: int, locations: int, kernel: int, device: torch.device, mode: str):
    block_k = min(next_power_of_2(kernel), 128)
    k_tiles = cdiv(kernel, block_k)
    configs = []
    for block_r, block_i, warps in _TILES["fma" if mode == "fma" else "mma"][block_k]:
        tiles = cdiv(rows, block_r) * k_tiles
        # split the locations until the grid fills the GPU twice, keeping >= 4 steps per program; also
        # half that (fewer atomic partial sums: the faster one on some 3×3 layers)
        split = max(1, min(cdiv(2 * multiprocessors(device), tiles), locations // (4 * block_i)))
        for s in dict.fromkeys((split, cdiv(split, 2))):
            configs.append(MeanConfig(block_r, block_i, block_k, warps, s))
    return configs


def _visited(size: int, stride: int, pad: int, outputs: int) -> slice:
    """The input locations ``o·S − P`` (``0 ≤ o < O``) inside ``[0, size)`` along one dim, as a slice."""
    first = -(-pad // stride)  # the first output whose location is not in the left padding
    last = min(outputs - 1, (size - 1 + pad) // stride)
    if last < first:
        return slice(0, 0)
    return slice(first * stride - pad, last * stride - pad + 1, stride)


def pointwise_means(x: torch.Tensor, geometry: KernelGeometry) -> torch.Tensor:
    """:func:`patch_means` of a kernel-size-1 geometry: ``[N, C_in]`` float32, the sum of the visited
    locations (a strided view of ``x``, no copy) over ``∏O`` (the padded locations count as zeros)."""
    if geometry.kernel_numel != 1:
        raise ValueError(f"pointwise_means needs kernel size 1, got {geometry.kernel_size}")
    n, c = x.shape[:2]
    view = x.reshape(n, c, *geometry.input_size)[(slice(None), slice(None), *(
        _visited(i, s, p, o) for i, s, p, o in
        zip(geometry.input_size, geometry.stride, geometry.pad_left, geometry.output_size)))]
    return view.sum((2, 3, 4), dtype=torch.float32).div_(geometry.output_numel)


def patch_means(x: torch.Tensor, geometry: KernelGeometry, precision: str, config: MeanConfig = None,
                mode: str = None) -> torch.Tensor:
    """``ū`` as ``[N, C_in · ∏K]`` float32 (rows of one sample ordered ``(g, c, k)`` like the factor).

    Kernel size 1 without a forced ``config`` or ``mode``: :func:`pointwise_means` (PyTorch's reduction)."""
    if geometry.kernel_numel == 1 and config is None and mode is None:
        return pointwise_means(x, geometry)
    x = x.contiguous()
    rows, locations, kernel = x.shape[0] * geometry.in_channels, geometry.input_numel, geometry.kernel_numel
    mode = mode or _mode(precision, x.dtype)
    active = sum(1 << j for j in range(3) if geometry.input_size[j] > 1 or geometry.kernel_size[j] > 1)

    def launch(cfg: MeanConfig):
        atomic = cfg.split > 1
        out = torch.zeros((rows, kernel), device=x.device, dtype=torch.float32) if atomic else \
            torch.empty((rows, kernel), device=x.device, dtype=torch.float32)
        i_per_split = cdiv(cdiv(locations, cfg.split), cfg.block_i) * cfg.block_i
        grid = (cdiv(rows, cfg.block_r), cdiv(kernel, cfg.block_k), cdiv(locations, i_per_split))
        _launch_patch_mean(
            grid,
            x, out, 1.0 / geometry.output_numel,
            rows, locations, kernel, i_per_split,
            *geometry.spatial_args(),
            int(atomic),
            BLOCK_R=cfg.block_r, BLOCK_I=cfg.block_i, BLOCK_K=cfg.block_k, MODE=mode, num_warps=cfg.num_warps,
            ACTIVE=active,
        )
        return out

    if config is None:
        key = (rows, locations, kernel, geometry, x.dtype, mode, x.device.type)
        config = _CACHE.choose(key, lambda: candidates(rows, locations, kernel, x.device, mode), launch, x.device)
    return launch(config).view(x.shape[0], geometry.in_channels * kernel)


#: largest patch-mean buffer ``ū`` (bytes) one call holds; larger ``ū`` are made and reduced in chunks of
#: samples (the factor's only extra memory: at most 1 MiB on every layer)
MEANS_CHUNK_BYTES = 2**20


def kfac_reduce_factor(x: torch.Tensor, geometry: KernelGeometry, precision: str,
                       config: MeanConfig = None, mode: str = None, chunk_bytes: float = None) -> torch.Tensor:
    """``[G, D, D]`` KFAC-reduce factor in ``x.dtype``: :func:`patch_means`, then their Gram ``/N``.

    ``ū`` is made for chunks of samples of at most ``chunk_bytes`` (default :data:`MEANS_CHUNK_BYTES`;
    at least one sample), each chunk's Gram added into one float32 factor."""
    batch, rows = x.shape[0], geometry.in_channels * geometry.kernel_numel
    limit = MEANS_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    samples = max(1, min(batch, int(limit // (4 * rows))))  # ū is float32
    trivial = trivial_geometry(geometry.groups, rows)
    if samples == batch:
        means = patch_means(x, geometry, precision, config, mode)
        return finish(kfc_factor(means, trivial, precision, 1.0 / batch), x.dtype)
    factor = torch.zeros((geometry.groups, geometry.rows, geometry.rows), device=x.device, dtype=torch.float32)
    for start in range(0, batch, samples):
        means = patch_means(x[start:start + samples], geometry, precision, config, mode)
        kfc_factor(means, trivial, precision, 1.0 / batch, out=factor)
        del means  # the next chunk's buffer reuses its memory
    return finish(factor, x.dtype)
