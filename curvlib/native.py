"""The ``"native"`` pathway: each operation through PyTorch's own kernels (cuDNN/ATen convolutions and
their gradients; explicit unfolding plus batched matrix products where PyTorch has no built-in).

These are the implementations a PyTorch user would write by hand (the core paper's ``PT`` baseline),
generalised to any number of spatial dimensions, groups and asymmetric padding. They give
``pathway="auto"`` (:mod:`curvlib.pathways`) a candidate that is never slower than PyTorch itself.

Everything is expressed through the layer's *reference convolution* (:class:`~curvlib.hyperparams.ConvGeometry`):
``to_output_side`` is its forward map (``i`` → ``o``), ``to_input_side`` its transpose (``o`` → ``i``),
``reference_weight_vjp`` its weight gradient. The unfold-based operations (KFAC factors, GGN diagonal and
Gram, HesScale) need the unfolded layer input and exist for ordinary (not transposed) layers only;
:func:`supports` says which operation runs natively for a geometry.

Normalisations are those of :mod:`curvlib.functional`.
"""

from __future__ import annotations

import functools
import math
from typing import Iterator, Optional, Tuple

import torch
from torch import Tensor

from .cuda_graphs import GraphCache
from .hyperparams import ConvGeometry

#: operations with a native implementation for ordinary layers; the first five also for transposed layers
NATIVE_OPERATIONS = (
    "conv",
    "conv_transpose",
    "weight_jvp",
    "input_jvp",
    "input_vjp",
    "weight_vjp",
    "kfc",
    "kfac_reduce",
    "ggn_diag",
    "ggn_gram",
    "hesscale_weight_diag",
)
_UNFOLD_OPERATIONS = ("kfc", "kfac_reduce", "ggn_diag", "ggn_gram", "hesscale_weight_diag")

#: bytes of per-(column, sample) weight gradients the GGN diagonal/Gram hold at once when no memory
#: budget is set (``curvlib.pathways.configure(memory_budget=...)``; with one, a third of it): fewer,
#: larger batched products are faster, PyTorch's own chunked version in the benchmark uses 2 GiB
DEFAULT_CHUNK_BYTES = 2**30


def _chunk_bytes() -> float:
    """The gradient chunk of the GGN diagonal/Gram under the current memory budget."""
    from .pathways import settings  # here: pathways imports nothing of this module

    budget = settings().memory_budget
    return DEFAULT_CHUNK_BYTES if budget is None else max(budget / 3, 2**20)


def supports(op: str, geometry: ConvGeometry, per_sample: bool = False, columns: bool = False) -> bool:
    """Whether :mod:`curvlib.native` implements ``op`` for this geometry and these options."""
    if op not in NATIVE_OPERATIONS or geometry.num_dims > 3:  # ATen convolutions stop at 3-d
        return False
    if op in _UNFOLD_OPERATIONS:
        return not geometry.transposed
    if op == "weight_vjp":
        return not (per_sample or columns)
    return True


@functools.lru_cache(maxsize=4096)
def _symmetric_padding(geometry: ConvGeometry):
    """``(padding per dim, explicit (left, right) pads or None)``: ATen pads symmetrically only."""
    if all(left == right for left, right in geometry.padding):
        return [left for left, _ in geometry.padding], None
    return [0] * geometry.num_dims, geometry.padding


def _pad(tensor: Tensor, pairs) -> Tensor:
    flat = [p for pair in reversed(pairs) for p in pair]  # torch.nn.functional.pad: last dim first
    return torch.nn.functional.pad(tensor, flat)


