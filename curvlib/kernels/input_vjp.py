"""The input gradient (data gradient) of a convolution as a polyphase implicit GEMM.

``dx = input_vjp(g, weight, geometry)`` is the adjoint of a convolution applied to output gradients
``g [M, C_out, *O]``: ``dx[m, c, i] = Σ_{o, k : i + P − k·DIL = S·q} g[m, o, q] · w[o, c, k]`` (``o`` and
``c`` in one group). cuDNN computes it as a transposed convolution; for strided layers whose channel
counts do not suit its tiles it falls back to slow kernels (H100, All-CNN-C's stride-2 layer with 96
channels: 95 TFLOP/s, against 350-540 TFLOP/s for its stride-1 layers;
``benchmarks/results/h100-2026-11-22-session18/dgrad_variants.txt``).

Polyphase split: the input positions ``i`` fall into ``∏S`` *phases* ``r = i mod S``. Within a phase
the kernel entries that reach ``i`` are fixed — those ``k`` with ``(r + P − k·DIL) ≡ 0 (mod S)``, an
arithmetic progression per spatial dim — and the output location they read is ``q = a + δ_k`` for
``i = r + S·a``. So each phase is a stride-1 correlation with its own sub-kernel: one launch per
phase, whose programs compute ``[BLOCK_M positions, BLOCK_N input channels]`` tiles of ``dx`` from
gathered ``[BLOCK_M, BLOCK_K]`` tiles of ``g`` and ``[BLOCK_K, BLOCK_N]`` tiles of the weight on the
matrix units (float32 accumulation), and store them straight into ``dx``'s layout. Every position
belongs to exactly one phase; positions no window reaches get zeros. No zero-inserted (dilated)
gradient is formed and no multiply is wasted on skipped taps.

Fused epilogue (``window=``, ``mask=``): where the convolution's input is a zero padding of a ReLU's
output, the engine wants the gradient at the ReLU's input, ``relu'(a) ⊙ crop(dx)``. The kernel then
computes only the positions inside the padding's inner window (each phase restricted to its
positions in the box, :func:`._geometry.polyphase`), zeroes those whose saved activation is ``<=``
the threshold and stores the result window-sized: neither the padded gradient nor a separate mask
pass over it is written or read (H100, All-CNN-C's conv3, 20 × 128 samples in bfloat16: 0.82 ms,
against 1.53 ms for cuDNN's data gradient and the mask kernel and 1.1 ms for this kernel unfused).

Shapes: 1-d, 2-d and 3-d convolutions (embedded in three dims like every kernel here), groups,
stride, dilation, asymmetric zero padding. ``g`` and ``dx`` may have any strides (channels-last is the
fast case: rows of channels are contiguous); the weight is read with its own strides.

Precision: float16/bfloat16 ``g`` multiplies on the matrix units (exact products, float32 sums), the
result rounded to ``g``'s dtype once. float32 ``g`` multiplies as ``precision`` says (``"ieee"``: exact
FMA; ``"tf32"``: one TF32 pass, as cuDNN does with ``torch.backends.cudnn.allow_tf32``).

Imported only when Triton is importable.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ._common import mma
from ._geometry import KernelGeometry, polyphase
from ._host import cdiv, next_power_of_2, rounded_threshold
from ._launch import Launcher
from .autotune import ConfigCache

# Specialised integers (as in :mod:`.unfold`): strides (vectorised loads and stores where the channel
# stride is 1 and the others are multiples of 16: without the sample strides, rows were gathered
# element by element, 6× slower than cuDNN) and the sizes that are 1 on most layers (the embedded dim of a 2-d convolution, one tap
# per dim), whose arithmetic then folds away. The other sizes stay run-time integers.
_SPECIALISED = ["sgn", "son", "sgc", "sg0", "sg1", "sg2", "swo", "swc", "sw0", "sw1", "sw2", "soc", "so0", "so1", "so2",
                "A0", "O0", "S0", "T0", "T1", "T2", "CO_G", "C_G", "CT", "smn", "smc", "sm0", "sm1", "sm2"]
_INT_ARGS = ["ROWS", "A1", "A2", "O1", "O2", "R0", "R1", "R2", "S1", "S2", "KB0", "KB1", "KB2", "KS0", "KS1",
             "KS2", "E0", "E1", "E2", "ES0", "ES1", "ES2", "NM", "JM"]


@triton.jit(do_not_specialize=_INT_ARGS)
def _input_vjp_kernel(
    g_ptr, w_ptr, out_ptr, ROWS, C_G, CO_G, CT,
    A0, A1, A2, O0, O1, O2, R0, R1, R2, S0, S1, S2,
    KB0, KB1, KB2, KS0, KS1, KS2, T0, T1, T2, E0, E1, E2, ES0, ES1, ES2,
    sgn, sgc, sg0, sg1, sg2, swo, swc, sw0, sw1, sw2, son, soc, so0, so1, so2,
    mask_ptr, threshold, NM, JM, smn, smc, sm0, sm1, sm2,
    MASKED: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(1)
    group = pid_n // CT
    c = (pid_n - group * CT) * BLOCK_N + tl.arange(0, BLOCK_N)  # input channel within the group
    p = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)      # flat (sample, a0, a1, a2) of the phase
    valid_p, valid_c = p < ROWS, c < C_G
    a2 = p % A2
    rest = p // A2
    a1 = rest % A1
    rest = rest // A1
    a0 = rest % A0
    n = (rest // A0).to(tl.int64)
    if MASKED:
        # rows in (activation sample, vector, position) order: the programs that run at a time share
        # their masks' rows in L2 (in (vector, sample) order each mask row is read J times, evicted between)
        n_mask = n // JM
        n = (n - n_mask * JM) * NM + n_mask
    g_rows = n * sgn + a0 * sg0 + a1 * sg1 + a2 * sg2
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    blocks = tl.cdiv(CO_G, BLOCK_K)
    for step in range(0, T0 * T1 * T2 * blocks):
        tap = step // blocks
        o = (step - tap * blocks) * BLOCK_K + tl.arange(0, BLOCK_K)  # output channel within the group
        m2 = tap % T2
        m1 = (tap // T2) % T1
        m0 = tap // (T1 * T2)
        # this tap reads output location q = a + δ, δ = E − m·ES; its weight entry is k = KB + m·KS
        d0, d1, d2 = E0 - m0 * ES0, E1 - m1 * ES1, E2 - m2 * ES2
        inside = (((a0 + d0).to(tl.uint32, bitcast=True) < O0) & ((a1 + d1).to(tl.uint32, bitcast=True) < O1)
                  & ((a2 + d2).to(tl.uint32, bitcast=True) < O2) & valid_p)
        valid_o = o < CO_G
        channel = group * CO_G + o
        g_tile = tl.load(g_ptr + (g_rows + (d0 * sg0 + d1 * sg1 + d2 * sg2))[:, None] + (channel * sgc)[None, :],
                         mask=inside[:, None] & valid_o[None, :], other=0.0)
        w_offset = (KB0 + m0 * KS0) * sw0 + (KB1 + m1 * KS1) * sw1 + (KB2 + m2 * KS2) * sw2
        w_tile = tl.load(w_ptr + w_offset + (channel * swo)[:, None] + (c * swc)[None, :],
                         mask=valid_o[:, None] & valid_c[None, :], other=0.0)
        acc = mma(g_tile, w_tile, acc, PRECISION)
    i0, i1, i2 = R0 + S0 * a0, R1 + S1 * a1, R2 + S2 * a2  # positions in the output box
    out_rows = n * son + i0 * so0 + i1 * so1 + i2 * so2
    mask_rows = n_mask * smn + i0 * sm0 + i1 * sm1 + i2 * sm2 if MASKED else out_rows
    # stored in quarters of the channel tile: with the whole tile the compiler held the result, the mask
    # and both tiles of addresses at once, spilling registers (H100, All-CNN-C's conv3, 20 × 128 samples:
    # the masked kernel took 1.27 ms whole, 0.99 in halves, 0.84 in quarters; without the mask 0.72,
    # 0.68 and 0.64 ms)
    halves = tl.split(tl.permute(tl.reshape(acc.to(out_ptr.dtype.element_ty), (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
    first = (pid_n - group * CT) * BLOCK_N
    for half in tl.static_range(2):
        quarters = tl.split(tl.permute(tl.reshape(halves[half], (BLOCK_M, 2, BLOCK_N // 4)), (0, 2, 1)))
        for quarter in tl.static_range(2):
            _store_part(quarters[quarter], first + (2 * half + quarter) * (BLOCK_N // 4) + tl.arange(0, BLOCK_N // 4),
                        valid_p, group, C_G, out_ptr, out_rows, soc, mask_ptr, mask_rows, smc, threshold, MASKED)


@triton.jit
def _store_part(part, c, valid_p, group, C_G, out_ptr, out_rows, soc, mask_ptr, mask_rows, smc, threshold,
                MASKED: tl.constexpr):
    """Store ``part`` (rows ``out_rows``, channels ``c`` of the group), zero where the mask is ``<= threshold``."""
    stored = valid_p[:, None] & (c < C_G)[None, :]
    in_channel = group * C_G + c
    if MASKED:  # a ReLU's backward: zero where the saved activation of the sample is <= threshold
        saved = tl.load(mask_ptr + mask_rows[:, None] + (in_channel * smc)[None, :], mask=stored, other=0.0)
        part = tl.where(saved <= threshold, tl.zeros_like(part), part)
    tl.store(out_ptr + out_rows[:, None] + (in_channel * soc)[None, :], part, mask=stored)


_launch = Launcher(_input_vjp_kernel, specialised=_SPECIALISED)


def config(geometry: KernelGeometry, dtype: torch.dtype) -> Tuple[int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, BLOCK_K, num_warps)``: tiles of 128 positions, the group's input channels
    (up to 128) and a reduction step of 32 output channels (64 in 16-bit, whose rows are as many bytes)."""
    block_n = min(128, next_power_of_2(geometry.channels_per_group))
    block_k = min(64 if dtype.itemsize == 2 else 32, next_power_of_2(geometry.out_channels_per_group))
    return 128, block_n, block_k, 8 if block_n >= 128 else 4


