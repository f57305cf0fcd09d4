"""GGN diagonal of a convolution weight from sample chunks of the unfolded input (dense operands).

The gathered kernel of :mod:`.weight_diag` builds every patch tile from ``x`` with per-element
address arithmetic and bounds masks; that keeps its tiles small (the addresses live in registers)
and its matrix units starved (about 40 TFLOP/s in TF32 on an H100). Here a chunk of samples is
first unfolded into a dense buffer ``U [n, G, O, D]`` (``D`` contiguous; one gather kernel on CUDA,
:mod:`.unfold`, else one strided copy), and the kernel is a plain tiled product with a squaring epilogue:

    for each sample n:   J = S_n U_nᵀ          rows (column c, output channel co), K = output locations
                         acc += J ⊙ J         in registers
    result[co, d] += Σ_c acc[(c, co), d]      once per program

The loops over samples and location blocks are either nested or one flat loop (``flat``, chosen per
shape by the autotuner): the flat loop lets the software pipeline load the next sample's tiles
while the squares of this one are added, which pays where a sample has only a few location blocks.

On Hopper GPUs and newer (``tma``, :func:`tma_supported`) the tiles are loaded by the tensor memory
accelerator from host-side descriptors, and the chunk is unfolded K-major, ``U [n, G, D, O]`` (locations
contiguous): both operands then reach the matrix units from shared memory in the layout TF32
``wgmma`` reads without a transpose. On an H100 this doubles the TF32 rate on All-CNN-C (conv2 with
100 columns: 130 → 241 TFLOP/s; ``benchmarks/results/h100-2026-11-22-session13``). The descriptors
zero-fill what lies outside ``S`` (columns past ``C``, locations past ``O``) and outside the chunk, so
no masks are needed; rows of ``S`` past a group's channels read the next group's channels, which only
reach result rows the store masks out.

A program owns ``BLOCK_C`` columns × ``BLOCK_CO`` channels × ``BLOCK_D`` weight columns of one
group and loops over the chunk's samples; the per-(column, sample) gradients ``J`` never leave
registers. Programs that share a result tile (other column blocks, other chunks, split batches) add
into a zeroed float32 buffer atomically, so the last bits may vary between runs.

Extra memory: the unfolded chunk (at most :func:`._host.unfolded_chunk_bytes`, 64 MiB, or one sample's
patches if larger: independent of ``C`` and ``N``) and the float32 result.

Imported only when Triton is importable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import jacobian_rows, mma
from ._geometry import KernelGeometry
from ._host import (TMA_ALIGNMENT, cdiv, compute_capability, multiprocessors, next_power_of_2, tma_shape_ok,
                    unfolded_chunk_bytes)
from ._launch import Launcher
from . import unfold
from ._triton import INTERPRET

try:  # host-side tensor-memory-accelerator descriptors (Triton >= 3.3)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # older Triton: the pointer form only
    TensorDescriptor = None

def tma_supported(device: torch.device) -> bool:
    """Whether the TMA form of the kernel can run on ``device``: a CUDA GPU of compute capability 9.0
    or newer, Triton's host-side descriptors, not the interpreter."""
    return (TensorDescriptor is not None and not INTERPRET and device.type == "cuda"
            and compute_capability(device) >= (9, 0))




