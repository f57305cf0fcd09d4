"""The unfolded input of a sample chunk, written by one gather kernel (im2col into a given buffer).

The unfolded-chunk GGN kernel (:mod:`.ggn_unfolded`) reads the unfolded input of a chunk of samples,
``U [n, G, D, O]`` (K-major, locations contiguous) or ``[n, G, O, D]``, from a buffer it reuses for
every chunk. PyTorch's strided ``copy_`` from the window view (:func:`.ggn_unfolded.unfolded_view`)
indexes nine dimensions per element without vector loads: on an H100, 0.10 ms for a 65 MB bfloat16 chunk
of All-CNN-C's 3×3 layers (0.64 TB/s written), about 4 ms of a DiagGGNExact step. This kernel (0.059 ms,
1.1 TB/s written) gathers ``[BLOCK_D, BLOCK_O]`` tiles with the patch-address helpers every fused kernel
uses (:mod:`._common`), zero-fills windows that leave the input (no padded copy of ``x`` per chunk),
converts to the buffer's dtype, and stores each tile with the buffer's strides.

Rows ``d = (c, k0, k1, k2)`` are ordered like ``weight.flatten(1)``; locations ``o = (o0, o1, o2)``
row-major, as :func:`.ggn_unfolded.unfolded_view` orders them (the reference the tests compare with).

Imported only when Triton is importable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import load_patches, patch_cols, patch_rows
from ._geometry import KernelGeometry
from ._host import cdiv, next_power_of_2
from ._launch import Launcher

# Specialised integers (Triton compiles a variant per pattern of "equal to 1" and "divisible by 16"):
# the strides, so that the stores are vectorised where the innermost stride is 1; the locations per
# row, so that the store mask comes in runs of 16; and the sizes that are 1 on most layers (a 2-d
# convolution's embedded dim, stride, dilation, groups), whose index arithmetic then folds away.
# Without them the kernel ran at a tenth of the speed (H100: 0.58 instead of 0.059 ms for a 65 MB
# chunk). The other sizes stay run-time integers: one compiled kernel serves layers of any size.
_SPECIALISED = ["OT", "G", "sxn", "sxc", "s0", "s1", "s2", "son", "sog", "sod", "soo", "I0", "K0", "O0",
                "S0", "S1", "S2", "DL0", "DL1", "DL2"]
_INT_ARGS = ["first", "C_G", "D", "KT", "I1", "I2", "K1", "K2", "O1", "O2", "P0", "P1", "P2"]


@triton.jit(do_not_specialize=_INT_ARGS)
def _unfold_kernel(
    x_ptr, out_ptr, first, C_G, D, KT, OT, G,
    sxn, sxc, s0, s1, s2, son, sog, sod, soo,
    I0, I1, I2, K0, K1, K2, O0, O1, O2, S0, S1, S2, DL0, DL1, DL2, P0, P1, P2,
    CHECK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_O: tl.constexpr,
):
    o = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    ng = tl.program_id(2)
    n = ng // G  # the chunk's n-th sample: x's sample first + n
    g = ng - n * G
    valid_d, valid_o = d < D, o < OT
    rows, a0, a1, a2 = patch_rows(d, g, C_G, KT, K1, K2, DL0, DL1, DL2, sxc, s0, s1, s2)
    cols, p0, p1, p2 = patch_cols((first + n).to(tl.int64), o, O1, O2, S0, S1, S2, P0, P1, P2, sxn, s0, s1, s2)
    tile = load_patches(x_ptr, rows, a0, a1, a2, valid_d, cols, p0, p1, p2, valid_o, I0, I1, I2, CHECK)
    target = out_ptr + (n.to(tl.int64) * son + g * sog) + d[:, None] * sod + o[None, :] * soo
    tl.store(target, tile.to(out_ptr.dtype.element_ty), mask=valid_d[:, None] & valid_o[None, :])


_launch = Launcher(_unfold_kernel, specialised=_SPECIALISED)


def supported(x: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether :func:`unfold_into` runs: ``x`` and ``out`` CUDA tensors on one device."""
    return x.is_cuda and x.device == out.device


def unfold_into(x: torch.Tensor, geometry: KernelGeometry, out: torch.Tensor, first: int,
                k_major: bool = True) -> torch.Tensor:
    """Write the unfolded input of samples ``first, ..., first + n - 1`` of ``x [N, C_in, *I]`` into
    ``out`` (``k_major``: ``[n, G, D, O]``, else ``[n, G, O, D]``; any strides, e.g. a slice of a
    padded buffer) in ``out``'s dtype, zeros where windows leave the input; returns ``out``.

    >>> # x [N, C, H, W] on CUDA, geometry = kernel_geometry(ConvGeometry.from_module(conv, x.shape))
    >>> # out = torch.empty(n, 1, D, O, device="cuda", dtype=torch.bfloat16); unfold_into(x, geometry, out, 0)
    """
    n = out.shape[0]
    key = (x.shape, x.stride(), geometry, out.shape, out.stride(), k_major)
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        plan = _PLANS[key] = _plan(x, geometry, out, k_major)
    if not 0 <= first <= x.shape[0] - n:
        raise ValueError(f"samples {first}..{first + n - 1} are not in x's batch of {x.shape[0]}")
    if n == 0:
        return out
    view_shape, grid, arguments, constexprs = plan
    _launch(grid, x.reshape(view_shape), out, first, *arguments, **constexprs)  # a view where x's strides allow it
    return out


#: launch plans by the shapes and strides of ``x`` and ``out``, the geometry and the layout (host time:
#: the GGN kernel unfolds the same shapes for every chunk of samples and of columns)
_PLANS: dict = {}
_MAX_PLANS = 1024


def _plan(x: torch.Tensor, geometry: KernelGeometry, out: torch.Tensor, k_major: bool) -> tuple:
    """``(x's [N, C_in, I0, I1, I2] view shape, grid, integer arguments after first, constexprs)``."""
    n, groups = out.shape[0], geometry.groups
    D, OT = geometry.rows, geometry.output_numel
    expected = (n, groups, D, OT) if k_major else (n, groups, OT, D)
    if tuple(out.shape) != expected:
        raise ValueError(f"out must have shape {expected}, got {tuple(out.shape)}")
    I0, I1, I2 = geometry.input_size
    x = x.reshape(x.shape[0], geometry.in_channels, I0, I1, I2)  # a view where x's strides allow it
    sod, soo = (out.stride(2), out.stride(3)) if k_major else (out.stride(3), out.stride(2))
    block_o = min(128, next_power_of_2(OT))
    block_d = max(1, min(next_power_of_2(D), 4096 // block_o))
    grid = (cdiv(OT, block_o), cdiv(D, block_d), n * groups)
    arguments = (geometry.channels_per_group, D, geometry.kernel_numel, OT, groups,
                 *x.stride(), out.stride(0), out.stride(1), sod, soo, *geometry.spatial_args())
    return tuple(x.shape), grid, arguments, dict(CHECK=geometry.check, BLOCK_D=block_d, BLOCK_O=block_o, num_warps=4)
