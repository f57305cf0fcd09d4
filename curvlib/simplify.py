"""Exact rewrites of tensor networks (core paper D.3), each ``TensorNetwork → TensorNetwork``.

Rewrites that remove index patterns (used by :func:`simplify`):

- :func:`unfold_input_leg` — transformations **T1** (dense, ``K = S``) and **T2** (down-sampling,
  ``S > K``) generalised: when a pattern's input leg ``i`` is summed and carried only by data
  operands, and windows do not overlap (``S ≥ D·(K−1)+1``), the contraction with Π is the strided
  *view* ``X[..., o·S + k·D − P, ...]`` — no pattern, no copy (padding, if any, is applied first).
  Trailing pixels that no window touches (D14 violated) are skipped by the view. Averaged
  patterns (KFAC-reduce) become the same view summed over ``o`` and scaled by ``1/O``.
- :func:`embed_output_leg` — the same for a pattern whose input leg is an *output* leg (input
  VJPs, fold): the network returns ``(o, k)`` and a post-processing step writes them into ``i``.
- :func:`merge_duplicate_patterns` — two copies of one pattern sharing two legs are a delta on the
  third (``Π[i,o,k] Π[i,o,k'] = δ_{kk'} Π[i,o,k]``): one copy is dropped.
- :func:`square_repeated_operands` — the same tensor twice with the same legs becomes its square.
- :func:`prune_identities` — identity patterns (``K = S = 1``, no padding) and Kronecker deltas are
  removed by renaming one leg to the other.
- :func:`squeeze_legs` — legs of size 1 are dropped.
- :func:`merge_parallel_legs` — legs that always appear together, adjacent and in the same order,
  are merged into one (fewer, larger dimensions for einsum), when the data allow a view.

Rewrites that re-express a pattern (exact identities of Π, available for analysis and for later
pathways; they do not make a contraction cheaper by themselves and are not applied by default):

- :func:`swap_kernel_output` — **T3**: ``Π(I,K,S,P,D)[i,o,k] = Π(I,O,D,P,S)[i,k,o]`` under D14.
- :func:`stride_as_subsampling` — **T4**: ``Π(I,K,S,P,D) = Π(I,K,1,P,D)[:, ::S, :]``.
- :func:`dilation_as_subsampling` — **T5**: ``Π(I,K,S,P,D) = Π(I,K+(K−1)(D−1),S,P,1)[:, :, ::D]``.
- :func:`transpose_as_convolution` — **T6**: ``Π(I,K,1,P,1)[i,o,k] = Π(O,K,1,K−1−P,1)[o,i,K−1−k]``;
  the kernel flip is moved onto the (small) operand carrying ``k`` where possible.

Every rewrite returns the network unchanged when its preconditions do not hold.

>>> import torch
>>> from curvlib import functional as F
>>> from curvlib.simplify import simplify
>>> from curvlib.expressions import kfac
>>> from curvlib.hyperparams import make_geometry
>>> x = torch.randn(2, 3, 8, 8)
>>> net = kfac.kfc(x, make_geometry(3, 3, (8, 8), kernel_size=2, stride=2))  # dense conv
>>> net.num_patterns, simplify(net).num_patterns
(4, 0)
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional, Tuple

from .patterns import PatternSpec
from .tensor_network import Embedding, TensorNetwork, pad_axis, window_view


# ----------------------------------------------------------------------------------------------
# helpers


def _full_plain_pattern(network: TensorNetwork, position: int) -> Optional[Tuple[str, str, str]]:
    """Legs ``(i, o, k)`` of operand ``position`` if it is an unmodified full pattern, else ``None``."""
    operand = network.operands[position]
    if operand.pattern is None or not operand.pattern.is_plain or len(operand.legs) != 3:
        return None
    return operand.legs


def _non_overlapping(spec: PatternSpec) -> bool:
    return spec.stride >= spec.dilation * (spec.kernel_size - 1) + 1


def _fresh_leg(network: TensorNetwork, base: str) -> str:
    leg, count = base + "~", 0
    while leg in network.sizes:
        count += 1
        leg = f"{base}~{count}"
    return leg


def _rename(network: TensorNetwork, old: str, new: str, drop: int) -> TensorNetwork:
    """Rename leg ``old`` to ``new`` everywhere and drop operand ``drop``."""
    operands = [
        replace(op, legs=tuple(new if leg == old else leg for leg in op.legs))
        for pos, op in enumerate(network.operands)
        if pos != drop
    ]
    output = tuple(new if leg == old else leg for leg in network.output)
    return network.with_operands(operands, output=output)


def _embedding_legs(network: TensorNetwork) -> set:
    return {leg for e in network.embeddings for leg in (e.output_leg, e.kernel_leg)}


# ----------------------------------------------------------------------------------------------
# pattern-removing rewrites


def unfold_input_leg(
    network: TensorNetwork, position: int, allow_overlap: bool = False, averaged: bool = True
) -> TensorNetwork:
    """T1/T2: replace ``X[..i..] Π[i, o, k]`` by the strided view ``X[..o, k..]`` (see module docstring).

    With ``allow_overlap=True`` also overlapping windows are viewed (exact, but einsum may then
    copy the view: that is the im2col memory cost).
    """
    operand = network.operands[position]
    spec = operand.pattern
    if spec is None or operand.legs[0] in network.output:
        return network
    is_averaged = spec.mean_over == "output" and replace(spec, mean_over=None).is_plain and len(operand.legs) == 2
    if is_averaged and not averaged:
        return network
    if is_averaged:
        i, k = operand.legs
        o = _fresh_leg(network, i.replace("i", "o", 1))
    elif _full_plain_pattern(network, position):
        i, o, k = operand.legs
    else:
        return network
    if not (allow_overlap or _non_overlapping(spec)):
        return network
    # every other operand carrying i is data (several, e.g. X twice in HesScale: Π picks one i per (o, k))
    carriers = [pos for pos in network.users(i) if pos != position]
    if not carriers:
        return network
    for pos in carriers:
        carrier = network.operands[pos]
        if carrier.tensor is None or carrier.legs.count(i) != 1 or o in carrier.legs or k in carrier.legs:
            return network
    operands = list(network.operands)
    for pos in carriers:
        carrier = network.operands[pos]
        axis = carrier.legs.index(i)
        view = window_view(pad_axis(carrier.tensor, axis, spec.padding), axis, spec.plain())
        legs = carrier.legs[:axis] + (o, k) + carrier.legs[axis + 1 :]
        operands[pos] = replace(carrier, tensor=view, legs=legs)
    sizes = dict(network.sizes, **{o: spec.output_size})
    del operands[position]
    scale = network.scale / spec.output_size if is_averaged else network.scale
    return network.with_operands(operands, sizes=sizes, scale=scale)


def embed_output_leg(network: TensorNetwork, position: int) -> TensorNetwork:
    """Pattern whose input leg ``i`` is an output leg: return legs ``(o, k)`` and scatter them into ``i``."""
    legs = _full_plain_pattern(network, position)
    if legs is None:
        return network
    i, o, k = legs
    spec = network.operands[position].pattern
    if i not in network.output or o in network.output or k in network.output or not _non_overlapping(spec):
        return network
    others = [pos for pos, op in enumerate(network.operands) if pos != position]
    if any(i in network.operands[pos].legs for pos in others):
        return network
    if not all(any(leg in network.operands[pos].legs for pos in others) for leg in (o, k)):
        return network
    axis = network.output.index(i)
    output = network.output[:axis] + (o, k) + network.output[axis + 1 :]
    operands = [op for pos, op in enumerate(network.operands) if pos != position]
    embeddings = network.embeddings + (Embedding(o, k, i, spec),)
    return network.with_operands(operands, output=output, embeddings=embeddings)


def merge_duplicate_patterns(network: TensorNetwork) -> TensorNetwork:
    """Two copies of one pattern sharing two of their legs are forced equal on the third.

    For fixed ``(i, o)`` at most one ``k`` satisfies ``i = o·S + k·D − P`` (and likewise for the
    other pairs), so ``Π[i,o,k] Π[i,o,k'] = δ_{kk'} Π[i,o,k]``: the second pattern is dropped and its
    free leg renamed to the first one's. This turns the two Jacobian copies of HesScale's networks
    into squared operands (``W∘W``, ``X∘X``) instead of large intermediates.
    """
    changed = True
    while changed:
        changed = False
        plain = [pos for pos in range(len(network.operands)) if _full_plain_pattern(network, pos)]
        for a in plain:
            for b in plain:
                if b <= a or network.operands[a].pattern != network.operands[b].pattern:
                    continue
                legs_a, legs_b = network.operands[a].legs, network.operands[b].legs
                differing = [axis for axis in range(3) if legs_a[axis] != legs_b[axis]]
                if len(differing) != 1:
                    continue
                keep, drop = legs_a[differing[0]], legs_b[differing[0]]
                if keep in network.output and drop in network.output:
                    continue  # both legs are kept: the result would need a diagonal embedding
                if keep in _embedding_legs(network) or drop in _embedding_legs(network):
                    continue
                if any(keep in op.legs and drop in op.legs for op in network.operands):
                    continue  # an operand carrying both legs would need its diagonal
                if drop in network.output:
                    keep, drop = drop, keep
                network = _rename(network, drop, keep, drop=b)
                changed = True
                break
            if changed:
                break
    return network


def square_repeated_operands(network: TensorNetwork) -> TensorNetwork:
    """Two data operands holding the same tensor with the same legs become one operand, its square.

    After :func:`merge_duplicate_patterns`, HesScale's networks hold ``X`` (or ``W``) twice with equal
    legs; einsum would otherwise treat them as independent factors and may plan large intermediates.
    """
    changed = True
    while changed:
        changed = False
        for a, first in enumerate(network.operands):
            for b in range(a + 1, len(network.operands)):
                second = network.operands[b]
                if first.tensor is None or second.tensor is not first.tensor or first.legs != second.legs:
                    continue
                operands = list(network.operands)
                operands[a] = replace(first, tensor=first.tensor * first.tensor, name=f"{first.name}²")
                del operands[b]
                network = network.with_operands(operands)
                changed = True
                break
            if changed:
                break
    return network


def prune_identities(network: TensorNetwork) -> TensorNetwork:
    """Remove Kronecker deltas and identity patterns (``K = S = D = 1``, no padding) by renaming legs."""
    changed = True
    while changed:
        changed = False
        for position, operand in enumerate(network.operands):
            if operand.delta:
                a, b = operand.legs
            elif operand.pattern is not None and operand.pattern.is_plain and len(operand.legs) in (2, 3):
                spec = operand.pattern
                if not (spec.kernel_size == 1 and spec.stride == 1 and spec.padding == (0, 0)):
                    continue
                a, b = operand.legs[:2]
                if len(operand.legs) == 3 and (operand.legs[2] in network.output or len(network.users(operand.legs[2])) > 1):
                    continue  # the size-1 kernel leg is used elsewhere: squeeze it first
            else:
                continue
            if a == b:
                # an earlier renaming joined both legs (two identity patterns on one leg pair): the
                # diagonal of an identity is all ones, so the operand is a factor 1 — drop it while
                # another operand still carries the leg
                if len(network.users(a)) > 1:
                    operands = [op for pos, op in enumerate(network.operands) if pos != position]
                    network = network.with_operands(operands)
                    changed = True
                    break
                continue
            if a in network.output and b in network.output:
                continue
            if a in _embedding_legs(network) or b in _embedding_legs(network):
                continue
            old, new = (a, b) if a not in network.output else (b, a)
            network = _rename(network, old, new, drop=position)
            changed = True
            break
    return network


def squeeze_legs(network: TensorNetwork) -> TensorNetwork:
    """Drop every leg of size 1 from operands and output (the final reshape restores the shape)."""
    protected = _embedding_legs(network)
    ones = {leg for leg, size in network.sizes.items() if size == 1 and leg not in protected}
    if not ones:
        return network
    operands = []
    for operand in network.operands:
        keep = tuple(leg for leg in operand.legs if leg not in ones)
        if keep == operand.legs:
            operands.append(operand)
            continue
        if operand.tensor is not None:
            dims = [axis for axis, leg in enumerate(operand.legs) if leg in ones]
            tensor = operand.tensor.squeeze(dims) if dims else operand.tensor
            operands.append(replace(operand, legs=keep, tensor=tensor))
        elif operand.delta:
            operands.append(operand)  # a delta between legs of size 1 is the number 1: keep it simple
        else:
            operands.append(replace(operand, legs=keep))
    output = tuple(leg for leg in network.output if leg not in ones)
    return network.with_operands(operands, output=output)


def _adjacent_everywhere(network: TensorNetwork, a: str, b: str) -> bool:
    for legs in [op.legs for op in network.operands] + [network.output]:
        has_a, has_b = a in legs, b in legs
        if has_a != has_b:
            return False
        if has_a:
            if legs.count(a) != 1 or legs.count(b) != 1 or legs.index(b) != legs.index(a) + 1:
                return False
    return True


def merge_parallel_legs(network: TensorNetwork) -> TensorNetwork:
    """Merge legs ``a, b`` that appear adjacent, in this order, in the same operands and the output."""
    protected = _embedding_legs(network)
    changed = True
    while changed:
        changed = False
        for operand in network.operands:
            for a, b in zip(operand.legs, operand.legs[1:]):
                if a in protected or b in protected or operand.delta or not _adjacent_everywhere(network, a, b):
                    continue
                merged = _merge_pair(network, a, b)
                if merged is not None:
                    network, changed = merged, True
                    break
            if changed:
                break
    return network


def _merge_pair(network: TensorNetwork, a: str, b: str) -> Optional[TensorNetwork]:
    size = network.sizes[a] * network.sizes[b]
    operands = []
    for operand in network.operands:
        if a not in operand.legs:
            operands.append(operand)
            continue
        if operand.delta:  # a delta joins its two legs: merging them would leave a one-legged delta
            return None
        axis = operand.legs.index(a)
        legs = operand.legs[:axis] + (a,) + operand.legs[axis + 2 :]
        tensor = operand.tensor
        if tensor is not None:
            try:
                tensor = tensor.view(*tensor.shape[:axis], size, *tensor.shape[axis + 2 :])
            except RuntimeError:  # strides do not allow a view: merging would copy, not worth it
                return None
        operands.append(replace(operand, legs=legs, tensor=tensor))
    axis = network.output.index(a) if a in network.output else None
    output = network.output if axis is None else network.output[:axis] + (a,) + network.output[axis + 2 :]
    sizes = dict(network.sizes, **{a: size})
    return network.with_operands(operands, output=output, sizes=sizes)


# ----------------------------------------------------------------------------------------------
# pattern identities T3-T6


def swap_kernel_output(network: TensorNetwork, position: int) -> TensorNetwork:
    """T3: the pattern becomes ``Π(I, O, D, P, S)`` with legs ``(i, k, o)`` (requires D14)."""
    legs = _full_plain_pattern(network, position)
    spec = network.operands[position].pattern if legs else None
    if legs is None or spec.remainder != 0:
        return network
    i, o, k = legs
    swapped = PatternSpec(spec.input_size, spec.output_size, spec.dilation, spec.padding, spec.stride)
    operands = list(network.operands)
    operands[position] = replace(operands[position], pattern=swapped, legs=(i, k, o))
    return network.with_operands(operands)


def stride_as_subsampling(network: TensorNetwork, position: int) -> TensorNetwork:
    """T4: a strided pattern as every ``S``-th output of the non-strided pattern."""
    if _full_plain_pattern(network, position) is None:
        return network
    spec = network.operands[position].pattern
    dense = PatternSpec(spec.input_size, spec.kernel_size, 1, spec.padding, spec.dilation, output_step=spec.stride)
    operands = list(network.operands)
    operands[position] = replace(operands[position], pattern=dense)
    return network.with_operands(operands)


def dilation_as_subsampling(network: TensorNetwork, position: int) -> TensorNetwork:
    """T5: a dilated pattern as every ``D``-th kernel element of a larger non-dilated pattern."""
    if _full_plain_pattern(network, position) is None:
        return network
    spec = network.operands[position].pattern
    span = spec.dilation * (spec.kernel_size - 1) + 1
    dense = PatternSpec(spec.input_size, span, spec.stride, spec.padding, 1, kernel_step=spec.dilation)
    operands = list(network.operands)
    operands[position] = replace(operands[position], pattern=dense)
    return network.with_operands(operands)


def transpose_as_convolution(network: TensorNetwork, position: int) -> TensorNetwork:
    """T6: ``Π(I,K,1,P,1)[i,o,k] = Π(O,K,1,K−1−P,1)[o,i,K−1−k]`` (needs ``P ≤ K−1`` on both sides).

    The reversed kernel leg is absorbed by flipping the one data operand that carries ``k``, if
    there is exactly one; otherwise the new pattern keeps ``flip_kernel=True``.
    """
    legs = _full_plain_pattern(network, position)
    spec = network.operands[position].pattern if legs else None
    if legs is None or spec.stride != 1 or spec.dilation != 1 or max(spec.padding) > spec.kernel_size - 1:
        return network
    i, o, k = legs
    left, right = spec.padding
    new_padding = (spec.kernel_size - 1 - left, spec.kernel_size - 1 - right)
    carriers = [pos for pos in network.users(k) if pos != position]
    absorb = (
        k not in network.output
        and len(carriers) == 1
        and network.operands[carriers[0]].tensor is not None
        and network.operands[carriers[0]].legs.count(k) == 1
    )
    transposed = PatternSpec(spec.output_size, spec.kernel_size, 1, new_padding, 1, flip_kernel=not absorb)
    operands = list(network.operands)
    operands[position] = replace(operands[position], pattern=transposed, legs=(o, i, k))
    if absorb:
        carrier = operands[carriers[0]]
        operands[carriers[0]] = replace(carrier, tensor=carrier.tensor.flip(carrier.legs.index(k)))
    return network.with_operands(operands)


# ----------------------------------------------------------------------------------------------
# pipeline


def simplify(network: TensorNetwork, unfold_overlapping: bool = False) -> TensorNetwork:
    """Merge duplicate patterns, apply the pattern-removing rewrites until none applies, then
    prune, squeeze and merge legs.

    ``unfold_overlapping=True`` also views overlapping windows as the unfolded input (the
    ``"unfold"`` pathway of :mod:`curvlib.functional`): no pattern contractions and GEMM-shaped
    work, at the memory cost of the unfolded input when einsum materialises the view.
    """
    network = square_repeated_operands(merge_duplicate_patterns(network))
    changed = True
    while changed:
        changed = False
        for position in range(len(network.operands)):
            for rewrite in (embed_output_leg, unfold_input_leg):
                if rewrite is unfold_input_leg:
                    # averaged patterns (KFAC-reduce) are cheaper than the view summed over o
                    # (measured on an H100), so they are viewed only on the unfold pathway
                    rewritten = rewrite(
                        network, position, allow_overlap=unfold_overlapping, averaged=unfold_overlapping
                    )
                else:
                    rewritten = rewrite(network, position)
                if rewritten is not network:
                    network, changed = rewritten, True
                    break
            if changed:
                break
    network = squeeze_legs(network)
    network = prune_identities(network)
    return merge_parallel_legs(network)