@triton.jit
def _product_step(u_src, s_src, J, n, s_n, o0, s_rows, valid_r, u_cols, valid_d, OT, D, ssn, sso, sun, tma_s_row,
                  tma_co0, tma_u_row, tma_c0, tma_d0, BLOCK_C: tl.constexpr, BLOCK_CO: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_O: tl.constexpr, EVEN_O: tl.constexpr, PRECISION: tl.constexpr,
                  TMA: tl.constexpr, S_CL: tl.constexpr):
    """``J + S[rows, s_n, o0:o0+BLOCK_O] @ U[n, o0:o0+BLOCK_O, cols]`` (one step of the location loop;
    ``n`` counts the chunk's samples, ``s_n`` is the same sample's index in ``S``).

    ``TMA``: ``s_src`` and ``u_src`` are descriptors of ``S [C, N·C_out, O]`` (``S_CL``: ``S [C, N, O, C_out]``,
    a channels-last ``S`` of 16-bit entries, whose tile is transposed for the product) and ``U [n·G, D, O]``;
    the tiles start at ``(tma_c0, tma_s_row, o0)`` (``S_CL``: ``(tma_c0, s_n, o0, tma_co0)``) and
    ``(tma_u_row, tma_d0, o0)``; else pointers, ``S``'s locations ``sso`` apart (1, or ``C_out`` where ``S``
    is stored channels last)."""
    if TMA and S_CL:
        s_cl = tl.reshape(s_src.load([tma_c0, s_n, o0, tma_co0]), (BLOCK_C, BLOCK_O, BLOCK_CO))
        s_tile = tl.reshape(tl.permute(s_cl, (0, 2, 1)), (BLOCK_C * BLOCK_CO, BLOCK_O))
        u_tile = tl.trans(tl.reshape(u_src.load([tma_u_row, tma_d0, o0]), (BLOCK_D, BLOCK_O)))
    elif TMA:
        s_tile = tl.reshape(s_src.load([tma_c0, tma_s_row, o0]), (BLOCK_C * BLOCK_CO, BLOCK_O))
        u_tile = tl.trans(tl.reshape(u_src.load([tma_u_row, tma_d0, o0]), (BLOCK_D, BLOCK_O)))
    else:
        s_sample = s_src + tl.cast(s_n, tl.int64) * ssn + s_rows
        u_sample = u_src + tl.cast(n, tl.int64) * sun + u_cols
        o = o0 + tl.arange(0, BLOCK_O)
        if EVEN_O:
            s_tile = tl.load(s_sample[:, None] + (o * sso)[None, :], mask=valid_r[:, None], other=0.0)
            u_tile = tl.load(u_sample[None, :] + (o * D)[:, None], mask=valid_d[None, :], other=0.0)
        else:
            valid_o = o < OT
            s_tile = tl.load(s_sample[:, None] + (o * sso)[None, :], mask=valid_r[:, None] & valid_o[None, :],
                             other=0.0)
            u_tile = tl.load(u_sample[None, :] + (o * D)[:, None], mask=valid_o[:, None] & valid_d[None, :],
                             other=0.0)
    return mma(s_tile, u_tile, J, PRECISION)


@triton.jit
def _add_squares(J, acc, out_tile, n, out_row_stride, out_mask, PER_SAMPLE: tl.constexpr, BLOCK_C: tl.constexpr,
                 BLOCK_CO: tl.constexpr, BLOCK_D: tl.constexpr):
    """Add the squares of one sample's complete ``J`` to ``acc``, or (per-sample diagonals) their column
    sum to the sample's own slice of the result."""
    if PER_SAMPLE:
        squares = tl.sum(tl.reshape(J * J, (BLOCK_C, BLOCK_CO, BLOCK_D)), axis=0)
        tl.atomic_add(out_tile + tl.cast(n, tl.int64) * out_row_stride, squares, mask=out_mask, sem="relaxed")
    else:
        acc += J * J
    return acc


@triton.jit(do_not_specialize=["C", "COG", "D", "n_offset", "n_per_split", "n_count", "d_tiles", "co_tiles",
                               "out_row_stride", "ssn", "sun", "sug"])
