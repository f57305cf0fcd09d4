"""The :class:`TensorNetwork`: operands with named legs, an output, and post-processing.

Every operation of curvlib is one ``TensorNetwork``. Expression builders (:mod:`curvlib.expressions`)
create them, :mod:`curvlib.simplify` rewrites them and :mod:`curvlib.contract` evaluates them.

An operand is either data (a tensor whose axes are the operand's legs), an index pattern (a
:class:`~curvlib.patterns.PatternSpec`, materialised on the network's device and dtype only when
contracted, so that rewrites can drop it for free) or a Kronecker delta between two legs.

After the einsum, a network applies, in this order: its *embeddings* (scatter a pair of legs
``(o, k)`` back into the input leg ``i`` they replaced, see :func:`curvlib.simplify.embed_output_leg`),
a scalar ``scale``, and a reshape to ``output_shape`` (which groups adjacent legs, e.g. ``(c k1 k2)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .patterns import PatternSpec, pattern_tensor


@dataclass(frozen=True)
class Operand:
    """One node of a tensor network.

    Attributes:
        legs: names of the operand's legs, one per axis.
        tensor: the data, for data operands.
        pattern: the index pattern, for pattern operands. Its materialised shape is reshaped to
            the sizes of ``legs`` (so a leg may be split into several, e.g. for mini-blocks).
        delta: ``True`` for a Kronecker delta (identity matrix) between its two legs.
        name: a label for printing (``"x"``, ``"s"``, ``"Π0"`` ...).
    """

    legs: Tuple[str, ...]
    tensor: Optional[Tensor] = None
    pattern: Optional[PatternSpec] = None
    delta: bool = False
    name: str = ""

    @property
    def kind(self) -> str:
        if self.pattern is not None:
            return "pattern"
        return "delta" if self.delta else "data"


@dataclass(frozen=True)
class Embedding:
    """Post-processing: the result's adjacent legs ``(output_leg, kernel_leg)`` become the leg ``input_leg``.

    Element ``(o, k)`` is written to position ``o·S + k·D − P_left`` of a zero tensor of length
    ``I`` (positions outside ``[0, I)`` are padding and dropped). Valid only for windows that do
    not overlap, where the scatter is a copy.
    """

    output_leg: str
    kernel_leg: str
    input_leg: str
    spec: PatternSpec


@dataclass(frozen=True)
class TensorNetwork:
    """An einsum over named legs, plus post-processing.

    Attributes:
        operands: the nodes.
        output: legs of the einsum result, in order (before embeddings).
        sizes: size of every leg.
        output_shape: final shape of the result (a reshape of the post-processed result).
        device, dtype: where and in which precision patterns and deltas are materialised.
        embeddings: applied after the einsum, last first (see :class:`Embedding`).
        scale: the result is multiplied by this number.
    """

    operands: Tuple[Operand, ...]
    output: Tuple[str, ...]
    sizes: Dict[str, int]
    output_shape: Tuple[int, ...]
    device: torch.device
    dtype: torch.dtype
    embeddings: Tuple[Embedding, ...] = ()
    scale: float = 1.0
    label: str = field(default="", compare=False)

    def __post_init__(self):
        for operand in self.operands:
            if operand.tensor is not None:
                shape = tuple(operand.tensor.shape)
                expected = tuple(self.sizes[leg] for leg in operand.legs)
                if shape != expected:
                    raise ValueError(
                        f"operand {operand.name or operand.legs} has shape {shape}, its legs {operand.legs} "
                        f"need {expected}"
                    )
        missing = [leg for leg in self.output if not any(leg in op.legs for op in self.operands)]
        if missing:
            raise ValueError(f"output legs {missing} appear in no operand")

    # --------------------------------------------------------------------------------------------
    # queries used by the rewrites

    def with_operands(self, operands: Sequence[Operand], **changes) -> "TensorNetwork":
        return replace(self, operands=tuple(operands), **changes)

    def users(self, leg: str) -> Tuple[int, ...]:
        """Positions of the operands that carry ``leg``."""
        return tuple(pos for pos, op in enumerate(self.operands) if leg in op.legs)

    def operand_shape(self, operand: Operand) -> Tuple[int, ...]:
        return tuple(self.sizes[leg] for leg in operand.legs)

    def materialize(self, operand: Operand) -> Tensor:
        """The tensor of an operand, patterns and deltas built on the network's device/dtype."""
        if operand.tensor is not None:
            return operand.tensor
        if operand.pattern is not None:
            return pattern_tensor(operand.pattern, self.device, self.dtype).reshape(self.operand_shape(operand))
        size = self.sizes[operand.legs[0]]
        return torch.eye(size, device=self.device, dtype=self.dtype)

    def tensors(self) -> Tuple[Tensor, ...]:
        return tuple(self.materialize(op) for op in self.operands)

    @property
    def equation(self) -> str:
        """The einsum equation with one letter per leg (letters assigned in order of appearance)."""
        letters = self.letters()
        inputs = ",".join("".join(letters[leg] for leg in op.legs) for op in self.operands)
        return inputs + "->" + "".join(letters[leg] for leg in self.output)

    def letters(self) -> Dict[str, str]:
        alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
        letters: Dict[str, str] = {}
        for leg in [leg for op in self.operands for leg in op.legs] + list(self.output):
            if leg not in letters:
                if len(letters) == len(alphabet):
                    raise ValueError(f"tensor network has more than {len(alphabet)} distinct legs")
                letters[leg] = alphabet[len(letters)]
        return letters

    @property
    def named_equation(self) -> str:
        """Readable equation with leg names, e.g. ``"n g ci i0, i0 o0 k0 -> n g ci k0 o0"``."""
        inputs = ", ".join(" ".join(op.legs) for op in self.operands)
        return inputs + " -> " + " ".join(self.output)

    @property
    def num_patterns(self) -> int:
        return sum(op.pattern is not None for op in self.operands)

    def __repr__(self) -> str:
        names = ", ".join(op.name or op.kind for op in self.operands)
        return f"TensorNetwork({self.label or 'unnamed'}: {self.named_equation}; operands: {names})"

    def output_numel(self) -> int:
        return math.prod(self.sizes[leg] for leg in self.output)