def to_output_side(t_i: Tensor, weight: Tensor, geometry: ConvGeometry, bias: Optional[Tensor] = None) -> Tensor:
    """The reference convolution ``i → o``: ``[N, in_channels, *input_size] → [N, out_channels, *output_size]``
    (plus ``bias`` ``[out_channels]`` if given)."""
    padding, explicit = _symmetric_padding(geometry)
    if explicit is not None:
        t_i = _pad(t_i, explicit)
    n = geometry.num_dims
    y = torch.convolution(  # not torch.ops.aten.convolution: its Python dispatch costs microseconds
        t_i, weight, bias, list(geometry.stride), padding, list(geometry.dilation), False, [0] * n, geometry.groups
    )
    # a transposed layer's input (the o side) may stop short of the reference output (output_padding ≥ stride)
    return y[(..., *(slice(0, o) for o in geometry.output_size))] if tuple(y.shape[2:]) != geometry.output_size else y


def to_input_side(t_o: Tensor, weight: Tensor, geometry: ConvGeometry) -> Tensor:
    """The transposed reference convolution ``o → i``: ``[N, out_channels, *output_size] → [N, in_channels, *input_size]``.

    Computed as the input gradient of the reference convolution (``convolution_backward``, as
    ``torch.nn.grad.conv{N}d_input`` does), which takes the target size from the input's shape and
    so needs no output padding.
    """
    padding, explicit = _symmetric_padding(geometry)
    sizes = list(geometry.input_size)
    if explicit is not None:
        sizes = [i + left + right for i, (left, right) in zip(sizes, explicit)]
    covered = _covered_outputs(sizes, geometry, padding)
    if any(c > o for c, o in zip(covered, t_o.shape[2:])):
        # a transposed layer's input may stop short of the reference output (output_padding ≥ stride)
        t_o = _pad(t_o, [(0, c - o) for c, o in zip(covered, t_o.shape[2:])])
    dummy = t_o.new_empty(1).expand(t_o.shape[0], geometry.in_channels, *sizes)  # only its shape is read
    n = geometry.num_dims
    result = torch.ops.aten.convolution_backward(
        t_o, dummy, weight, None, list(geometry.stride), padding, list(geometry.dilation), False, [0] * n,
        geometry.groups, [True, False, False],
    )[0]
    if explicit is not None:
        result = result[(..., *(slice(left, left + i) for i, (left, _) in zip(geometry.input_size, explicit)))]
    return result


def reference_weight_vjp(t_i: Tensor, t_o: Tensor, geometry: ConvGeometry) -> Tensor:
    """``Σ_n`` weight gradient of the reference convolution, ``[out_channels, in_channels // G, *K]``."""
    padding, explicit = _symmetric_padding(geometry)
    if explicit is not None:
        t_i = _pad(t_i, explicit)
    covered = _covered_outputs(t_i.shape[2:], geometry, padding)
    if any(c > o for c, o in zip(covered, t_o.shape[2:])):
        # a transposed layer's input may stop short of the reference output (output_padding ≥ stride):
        # the missing outputs get zero gradient
        t_o = _pad(t_o, [(0, c - o) for c, o in zip(covered, t_o.shape[2:])])
    dummy = t_o.new_empty(1).expand(geometry.weight_shape)  # only its shape is read, as torch.nn.grad does
    n = geometry.num_dims
    return torch.ops.aten.convolution_backward(
        t_o, t_i, dummy, None, list(geometry.stride), padding, list(geometry.dilation), False, [0] * n,
        geometry.groups, [False, True, False],
    )[1]


def _covered_outputs(sizes, geometry: ConvGeometry, padding):
    return [(i + 2 * p - d * (k - 1) - 1) // s + 1 for i, p, d, k, s in
            zip(sizes, padding, geometry.dilation, geometry.kernel_size, geometry.stride)]


# ----------------------------------------------------------------------------------------------
# unfold-based operations (ordinary layers)


def _windows(x: Tensor, geometry: ConvGeometry) -> Tensor:
    """The overlapping windows of ``x`` as a strided view ``[N, C, *O, *K]`` (no copy)."""
    k = geometry.num_dims
    windows = _pad(x, geometry.padding)
    for axis in range(k):
        span = geometry.dilation[axis] * (geometry.kernel_size[axis] - 1) + 1
        windows = windows.unfold(2 + axis, span, geometry.stride[axis])[..., :: geometry.dilation[axis]]
    # trailing pixels no window reaches are already dropped by unfold
    return windows[(slice(None), slice(None), *(slice(0, o) for o in geometry.output_size))]