def _ggn_diag_unfolded_kernel(
    u_src, s_src, out_ptr,
    C, COG, D, OT, n_offset, n_count, n_per_split, d_tiles, co_tiles, out_row_stride,
    ssc, ssn, ssch, sso, sun, sug,
    PER_SAMPLE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_O: tl.constexpr, EVEN_O: tl.constexpr, PRECISION: tl.constexpr, FLAT: tl.constexpr, TMA: tl.constexpr,
    S_CL: tl.constexpr,
):
    pid = tl.program_id(0)
    d_tile = pid % d_tiles
    rest = pid // d_tiles
    co_tile = rest % co_tiles
    c_block = rest // co_tiles
    g = tl.program_id(1)
    split = tl.program_id(2)

    d = d_tile * BLOCK_D + tl.arange(0, BLOCK_D)
    valid_d = d < D
    r_c, r_co = jacobian_rows(co_tile, BLOCK_C, BLOCK_CO)
    r_c += c_block * BLOCK_C
    valid_r = (r_c < C) & (r_co < COG)
    s_rows = r_c.to(tl.int64) * ssc + (g * COG + r_co).to(tl.int64) * ssch
    u_cols = g.to(tl.int64) * sug + d

    # TMA tile origins: S rows (column block, sample n's channels of this tile), U rows (n, g)
    G = tl.num_programs(1)
    c0 = c_block * BLOCK_C
    d0 = d_tile * BLOCK_D
    channel0 = g * COG + co_tile * BLOCK_CO
    channels = ssn // ssch  # C_out (used by the TMA form, which reads S with the locations contiguous)

    co = co_tile * BLOCK_CO + tl.arange(0, BLOCK_CO)
    out_mask = (co < COG)[:, None] & valid_d[None, :]
    out_tile = out_ptr + (g * COG + co)[:, None] * D + d[None, :]

    acc = tl.zeros((BLOCK_C * BLOCK_CO, BLOCK_D), dtype=tl.float32)
    n_start = split * n_per_split
    n_end = tl.minimum(n_count, n_start + n_per_split)
    if FLAT:
        # one loop over (sample, location block): the software pipeline prefetches the next sample's
        # tiles while this one's squares are added (layers with few locations run 2-4 steps per sample)
        o_steps = tl.cdiv(OT, BLOCK_O)
        J = tl.zeros((BLOCK_C * BLOCK_CO, BLOCK_D), dtype=tl.float32)
        for step in range(0, (n_end - n_start) * o_steps):
            sample = step // o_steps
            o0 = (step - sample * o_steps) * BLOCK_O
            n = n_start + sample
            J = _product_step(u_src, s_src, J, n, n_offset + n, o0, s_rows, valid_r, u_cols, valid_d, OT, D, ssn,
                              sso, sun, (n_offset + n) * channels + channel0, channel0, n * G + g, c0, d0,
                              BLOCK_C, BLOCK_CO, BLOCK_D, BLOCK_O, EVEN_O, PRECISION, TMA, S_CL)
            if o0 + BLOCK_O >= OT:  # the sample's last location block: J is complete
                acc = _add_squares(J, acc, out_tile, n_offset + n, out_row_stride, out_mask, PER_SAMPLE, BLOCK_C,
                                   BLOCK_CO, BLOCK_D)
                J = tl.zeros((BLOCK_C * BLOCK_CO, BLOCK_D), dtype=tl.float32)
    else:
        for n in range(n_start, n_end):
            J = tl.zeros((BLOCK_C * BLOCK_CO, BLOCK_D), dtype=tl.float32)
            for o0 in range(0, OT, BLOCK_O):
                J = _product_step(u_src, s_src, J, n, n_offset + n, o0, s_rows, valid_r, u_cols, valid_d, OT, D, ssn,
                                  sso, sun, (n_offset + n) * channels + channel0, channel0, n * G + g, c0, d0,
                                  BLOCK_C, BLOCK_CO, BLOCK_D, BLOCK_O, EVEN_O, PRECISION, TMA, S_CL)
            acc = _add_squares(J, acc, out_tile, n_offset + n, out_row_stride, out_mask, PER_SAMPLE, BLOCK_C, BLOCK_CO,
                               BLOCK_D)

    if not PER_SAMPLE:
        squares = tl.sum(tl.reshape(acc, (BLOCK_C, BLOCK_CO, BLOCK_D)), axis=0)
        tl.atomic_add(out_tile, squares, mask=out_mask, sem="relaxed")


_launch = Launcher(_ggn_diag_unfolded_kernel, specialised=["OT", "ssc", "ssch", "sso"])


