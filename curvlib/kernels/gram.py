"""Gram of the unfolded input by implicit GEMM (the KFC / KFAC-expand factor): ``Ω_g = 1/N Σ_{n,o} ⟦X⟧_{n,g,:,o} ⟦X⟧_{n,g,:,o}ᵀ``.

Each program owns one ``[BLOCK_D, BLOCK_D]`` tile of the upper triangle of one group's ``[D, D]``
factor (the factor is symmetric: half the products) and reduces over a slice of the ``N·O`` patch
columns, gathering both operand tiles straight from ``x`` (:mod:`._common`); the unfolded input is
never formed. Off-diagonal tiles are written twice (the tile and its mirror). When the column
reduction is split over several programs (few tiles, e.g. depthwise convolutions), they add into a
zeroed float32 result atomically, so the summation order, and the last bits, may vary between runs.

Extra memory: none beyond the result (plus a float32 copy of it for half-precision inputs).

Imported only when Triton is importable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import load_patches, mma, patch_cols, patch_rows, store_tile
from ._geometry import KernelGeometry
from ._host import cdiv, finish, new_output, split_count
from ._launch import Launcher
from .autotune import ConfigCache

_INT_ARGS = [
    "C_G", "D", "KT", "M", "OT", "m_per_split", "sxn", "sxc", "s0", "s1", "s2",
    "I0", "I1", "I2", "K0", "K1", "K2", "O0", "O1", "O2", "S0", "S1", "S2", "DL0", "DL1", "DL2", "P0", "P1", "P2",
    "use_atomic",
]


# Shapes are run-time integers (not specialised): one compiled kernel serves every layer with the same
# block sizes, precision and dtype, which keeps compilation off the critical path.
@triton.jit(do_not_specialize=_INT_ARGS)
def _kfc_kernel(
    x_ptr, out_ptr, scale,
    C_G, D, KT, M, OT, m_per_split,
    sxn, sxc, s0, s1, s2,
    I0, I1, I2, K0, K1, K2, O0, O1, O2, S0, S1, S2, DL0, DL1, DL2, P0, P1, P2,
    use_atomic,
    CHECK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, PRECISION: tl.constexpr,
):
    # tile pair (ti <= tj) of the upper triangle, enumerated t = tj (tj + 1) / 2 + ti
    t = tl.program_id(0)
    g = tl.program_id(1)
    split = tl.program_id(2)
    tj = ((tl.sqrt((8 * t + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int32)
    tj = tl.where(tj * (tj + 1) // 2 > t, tj - 1, tj)  # float rounding of the square root
    tj = tl.where((tj + 1) * (tj + 2) // 2 <= t, tj + 1, tj)
    ti = t - tj * (tj + 1) // 2

    rows_i = ti * BLOCK_D + tl.arange(0, BLOCK_D)
    rows_j = tj * BLOCK_D + tl.arange(0, BLOCK_D)
    valid_i = rows_i < D
    valid_j = rows_j < D
    off_i, a0_i, a1_i, a2_i = patch_rows(rows_i, g, C_G, KT, K1, K2, DL0, DL1, DL2, sxc, s0, s1, s2)
    off_j, a0_j, a1_j, a2_j = patch_rows(rows_j, g, C_G, KT, K1, K2, DL0, DL1, DL2, sxc, s0, s1, s2)

    m_start = split * m_per_split
    m_end = tl.minimum(M, m_start + m_per_split)
    acc = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        m = m0 + tl.arange(0, BLOCK_M)
        valid_m = m < m_end
        n = m // OT
        col, p0, p1, p2 = patch_cols(n, m - n * OT, O1, O2, S0, S1, S2, P0, P1, P2, sxn, s0, s1, s2)
        a = load_patches(x_ptr, off_i, a0_i, a1_i, a2_i, valid_i, col, p0, p1, p2, valid_m, I0, I1, I2, CHECK)
        b = load_patches(x_ptr, off_j, a0_j, a1_j, a2_j, valid_j, col, p0, p1, p2, valid_m, I0, I1, I2, CHECK)
        acc = mma(a, tl.trans(b), acc, PRECISION)

    acc = acc * scale
    base = out_ptr + g * D * D
    mask = valid_i[:, None] & valid_j[None, :]
    store_tile(base + rows_i[:, None] * D + rows_j[None, :], acc, mask, use_atomic)
    # the mirror tile (transposed addresses, same values); diagonal tiles are complete already
    off_diagonal = (rows_i // BLOCK_D) != tj  # a tensor: the interpreter rejects scalar masks
    store_tile(base + rows_j[None, :] * D + rows_i[:, None], acc, mask & off_diagonal[:, None], use_atomic)


_launch_kfc = Launcher(_kfc_kernel)


@dataclass(frozen=True)
class KFCConfig:
    """Launch configuration: square tile ``block_d``, reduction step ``block_m``, column-reduction ``split``."""

    block_d: int
    block_m: int
    num_warps: int
    split: int


_CACHE = ConfigCache("kfc")


#: (block_m, num_warps) per matrix-unit class and tile size ``block_d``, chosen from the compiler's
#: report for sm_90 with Triton 3.6 (no register spills; 128-wide tiles spill: the gathered operands
#: and their masks live in registers)
_TILES = {
    "fma": {16: (64, 4), 32: (32, 8), 64: (32, 8)},
    "mma": {16: (64, 4), 32: (32, 4), 64: (64, 8)},
    "mma3": {16: (64, 4), 32: (32, 4), 64: (32, 8)},
}


def unit_class(precision: str, dtype: torch.dtype) -> str:
    """``"fma"`` (float32 FMA), ``"mma"`` (one matrix-unit pass) or ``"mma3"`` (three TF32 passes)."""
    if dtype != torch.float32 or precision in ("tf32", "bf16"):
        return "mma"
    return "mma3" if precision == "tf32x3" else "fma"


def _padded_work(rows: int, block_d: int) -> int:
    tiles = cdiv(rows, block_d)
    return tiles * (tiles + 1) // 2 * block_d**2


def candidates(rows: int, columns: int, groups: int, device: torch.device, unit: str):
    """Candidate configurations for a ``[rows, rows]`` factor per group reduced over ``columns``:
    the widest tile that fits, and a narrower one where it pads much less (e.g. ``D = 72``)."""
    widest = min(64, max(16, 1 << (max(rows, 1) - 1).bit_length()))
    sizes = [widest] + [b for b in (32, 16) if b < widest and _padded_work(rows, b) < 0.7 * _padded_work(rows, widest)]
    configs = []
    for block_d in sizes[:2]:
        block_m, warps = _TILES[unit][block_d]
        pairs = cdiv(rows, block_d) * (cdiv(rows, block_d) + 1) // 2
        # a few waves: short tail when the tile count is not a multiple of the multiprocessors, while
        # small problems stay unsplit (no zeroed buffer, no atomics)
        split = split_count(pairs * groups, cdiv(columns, block_m), device, min_work=32, waves=4)
        configs.append(KFCConfig(block_d, block_m, warps, split))
    # and the widest tile split finer (more programs in flight: latency hiding on small problems)
    block_d, block_m, warps = configs[0].block_d, configs[0].block_m, configs[0].num_warps
    tiles = cdiv(rows, block_d)
    finer = split_count(tiles * (tiles + 1) // 2 * groups, cdiv(columns, block_m), device, min_work=4, waves=16)
    if finer > configs[0].split:
        configs.append(KFCConfig(block_d, block_m, warps, finer))
    return configs


def kfc_factor(x: torch.Tensor, geometry: KernelGeometry, precision: str, scale: float, config: KFCConfig = None,
               out: torch.Tensor = None):
    """``scale · Σ_{n,o} ⟦X⟧ ⟦X⟧ᵀ`` per group: ``[G, D, D]`` in ``x.dtype`` (float32 accumulation).

    ``x`` is ``[N, C_in, *I]`` with ``geometry`` its :class:`KernelGeometry`; ``config`` forces a
    launch configuration (tests), else it is chosen per shape by :class:`ConfigCache`. With ``out``
    (a float32 ``[G, D, D]`` buffer) the products are added into it atomically and it is returned:
    sums over sample chunks (autotuning writes to buffers of its own).
    """
    x = x.contiguous()
    batch = x.shape[0]
    G, D = geometry.groups, geometry.rows
    columns = batch * geometry.output_numel
    I0, I1, I2 = geometry.input_size
    strides = (geometry.in_channels * geometry.input_numel, geometry.input_numel, I1 * I2, I2, 1)

    def launch(cfg: KFCConfig, into: torch.Tensor = None):
        atomic = cfg.split > 1 or into is not None
        out = new_output((G, D, D), x.device, zero=atomic) if into is None else into
        tiles = cdiv(D, cfg.block_d)
        m_per_split = cdiv(cdiv(columns, cfg.split), cfg.block_m) * cfg.block_m
        grid = (tiles * (tiles + 1) // 2, G, cdiv(columns, m_per_split))
        _launch_kfc(
            grid,
            x, out, scale,
            geometry.channels_per_group, D, geometry.kernel_numel, columns, geometry.output_numel, m_per_split,
            *strides, *geometry.spatial_args(),
            int(atomic),
            CHECK=geometry.check, BLOCK_D=cfg.block_d, BLOCK_M=cfg.block_m, PRECISION=precision,
            num_warps=cfg.num_warps,
        )
        return out

    if config is None:
        options = candidates(D, columns, G, x.device, unit_class(precision, x.dtype))
        key = (G, D, columns, geometry, x.dtype, precision, x.device.type)
        config = _CACHE.choose(key, options, launch, x.device)
    if out is not None:
        if out.shape != (G, D, D) or out.dtype != torch.float32 or out.device != x.device:
            raise ValueError(f"out must be a float32 [{G}, {D}, {D}] tensor on {x.device}, got "
                             f"{out.dtype} {list(out.shape)} on {out.device}")
        return launch(config, out)
    return finish(launch(config), x.dtype)
