"""Lag products of a convolution input in one launch: ``L[δ, g, i, j] = Σ_n Σ_q x[n, g·C/G + i, q] · x[n, g·C/G + j, q + s_δ]``.

The lags pathway (:mod:`curvlib.lag_gram`) builds the KFC factor of a stride-1 convolution from these
products, one per lag ``δ`` (spatial shift ``s_δ = dil·δ``), over each lag's *overlap region*: the
positions ``q`` with both ``q`` and ``q + s_δ`` inside the input. Every product is a small ``[C/G, C/G]``
matrix reduced over ``N·∏(I - |s_δ|)`` positions; in the GEMM form each costs two strided copies and a
batched matrix product (about three launches per lag, the copies rewriting ``x`` twice per lag). Here
one launch computes all of them and reads the operands straight from ``x``:

- a lag's two operands differ by a constant address offset (``x`` contiguous: the flat shift
  ``Σ_t s_t·stride_t``), so a reduction step loads ``[BLOCK, BLOCK_R]`` tiles of rows ``i`` at ``q`` and
  of columns ``j`` at ``q + s_δ`` without bounds checks (``q`` walks the overlap region only);
- programs are laid out ``(lag, channel tile, slice of the reduction)`` with the lag fastest, so the
  programs in flight at one time read the same stretch of ``x`` (it is reused from L2);
- a long reduction is split into slices added atomically into a zeroed float32 result (parallelism,
  and a bounded accumulation chain: each slice sums at most :data:`MAX_SLICE` positions);
- groups with ``C/G ≥ 16`` use ``tl.dot`` on ``[BLOCK, BLOCK]`` channel tiles (the layout above).
  Narrower groups (depthwise, the 3-channel first layer) do one or two multiply-adds per loaded
  element, so there the loads and the index arithmetic are the cost: a program owns ``BLOCK_P`` channel pairs ``(g, i, j)``
  and one stretch of positions ``(n, q)`` of the whole input, loads its tile once, and loops over the
  lags inside, loading the tile shifted by each lag (an L1 hit: the halo is the program's own
  neighbourhood) masked where ``q + s`` leaves the input, and adds the ``BLOCK_P``
  products of each lag atomically (no matrix-unit padding from 1 or 3 to 16).

Precision (``tl.dot``'s ``input_precision`` for float32, :func:`._common.mma`): ``"ieee"`` multiplies
float32 exactly (FMA; relative error ~1e-6, like cuBLAS), ``"tf32"`` one matrix-unit pass (~1e-3),
``"tf32x3"`` three passes, ``"bf16"`` operands rounded to bfloat16. The narrow path always uses exact
float32 FMAs. Summation order varies between runs when the reduction is split (atomics).

Imported only when Triton is importable.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ._common import mma, store_tile, unravel3
from ._host import cdiv, multiprocessors
from ._launch import Launcher
from .autotune import ConfigCache

#: positions one program sums at most (per lag and channel tile): a bound on the float32 accumulation
#: chain, like the GEMM form's row blocks (``lag_gram._ROW_BLOCK``); longer reductions are split
MAX_SLICE = 16384

#: narrower groups than this take the narrow path (``tl.dot`` needs tiles of at least 16)
DOT_MIN_CHANNELS = 16

_INT_ARGS = ["N", "CI", "G", "sxn", "sxc", "I12", "I2", "r_per_split", "use_atomic"]
_NARROW_INT_ARGS = ["LAGS", "CI", "G", "sxn", "sxc", "I0", "I1", "I2", "total", "r_per_program"]


@triton.jit
def _lag_region(table_ptr, lag, N):
    """The lag's overlap region from its row of the table: ``(OV1, OV2, OV, start, shift, total)`` with
    ``OV`` its volume, ``start`` the flat address of its first ``q``, ``shift`` the flat ``s_δ``."""
    row = table_ptr + lag * 8
    OV1 = tl.load(row)
    OV2 = tl.load(row + 1)
    OV = tl.load(row + 2)
    start = tl.load(row + 3)
    shift = tl.load(row + 4)
    return OV1, OV2, OV, start, shift, N * OV


@triton.jit
def _positions(r, OV1, OV2, OV, start, sxn, I12, I2):
    """Flat addresses (without the channel) of reduction indices ``r = (n, o)`` of the overlap region."""
    n = r // OV
    o0, o1, o2 = unravel3(r - n * OV, OV1, OV2)
    return n * sxn + start + o0 * I12 + o1 * I2 + o2


@triton.jit(do_not_specialize=_INT_ARGS)
def _lag_dot_kernel(
    x_ptr, table_ptr, out_ptr,
    N, CI, G, sxn, sxc, I12, I2, r_per_split, use_atomic,
    BLOCK: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
):
    lag = tl.program_id(0)
    tile = tl.program_id(1)
    split = tl.program_id(2)
    tiles = tl.cdiv(CI, BLOCK)
    g = tile // (tiles * tiles)
    t = tile - g * (tiles * tiles)
    ti = t // tiles
    tj = t - ti * tiles
    OV1, OV2, OV, start, shift, total = _lag_region(table_ptr, lag, N)

    i = ti * BLOCK + tl.arange(0, BLOCK)
    j = tj * BLOCK + tl.arange(0, BLOCK)
    valid_i = i < CI
    valid_j = j < CI
    row_a = (g * CI + i) * sxc
    row_b = (g * CI + j) * sxc + shift
    r_start = split * r_per_split
    r_end = tl.minimum(total, r_start + r_per_split)
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for r0 in range(r_start, r_end, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        valid_r = r < r_end
        col = _positions(r, OV1, OV2, OV, start, sxn, I12, I2)
        # both tiles [channels, positions]: the positions (contiguous in x) vary fastest in the loads
        a = tl.load(x_ptr + row_a[:, None] + col[None, :], mask=valid_i[:, None] & valid_r[None, :], other=0.0)
        b = tl.load(x_ptr + row_b[:, None] + col[None, :], mask=valid_j[:, None] & valid_r[None, :], other=0.0)
        acc = mma(a, tl.trans(b), acc, PRECISION)
    ptrs = out_ptr + ((lag * G + g) * CI + i[:, None]) * CI + j[None, :]
    store_tile(ptrs, acc, valid_i[:, None] & valid_j[None, :], use_atomic)


@triton.jit(do_not_specialize=_NARROW_INT_ARGS)
def _lag_narrow_kernel(
    x_ptr, table_ptr, out_ptr,
    LAGS, CI, G, sxn, sxc, I0, I1, I2, total, r_per_program,
    BLOCK_P: tl.constexpr, CI_P: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # One block of channel pairs (g, i, j) of BLOCK_P / CI_P² groups and one stretch of positions (n, q)
    # of the whole input; every lag in a loop: the program's tile of x is loaded once, the shifted tiles
    # come from L1 (pairs sharing a channel load it again: also from L1). All tensors 2-d [pairs, positions].
    pair_block = tl.program_id(0)
    stretch = tl.program_id(1)
    I12 = I1 * I2
    pair = pair_block * BLOCK_P + tl.arange(0, BLOCK_P)
    g = pair // (CI_P * CI_P)
    i = (pair // CI_P) % CI_P
    j = pair % CI_P
    pair_valid = (g < G) & (i < CI) & (j < CI)
    row_a = (g * CI + i) * sxc
    row_b = (g * CI + j) * sxc
    out_pairs = out_ptr + (g * CI + i) * CI + j
    r_end = tl.minimum(total, (stretch + 1) * r_per_program)
    for r0 in range(stretch * r_per_program, r_end, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        valid_r = r < r_end
        n = r // (I0 * I12)
        q = r - n * (I0 * I12)
        q0, q1, q2 = unravel3(q, I1, I2)
        col = n * sxn + q
        a = tl.load(x_ptr + row_a[:, None] + col[None, :], mask=pair_valid[:, None] & valid_r[None, :], other=0.0)
        a = a.to(tl.float32)
        address_b = x_ptr + row_b[:, None] + col[None, :]
        for lag in range(0, LAGS):
            row = table_ptr + lag * 8
            # the partner q + s inside the input, per dim (one unsigned comparison each)
            inside = (valid_r & ((q0 + tl.load(row + 5)).to(tl.uint32, bitcast=True) < I0.to(tl.uint32))
                      & ((q1 + tl.load(row + 6)).to(tl.uint32, bitcast=True) < I1.to(tl.uint32))
                      & ((q2 + tl.load(row + 7)).to(tl.uint32, bitcast=True) < I2.to(tl.uint32)))
            b = tl.load(address_b + tl.load(row + 4), mask=pair_valid[:, None] & inside[None, :], other=0.0)
            products = tl.sum(a * b.to(tl.float32), axis=1)
            tl.atomic_add(out_pairs + lag * G * CI * CI, products, mask=pair_valid, sem="relaxed")


_launch_dot = Launcher(_lag_dot_kernel)
_launch_narrow = Launcher(_lag_narrow_kernel)


@dataclass(frozen=True)
class LagConfig:
    """Launch configuration: channel tile ``block`` (dot path) or channel pairs per program (narrow path),
    reduction step ``block_r``, warps, and the reduction's ``split`` (narrow path: stretches of positions)."""

    narrow: bool
    block: int
    block_r: int
    num_warps: int
    split: int


