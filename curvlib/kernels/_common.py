"""Triton building blocks shared by the kernels: implicit-im2col index arithmetic and the matrix product.

The unfolded input of a convolution is never formed. A kernel addresses its entry
``⟦X⟧[n, g, d, o]`` (``d = (c, k0, k1, k2)`` a row of the group's weight, ``o = (o0, o1, o2)`` an
output location) as ``x[n, g·C_G + c, o·S + k·DIL − P]`` and splits the address into a *row part*
(depends on ``d`` only, computed once per tile) and a *column part* (depends on ``(n, o)`` only,
computed once per step of the reduction), so a gathered tile costs one add per element plus, for
padded convolutions, the bounds checks.

Imported only when Triton is importable (see :mod:`._triton`).
"""

import triton
import triton.language as tl

from ._triton import HAS_INPUT_PRECISION

_HAS_INPUT_PRECISION = tl.constexpr(HAS_INPUT_PRECISION)


@triton.jit
def unravel3(index, I1, I2):
    """``(i0, i1, i2)`` of flat row-major indices ``index`` into a ``[*, I1, I2]`` box."""
    i0 = index // (I1 * I2)
    rest = index - i0 * (I1 * I2)
    i1 = rest // I2
    return i0, i1, rest - i1 * I2


@triton.jit
def kernel_offsets(k, K1, K2, DL0, DL1, DL2):
    """Spatial offsets ``a_j = k_j·DIL_j`` of flat kernel entries ``k = (k0, k1, k2)`` (row-major)."""
    k0 = k // (K1 * K2)
    rest = k - k0 * (K1 * K2)
    k1 = rest // K2
    k2 = rest - k1 * K2
    return k0 * DL0, k1 * DL1, k2 * DL2


@triton.jit
def patch_rows(d, g, C_G, KT, K1, K2, DL0, DL1, DL2, sxc, s0, s1, s2):
    """Row part of patch addresses for rows ``d`` (flat ``(c, k0, k1, k2)``) of group ``g``.

    Returns ``(offset, a0, a1, a2)`` with ``a_j = k_j·DIL_j`` the kernel's spatial offsets.
    """
    c = d // KT
    a0, a1, a2 = kernel_offsets(d - c * KT, K1, K2, DL0, DL1, DL2)
    offset = (g * C_G + c) * sxc + a0 * s0 + a1 * s1 + a2 * s2
    return offset, a0, a1, a2


@triton.jit
def patch_cols(n, o, O1, O2, S0, S1, S2, P0, P1, P2, sxn, s0, s1, s2):
    """Column part of patch addresses for sample(s) ``n`` and flat output locations ``o``.

    Returns ``(offset, p0, p1, p2)`` with ``p_j = o_j·S_j − P_j`` the window origins.
    """
    o0 = o // (O1 * O2)
    rest = o - o0 * (O1 * O2)
    o1 = rest // O2
    o2 = rest - o1 * O2
    p0 = o0 * S0 - P0
    p1 = o1 * S1 - P1
    p2 = o2 * S2 - P2
    offset = n * sxn + p0 * s0 + p1 * s1 + p2 * s2
    return offset, p0, p1, p2


@triton.jit
def inside(a, p, size):
    """``[rows, cols]`` mask ``0 <= a + p < size`` along one spatial dim, as one unsigned comparison."""
    return (a[:, None] + p[None, :]).to(tl.uint32, bitcast=True) < size.to(tl.uint32)


@triton.jit
def load_patches(x_ptr, row_offset, a0, a1, a2, row_valid, col_offset, p0, p1, p2, col_valid,
                 I0, I1, I2, CHECK: tl.constexpr):
    """Gather the ``[rows, cols]`` tile of the unfolded input (zeros outside the input and the tile).

    ``CHECK`` has bit ``j`` set when windows can leave the input along spatial dim ``j`` (padding);
    other dims need no bounds check (a 2-d convolution embedded in 3 dims never checks dim 0).
    """
    mask = row_valid[:, None] & col_valid[None, :]
    if CHECK & 1:
        mask = mask & inside(a0, p0, I0)
    if CHECK & 2:
        mask = mask & inside(a1, p1, I1)
    if CHECK & 4:
        mask = mask & inside(a2, p2, I2)
    return tl.load(x_ptr + row_offset[:, None] + col_offset[None, :], mask=mask, other=0.0)


@triton.jit
def jacobian_rows(co_tile, BLOCK_C: tl.constexpr, BLOCK_CO: tl.constexpr):
    """Rows ``(column c, output channel co)`` of a ``[BLOCK_C·BLOCK_CO, ·]`` tile of per-(column,
    sample) weight gradients, ``co`` fastest: ``(c within the column block, co)``."""
    r = tl.arange(0, BLOCK_C * BLOCK_CO)
    return r // BLOCK_CO, co_tile * BLOCK_CO + r % BLOCK_CO


@triton.jit
def mma(a, b, acc, PRECISION: tl.constexpr):
    """``acc + a @ b`` accumulated in float32.

    ``PRECISION``: ``"ieee"`` (float32 FMA for float32 operands), ``"tf32"``, ``"tf32x3"`` (three TF32
    passes, about float32 accuracy) or ``"bf16"`` (operands rounded to bfloat16). Half-precision
    operands always go through the matrix units (their products are exact in float32).
    """
    if PRECISION == "bf16":
        acc = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)
    elif a.dtype == tl.float32:
        if _HAS_INPUT_PRECISION:
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        else:
            acc = tl.dot(a, b, acc, allow_tf32=PRECISION == "tf32")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def store_tile(ptrs, values, mask, use_atomic):
    """Store, or add atomically when several programs share the tile (split reductions)."""
    if use_atomic != 0:
        tl.atomic_add(ptrs, values, mask=mask, sem="relaxed")
    else:
        tl.store(ptrs, values, mask=mask)