#: the largest number of (sample, input location) rows a launch indexes (32-bit position arithmetic)
_MAX_ROWS = 2**31 - 1

#: the candidate that runs the caller's own data gradient (cuDNN's transposed convolution)
ADJOINT = "adjoint"
#: per shape: the adjoint or a block configuration of the kernel, whichever ran fastest
_CHOICES = ConfigCache("input_vjp")


def candidates(geometry: KernelGeometry, dtype: torch.dtype) -> list:
    """The adjoint first (the choice where nothing is measured), then block configurations: the default,
    half the channel tile (the faster on All-CNN-C's 192-channel stride-2 layer) and half the rows (the
    fastest with a mask on its 96-channel one)."""
    block_m, block_n, block_k, _ = config(geometry, dtype)
    configs = [(block_m, block_n, 32, 4, 4), (block_m, max(16, block_n // 2), 32, 4, 4), (64, block_n, 32, 4, 4)]
    return [ADJOINT] + list(dict.fromkeys(configs))


def eligible(geometry: KernelGeometry) -> bool:
    """Layers whose data gradient the kernel may run faster than cuDNN: strided ones (cuDNN's stride-1
    kernels ran 1.6-2× faster than this one on All-CNN-C's layers) with at least 16 channels per group
    on both sides (fewer leave most of each matrix-unit tile empty)."""
    return (any(s > 1 for s in geometry.stride) and geometry.channels_per_group >= 16
            and geometry.out_channels_per_group >= 16)


def fastest(g: torch.Tensor, weight: torch.Tensor, geometry: KernelGeometry, adjoint,
            window: Optional[Sequence[Tuple[int, int]]] = None, mask: Optional[torch.Tensor] = None,
            threshold: float = 0.0) -> torch.Tensor:
    """The data gradient by whichever of ``adjoint()`` (the caller's) and this kernel ran fastest for
    this shape, measured on the first call (:class:`.autotune.ConfigCache`; with autotuning off, or
    where the kernel does not take these tensors (:func:`supported`: float64), ``adjoint``). float32
    gradients multiply in TF32 where cuDNN may (``torch.backends.cudnn.allow_tf32``).

    ``window``, ``mask`` and ``threshold`` as in :func:`input_vjp`; ``adjoint()`` must then return the
    same (the cropped, masked gradient), so that the measurement compares like with like."""
    if not supported(g, weight) or g.shape[0] * geometry.input_numel > _MAX_ROWS:  # float64, huge: the adjoint
        return adjoint()
    precision = "tf32" if g.dtype == torch.float32 and torch.backends.cudnn.allow_tf32 else "ieee"
    key = (geometry, tuple(g.shape), g.stride(), g.dtype, precision, g.device,
           None if window is None else tuple(map(tuple, window)),
           None if mask is None else (tuple(mask.shape), mask.stride(), mask.dtype))

    def run(choice):
        if choice == ADJOINT:
            return adjoint()
        return input_vjp(g, weight, geometry, precision=precision, block=choice, window=window, mask=mask,
                         threshold=threshold)

    return run(_CHOICES.choose(key, lambda: candidates(geometry, g.dtype), run, g.device))


def supported(g: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`input_vjp` runs: CUDA tensors of one device, ``g`` float32/float16/bfloat16, the
    weight in ``g``'s dtype."""
    return (g.is_cuda and weight.device == g.device and weight.dtype == g.dtype
            and g.dtype in (torch.float32, torch.float16, torch.bfloat16))


def input_vjp(g: torch.Tensor, weight: torch.Tensor, geometry: KernelGeometry, out: Optional[torch.Tensor] = None,
              precision: str = "ieee", block: Optional[Tuple[int, int, int, int]] = None,
              window: Optional[Sequence[Tuple[int, int]]] = None, mask: Optional[torch.Tensor] = None,
              threshold: float = 0.0) -> torch.Tensor:
    """The input gradient ``[M, C_in, *I]`` of a convolution for output gradients ``g [M, C_out, *O]``
    (``weight [C_out, C_in/G, *K]`` in ``g``'s dtype): written into ``out`` (any strides) or a new
    tensor in ``g``'s memory format; returns it. ``block`` overrides :func:`config` (benchmarks).

    Fused epilogues (the backward of a zero padding and a ReLU that precede the convolution):

    - ``window``: ``(first, size)`` per spatial dim of the convolution: only the input positions
      ``first ≤ i < first + size`` are computed, and the result is ``[M, C_in, *sizes]`` (the gradient
      of the tensor a zero padding of ``first`` on the left padded).
    - ``mask [N, C_in, *sizes]`` (``N`` dividing ``M``; ``g``'s dtype or float32): the result is zero
      where ``mask[m mod N] <= threshold`` (``threshold`` rounded to ``mask``'s dtype, as PyTorch's
      ``threshold_backward`` compares; a NaN in ``mask`` passes the gradient), the ReLU's backward for
      ``M = J·N`` gradients of ``J`` vectors.

    >>> # g [M, C_out, 16, 16] bf16 on CUDA, weight [C_out, C_in, 3, 3] bf16, geometry of a stride-2 conv
    >>> # dx = input_vjp(g, weight, kernel_geometry(geometry))   # [M, C_in, 33, 33]
    """
    spatial = g.dim() - 2
    box = _window(window, geometry, spatial)
    shape = (g.shape[0], geometry.in_channels, *(size for _, size in box[3 - spatial:]))
    if g.shape[0] * geometry.input_numel > _MAX_ROWS:
        raise ValueError(f"input_vjp indexes positions in 32 bits: g's {g.shape[0]} samples times "
                         f"{geometry.input_numel} input locations exceed {_MAX_ROWS}")
    if mask is not None:
        _check_mask(mask, g, shape)
    if out is None:
        out = torch.empty(shape, dtype=g.dtype, device=g.device,
                          memory_format=_memory_format(g))
    elif tuple(out.shape) != shape:
        raise ValueError(f"out must have shape {shape}, got {tuple(out.shape)}")
    if out.numel() == 0:
        return out
    block_m, block_n, block_k, warps, *stages = block or config(geometry, g.dtype)
    channel_tiles = cdiv(geometry.channels_per_group, block_n)
    sizes = tuple(size for _, size in box)
    g5 = g.reshape(g.shape[0], g.shape[1], *geometry.output_size)  # views: trivial dims prepended
    w5 = weight.reshape(weight.shape[0], weight.shape[1], *geometry.kernel_size)
    o5 = out.view(out.shape[0], out.shape[1], *sizes) if out.dim() < 5 else out
    if mask is None:
        masking = (o5, 0.0, 1, 1, 0, 0, 0, 0, 0)  # unused: the kernel's MASKED branch is compiled out
    else:
        m5 = mask.view(mask.shape[0], mask.shape[1], *sizes) if mask.dim() < 5 else mask
        masking = (m5, rounded_threshold(float(threshold), mask.dtype), mask.shape[0], g.shape[0] // mask.shape[0],
                   *m5.stride())
    for (r0, t0), (r1, t1), (r2, t2) in polyphase(geometry, None if window is None else box):
        rows = g.shape[0] * t0[0] * t1[0] * t2[0]
        if rows == 0:
            continue
        _launch(
            (cdiv(rows, block_m), geometry.groups * channel_tiles), g5, w5, o5, rows,
            geometry.channels_per_group, geometry.out_channels_per_group, channel_tiles,
            t0[0], t1[0], t2[0], *geometry.output_size, r0, r1, r2, *geometry.stride,
            t0[1], t1[1], t2[1], t0[2], t1[2], t2[2], t0[3], t1[3], t2[3], t0[4], t1[4], t2[4], t0[5], t1[5], t2[5],
            *g5.stride(), *w5.stride(), *o5.stride(), *masking,
            MASKED=mask is not None, PRECISION=precision, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
            num_warps=warps, num_stages=stages[0] if stages else None,
        )
    return out


def _window(window: Optional[Sequence[Tuple[int, int]]], geometry: KernelGeometry, spatial: int) -> tuple:
    """``window`` checked and embedded in the kernels' three dims (the whole input where ``None``)."""
    if window is None:
        return tuple((0, size) for size in geometry.input_size)
    window = tuple(tuple(w) for w in window)
    sizes = geometry.input_size[3 - spatial:]
    if len(window) != spatial or any(len(w) != 2 for w in window) or any(
            not (0 <= first and 0 <= size and first + size <= limit) for (first, size), limit in zip(window, sizes)):
        raise ValueError(f"window must hold (first, size) with 0 <= first and first + size <= the input size "
                         f"per spatial dim (input {tuple(sizes)}), got {window}")
    return ((0, 1),) * (3 - spatial) + window


def _check_mask(mask: torch.Tensor, g: torch.Tensor, shape: tuple) -> None:
    if (mask.dim() != len(shape) or tuple(mask.shape[1:]) != shape[1:] or mask.shape[0] == 0
            or shape[0] % mask.shape[0] or mask.device != g.device or mask.dtype not in (g.dtype, torch.float32)):
        raise ValueError(f"mask must be [N, {', '.join(map(str, shape[1:]))}] with N dividing {shape[0]}, on "
                         f"{g.device}, in {g.dtype} or float32; got {tuple(mask.shape)} {mask.dtype} on {mask.device}")


def _memory_format(g: torch.Tensor) -> torch.memory_format:
    if g.dim() == 4 and g.is_contiguous(memory_format=torch.channels_last) and not g.is_contiguous():
        return torch.channels_last
    if g.dim() == 5 and g.is_contiguous(memory_format=torch.channels_last_3d) and not g.is_contiguous():
        return torch.channels_last_3d
    return torch.contiguous_format
