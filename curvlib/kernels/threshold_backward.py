"""ReLU / threshold backward of batched gradients: ``where(saved <= threshold, 0, g)`` in one pass.

The engine's column backpropagation (:mod:`curvlib.engine.batched_rules`) masks ``J`` gradients per
sample, ``g [J, N, ...]``, with the layer's saved ``[N, ...]`` activation broadcast over ``J``. ``g`` is
often a strided view (the cropped gradient of a zero-padded convolution input, channels-last). PyTorch's
``threshold_backward`` runs such operands at 1.2-1.3 TB/s on an H100 in bfloat16 (its vector loads are
8 bytes; the rows of a cropped view 64); this kernel reads rows of ``g`` and of the activation and
writes the result contiguous in the activation's memory order.

Layout: the three tensors are permuted to the output's memory order (the activation's, the vectors'
axis first), dimensions that are contiguous in both inputs are merged, and the kernel runs over
``[rows, inner]`` tiles, the row index split into up to four dimensions once per row. Tensors of more
than five such dimensions are not handled (:func:`supported` says so; the caller uses PyTorch's op).

Imported only when Triton is importable.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl

from ._host import cdiv, next_power_of_2, rounded_threshold
from ._launch import Launcher

#: row dimensions the kernel splits (plus the inner one)
ROW_DIMS = 4


@triton.jit(do_not_specialize=["rows", "d1", "d2", "d3"])
def _threshold_backward_kernel(
    g_ptr, s_ptr, out_ptr, threshold, rows, inner, d1, d2, d3,
    gs0, gs1, gs2, gs3, gsi, ss0, ss1, ss2, ss3, ssi,
    BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr,
):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    # row r = ((i0·d1 + i1)·d2 + i2)·d3 + i3
    i3 = r % d3
    rest = r // d3
    i2 = rest % d2
    rest = rest // d2
    i1 = rest % d1
    i0 = (rest // d1).to(tl.int64)
    g_row = i0 * gs0 + i1.to(tl.int64) * gs1 + i2.to(tl.int64) * gs2 + i3.to(tl.int64) * gs3
    s_row = i0 * ss0 + i1.to(tl.int64) * ss1 + i2.to(tl.int64) * ss2 + i3.to(tl.int64) * ss3
    mask = (r < rows)[:, None] & (i < inner)[None, :]
    g = tl.load(g_ptr + g_row[:, None] + (i * gsi)[None, :], mask=mask, other=0.0)
    s = tl.load(s_ptr + s_row[:, None] + (i * ssi)[None, :], mask=mask, other=0.0)
    # PyTorch's semantics: zero where saved <= threshold (a NaN activation passes the gradient on)
    out = tl.where(s <= threshold, tl.zeros_like(g), g)
    tl.store(out_ptr + r.to(tl.int64)[:, None] * inner + i[None, :], out, mask=mask)


_launch = Launcher(_threshold_backward_kernel, specialised=["inner", "gs0", "gs1", "gs2", "gs3", "ss0", "ss1", "ss2",
                                                            "ss3"])


def _memory_order(saved: torch.Tensor) -> List[int]:
    """The dimensions of ``saved`` from the outermost in memory to the innermost (stable for ties)."""
    return sorted(range(saved.dim()), key=lambda d: (-saved.stride(d), -d if saved.shape[d] == 1 else 0))


def _merged(shape: List[int], strides: List[List[int]]) -> Tuple[List[int], List[List[int]]]:
    """Adjacent dimensions merged where every tensor's strides allow it (size-1 dimensions dropped)."""
    keep = [d for d in range(len(shape)) if shape[d] != 1] or [len(shape) - 1]
    sizes = [shape[keep[0]]]
    merged = [[s[keep[0]]] for s in strides]
    for d in keep[1:]:
        if all(m[-1] == s[d] * shape[d] for m, s in zip(merged, strides)):
            sizes[-1] *= shape[d]
            for m, s in zip(merged, strides):
                m[-1] = s[d]
        else:
            sizes.append(shape[d])
            for m, s in zip(merged, strides):
                m.append(s[d])
    return sizes, merged