@dataclass(frozen=True)
class UnfoldedGGNConfig:
    """Tile of the unfolded-chunk GGN kernel: ``block_c·block_co`` rows of ``J``, ``block_d`` weight
    columns, ``block_o`` output locations per product step."""

    block_c: int
    block_co: int
    block_d: int
    block_o: int
    num_warps: int
    num_stages: int
    flat: bool = False  # one loop over (sample, location block) instead of nested loops
    tma: bool = False  # TMA loads, K-major chunk (Hopper and newer, see tma_supported)


#: ``(rows of J, block_co max, block_d, block_o, num_warps, num_stages, flat)`` per matrix-unit class,
#: best guess first (see :func:`.gram.unit_class`). The fastest of 8-13 tiles on All-CNN-C's layers
#: (H100, Triton 3.6, C = 100, N = 128; ``benchmarks/results/h100-2026-11-22-session9``, files
#: ``ggn_unfolded_tiles*``): TF32 126 TFLOP/s on conv2 with the first; the second and third on 256
#: locations and on the layers with 36-64; the fourth on D = 1728 (conv5, 122 TFLOP/s). The flat loop
#: (eleventh session, ``h100-2026-11-22-session11/flat_ggn_h100.txt``) wins where a sample has few
#: location blocks: TF32 conv6 (64 locations) 7.2 → 5.4 ms, conv7 (36) 6.9 → 5.3 ms, float32 FMA
#: conv7-9 by 6-10 %; it loses on 1024 locations (conv2 17.3 → 19.4 ms), so both are candidates
_TILES = {
    "fma": [(128, 32, 128, 16, 8, 3, False), (64, 32, 128, 16, 8, 3, False), (128, 32, 128, 16, 8, 3, True)],
    "mma": [(128, 32, 128, 32, 8, 3, False), (128, 32, 128, 16, 8, 4, False), (128, 64, 128, 16, 8, 4, False),
            (128, 32, 256, 16, 8, 3, False), (128, 32, 128, 32, 8, 3, True), (128, 32, 128, 16, 8, 4, True),
            (128, 64, 128, 16, 8, 4, True)],
    "mma3": [(64, 32, 64, 16, 4, 3, False), (128, 32, 64, 16, 8, 3, False)],
}


#: TMA tiles (K-major chunk), same fields, per matrix-unit class; tried first where TMA runs. The fastest
#: on All-CNN-C's layers (H100, Triton 3.6, TF32, ``h100-2026-11-22-session13/tma_layouts_experiment_h100.txt``): 64
#: locations per step on 256-1024 locations (three stages: four do not fit shared memory), 32 with the
#: flat loop on 36-64; 16 or two column blocks of 64 channels on the small layers with 10 columns
_TMA_TILES = {
    "mma": [(128, 32, 128, 64, 8, 3, False), (128, 32, 128, 32, 8, 4, False), (128, 32, 128, 32, 8, 3, True),
            (128, 32, 128, 16, 8, 4, False), (128, 64, 128, 16, 8, 4, True)],
    "mma3": [(128, 32, 128, 32, 8, 3, False), (128, 32, 128, 32, 8, 3, True)],
}

#: TMA tiles for 16-bit operands (bf16 column passes, half models), tried before the others: twice the
#: locations per step of the TF32 tiles fit shared memory, and the flat loop wins on every All-CNN-C layer
#: with 21 columns (H100, Triton 3.6, channels-last bf16 ``S``; ``h100-2026-11-22-session17/ggn_tiles.txt``:
#: 128 locations and four stages 252-276 → 292-329 TFLOP/s on 256-1024 locations, 64 on the 8×8 layers)
_TMA_TILES_16BIT = [(128, 32, 128, 128, 8, 4, True), (128, 32, 128, 64, 8, 4, True)]