def finalize(network: TensorNetwork, result: Tensor) -> Tensor:
    """Apply a network's embeddings, scale and final reshape to the raw einsum ``result``."""
    legs = list(network.output)
    for embedding in reversed(network.embeddings):
        axis = legs.index(embedding.output_leg)
        if legs[axis + 1] != embedding.kernel_leg:
            raise RuntimeError(f"embedding legs {embedding.output_leg}, {embedding.kernel_leg} are not adjacent")
        result = scatter_windows(result, axis, embedding.spec)
        legs[axis : axis + 2] = [embedding.input_leg]
    if network.scale != 1.0:
        result = result * network.scale
    return result.reshape(network.output_shape)


def window_view(tensor: Tensor, axis: int, spec: PatternSpec) -> Tensor:
    """View axis ``axis`` (already padded) of ``tensor`` as windows ``(o, k)``: element ``o·S + k·D``."""
    span = spec.dilation * (spec.kernel_size - 1) + 1
    windows = tensor.unfold(axis, span, spec.stride)[..., :: spec.dilation]
    return windows.movedim(-1, axis + 1)


def pad_axis(tensor: Tensor, axis: int, padding: Tuple[int, int]) -> Tensor:
    """Zero-pad ``tensor`` along ``axis`` by ``(left, right)``."""
    if padding == (0, 0):
        return tensor
    pads = [0, 0] * (tensor.dim() - 1 - axis) + list(padding)
    return torch.nn.functional.pad(tensor, pads)


def scatter_windows(result: Tensor, axis: int, spec: PatternSpec) -> Tensor:
    """Inverse of :func:`window_view` for non-overlapping windows: legs ``(o, k)`` at ``axis`` → leg ``i``."""
    left, right = spec.padding
    shape = list(result.shape)
    shape[axis : axis + 2] = [spec.input_size + left + right]
    padded = result.new_zeros(shape)
    window_view(padded, axis, spec).copy_(result)
    return padded.narrow(axis, left, spec.input_size)