_CACHE = ConfigCache("lag_products")


@functools.lru_cache(maxsize=1024)
def _table(size: Tuple[int, ...], shifts: Tuple[Tuple[int, ...], ...], device: torch.device) -> torch.Tensor:
    """Per lag ``[OV1, OV2, OV, start, shift, s0, s1, s2]`` (int32, on ``device``; built once per shape and
    lags): the overlap region's last two extents and volume, its first flat position, the flat shift and
    the shift per dim (three dims, leading zeros)."""
    size3 = (1,) * (3 - len(size)) + tuple(size)
    strides = (size3[1] * size3[2], size3[2], 1)
    rows = []
    for shift in shifts:
        s3 = (0,) * (3 - len(shift)) + tuple(shift)
        extent = [i - abs(s) for i, s in zip(size3, s3)]
        if min(extent) <= 0:
            raise ValueError(f"lag shift {shift} leaves no overlap in an input of size {tuple(size)}")
        start = sum(max(0, -s) * st for s, st in zip(s3, strides))
        flat = sum(s * st for s, st in zip(s3, strides))
        rows.append([extent[1], extent[2], math.prod(extent), start, flat, *s3])
    return torch.tensor(rows, dtype=torch.int32, device=device)


def _narrow_tiles(ci_p: int, groups: int) -> List[Tuple[int, int, int]]:
    """``(block_p, block_r, warps)`` candidates of the narrow path, best guess first: ``block_p`` channel
    pairs (``block_p / ci_p²`` groups, at least one) times ``block_r`` positions, 4096 or 8192 products per
    lag and program; with fewer pairs than the block the lanes move to the positions."""
    pairs = triton.next_power_of_2(groups) * ci_p * ci_p
    result = []
    for block_p, lanes, warps in ((16, 4096, 4), (32, 8192, 8), (8, 4096, 4), (32, 4096, 4)):
        block_p = min(max(block_p, ci_p * ci_p), pairs)
        result.append((block_p, max(16, lanes // block_p), warps))
    return list(dict.fromkeys(result))


def candidates(ci: int, groups: int, lags: int, total: int, device: torch.device):
    """Launch configurations to try, best guess first. Dot path: per candidate tile the split that gives
    about four waves of programs and keeps every slice at most :data:`MAX_SLICE` positions. Narrow path:
    one stretch of ``block_r`` positions per program (``split`` stretches), and four per program."""
    sms = multiprocessors(device)

    def split_for(programs: int, block_r: int) -> int:
        steps = cdiv(total, block_r)
        wanted = cdiv(4 * sms, max(programs, 1))
        return max(1, min(max(wanted, cdiv(total, MAX_SLICE)), steps))

    if ci < DOT_MIN_CHANNELS:
        configs = []
        for block_p, block_r, warps in _narrow_tiles(triton.next_power_of_2(ci), groups):
            for steps in (1, 4):
                configs.append(LagConfig(True, block_p, block_r, warps, cdiv(total, steps * block_r)))
        return list(dict.fromkeys(configs))
    configs = []
    for block, block_r, warps in ((64, 32, 8), (32, 32, 4), (64, 64, 8), (32, 64, 4)):
        if block == 64 and ci <= 32:
            continue
        programs = lags * groups * cdiv(ci, block) ** 2
        configs.append(LagConfig(False, block, block_r, warps, split_for(programs, block_r)))
    return configs


def lag_products(
    x: torch.Tensor,
    shifts: Sequence[Tuple[int, ...]],
    groups: int,
    precision: str = "ieee",
    config: LagConfig = None,
) -> torch.Tensor:
    """``[len(shifts), G, C/G, C/G]`` float32: per spatial shift ``s`` (a tuple per spatial dim, e.g.
    ``dil·δ``) and group ``g``, ``Σ_n Σ_q x[n, g·C/G + i, q] · x[n, g·C/G + j, q + s]`` over the positions
    ``q`` with ``q`` and ``q + s`` both inside ``x`` (no normalisation).

    ``x`` ``[N, C, *I]`` with 1 to 3 spatial dims, float32 (or half precision) on a CUDA device (CPU
    tensors under ``TRITON_INTERPRET=1``), fewer than 2³¹ elements; every shift must leave an overlap
    (``|s_t| < I_t``). ``precision`` as in :func:`._common.mma`; ``config`` forces a launch
    configuration (tests), else one is chosen per shape (:class:`.autotune.ConfigCache`).
    """
    x = x.contiguous()
    n, c, *size = x.shape
    ci = c // groups
    shifts = tuple(tuple(int(s) for s in shift) for shift in shifts)
    table = _table(tuple(size), shifts, x.device)
    size3 = (1,) * (3 - len(size)) + tuple(size)
    total = n * math.prod(size)  # the largest reduction (shift 0)
    lags = len(shifts)
    sxn, sxc = c * math.prod(size), math.prod(size)

    def launch(cfg: LagConfig):
        atomic = cfg.narrow or cfg.split > 1
        out = (torch.zeros if atomic else torch.empty)((lags, groups, ci, ci), device=x.device, dtype=torch.float32)
        r_per_split = cdiv(cdiv(total, cfg.split), cfg.block_r) * cfg.block_r
        if cfg.narrow:  # split: stretches of positions, every lag in each program
            ci_p = triton.next_power_of_2(ci)
            grid = (cdiv(groups * ci_p * ci_p, cfg.block), cdiv(total, r_per_split))
            _launch_narrow(grid, x, table, out, lags, ci, groups, sxn, sxc, *size3, total, r_per_split,
                           BLOCK_P=cfg.block, CI_P=ci_p, BLOCK_R=cfg.block_r,
                           num_warps=cfg.num_warps)
        else:
            grid = (lags, groups * cdiv(ci, cfg.block) ** 2, cfg.split)
            _launch_dot(grid, x, table, out, n, ci, groups, sxn, sxc, size3[1] * size3[2], size3[2], r_per_split,
                        int(atomic), BLOCK=cfg.block, BLOCK_R=cfg.block_r, PRECISION=precision,
                        num_warps=cfg.num_warps)
        return out

    if config is None:
        key = (n, c, tuple(size), groups, shifts, x.dtype, precision, x.device.type)
        config = _CACHE.choose(key, lambda: candidates(ci, groups, lags, total, x.device), launch, x.device)
    return launch(config)