def candidates(columns: int, out_per_group: int, rows: int, locations: int, unit: str, tma: bool = False,
               sixteen_bit: bool = False):
    """Tiles for ``columns`` columns, ``out_per_group`` output channels per group, ``rows`` = ``D`` and
    ``locations`` = ``O`` on the matrix-unit class ``unit``, best guess first (the TMA tiles first when
    ``tma``: see :func:`tma_supported` and :func:`tma_shape_ok`; those for 16-bit operands before them
    with ``sixteen_bit``); none when one sample's unfolded group has ``2³¹`` entries or more (the kernel's
    in-sample offsets are 32-bit)."""
    if locations * rows >= 2**31:
        return []
    tma_tiles = (_TMA_TILES_16BIT if sixteen_bit and unit == "mma" else []) + _TMA_TILES.get(unit, [])
    entries = [(*entry, True) for entry in tma_tiles] if tma else []
    entries += [(*entry, False) for entry in _TILES[unit]]
    configs = []
    for rows_of_j, co_max, block_d, block_o, warps, stages, flat, use_tma in entries:
        block_co = min(next_power_of_2(out_per_group, minimum=1), co_max)
        block_c = max(cdiv(16, block_co), min(rows_of_j // block_co, next_power_of_2(columns, minimum=1)))
        block_d = min(block_d, next_power_of_2(rows))
        block_o = min(block_o, next_power_of_2(locations))
        configs.append(UnfoldedGGNConfig(block_c, block_co, block_d, block_o, warps, stages, flat, use_tma))
    return list(dict.fromkeys(configs))


def unfold_chunk(x: torch.Tensor, geometry: KernelGeometry, out: torch.Tensor, k_major: bool = False) -> torch.Tensor:
    """Write the unfolded input of the samples ``x [n, C_in, *I]`` into ``out [n, G, O, D]`` (``k_major``:
    ``[n, G, D, O]``; ``out`` may be a slice of a padded buffer) in one strided copy, rows
    ``d = (c, k0, k1, k2)`` ordered like ``weight.flatten(1)``, and return it."""
    _unfold_target(out, geometry, k_major).copy_(unfolded_view(x, geometry, k_major))
    return out


def _unfold_target(out: torch.Tensor, geometry: KernelGeometry, k_major: bool) -> torch.Tensor:
    """``out [n, G, O, D]`` (``k_major``: ``[n, G, D, O]``) with ``D`` and ``O`` unflattened to the axes of
    :func:`unfolded_view`."""
    rows, locations = (geometry.channels_per_group, *geometry.kernel_size), geometry.output_size
    if k_major:
        return out.unflatten(3, locations).unflatten(2, rows)
    return out.unflatten(3, rows).unflatten(2, locations)


def _input_pads(geometry: KernelGeometry):
    """``(left, right)`` zeros per spatial axis that the windows reach beyond the input."""
    pads = []
    for i, k, st, dl, p, o in zip(geometry.input_size, geometry.kernel_size, geometry.stride, geometry.dilation,
                                  geometry.pad_left, geometry.output_size):
        pads.append((p, max(0, (o - 1) * st + (k - 1) * dl + 1 - i - p)))
    return pads


def unfolded_view(x: torch.Tensor, geometry: KernelGeometry, k_major: bool = False) -> torch.Tensor:
    """The unfolded input of ``x [n, C_in, *I]`` as a strided view (of ``x``, or of a padded copy where the
    convolution pads): ``[n, G, C_in/G, K0, K1, K2, O0, O1, O2]`` for ``k_major``, else
    ``[n, G, O0, O1, O2, C_in/G, K0, K1, K2]``. Slices along ``n`` are the samples' unfolded inputs."""
    n = x.shape[0]
    spatial = x.reshape(n, geometry.in_channels, *geometry.input_size)
    pads = _input_pads(geometry)
    if any(p != (0, 0) for p in pads):
        spatial = F.pad(spatial, [v for pair in reversed(pads) for v in pair])
    windows = spatial
    for axis, (k, st, dl) in enumerate(zip(geometry.kernel_size, geometry.stride, geometry.dilation)):
        windows = windows.unfold(2 + axis, dl * (k - 1) + 1, st)[..., ::dl]
    o0, o1, o2 = geometry.output_size
    windows = windows[:, :, :o0, :o1, :o2]  # [n, C, O0, O1, O2, K0, K1, K2]
    windows = windows.unflatten(1, (geometry.groups, geometry.channels_per_group))
    if k_major:
        return windows.permute(0, 1, 2, 6, 7, 8, 3, 4, 5)
    return windows.permute(0, 1, 3, 4, 5, 2, 6, 7, 8)


def channels_last_view(s: torch.Tensor):
    """``s [C, N, C_out, *O]`` as a ``[C, N, O, C_out]`` view where its memory is in that order (messages
    of a channels-last backward pass: :class:`curvlib.engine.batched_rules.BackwardOptions`), else ``None``."""
    if s.dim() < 4 or s.stride(2) != 1:
        return None
    moved = s.movedim(2, -1)
    return moved.reshape(s.shape[0], s.shape[1], -1, s.shape[2]) if moved.is_contiguous() else None


def channels_last_tma_ok(s_cl: torch.Tensor, block_co: int) -> bool:
    """Whether TMA can read ``s_cl [C, N, O, C_out]`` (:func:`channels_last_view`) in tiles of ``block_co``
    channels: 16-bit entries (the product takes the transposed tile from shared memory), a 16-byte aligned
    address and strides, and tiles of at least 16 bytes along the channels."""
    size = s_cl.element_size()
    return (size == 2 and block_co * size >= TMA_ALIGNMENT and s_cl.data_ptr() % TMA_ALIGNMENT == 0
            and all(stride * size % TMA_ALIGNMENT == 0 for stride in s_cl.stride()[:-1]))


def chunk_samples(batch: int, geometry: KernelGeometry, element_size: int, chunk_bytes: float) -> int:
    """Samples per unfolded chunk: as many as fit ``chunk_bytes``, at least one."""
    per_sample = geometry.groups * geometry.output_numel * geometry.rows * element_size
    return max(1, min(batch, int(chunk_bytes // per_sample)))


def _aligned(length: int, element_size: int) -> int:
    """``length`` rounded up to a multiple of 16 bytes."""
    step = max(1, TMA_ALIGNMENT // element_size)
    return cdiv(length, step) * step


@dataclass(frozen=True)
class _Plan:
    """The host side of one :func:`ggn_diag` call: everything fixed by the operands' shapes, strides,
    dtypes, devices and ``s``'s alignment, and by the arguments (computed once per such signature: the
    engine calls the kernel with the same shapes for every chunk of columns, and this Python costs
    about as much host time as the launches)."""

    s_cl: Optional[tuple]  # (shape, strides) of the [C, N, O, C_out] view of a channels-last s, else None
    tma: bool
    tma_cl: bool
    unit_dtype: torch.dtype
    buffer_shape: tuple  # [samples, G, rows, O aligned] (TMA) or [samples, G, O, rows]
    out_shape: tuple
    gather: bool  # the gather kernel unfolds (else a strided copy from the window view)
    pads: bool
    chunks: tuple  # (first sample, samples, samples per batch slice, slices) per sample chunk
    grid: tuple  # (programs per group, G)
    arguments: tuple  # the launch's integers before the chunk's, and after them
    constexprs: tuple


_PLANS: Dict[tuple, _Plan] = {}
_MAX_PLANS = 1024


def ggn_diag(x: torch.Tensor, s: torch.Tensor, geometry: KernelGeometry, per_sample: bool, precision: str,
             config: UnfoldedGGNConfig, chunk_bytes: float = None, split: int = None,
             bias: bool = False) -> torch.Tensor:
    """GGN diagonal as a float32 ``[N or 1, C_out·D]`` buffer (see the module docstring).

    ``bias``: the bias's diagonal as well, as ``[N or 1, C_out·(D + 1)]`` with the bias in each channel's
    last entry — the unfolded chunk gets a row of ones, whose products are the columns' sums over output
    locations (no second pass over ``s``; the row fits the padding of the last row tile on most layers).

    The chunk is unfolded in bfloat16 for ``precision="bf16"`` (the products round to it anyway), else
    in ``x.dtype``. ``chunk_bytes`` (default :func:`._host.unfolded_chunk_bytes`) and ``split`` (batch
    slices per chunk) force the chunking (tests). A TMA ``config`` whose requirements this ``s`` does not
    meet (16-byte aligned address and location stride) runs the same tile with pointer loads.
    """
    chunk_bytes = unfolded_chunk_bytes() if chunk_bytes is None else chunk_bytes
    key = (x.shape, x.stride(), x.dtype, x.device, s.shape, s.stride(), s.dtype, s.data_ptr() % TMA_ALIGNMENT,
           geometry, per_sample, precision, config, chunk_bytes, split, bias)
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        plan = _PLANS[key] = _make_plan(x, s, geometry, per_sample, precision, config, chunk_bytes, split, bias)
    return _run(plan, x, s, geometry)


def _make_plan(x: torch.Tensor, s: torch.Tensor, geometry: KernelGeometry, per_sample: bool, precision: str,
               config: UnfoldedGGNConfig, chunk_bytes: float, split: Optional[int], bias: bool) -> _Plan:
    columns, batch = s.shape[0], s.shape[1]
    G, COG, D, OT = geometry.groups, geometry.out_channels_per_group, geometry.rows, geometry.output_numel
    s_cl = channels_last_view(s)  # [C, N, O, C_out] where s is stored channels last, else None
    if s_cl is None:
        s = s.contiguous()  # what _run reads (the strides below are its)
    unit_dtype = torch.bfloat16 if precision == "bf16" else x.dtype
    unit_size = torch.finfo(unit_dtype).bits // 8
    # the TMA form reads S's tiles with the locations contiguous: TF32 wgmma takes its shared-memory
    # operands K-major only (a channels-last tile, permuted for the product, made Triton 3.6 emit an
    # illegal instruction on an H100). 16-bit operands may be transposed in shared memory: a channels-last
    # S of 16-bit entries (bf16 column passes) is read by TMA as [C, N, O, C_out] tiles (channel blocks of
    # at least 16 bytes); other channels-last S run the pointer form
    tma_cl = config.tma and s_cl is not None and channels_last_tma_ok(s_cl, config.block_co) \
        and tma_supported(x.device)
    tma = tma_cl or (config.tma and s_cl is None and tma_supported(x.device) and tma_shape_ok(OT, s.element_size())
                     and s.data_ptr() % TMA_ALIGNMENT == 0)
    samples = chunk_samples(batch, geometry, unit_size, chunk_bytes)
    rows = D + 1 if bias else D  # the kernel's D: the unfolded rows, with the bias's row of ones last
    weight_numel = geometry.out_channels * rows
    # K-major for TMA, each sample-group's rows padded to 16 bytes (the descriptor's stride)
    buffer_shape = (samples, G, rows, _aligned(OT, unit_size)) if tma else (samples, G, OT, rows)
    buffer_strides = (G * buffer_shape[2] * buffer_shape[3], buffer_shape[2] * buffer_shape[3])
    d_tiles, co_tiles = cdiv(rows, config.block_d), cdiv(COG, config.block_co)
    programs = d_tiles * co_tiles * cdiv(columns, config.block_c) * G
    chunks = []
    for n0 in range(0, batch, samples):
        n = min(batch, n0 + samples) - n0
        slices = split or max(1, min(n, cdiv(2 * multiprocessors(x.device), programs)))
        n_per_split = cdiv(n, slices)
        chunks.append((n0, n, n_per_split, cdiv(n, n_per_split)))
    return _Plan(
        s_cl=None if s_cl is None else (tuple(s_cl.shape), s_cl.stride()),
        tma=tma,
        tma_cl=tma_cl,
        unit_dtype=unit_dtype,
        buffer_shape=buffer_shape,
        out_shape=(batch if per_sample else 1, weight_numel),
        gather=unfold.supported(x, x),  # the chunk buffer is on x's device
        pads=any(pair != (0, 0) for pair in _input_pads(geometry)),
        chunks=tuple(chunks),
        grid=(programs // G, G),
        arguments=((columns, COG, rows, OT),
                   (d_tiles, co_tiles, weight_numel, s.stride(0), s.stride(1), 1 if s_cl is not None else OT,
                    geometry.out_channels if s_cl is not None else 1, *buffer_strides)),
        constexprs=tuple(dict(
            PER_SAMPLE=per_sample, BLOCK_C=config.block_c, BLOCK_CO=config.block_co, BLOCK_D=config.block_d,
            BLOCK_O=config.block_o, EVEN_O=OT % config.block_o == 0, PRECISION=precision,
            FLAT=config.flat, TMA=tma, S_CL=tma_cl, num_warps=config.num_warps, num_stages=config.num_stages,
        ).items()),
    )


def _run(plan: _Plan, x: torch.Tensor, s: torch.Tensor, geometry: KernelGeometry) -> torch.Tensor:
    """One call of :func:`ggn_diag` by its plan: the buffers, the descriptors, per sample chunk an unfold and
    a launch."""
    D, OT = geometry.rows, geometry.output_numel
    if plan.s_cl is None:
        s = s.contiguous()
    buffer = torch.empty(plan.buffer_shape, device=x.device, dtype=plan.unit_dtype)
    if plan.tma:
        buffer = buffer[..., :OT]
        if plan.buffer_shape[2] > D:  # the bias's row of ones
            buffer[:, :, D].fill_(1)
        patches = buffer[:, :, :D]
    else:
        if plan.buffer_shape[3] > D:
            buffer[..., D].fill_(1)
        patches = buffer[..., :D]
    out = torch.zeros(plan.out_shape, device=x.device, dtype=torch.float32)
    # built once per call, not per chunk: the unfold target, the descriptors of all of S and the whole
    # buffer (the kernel offsets S's rows by the chunk's first sample and reads only the chunk's rows of
    # the buffer), and the window view where it is one of x (a padded input is padded chunk by chunk: a
    # padded copy of all of x would be extra memory of x's size)
    target = None if plan.gather else _unfold_target(patches, geometry, k_major=plan.tma)
    windows = None if plan.pads or plan.gather else unfolded_view(x, geometry, k_major=plan.tma)
    constexprs = dict(plan.constexprs)
    if plan.tma:
        if plan.tma_cl:
            s_cl = s.as_strided(*plan.s_cl, s.storage_offset())  # the [C, N, O, C_out] view
            s_src = TensorDescriptor(s_cl, list(s_cl.shape), list(s_cl.stride()),
                                     [constexprs["BLOCK_C"], 1, constexprs["BLOCK_O"], constexprs["BLOCK_CO"]])
        else:
            s_rows = s.view(s.shape[0], s.shape[1] * geometry.out_channels, OT)  # [C, N·C_out, O]
            s_src = TensorDescriptor(s_rows, list(s_rows.shape), list(s_rows.stride()),
                                     [constexprs["BLOCK_C"], constexprs["BLOCK_CO"], constexprs["BLOCK_O"]])
        u_rows = buffer.flatten(0, 1)  # [samples·G, D, O]
        u_src = TensorDescriptor(u_rows, list(u_rows.shape), list(u_rows.stride()),
                                 [1, constexprs["BLOCK_D"], constexprs["BLOCK_O"]])
    else:
        s_src, u_src = s, buffer
    before, after = plan.arguments
    for n0, n, n_per_split, slices in plan.chunks:
        if plan.gather:
            unfold.unfold_into(x, geometry, patches[:n], n0, k_major=plan.tma)
        else:
            target[:n].copy_(unfolded_view(x[n0:n0 + n], geometry, plan.tma) if plan.pads else windows[n0:n0 + n])
        _launch((*plan.grid, slices), u_src, s_src, out, *before, n0, n, n_per_split, *after, **constexprs)
    return out
