"""The structure of a backward graph, so that what the engine derives from it carries over to later steps.

A training loop builds a new autograd graph every step, nearly always one of the same structure. What the
engine plans from the graph before the first chunk of columns — the stages from gate to gate
(:mod:`.staging`), the chunk size under the memory budget, the graph walk's order, rules and receiving
shapes (:class:`.graph_vjp.GraphVJP`) — depends on that structure only, yet took 1.5-2 ms of host time
per step on an H100 host (All-CNN-C), while the device waited for the first chunk.

:class:`GraphSkeleton` numbers the nodes of a graph in a canonical order (breadth first from the model
output's node, children in ``next_functions`` order) and keys the structure by, per node, its type, the
positions and input slots of its children and the shapes and dtypes its inputs take (autograd's input
metadata). Two graphs with equal keys are the same computation up to the tensors' values: a plan stored
with positions instead of nodes is valid for both (:meth:`GraphSkeleton.edge` rebinds a position).
Walking the graph for the key costs about 40 µs for All-CNN-C's 42 nodes.

>>> import torch
>>> w = torch.randn(3, 2, requires_grad=True)
>>> first, second = (GraphSkeleton((torch.randn(4, 3) @ w).tanh()) for _ in range(2))
>>> first.key == second.key, len(first.nodes)
(True, 3)
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["GraphSkeleton", "StructureKey"]


def _metadata(node) -> Optional[tuple]:
    """``(shape, dtype)`` of each input of ``node`` (``None`` where this torch does not expose them)."""
    metadata = getattr(node, "_input_metadata", None)
    if metadata is None:
        return None
    return tuple((tuple(m.shape), m.dtype) for m in metadata)


class StructureKey:
    """A graph's structure as a dict key: the nested tuple, hashed once (looked up several times a step)."""

    __slots__ = ("entries", "_hash")

    def __init__(self, entries: tuple):
        self.entries = entries
        self._hash = hash(entries)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        return self is other or (isinstance(other, StructureKey) and self._hash == other._hash
                                 and self.entries == other.entries)


class GraphSkeleton:
    """The nodes of ``output``'s backward graph in canonical order and the key of its structure.

    ``nodes``: the nodes, ``nodes[0]`` is ``output.grad_fn``; ``index``: node → position (also the set
    of nodes ``output`` depends on); ``key``: hashable, equal for graphs of the same structure (see the
    module docstring); ``output_nr``: ``output``'s slot at its node. An output without history has no
    nodes and the key ``None``.
    """

    __slots__ = ("nodes", "index", "key", "output_nr")

    def __init__(self, output: Tensor):
        root = output.grad_fn
        self.output_nr = output.output_nr
        self.nodes: List[object] = [] if root is None else [root]
        self.index: Dict[object, int] = {} if root is None else {root: 0}
        entries = []
        position = 0
        while position < len(self.nodes):  # breadth first: the list grows while it is read
            node = self.nodes[position]
            position += 1
            children = []
            for child, number in node.next_functions:
                if child is None:
                    children.append(None)
                    continue
                at = self.index.get(child)
                if at is None:
                    at = self.index[child] = len(self.nodes)
                    self.nodes.append(child)
                children.append((at, number))
            entries.append((type(node), tuple(children), _metadata(node)))
        self.key = None if root is None else StructureKey((self.output_nr, tuple(entries)))

    def position(self, edge) -> Optional[Tuple[int, int]]:
        """``(position, output_nr)`` of a gradient edge of this graph; ``None`` for one outside it."""
        at = self.index.get(getattr(edge, "node", None))
        return None if at is None else (at, edge.output_nr)

    def edge(self, position: Tuple[int, int]):
        """The gradient edge at ``(position, output_nr)`` (:meth:`position`'s inverse)."""
        at, number = position
        return torch.autograd.graph.GradientEdge(self.nodes[at], number)
