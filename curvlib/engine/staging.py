"""Backpropagating columns in stages: the memory of a chunk of columns is that of its widest stage.

One VJP of the model output w.r.t. every recorded layer output returns all the messages at once, so
a chunk of ``c`` columns holds ``c · Σ_l |y_l|`` numbers before any layer uses its own. Most CNNs have
*gates*: autograd nodes through which every path from the model output to all later work passes (in a
plain chain, every layer's own node; in a ResNet, the block outputs). The message at a gate is all a
backward pass below it needs, so the columns can be backpropagated from gate to gate:

    stage 0:  output → messages of the layers before gate 1, and the message at gate 1
    stage k:  gate k → messages of the layers between gates k and k+1, and the message at gate k+1

and each layer's quantities computed (its message released) as soon as its stage has run. A stage
never backpropagates below its closing gate (the layers it returns are not reachable through it), so
no backward kernel runs twice. Where a gate is a recorded layer's own node its message is the
layer's; other gates (e.g. a residual sum) carry a message of their own for one stage.

On All-CNN-C (a chain) the widest stage holds ``|y_2| + 3·|y_1|`` per column (its source, its
result, and transient gradients) instead of ``Σ_l |y_l| + 2·max_l |y_l|``: 201 instead of 279 MB
per column at batch 128, so 10 columns fit a 3.5 GB budget instead of 7 (H100, TF32: 190 instead
of 209 ms per step). Deeper networks gain more: the sum grows with depth, the widest stage does not.
The engine stages only where a budget chunks the columns and stages fit more of them per chunk
(each stage is one more batched backward call).

:func:`plan_stages` finds the gates by a topological sweep of the part of the graph that leads to
recorded outputs: a node is a gate when, just before it is visited, it is the only node that a visited
node points to — then every node not yet visited is reachable only through it.

>>> import torch
>>> from torch.autograd.graph import get_gradient_edge
>>> x = torch.randn(2, 3)
>>> w1, w2 = torch.randn(3, 3, requires_grad=True), torch.randn(3, 3, requires_grad=True)
>>> h1 = x @ w1; h2 = h1.tanh() @ w2; out = h2.sin()
>>> [len(stage.calls) + len(stage.gate_calls) for stage in plan_stages(out, [get_gradient_edge(h1), get_gradient_edge(h2)])]
[1, 1]
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor


@dataclass
class Stage:
    """One backward pass of a chunk of columns.

    ``source``: the edge whose message starts it (``None``: the model output, where the messages are
    the columns). ``calls``: indices of the recorded outputs whose messages it returns. ``gate``: the
    edge whose message starts the next stage (``None`` for the last stage); ``gate_calls``: indices
    of recorded outputs whose edge is the gate (their message is the gate's); ``gate_numel``: entries
    of one sample-column of the gate's message (``None`` if unknown).
    """

    source: Optional[object] = None
    calls: List[int] = field(default_factory=list)
    gate: Optional[object] = None
    gate_calls: List[int] = field(default_factory=list)
    gate_numel: Optional[int] = None

    def inputs(self, edges: Sequence) -> list:
        """The edges this stage differentiates w.r.t.: its calls' and the gate's."""
        return [edges[i] for i in self.calls] + ([] if self.gate is None else [self.gate])


def _edge_key(edge) -> Optional[Tuple[object, int]]:
    node = getattr(edge, "node", None)
    return None if node is None else (node, edge.output_nr)


def plan_stages(output: Tensor, edges: Sequence) -> List[Stage]:
    """Stages that backpropagate from ``output`` to the gradient edges ``edges`` (see the module
    docstring). Edges not reached from ``output`` are in no stage (their messages are zero). One
    stage (everything at once) where the graph has no gate with layers on both sides, or where the
    edges are tensors (torch without ``get_gradient_edge``)."""
    keys = [_edge_key(edge) for edge in edges]
    root = output.grad_fn
    if root is None or any(key is None for key in keys):
        return [Stage(calls=list(range(len(edges))))]
    calls_at: Dict[object, List[int]] = {}
    for index, (node, _) in enumerate(keys):
        calls_at.setdefault(node, []).append(index)

    # the nodes from which a recorded output is reachable (iterative post-order)
    children: Dict[object, List[Tuple[object, int]]] = {}
    relevant: Dict[object, bool] = {}
    stack = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            relevant[node] = node in calls_at or any(relevant.get(child, False) for child, _ in children[node])
            continue
        if node in children:
            continue
        children[node] = [(child, nr) for child, nr in node.next_functions if child is not None]
        stack.append((node, True))
        stack.extend((child, False) for child, _ in children[node] if child not in children)
    if not relevant.get(root, False):
        return [Stage(calls=list(range(len(edges))))]

    parents_left: Dict[object, int] = {}
    slots: Dict[object, set] = {}
    for node, kids in children.items():
        if not relevant[node]:
            continue
        for child, nr in kids:
            if relevant.get(child, False):
                parents_left[child] = parents_left.get(child, 0) + 1
                slots.setdefault(child, set()).add(nr)

    stages = [Stage()]
    touched = set()  # nodes a visited node points to, not visited yet
    ready = [root]
    while ready:
        node = ready.pop()
        touched.discard(node)
        here = calls_at.get(node, [])
        if node is not root and not touched and len(slots.get(node, ())) == 1:
            # every node not visited yet is reachable only through this one: a gate
            (nr,) = slots[node]
            own = [i for i in here if keys[i][1] == nr]
            current = stages[-1]
            if own or current.calls or current.gate_calls:
                current.gate = edges[own[0]] if own else torch.autograd.graph.GradientEdge(node, nr)
                current.gate_calls = own
                current.gate_numel = _numel_at(node, nr)
                stages.append(Stage(source=current.gate))
                here = [i for i in here if i not in own]
        stages[-1].calls.extend(here)
        for child, _ in children[node]:
            if not relevant.get(child, False):
                continue
            touched.add(child)
            parents_left[child] -= 1
            if parents_left[child] == 0:
                ready.append(child)
    if stages[-1].gate is None and not stages[-1].calls and len(stages) > 1:
        stages.pop()  # nothing below the last gate: its stage has nothing to return
        stages[-1].gate = stages[-1].gate_numel = None
        stages[-1].calls.extend(stages[-1].gate_calls)
        stages[-1].gate_calls = []
    return stages


def _numel_at(node, nr: int) -> Optional[int]:
    """Entries of the gradient flowing into ``node`` at slot ``nr`` (autograd's metadata; ``None`` where
    this torch does not expose it)."""
    try:
        return math.prod(node._input_metadata[nr].shape)
    except Exception:  # a private attribute: absent or different in other versions
        return None


def _gate_numel(stage: Stage, numels: Sequence[int]) -> int:
    """Entries of the message at ``stage``'s closing gate (0 without one)."""
    if stage.gate is None:
        return 0
    if stage.gate_calls:
        return numels[stage.gate_calls[0]]
    return stage.gate_numel if stage.gate_numel is not None else max(numels)


def stage_numels(stages: Sequence[Stage], numels: Sequence[int], groups: Sequence[int],
                 hand_off: bool = False) -> List[int]:
    """Entries each stage holds at its peak, per column: the message it starts from, those it returns
    (the layers' and the closing gate's), the backward pass's transient gradients, and the messages of
    layers whose group (``groups[i]``: a shared module's calls) is not complete yet. ``numels[i]``:
    entries of recorded output ``i`` (batch included).

    Transients: twice the largest message the stage returns (a node's gradient and its result) where
    the backward pass is autograd's. With ``hand_off`` (the engine's graph walk, a :class:`Handoff`
    source, released once its node has run), the larger of the source with one transient (its node's
    result) and the returned messages with one transient (the gradient a returned message is
    computed from; the message itself is counted among the returned).
    """
    remaining: Dict[int, int] = {}
    for index in range(len(numels)):
        remaining[groups[index]] = remaining.get(groups[index], 0) + 1
    held, source, result = 0, 0, []
    waiting: Dict[int, int] = {}  # entries of messages kept for incomplete groups
    for stage in stages:
        returned = [numels[i] for i in stage.calls + stage.gate_calls]
        gate = _gate_numel(stage, numels)
        own_gate = 0 if stage.gate_calls else gate
        transient = max(returned + [own_gate, 0])
        if hand_off:
            live = max(source, sum(returned) + own_gate) + transient + held
        else:
            live = source + sum(returned) + own_gate + 2 * transient + held
        result.append(live)
        for index in stage.calls + stage.gate_calls:
            group = groups[index]
            remaining[group] -= 1
            waiting[group] = waiting.get(group, 0) + numels[index]
            if remaining[group] == 0:
                waiting.pop(group)
        held = sum(waiting.values())
        source = gate
    return result


def merge_stages(stages: Sequence[Stage], numels: Sequence[int], groups: Sequence[int],
                 hand_off: bool = False) -> List[Stage]:
    """Merge neighbouring stages while the merged one holds no more than the widest stage does:
    fewer backward calls (host time) at the same peak memory (:func:`stage_numels`)."""
    if len(stages) < 2:
        return list(stages)
    limit = max(stage_numels(stages, numels, groups, hand_off))
    merged = [stages[0]]
    for position in range(1, len(stages)):
        last, stage = merged[-1], stages[position]
        candidate = Stage(source=last.source, calls=last.calls + last.gate_calls + stage.calls, gate=stage.gate,
                          gate_calls=list(stage.gate_calls), gate_numel=stage.gate_numel)
        trial = merged[:-1] + [candidate] + list(stages[position + 1 :])
        if max(stage_numels(trial, numels, groups, hand_off)) <= limit:
            merged[-1] = candidate
        else:
            merged.append(stage)
    return merged


class Handoff:
    """A stage's source message handed to the VJP with its last reference, so that the backward pass
    can release it as soon as the source's node has used it (the source of All-CNN-C's last stage,
    20 columns in bfloat16, is 503 MB; held through the stage, it sat at the step's memory peak).

    :meth:`take` returns the message and drops the handoff's reference; taken a second time (a VJP that
    failed half-way and starts over another way), it recomputes the message from the model output.
    ``shape``, ``dtype`` and ``device`` stay readable after the take."""

    def __init__(self, message: Tensor, recompute: Callable[[], Tensor]):
        self._message: Optional[Tensor] = message
        self._recompute = recompute
        self.shape, self.dtype, self.device = message.shape, message.dtype, message.device

    def take(self) -> Tensor:
        message, self._message = self._message, None
        return self._recompute() if message is None else message


def taken(vectors) -> Tensor:
    """``vectors`` itself, or the message of a :class:`Handoff` (taken)."""
    return vectors.take() if isinstance(vectors, Handoff) else vectors


def backpropagate(output: Tensor, edges: Sequence, shapes: Sequence[torch.Size], vectors: Tensor,
                  stages: Sequence[Stage], groups: Sequence[Sequence[int]], vjp: Callable,
                  hand_off: bool = False) -> Iterator[Tuple[int, list]]:
    """Run ``stages``; yield ``(g, messages)`` for each group ``groups[g]`` (indices into ``edges``) as soon
    as all its messages ``[J, *shapes[i]]`` are complete, then release them.

    ``vjp(output, inputs, vectors, like)`` is the batched VJP (:func:`curvlib.engine.layers.batched_vjp`);
    ``vectors [J, *output.shape]`` the columns. Messages of edges no stage reaches are zeros. With
    ``hand_off``, the stages after the first get their source as a :class:`Handoff` (``vjp`` must
    accept one: :func:`taken`), which recomputes it from ``vectors`` if taken twice.
    """
    pending: List[Optional[Sequence[int]]] = list(groups)
    messages: Dict[int, Tensor] = {}
    source, current = output, vectors
    for stage in stages:
        like = [shapes[i] for i in stage.calls] + ([None] if stage.gate is not None else [])
        if hand_off and stage.source is not None:
            current = Handoff(current, _recompute(vjp, output, stage.source, vectors))
        grads = vjp(source, stage.inputs(edges), current, like)
        messages.update(zip(stage.calls, grads))
        current = None
        if stage.gate is not None:
            source, current = stage.gate, grads[-1]
            messages.update((i, current) for i in stage.gate_calls)
        del grads
        for g, wanted in enumerate(pending):
            if wanted is not None and all(i in messages for i in wanted):
                pending[g] = None
                yield g, [messages.pop(i) for i in wanted]
    for g, wanted in enumerate(pending):
        if wanted is not None:
            yield g, [messages.pop(i) if i in messages else
                      torch.zeros(vectors.shape[0], *shapes[i], dtype=vectors.dtype, device=vectors.device)
                      for i in wanted]


def _recompute(vjp: Callable, output: Tensor, edge, vectors: Tensor) -> Callable[[], Tensor]:
    """The message at ``edge`` recomputed from the columns ``vectors`` at ``output`` (one VJP, all stages
    before ``edge`` at once)."""
    return lambda: vjp(output, [edge], vectors, [None])[0]
