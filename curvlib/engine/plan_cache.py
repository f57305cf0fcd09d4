"""The column passes' plans kept across steps, keyed by the backward graph's structure.

Before its first chunk of columns the engine plans the step: the chunk size under the memory budget,
the stages from gate to gate (:mod:`.staging`) and, per stage, the graph walk
(:class:`.graph_vjp.GraphVJP`). All of it follows from the structure of the backward graph
(:class:`.skeleton.GraphSkeleton`), the recorded layer calls' shapes and hyper-parameters and the
engine's settings — not from the tensors' values — so a later step with equal keys reuses it, with the
stored positions rebound to its own graph's nodes. Measured on an H100 host (All-CNN-C, 5 chunks of
20 columns): the plans took 1.5-2 ms of host time per step, at the start of the column passes, while
the device waited.

Two caches, each keeping its :data:`MAX_ENTRIES` most recently used entries (a model trained with a
few input shapes or in a few configurations keeps all of them):

- :data:`SETUPS`: ``(chunk size, stages, pathway room)`` of a step's column passes
  (:func:`positional_stages` / :func:`rebound_stages` store and restore the stages' edges);
- :data:`WALKS`: the graph walk of a stage (:meth:`.graph_vjp.GraphVJP.positional`), or
  :data:`NO_WALK` where none could be built or it failed while running (autograd's engine then runs
  the stage without trying the walk again).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import List, Optional, Sequence

from .skeleton import GraphSkeleton
from .staging import Stage

__all__ = ["LRU", "SETUPS", "WALKS", "NO_WALK", "MAX_ENTRIES", "positional_stages", "rebound_stages",
           "edge_positions", "clear"]

#: entries each cache keeps
MAX_ENTRIES = 32

#: marks a stage whose walk could not be built or failed: autograd's engine runs it
NO_WALK = object()


class LRU(OrderedDict):
    """A dict keeping its ``size`` most recently used entries (:meth:`get` counts as use)."""

    def __init__(self, size: int = MAX_ENTRIES):
        super().__init__()
        self.size = size

    def get(self, key, default=None):
        if key not in self:
            return default
        self.move_to_end(key)
        return self[key]

    def put(self, key, value) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)


SETUPS = LRU()
WALKS = LRU()


def clear() -> None:
    """Forget every stored plan (later steps plan again)."""
    SETUPS.clear()
    WALKS.clear()


def edge_positions(skeleton: GraphSkeleton, edges: Sequence) -> Optional[tuple]:
    """Positions (:meth:`GraphSkeleton.position`) of gradient edges, or of tensors by their node; ``None``
    if one is not in the skeleton's graph."""
    positions = []
    for edge in edges:
        if hasattr(edge, "grad_fn"):  # a tensor: its node and slot
            at = skeleton.index.get(edge.grad_fn)
            position = None if at is None else (at, edge.output_nr)
        else:
            position = skeleton.position(edge)
        if position is None:
            return None
        positions.append(position)
    return tuple(positions)


def positional_stages(stages: Optional[Sequence[Stage]], skeleton: GraphSkeleton):
    """``stages`` with their source and gate edges as positions in ``skeleton`` (``None`` stays ``None``);
    ``False`` where an edge is outside the graph (not storable)."""
    if stages is None:
        return None
    stored = []
    for stage in stages:
        ends = edge_positions(skeleton, [edge for edge in (stage.source, stage.gate) if edge is not None])
        if ends is None:
            return False
        ends = list(ends)
        source = None if stage.source is None else ends.pop(0)
        gate = None if stage.gate is None else ends.pop(0)
        stored.append((source, tuple(stage.calls), gate, tuple(stage.gate_calls), stage.gate_numel))
    return tuple(stored)


def rebound_stages(stored, skeleton: GraphSkeleton) -> Optional[List[Stage]]:
    """The stages :func:`positional_stages` stored, on the edges of ``skeleton``'s graph."""
    if stored is None:
        return None
    return [Stage(source=None if source is None else skeleton.edge(source), calls=list(calls),
                  gate=None if gate is None else skeleton.edge(gate), gate_calls=list(gate_calls),
                  gate_numel=gate_numel)
            for source, calls, gate, gate_calls, gate_numel in stored]