def _plan(g: torch.Tensor, saved: torch.Tensor) -> Optional[tuple]:
    """``(output shape in memory order, permutation back, sizes, g strides, saved strides)`` or ``None``."""
    order = [0] + [d + 1 for d in _memory_order(saved)]
    shape = [g.shape[d] for d in order]
    g_strides = [g.stride(d) for d in order]
    s_strides = [0] + [saved.stride(d - 1) for d in order[1:]]
    sizes, (gs, ss) = _merged(shape, [g_strides, s_strides])
    if len(sizes) > ROW_DIMS + 1:
        return None
    pad = ROW_DIMS + 1 - len(sizes)
    sizes, gs, ss = [1] * pad + sizes, [0] * pad + gs, [0] * pad + ss
    inverse = sorted(range(len(order)), key=order.__getitem__)
    return shape, inverse, sizes, gs, ss


def _eligible(g: torch.Tensor, saved: torch.Tensor) -> bool:
    return (g.is_cuda and saved.device == g.device and g.dim() == saved.dim() + 1 and g.shape[1:] == saved.shape
            and g.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and saved.dtype in (g.dtype, torch.float32) and g.numel() > 0)


#: launch plans by the operands' shapes, strides, dtypes and devices (host time: the engine masks the
#: same shapes for every chunk of columns; the plan's Python costs about as much as the launch)
_PLANS: Dict[tuple, Optional[tuple]] = {}
_MAX_PLANS = 1024


def _launch_plan(g: torch.Tensor, saved: torch.Tensor) -> Optional[tuple]:
    """``(output shape, permutation back, sizes, g strides, saved strides, BLOCK_R, BLOCK_I, grid)``, or
    ``None`` where the kernel does not run for these operands."""
    key = (g.shape, g.stride(), g.dtype, g.device, saved.shape, saved.stride(), saved.dtype, saved.device)
    if key in _PLANS:
        return _PLANS[key]
    plan = _plan(g, saved) if _eligible(g, saved) else None
    if plan is not None:
        sizes = plan[2]
        rows, inner = sizes[0] * sizes[1] * sizes[2] * sizes[3], sizes[4]
        block_i = min(next_power_of_2(inner), 128)
        block_r = max(1, 4096 // block_i)
        plan = (*plan, block_r, block_i, (cdiv(rows, block_r), cdiv(inner, block_i)))
    if len(_PLANS) >= _MAX_PLANS:
        _PLANS.clear()
    _PLANS[key] = plan
    return plan


def supported(g: torch.Tensor, saved: torch.Tensor) -> bool:
    """Whether :func:`threshold_backward` runs for ``g [J, *saved.shape]`` and ``saved``: CUDA tensors,
    ``g`` float32/float16/bfloat16, ``saved`` of ``g``'s dtype or float32, at most five dimensions after
    merging those contiguous in both."""
    return _launch_plan(g, saved) is not None


def threshold_backward(g: torch.Tensor, saved: torch.Tensor, threshold: float) -> Optional[torch.Tensor]:
    """``torch.ops.aten.threshold_backward(g, saved, threshold)`` for ``g [J, *saved.shape]``: a tensor
    shaped like ``g`` in ``g``'s dtype, laid out in ``saved``'s memory order; ``None`` where not
    :func:`supported` (the caller runs PyTorch's op)."""
    plan = _launch_plan(g, saved)
    if plan is None:
        return None
    shape, inverse, sizes, gs, ss, block_r, block_i, grid = plan
    out = torch.empty(shape, dtype=g.dtype, device=g.device)
    _launch(grid, g, saved, out, rounded_threshold(float(threshold), saved.dtype), sizes[0] * sizes[1] * sizes[2] * sizes[3],
            sizes[4], sizes[1], sizes[2], sizes[3], gs[0], gs[1], gs[2], gs[3], gs[4], ss[0], ss[1], ss[2], ss[3], ss[4],
            BLOCK_R=block_r, BLOCK_I=block_i, num_warps=8)
    return out.permute(inverse)