def unfold_input(x: Tensor, geometry: ConvGeometry) -> Tensor:
    """The unfolded input ``[N, G, D, O]`` (``D = C_in // G · ∏K`` ordered like ``weight.flatten(1)``,
    ``O = ∏ output_size``), materialised: the memory PyTorch's unfold pathway pays.

    One strided copy of the overlapping windows, N-d. Not ``torch.nn.functional.unfold``: its CUDA
    im2col launches one kernel per sample, 1.16x (GGN diagonal) to 1.36x (KFC) slower in geometric
    mean over the Table E3 layers on an H100 and host-bound inside the engine
    (``benchmarks/diagnostics/unfold_variants.py``)."""
    n, c = x.shape[:2]
    k = geometry.num_dims
    order = [0, 1, *range(2 + k, 2 + 2 * k), *range(2, 2 + k)]
    windows = _windows(x, geometry).permute(order)
    return windows.reshape(n, geometry.groups, (c // geometry.groups) * math.prod(geometry.kernel_size), -1)


def unfold_columns(x: Tensor, geometry: ConvGeometry) -> Tensor:
    """The unfolded input with the samples among the columns, ``[G, D, N·O]`` (column ``n·O + o``):
    the operand of the KFC Gram, made by one copy (:func:`unfold_input` followed by a permutation
    would copy twice).

    >>> from curvlib.hyperparams import make_geometry
    >>> g = make_geometry(4, 6, (6, 6), kernel_size=3, stride=2, padding=1, groups=2)
    >>> x = torch.randn(2, 4, 6, 6)
    >>> torch.equal(unfold_columns(x, g), unfold_input(x, g).permute(1, 2, 0, 3).flatten(2))
    True
    """
    n, c = x.shape[:2]
    k = geometry.num_dims
    order = [1, *range(2 + k, 2 + 2 * k), 0, *range(2, 2 + k)]  # [C, *K, N, *O]
    windows = _windows(x, geometry).permute(order)
    return windows.reshape(geometry.groups, (c // geometry.groups) * math.prod(geometry.kernel_size), -1)


#: Grams ``u uᵀ`` of at least this many rows are computed by :func:`gram` in blocks (upper triangle only);
#: smaller ones by one product (the blocks' extra launches and copies would cost more than they save)
GRAM_BLOCK_MIN_ROWS = 512

#: blocks of rows of :func:`gram` (products ``(b + 1)/(2b)`` of the full one: 3/4 for 2). Measured
#: (``benchmarks/diagnostics/gram_blocks.py``, float32, the unfolded inputs of All-CNN-C and ResNet-18,
#: D = 576-4608): 2 blocks 0.79-1.04x the time of one product on an H100 and an H200; 3 blocks
#: 0.70-0.91x on both but 3.1x on one H100 for D = 1728, M = 8192 (a cuBLAS kernel choice), so 2
GRAM_BLOCKS = 2


def _row_blocks(rows: int, blocks: Optional[int]):
    """``(r0, r1)`` row ranges of :func:`gram`'s blocks (one range: a single product)."""
    blocks = GRAM_BLOCKS if blocks is None else blocks
    if blocks <= 1 or rows < max(GRAM_BLOCK_MIN_ROWS, blocks):
        return [(0, rows)]
    step = -(-rows // blocks)
    return [(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]


def gram_upper(u: Tensor, out: Tensor, blocks: int = None, accumulate: bool = False) -> None:
    """The upper triangle of blocks of ``u uᵀ`` (:func:`gram`) written into ``out`` ``[G, D, D]``, or added
    to it (``accumulate``); the blocks below the diagonal are left as they are (:func:`mirror_upper`).
    Each block row is one batched product into a view of ``out`` (cuBLAS writes it in place)."""
    for r0, r1 in _row_blocks(u.shape[1], blocks):
        left, right = u[:, r0:r1], u[:, r0:].transpose(1, 2)
        target = out[:, r0:r1, r0:]
        target.baddbmm_(left, right) if accumulate else torch.bmm(left, right, out=target)


def mirror_upper(out: Tensor, blocks: int = None) -> Tensor:
    """Copies the blocks above the diagonal (:func:`gram_upper`) into those below: ``out`` symmetric."""
    for r0, r1 in _row_blocks(out.shape[1], blocks)[:-1]:
        out[:, r1:, r0:r1] = out[:, r0:r1, r1:].transpose(1, 2)
    return out


def gram(u: Tensor, blocks: int = None) -> Tensor:
    """``u uᵀ`` ``[G, D, D]`` of ``u`` ``[G, D, M]``.

    From :data:`GRAM_BLOCK_MIN_ROWS` rows on, by ``blocks`` (default :data:`GRAM_BLOCKS`) blocks of rows:
    block ``i`` times the columns from its diagonal block on, mirrored into the lower triangle — the
    products of the upper triangle of blocks only (``(b + 1)/(2b)`` of the full product), like a BLAS
    ``syrk``, which PyTorch does not expose. ``blocks=1``: one product.

    >>> u = torch.randn(2, 600, 50, dtype=torch.float64)
    >>> torch.allclose(gram(u), u @ u.transpose(1, 2))
    True
    """
    out = u.new_empty(u.shape[0], u.shape[1], u.shape[1])
    gram_upper(u, out, blocks)
    return mirror_upper(out, blocks)


def unfolded_bytes(geometry: ConvGeometry, batch: int, element_size: int) -> int:
    """Bytes of the unfolded input of ``batch`` samples (:func:`unfold_input`)."""
    return batch * geometry.in_channels * math.prod(geometry.kernel_size) * math.prod(geometry.output_size) * element_size


#: without a memory budget, the KFC pathway of :mod:`curvlib.functional` unfolds at most this fraction of
#: the unfolded input at once (:func:`kfc_chunk_bytes`): an eighth of what PyTorch's unfold pathway holds
#: (the unfolded input and its permuted copy). Measured over the 66 Table E3 layers on an H200 (CUDA
#: graphs on; ``benchmarks/diagnostics/kfc_chunks.py``): 0.60x PyTorch's time in geometric mean,
#: against 0.62x all at once and 0.75x for a tenth (more, smaller products)
KFC_CHUNK_FRACTION = 0.25


def _padded_sample_bytes(geometry: ConvGeometry, element_size: int) -> int:
    """Bytes of one sample of ``x`` zero-padded (:func:`_pad` copies it when there is padding), else 0."""
    if not any(left or right for left, right in geometry.padding):
        return 0
    return geometry.in_channels * math.prod(
        i + left + right for i, (left, right) in zip(geometry.input_size, geometry.padding)) * element_size


def kfc_memory_limit(geometry: ConvGeometry, batch: int, element_size: int) -> Optional[float]:
    """Bytes of extra memory a KFC pathway may take under the current memory limits
    (``curvlib.pathways.configure(memory_budget=..., memory_fraction=...)``, the smaller of the two; the
    fraction is of the unfold pathway's memory, twice the unfolded input); ``None`` without limits."""
    from .pathways import settings  # here: pathways imports nothing of this module

    limits = settings()
    budget = limits.memory_budget
    if limits.memory_fraction is not None:
        relative = limits.memory_fraction * 2 * unfolded_bytes(geometry, batch, element_size)
        budget = relative if budget is None else min(budget, relative)
    return budget


def kfc_chunk_bytes(geometry: ConvGeometry, batch: int, element_size: int) -> float:
    """The ``chunk_bytes`` :func:`kfc` runs with in :func:`curvlib.functional.kfc`: :data:`KFC_CHUNK_FRACTION`
    of the unfolded input or, under memory limits (:func:`kfc_memory_limit`), the unfolded share of the
    limit if less (one chunk of padded input samples comes with it)."""
    per_sample = unfolded_bytes(geometry, 1, element_size)
    chunk = KFC_CHUNK_FRACTION * per_sample * batch
    budget = kfc_memory_limit(geometry, batch, element_size)
    if budget is not None:
        chunk = min(chunk, budget * per_sample / (per_sample + _padded_sample_bytes(geometry, element_size)))
    return chunk


def kfc_extra_bytes(geometry: ConvGeometry, batch: int, element_size: int, chunk_bytes: Optional[float]) -> float:
    """Extra memory of :func:`kfc` with ``chunk_bytes``: one chunk of unfolded samples (at least one) and,
    with padding, the chunk of padded input it is cut from."""
    per_sample = unfolded_bytes(geometry, 1, element_size)
    samples = batch if chunk_bytes is None else max(1, min(batch, int(chunk_bytes // max(per_sample, 1))))
    return samples * (per_sample + _padded_sample_bytes(geometry, element_size))


def kfc(x: Tensor, geometry: ConvGeometry, chunk_bytes: Optional[float] = None) -> Tensor:
    """``1/N Σ_{n,o} u uᵀ`` per group ``[G, D, D]``: unfold (:func:`unfold_columns`), one symmetric product
    (:func:`gram`).

    ``chunk_bytes``: unfold at most this many bytes at once (at least one sample). The samples then go
    in chunks whose products are added into the result (:func:`gram_upper`): the extra memory is one
    chunk's unfolded input instead of all of it, for more, smaller products. ``None``: all at once.
    Chunked calls on CUDA replay a captured graph when repeated at the same input address
    (:class:`curvlib.cuda_graphs.GraphCache`: 4-6 small operations per chunk, host-bound otherwise);
    the graph's temporaries are one chunk's.

    >>> from curvlib.hyperparams import make_geometry
    >>> x = torch.randn(8, 3, 10, 10, dtype=torch.float64)
    >>> g = make_geometry(3, 4, (10, 10), kernel_size=3, padding=1)
    >>> torch.allclose(kfc(x, g, chunk_bytes=3 * unfolded_bytes(g, 1, 8)), kfc(x, g))
    True
    """
    n = x.shape[0]
    per_sample = max(1, unfolded_bytes(geometry, 1, x.element_size()))
    samples = n if chunk_bytes is None else int(max(1, min(n, chunk_bytes // per_sample)))
    if samples >= n:
        return gram(unfold_columns(x, geometry)).div_(n)
    return _KFC_GRAPHS((geometry, samples), lambda t: _kfc_in_chunks(t, geometry, samples), x)


def _kfc_in_chunks(x: Tensor, geometry: ConvGeometry, samples: int) -> Tensor:
    n = x.shape[0]
    rows = x.shape[1] // geometry.groups * math.prod(geometry.kernel_size)
    out = x.new_empty(geometry.groups, rows, rows)
    for n0 in range(0, n, samples):
        gram_upper(unfold_columns(x[n0:n0 + samples], geometry), out, accumulate=n0 > 0)
    return mirror_upper(out).div_(n)


_KFC_GRAPHS = GraphCache("native_kfc", copy_moving_inputs=True)  # 4-6 kernels per chunk


def kfac_reduce(x: Tensor, geometry: ConvGeometry) -> Tensor:
    """``1/N Σ_n ū ūᵀ`` per group ``[G, D, D]``, ``ū`` the unfolded input averaged over output locations."""
    u = unfold_input(x, geometry).mean(-1).transpose(0, 1)  # [G, N, D]
    return torch.bmm(u.transpose(1, 2), u).div_(x.shape[0])


def _channel_blocks(geometry: ConvGeometry, per_channel_bytes: float, chunk_bytes: float):
    """Blocks ``(g0, g1, e0, e1)`` of output channels whose per-(column, sample) gradients fit ``chunk_bytes``."""
    groups, per_group = geometry.groups, geometry.out_channels // geometry.groups
    if per_channel_bytes * per_group <= chunk_bytes:
        step = max(1, int(chunk_bytes // (per_channel_bytes * per_group)))
        return [(g, min(g + step, groups), 0, per_group) for g in range(0, groups, step)]
    step = max(1, int(chunk_bytes // per_channel_bytes))
    return [(g, g + 1, e, min(e + step, per_group)) for g in range(groups) for e in range(0, per_group, step)]


def column_gradients(x: Tensor, s: Tensor, geometry: ConvGeometry, chunk_bytes: float) -> Iterator[Tuple]:
    """Yield ``(g0, g1, e0, e1, J)``, ``J [N, g1-g0, C, e1-e0, D]`` the weight gradient of every column of
    ``s`` and sample for a block of output channels (unfold once, one batched matrix product per block)."""
    u = unfold_input(x, geometry)
    n, g, d, o = u.shape
    c = s.shape[0]
    per_group = geometry.out_channels // g
    channels_inner = _channels_innermost(s)
    s = s.reshape(c, n, g, per_group, o)
    for g0, g1, e0, e1 in _channel_blocks(geometry, c * n * d * x.element_size(), chunk_bytes):
        e = e1 - e0
        if channels_inner:
            # channels-last s: the sample-major copy keeps the channels innermost (a transposing copy
            # runs at about a quarter of the bandwidth); J comes out [N, G, D, C, E], returned permuted.
            # Its rows are padded to 16 bytes: cuBLAS falls back to slow kernels on unaligned leading
            # dimensions (C·E = 21·115 bf16: 2.8 ms instead of about 0.5 ms, H100)
            ce = c * e
            row = -(-ce * s.element_size() // 16) * 16 // s.element_size()
            sb = s.new_empty(n, g1 - g0, o, row)
            sb[..., :ce].view(n, g1 - g0, o, c, e).copy_(s[:, :, g0:g1, e0:e1].permute(1, 2, 4, 0, 3))
            sb[..., ce:].zero_()  # the padding's products are dropped; zeros keep them finite
            J = torch.matmul(u[:, g0:g1], sb)[..., :ce].view(n, g1 - g0, d, c, e).permute(0, 1, 3, 4, 2)
        else:
            sb = s[:, :, g0:g1, e0:e1].permute(1, 2, 0, 3, 4).reshape(n, g1 - g0, c * e, o)
            J = torch.matmul(sb, u[:, g0:g1].transpose(-1, -2)).view(n, g1 - g0, c, e, d)
        yield g0, g1, e0, e1, J


def _channels_innermost(s: Tensor) -> bool:
    """Whether ``s [C, N, C_out, *O]`` stores its channels innermost (channels-last columns) with more
    than one output location."""
    return s.dim() > 3 and s.shape[2] > 1 and s.stride(2) == 1 and math.prod(s.shape[3:]) > 1


def ggn_diag(x: Tensor, s: Tensor, geometry: ConvGeometry, per_sample: bool = False,
             chunk_bytes: float = None) -> Tensor:
    """``Σ_{c[,n]} J_{c,n}²`` weight-shaped (``[N, *weight]`` if ``per_sample``), chunked over output channels."""
    n, g = x.shape[0], geometry.groups
    per_group, d = geometry.out_channels // g, geometry.weight_shape[1] * math.prod(geometry.kernel_size)
    out = x.new_empty((n, g, per_group, d) if per_sample else (g, per_group, d))
    chunk = _chunk_bytes() if chunk_bytes is None else chunk_bytes
    for g0, g1, e0, e1, J in column_gradients(x, s, geometry, chunk):
        if per_sample:
            out[:, g0:g1, e0:e1] = _squared_norm(J, (2,))
        else:
            out[g0:g1, e0:e1] = _squared_norm(J, (0, 2))
    return out.view(*((n,) if per_sample else ()), *geometry.weight_shape)


def _squared_norm(t: Tensor, dims: Tuple[int, ...]) -> Tensor:
    """``Σ t²`` over ``dims`` (the other dimensions in their order), reduced over ``t`` viewed in its
    memory order: the squared norm reads ``t`` once (square-then-sum reads it twice and writes it once
    more), and PyTorch's reduction of a permuted view can be 15x slower than of the same memory in order
    (channels-last column gradients ``[N, G, C, E, D]`` stored ``[N, G, D, C, E]``: 4.9 vs 0.29 ms, H100)."""
    order = sorted(range(t.dim()), key=lambda i: -t.stride(i))
    kept = [i for i in order if i not in dims]
    reduced = torch.linalg.vector_norm(t.permute(order), dim=[order.index(i) for i in dims]).square_()
    return reduced.permute([kept.index(i) for i in sorted(kept)])


def location_gram(s: Tensor, geometry: ConvGeometry) -> Tensor:
    """``Γ[n, g, e, o, o'] = Σ_c s[c, n, (g, e), o] s[c, n, (g, e), o']``, ``[N, G, E, O, O]``: the columns'
    Gram over output locations, per sample and output channel (additive over chunks of columns).

    With it the GGN diagonal of the weight is ``Σ_{n,o,o'} Γ[n,g,e,o,o'] u[n,g,d,o] u[n,g,d,o']``
    (:func:`ggn_diag_from_location_gram`): ``2·N·C_out·O²·(C + D)`` FLOPs instead of
    ``2·C·N·C_out·O·D``, fewer where ``O·(C + D) < C·D`` — layers with few output locations and many
    columns (late layers, classifier heads). ``s`` is ``[C, N, C_out, *O]``.
    """
    c, n = s.shape[:2]
    o = math.prod(s.shape[3:])
    flat = s.reshape(c, n, geometry.out_channels, o).permute(1, 2, 3, 0)  # [N, C_out, O, C]
    gram = torch.matmul(flat, flat.transpose(-1, -2))  # [N, C_out, O, O]
    return gram.view(n, geometry.groups, geometry.out_channels // geometry.groups, o, o)


def ggn_diag_from_location_gram(x: Tensor, gram: Tensor, geometry: ConvGeometry, per_sample: bool = False,
                                chunk_bytes: float = None) -> Tensor:
    """The weight's GGN diagonal (``[N, *weight]`` if ``per_sample``) from the location Gram
    ``Γ [N, G, E, O, O]`` of :func:`location_gram`: one matrix product per group contracting over
    ``(n, o, o')`` with the outer products ``u[n,g,d,o] u[n,g,d,o']`` of the unfolded input, built for
    chunks of samples of at most ``chunk_bytes``."""
    u = unfold_input(x, geometry)  # [N, G, D, O]
    n, g, d, o = u.shape
    e = gram.shape[2]
    chunk = _chunk_bytes() if chunk_bytes is None else chunk_bytes
    samples = max(1, min(n, int(chunk // max(1, g * d * o * o * x.element_size()))))
    out = x.new_zeros((n, g, e, d) if per_sample else (g, e, d))
    for n0 in range(0, n, samples):
        n1 = min(n, n0 + samples)
        pairs = (u[n0:n1, :, :, :, None] * u[n0:n1, :, :, None, :]).flatten(3)  # [n, G, D, O²]
        gam = gram[n0:n1].reshape(n1 - n0, g, e, o * o)
        if per_sample:
            out[n0:n1] = torch.matmul(gam, pairs.transpose(-1, -2))
        else:  # [G, E, n·O²] @ [G, n·O², D]
            out += torch.bmm(gam.permute(1, 2, 0, 3).reshape(g, e, -1), pairs.permute(1, 0, 3, 2).reshape(g, -1, d))
    return out.view(*((n,) if per_sample else ()), *geometry.weight_shape)


def ggn_gram(x: Tensor, s: Tensor, geometry: ConvGeometry, chunk_bytes: float = None) -> Tensor:
    """``[C, N, C, N]`` Gram matrix ``⟨J_{c,n}, J_{c',n'}⟩`` of per-(column, sample) weight gradients."""
    c, n = s.shape[:2]
    gram = x.new_zeros(c * n, c * n)
    chunk = _chunk_bytes() if chunk_bytes is None else chunk_bytes
    for *_, J in column_gradients(x, s, geometry, chunk / 2):  # the reshape below copies J
        flat = J.permute(2, 0, 1, 3, 4).reshape(c * n, -1)
        gram.addmm_(flat, flat.t())
    return gram.view(c, n, c, n)


def hesscale_weight_diag(x: Tensor, d: Tensor, geometry: ConvGeometry, per_sample: bool = False) -> Tensor:
    """``Σ_{n,o} d[n, e, o] u[n, (c, k), o]²`` per group (``[N, *weight]`` with ``per_sample``)."""
    u2 = unfold_input(x, geometry).square()  # [N, G, D, O]; not in place: may be a view of x
    n, g, dim, o = u2.shape
    dd = d.reshape(n, g, geometry.out_channels // g, o)
    if per_sample:
        return torch.matmul(dd, u2.transpose(-1, -2)).view(n, *geometry.weight_shape)
    u2 = u2.permute(1, 0, 3, 2).reshape(g, n * o, dim)
    dd = dd.permute(1, 2, 0, 3).reshape(g, -1, n * o)
    return torch.bmm(dd, u2).view(geometry.weight_shape)


# ----------------------------------------------------------------------------------------------
# prepared calls: the arguments of the ATen call computed once per geometry, for repeated calls
# (``curvlib.functional``'s shortcut), where microseconds of Python matter on small layers

_CONVOLUTION_BACKWARD = torch.ops.aten.convolution_backward.default  # the overload: no packet dispatch


def _no_adjustment(geometry: ConvGeometry) -> bool:
    """Symmetric padding, and the o side is exactly what the reference convolution produces."""
    padding, explicit = _symmetric_padding(geometry)
    return explicit is None and tuple(_covered_outputs(geometry.input_size, geometry, padding)) == geometry.output_size


@functools.lru_cache(maxsize=4096)
def prepared_to_output_side(geometry: ConvGeometry):
    """``f(t_i, weight, bias)`` = :func:`to_output_side`, with its arguments prepared."""
    if not _no_adjustment(geometry):
        return lambda t, w, b=None: to_output_side(t, w, geometry, b)
    stride, padding, dilation = list(geometry.stride), _symmetric_padding(geometry)[0], list(geometry.dilation)
    zeros, groups = [0] * geometry.num_dims, geometry.groups
    return lambda t, w, b=None: torch.convolution(t, w, b, stride, padding, dilation, False, zeros, groups)


@functools.lru_cache(maxsize=4096)
def prepared_to_input_side(geometry: ConvGeometry):
    """``f(t_o, weight)`` = :func:`to_input_side`, with its arguments prepared."""
    if not _no_adjustment(geometry):
        return lambda t, w: to_input_side(t, w, geometry)
    stride, padding, dilation = list(geometry.stride), _symmetric_padding(geometry)[0], list(geometry.dilation)
    zeros, groups, size = [0] * geometry.num_dims, geometry.groups, (geometry.in_channels, *geometry.input_size)
    mask = [True, False, False]
    return lambda t, w: _CONVOLUTION_BACKWARD(
        t, t.new_empty(1).expand(t.shape[0], *size), w, None, stride, padding, dilation, False, zeros, groups, mask
    )[0]


@functools.lru_cache(maxsize=4096)
def prepared_reference_weight_vjp(geometry: ConvGeometry):
    """``f(t_i, t_o)`` = :func:`reference_weight_vjp`, with its arguments prepared."""
    if not _no_adjustment(geometry):
        return lambda t_i, t_o: reference_weight_vjp(t_i, t_o, geometry)
    stride, padding, dilation = list(geometry.stride), _symmetric_padding(geometry)[0], list(geometry.dilation)
    zeros, groups, shape = [0] * geometry.num_dims, geometry.groups, geometry.weight_shape
    mask = [False, True, False]
    return lambda t_i, t_o: _CONVOLUTION_BACKWARD(
        t_o, t_i, t_o.new_empty(1).expand(shape), None, stride, padding, dilation, False, zeros, groups, mask
    )[1]
