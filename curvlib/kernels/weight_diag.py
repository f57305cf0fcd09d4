"""Weight-shaped diagonals of a convolution: GGN diagonal and HesScale, without per-sample gradients.

GGN diagonal ``Σ_{c,n} J_{c,n}[co, d]²`` with ``J_{c,n} = s_{c,n} ⟦X_n⟧ᵀ`` (``s_{c,n}`` is ``[C_out/G, O]``
per group, ``⟦X_n⟧`` the group's ``[D, O]`` patches). A program owns a ``[BLOCK_CO, BLOCK_D]`` tile
of the result and, per sample, computes ``J`` for ``BLOCK_C`` columns at once as one matrix product
(rows ``(c, co)``, so each gathered patch tile serves ``BLOCK_C`` columns), squares it in registers
and adds the column sum into its accumulator: ``J`` never leaves registers, extra memory does not
depend on ``C·N``. When ``O`` fits one tile (``SINGLE_O``) the patches of a sample are gathered once
for all columns.

HesScale weight diagonal ``Σ_{n,o} d[n, co, o] ⟦X⟧[n, d, o]²``: one matrix product of ``d`` with the
squared patches, reduced over all ``(n, o)``.

``per_sample=True`` keeps one accumulator per sample (grid axis 2 = the batch). Otherwise, when the
weight has too few tiles to fill the GPU, the batch is split over programs that add into a zeroed
float32 result atomically (summation order, and so the last bits, may vary between runs).

The GGN diagonal has a second kernel, :mod:`.ggn_unfolded`: dense products on sample chunks of the
unfolded input (≤ 64 MiB), 2.8-3.3x faster on the matrix units and 1.4-1.5x in float32 FMA on
All-CNN-C's large layers. :func:`ggn_diag` times both kernels' tiles per shape and keeps the fastest.

Imported only when Triton is importable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import jacobian_rows, load_patches, mma, patch_cols, patch_rows, store_tile
from ._geometry import KernelGeometry
from ._host import cdiv, finish, new_output, next_power_of_2, split_count
from ._launch import Launcher
from . import ggn_unfolded
from .autotune import ConfigCache
from .gram import unit_class

_SPATIAL = ["I0", "I1", "I2", "K0", "K1", "K2", "O0", "O1", "O2", "S0", "S1", "S2", "DL0", "DL1", "DL2", "P0", "P1", "P2"]


@triton.jit
def _column_sum_of_squares(J, BLOCK_C: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_D: tl.constexpr):
    """``Σ_c J[(c, co), d]²`` of a ``[BLOCK_C·BLOCK_CO, BLOCK_D]`` tile → ``[BLOCK_CO, BLOCK_D]``."""
    squares = J * J
    if BLOCK_C == 1:
        return squares
    return tl.sum(tl.reshape(squares, (BLOCK_C, BLOCK_CO, BLOCK_D)), axis=0)


# the strides of s (OT, ssc, ssn) stay specialised: divisible by 16, its rows load in 16-byte vectors
@triton.jit(do_not_specialize=[
    "C", "N", "COG", "C_G", "D", "KT", "n_per_split", "d_tiles", "out_row_stride",
    "sxn", "sxc", "s0", "s1", "s2", *_SPATIAL, "use_atomic",
])
def _ggn_diag_kernel(
    x_ptr, s_ptr, out_ptr,
    C, N, COG, C_G, D, KT, OT, n_per_split, d_tiles, out_row_stride,
    ssc, ssn, ssch, sxn, sxc, s0, s1, s2,
    I0, I1, I2, K0, K1, K2, O0, O1, O2, S0, S1, S2, DL0, DL1, DL2, P0, P1, P2,
    use_atomic,
    CHECK: tl.constexpr, SINGLE_O: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_CO: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_O: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    d_tile = pid % d_tiles
    co_tile = pid // d_tiles
    g = tl.program_id(1)
    split = tl.program_id(2)

    d = d_tile * BLOCK_D + tl.arange(0, BLOCK_D)
    valid_d = d < D
    off_d, a0, a1, a2 = patch_rows(d, g, C_G, KT, K1, K2, DL0, DL1, DL2, sxc, s0, s1, s2)
    r_c, r_co = jacobian_rows(co_tile, BLOCK_C, BLOCK_CO)
    s_row = (g * COG + r_co).to(tl.int64) * ssch
    valid_co = r_co < COG

    acc = tl.zeros((BLOCK_CO, BLOCK_D), dtype=tl.float32)
    n_start = split * n_per_split
    n_end = tl.minimum(N, n_start + n_per_split)
    for n in range(n_start, n_end):
        s_sample = s_ptr + tl.cast(n, tl.int64) * ssn + s_row
        if SINGLE_O:  # all output locations in one tile: gather the patches once for all columns
            o = tl.arange(0, BLOCK_O)
            valid_o = o < OT
            col, p0, p1, p2 = patch_cols(n, o, O1, O2, S0, S1, S2, P0, P1, P2, sxn, s0, s1, s2)
            u = tl.trans(load_patches(x_ptr, off_d, a0, a1, a2, valid_d, col, p0, p1, p2, valid_o,
                                      I0, I1, I2, CHECK))
            for c0 in range(0, C, BLOCK_C):
                c = c0 + r_c
                valid = valid_co & (c < C)
                s_tile = tl.load(s_sample[:, None] + c.to(tl.int64)[:, None] * ssc + o[None, :],
                                 mask=valid[:, None] & valid_o[None, :], other=0.0)
                J = mma(s_tile, u, tl.zeros((BLOCK_C * BLOCK_CO, BLOCK_D), dtype=tl.float32), PRECISION)
                acc += _column_sum_of_squares(J, BLOCK_C, BLOCK_CO, BLOCK_D)
        else:
            for c0 in range(0, C, BLOCK_C):
                c = c0 + r_c
                valid = valid_co & (c < C)
                s_cols = s_sample + c.to(tl.int64) * ssc
                J = tl.zeros((BLOCK_C * BLOCK_CO, BLOCK_D), dtype=tl.float32)
                for o0 in range(0, OT, BLOCK_O):
                    o = o0 + tl.arange(0, BLOCK_O)
                    valid_o = o < OT
                    col, p0, p1, p2 = patch_cols(n, o, O1, O2, S0, S1, S2, P0, P1, P2, sxn, s0, s1, s2)
                    u = load_patches(x_ptr, off_d, a0, a1, a2, valid_d, col, p0, p1, p2, valid_o,
                                     I0, I1, I2, CHECK)
                    s_tile = tl.load(s_cols[:, None] + o[None, :], mask=valid[:, None] & valid_o[None, :], other=0.0)
                    J = mma(s_tile, tl.trans(u), J, PRECISION)
                acc += _column_sum_of_squares(J, BLOCK_C, BLOCK_CO, BLOCK_D)

    co = co_tile * BLOCK_CO + tl.arange(0, BLOCK_CO)
    ptrs = out_ptr + split * out_row_stride + (g * COG + co)[:, None] * D + d[None, :]
    store_tile(ptrs, acc, (co < COG)[:, None] & valid_d[None, :], use_atomic)


@triton.jit(do_not_specialize=[
    "COG", "C_G", "D", "KT", "OT", "M", "m_per_split", "d_tiles", "out_row_stride",
    "sdn", "sdc", "sxn", "sxc", "s0", "s1", "s2", *_SPATIAL, "use_atomic",
])
def _hesscale_kernel(
    x_ptr, d_ptr, out_ptr,
    COG, C_G, D, KT, OT, M, m_per_split, d_tiles, out_row_stride,
    sdn, sdc, sxn, sxc, s0, s1, s2,
    I0, I1, I2, K0, K1, K2, O0, O1, O2, S0, S1, S2, DL0, DL1, DL2, P0, P1, P2,
    use_atomic,
    CHECK: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    d_tile = pid % d_tiles
    co_tile = pid // d_tiles
    g = tl.program_id(1)
    split = tl.program_id(2)

    d = d_tile * BLOCK_D + tl.arange(0, BLOCK_D)
    valid_d = d < D
    off_d, a0, a1, a2 = patch_rows(d, g, C_G, KT, K1, K2, DL0, DL1, DL2, sxc, s0, s1, s2)
    co = co_tile * BLOCK_CO + tl.arange(0, BLOCK_CO)
    valid_co = co < COG
    d_rows = d_ptr + (g * COG + co).to(tl.int64) * sdc  # d may exceed 2³¹ entries

    acc = tl.zeros((BLOCK_CO, BLOCK_D), dtype=tl.float32)
    m_start = split * m_per_split
    m_end = tl.minimum(M, m_start + m_per_split)
    for m0 in range(m_start, m_end, BLOCK_M):
        m = m0 + tl.arange(0, BLOCK_M)
        valid_m = m < m_end
        n = m // OT
        o = m - n * OT
        col, p0, p1, p2 = patch_cols(n, o, O1, O2, S0, S1, S2, P0, P1, P2, sxn, s0, s1, s2)
        u = load_patches(x_ptr, off_d, a0, a1, a2, valid_d, col, p0, p1, p2, valid_m, I0, I1, I2, CHECK)
        h = tl.load(d_rows[:, None] + (tl.cast(n, tl.int64) * sdn + o)[None, :], mask=valid_co[:, None] & valid_m[None, :], other=0.0)
        acc = mma(h, tl.trans(u * u), acc, PRECISION)

    ptrs = out_ptr + split * out_row_stride + (g * COG + co)[:, None] * D + d[None, :]
    store_tile(ptrs, acc, valid_co[:, None] & valid_d[None, :], use_atomic)


# ----------------------------------------------------------------------------------------------
# launchers

_launch_ggn = Launcher(_ggn_diag_kernel, specialised=["OT", "ssc", "ssn", "ssch"])
_launch_hesscale = Launcher(_hesscale_kernel)


@dataclass(frozen=True)
class GGNConfig:
    block_c: int
    block_co: int
    block_d: int
    block_o: int
    num_warps: int
    num_stages: int = 3


@dataclass(frozen=True)
class HesScaleConfig:
    block_co: int
    block_d: int
    block_m: int
    num_warps: int


_GGN_CACHE = ConfigCache("ggn_diag")
_HESSCALE_CACHE = ConfigCache("hesscale_weight_diag")

#: largest tile of output locations gathered once per sample for all columns
_SINGLE_O_MAX = 64

#: GGN tiles per matrix-unit class (see :func:`.gram.unit_class`), best guess first, chosen from the
#: compiler's report for sm_90 with Triton 3.6 (no register spills): ``(rows of J, block_co max,
#: block_d, num_warps, num_stages)`` when all output locations fit one tile (``block_o`` = their
#: count), else with ``block_o`` after ``block_d``. Rows of ``J`` are (column, channel) pairs: a
#: depthwise layer gets many columns per tile.
_GGN_SINGLE_O = {
    "fma": [(64, 16, 32, 8, 3), (64, 32, 32, 8, 3)],
    "mma": [(64, 32, 128, 8, 3), (64, 32, 64, 8, 3)],
    "mma3": [(32, 32, 32, 8, 3), (64, 16, 32, 8, 3)],
}
_GGN_MULTI_O = {
    "fma": [(128, 32, 64, 32, 8, 2), (128, 16, 64, 32, 8, 2)],
    "mma": [(128, 32, 64, 32, 8, 2), (256, 32, 64, 16, 8, 2)],
    "mma3": [(64, 16, 32, 16, 4, 2), (64, 32, 32, 32, 4, 2)],
}
#: HesScale tiles ``(block_co max, block_d, block_m, num_warps)``
_HESSCALE = {
    "fma": [(64, 64, 16, 8), (32, 64, 16, 4)],
    "mma": [(64, 128, 32, 8), (64, 64, 32, 8)],
    "mma3": [(64, 64, 16, 8), (64, 32, 16, 4)],
}


def ggn_candidates(columns: int, out_per_group: int, rows: int, locations: int, unit: str, tma: bool = False,
                   sixteen_bit: bool = False):
    """Tiles of both GGN kernels, best guess first: the unfolded-chunk kernel's first on the matrix
    units and for float32 FMA with many output locations (where it won on All-CNN-C), else the
    gathered kernel's (``tma``: the unfolded kernel's TMA tiles as well, first; ``sixteen_bit``: the
    products run on 16-bit operands)."""
    gathered = gathered_candidates(columns, out_per_group, rows, locations, unit)
    unfolded = ggn_unfolded.candidates(columns, out_per_group, rows, locations, unit, tma=tma, sixteen_bit=sixteen_bit)
    if unit == "fma" and locations < 128:
        return gathered + unfolded
    return unfolded + gathered


def gathered_candidates(columns: int, out_per_group: int, rows: int, locations: int, unit: str):
    """Tiles of the gathered kernel (:func:`_ggn_diag_kernel`)."""
    single = locations <= _SINGLE_O_MAX
    entries = [(*e[:3], next_power_of_2(locations), *e[3:]) for e in _GGN_SINGLE_O[unit]] if single else \
        list(_GGN_MULTI_O[unit])
    if single and locations & (locations - 1):
        # e.g. 36 locations pad to 64 in one tile: steps of 16 waste less
        entries.append((*_GGN_MULTI_O[unit][0][:3], 16, *_GGN_MULTI_O[unit][0][4:]))
    configs = []
    for rows_of_j, co_max, block_d, block_o, warps, stages in entries:
        block_co = min(next_power_of_2(out_per_group, minimum=1), co_max)
        # at least 16 rows (tl.dot), no more columns than there are
        block_c = max(cdiv(16, block_co), min(rows_of_j // block_co, next_power_of_2(columns, minimum=1)))
        block_d = min(block_d, next_power_of_2(rows))
        configs.append(GGNConfig(block_c, block_co, block_d, block_o, warps, stages))
    return list(dict.fromkeys(configs))


def _weight_strides(geometry: KernelGeometry):
    I0, I1, I2 = geometry.input_size
    return (geometry.in_channels * geometry.input_numel, geometry.input_numel, I1 * I2, I2, 1)


def ggn_diag(x: torch.Tensor, s: torch.Tensor, geometry: KernelGeometry, per_sample: bool, precision: str,
             config: GGNConfig = None, split: int = None, chunk_bytes: float = None,
             bias: bool = False, dtype: torch.dtype = None) -> torch.Tensor:
    """GGN diagonal ``[[N,] C_out, D]`` in ``dtype`` (default ``x.dtype``; see the module docstring); with
    ``bias`` ``[[N,] C_out, D + 1]``, the bias's diagonal last (the unfolded kernel computes it with the
    weight's, the gathered one from the columns' sums over locations).

    ``config`` (a :class:`GGNConfig` or a :class:`.ggn_unfolded.UnfoldedGGNConfig`) and ``split`` force
    the kernel, its tile and the batch split, ``chunk_bytes`` the unfolded kernel's chunk (tests);
    else chosen per shape.
    """
    return prepare_ggn_diag(x, s, geometry, per_sample, precision, config, split, chunk_bytes, bias, dtype)(x, s)


def prepare_ggn_diag(x: torch.Tensor, s: torch.Tensor, geometry: KernelGeometry, per_sample: bool, precision: str,
                     config: GGNConfig = None, split: int = None, chunk_bytes: float = None,
                     bias: bool = False, dtype: torch.dtype = None):
    """:func:`ggn_diag` as a function ``run(x, s)`` of operands with the shapes, strides, dtypes and
    device of these: the kernel and its tile are chosen here (timed on ``x`` and ``s`` on the first call
    for this shape), so repeated calls (every chunk of columns of every step) skip the choice."""
    x = x.contiguous()
    columns, batch = s.shape[0], s.shape[1]
    D = geometry.rows
    # s stored channels last (a channels-last column backpropagation) is read as it is by the unfolded
    # kernel; the gathered kernel reads s [C, N, C_out, O] with the locations contiguous
    channels_last = ggn_unfolded.channels_last_view(s) is not None

    def launch(cfg, x=x, s=s):
        return _launch_ggn_config(x, s, geometry, per_sample, precision, cfg, split, chunk_bytes, bias)

    if config is None:
        key = (columns, batch, geometry, per_sample, x.dtype, precision, x.device.type, channels_last, bias)
        # TMA tiles: S with its locations in 16-byte rows, or channels-last S of 16-bit entries
        tma = ggn_unfolded.tma_supported(x.device) and (
            s.element_size() == 2 if channels_last else ggn_unfolded.tma_shape_ok(geometry.output_numel,
                                                                                  s.element_size()))
        # both operands' tiles 16-bit (the unfolded input is rounded to bf16 under "bf16"; s as it comes)
        sixteen_bit = s.element_size() == 2 and (precision == "bf16" or x.element_size() == 2)
        options = lambda: ggn_candidates(columns, geometry.out_channels_per_group, D, geometry.output_numel,  # noqa: E731
                                         unit_class(precision, x.dtype), tma, sixteen_bit)
        config = _GGN_CACHE.choose(key, options, launch, x.device)
    result_dtype = x.dtype if dtype is None else dtype
    out_channels = geometry.out_channels

    def run(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        out = launch(config, x.contiguous(), s)
        out = out.view(out.shape[0], out_channels, D + 1) if bias else out
        return finish(out if per_sample else out[0], result_dtype)

    return run


def _launch_ggn_config(x: torch.Tensor, s: torch.Tensor, geometry: KernelGeometry, per_sample: bool, precision: str,
                       config, split, chunk_bytes, bias: bool) -> torch.Tensor:
    """The float32 ``[N or 1, C_out·D]`` result (``C_out·(D + 1)`` with ``bias``) of one kernel and tile."""
    if isinstance(config, ggn_unfolded.UnfoldedGGNConfig):
        return ggn_unfolded.ggn_diag(x, s, geometry, per_sample, precision, config, chunk_bytes, split, bias)
    columns, batch = s.shape[0], s.shape[1]
    G, COG, D, OT = geometry.groups, geometry.out_channels_per_group, geometry.rows, geometry.output_numel
    weight_numel = geometry.out_channels * D
    s_dense = s.contiguous()
    s_strides = (s_dense.stride(0), s_dense.stride(1), OT)
    d_tiles, co_tiles = cdiv(D, config.block_d), cdiv(COG, config.block_co)
    if per_sample:
        slices, atomic = batch, False
    else:
        slices = split or split_count(d_tiles * co_tiles * G, batch, x.device, min_work=1, waves=4)
        atomic = slices > 1
    n_per_split = cdiv(batch, slices)
    slices = cdiv(batch, n_per_split)
    out = new_output((batch if per_sample else 1, weight_numel), x.device, zero=atomic)
    _launch_ggn(
        (d_tiles * co_tiles, G, slices),
        x, s_dense, out,
        columns, batch, COG, geometry.channels_per_group, D, geometry.kernel_numel, OT, n_per_split, d_tiles,
        weight_numel if per_sample else 0,
        *s_strides, *_weight_strides(geometry), *geometry.spatial_args(),
        int(atomic),
        CHECK=geometry.check, SINGLE_O=OT <= config.block_o, BLOCK_C=config.block_c, BLOCK_CO=config.block_co,
        BLOCK_D=config.block_d, BLOCK_O=config.block_o, PRECISION=precision, num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    if not bias:
        return out
    sums = s.flatten(3).sum(3, dtype=torch.float32)  # [C, N, C_out]: the bias's gradients
    squares = sums.square_().sum(0) if per_sample else sums.square_().sum((0, 1))[None]
    return torch.cat([out.view(out.shape[0], geometry.out_channels, D), squares[..., None]], -1).flatten(1)


def hesscale_candidates(out_per_group: int, rows: int, unit: str):
    configs = []
    for co_max, block_d, block_m, warps in _HESSCALE[unit]:
        block_co = min(next_power_of_2(out_per_group), co_max)
        configs.append(HesScaleConfig(block_co, min(block_d, next_power_of_2(rows)), block_m, warps))
    return list(dict.fromkeys(configs))


def hesscale_weight_diag(x: torch.Tensor, d: torch.Tensor, geometry: KernelGeometry, per_sample: bool,
                         precision: str, config: HesScaleConfig = None, split: int = None) -> torch.Tensor:
    """HesScale weight diagonal ``[[N,] C_out, D]`` in ``x.dtype`` (see the module docstring)."""
    x, d = x.contiguous(), d.contiguous()
    batch = x.shape[0]
    G, COG, D, OT = geometry.groups, geometry.out_channels_per_group, geometry.rows, geometry.output_numel
    weight_numel = geometry.out_channels * D
    columns = batch * OT

    def launch(cfg: HesScaleConfig, split=split):
        d_tiles, co_tiles = cdiv(D, cfg.block_d), cdiv(COG, cfg.block_co)
        if per_sample:
            slices, m_per_split, atomic = batch, OT, False
        else:
            slices = split or split_count(d_tiles * co_tiles * G, cdiv(columns, cfg.block_m), x.device, min_work=8,
                                          waves=8)
            m_per_split = cdiv(cdiv(columns, slices), cfg.block_m) * cfg.block_m
            slices = cdiv(columns, m_per_split)
            atomic = slices > 1
        out = new_output((batch if per_sample else 1, weight_numel), x.device, zero=atomic)
        _launch_hesscale(
            (d_tiles * co_tiles, G, slices),
            x, d, out,
            COG, geometry.channels_per_group, D, geometry.kernel_numel, OT, columns, m_per_split, d_tiles,
            weight_numel if per_sample else 0,
            d.stride(0), OT, *_weight_strides(geometry), *geometry.spatial_args(),
            int(atomic),
            CHECK=geometry.check, BLOCK_CO=cfg.block_co, BLOCK_D=cfg.block_d, BLOCK_M=cfg.block_m,
            PRECISION=precision, num_warps=cfg.num_warps,
        )
        return out

    if config is None:
        key = (batch, geometry, per_sample, x.dtype, precision, x.device.type)
        config = _HESSCALE_CACHE.choose(
            key, lambda: hesscale_candidates(COG, D, unit_class(precision, x.dtype)), launch, x.device)
    out = launch(config)
    return finish(out if per_sample else out[0], x.dtype)
