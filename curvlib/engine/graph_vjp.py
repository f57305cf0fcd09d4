"""Batched vector-Jacobian products by walking the autograd graph with batched rules per node.

The engine backpropagates ``J`` columns (the loss Hessian's square root, MC samples) through the model
at once. :func:`curvlib.engine.layers.batched_vjp` does it with ``torch.func.vmap`` over
``torch.autograd.grad``; :class:`GraphVJP` does the same without autograd's engine: it walks the part of
the graph between the source and the wanted edges in topological order and applies each node's batched
rule (:mod:`.batched_rules`) to ``[J, ...]`` gradients. Why its own walk:

- the layout and the kernels of the column backpropagation are the engine's to choose: autograd hands
  each node a gradient in the layout of the forward pass (``channels_last`` moves the data gradients
  to the layout cuDNN's tensor-core kernels use, see :class:`.BackwardOptions`);
- what the nodes derive from their saved tensors (weights and activations in another layout) and the
  walk itself (order, rules, shapes) are resolved once for all chunks;
- no per-call functorch and autograd-engine overhead.

A plan (which nodes, in which order) is built once per ``(source, edges)`` and run for every chunk of
columns. Where a node's gradient goes only to the next node and on (a convolution, the zero padding
before it, the ReLU before that), the plan marks the run as a chain, and a chain rule
(:func:`.batched_rules.chain_rule`) may compute the gradient at its end in one kernel; where it
declines (CPU, stride 1), the nodes' own rules run. Where the graph between source and edges holds a
node without a batched rule, :meth:`GraphVJP.build` returns ``None`` and the caller uses ``vmap`` over
autograd. Gradient hooks registered on tensors or
nodes are not run (the engine's column passes are not the user's backward pass).

>>> import torch
>>> x = torch.randn(4, 3, requires_grad=True)
>>> lin = torch.nn.Linear(3, 2)
>>> h = torch.relu(lin(x)); out = h.sum(1) * 2
>>> from torch.autograd.graph import get_gradient_edge
>>> plan = GraphVJP.build(out, [get_gradient_edge(h)])
>>> plan.run(torch.randn(5, 4), [h.shape])[0].shape
torch.Size([5, 4, 2])
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .batched_rules import BackwardOptions, UnsupportedNode, chain_rule, rule_for
from .staging import taken

__all__ = ["GraphVJP", "UnsupportedNode"]


def _key(edge) -> Optional[Tuple[object, int]]:
    """``(node, output_nr)`` of a gradient edge or of a tensor with a ``grad_fn``; ``None`` otherwise."""
    if isinstance(edge, Tensor):
        return None if edge.grad_fn is None else (edge.grad_fn, edge.output_nr)
    node = getattr(edge, "node", None)
    return None if node is None else (node, edge.output_nr)


class GraphVJP:
    """The batched backward pass from ``source`` to ``edges``: see the module docstring.

    ``order``: the nodes to apply, in topological order; ``dependencies``: how many edges from nodes of
    the walk lead to each; ``watched``: which ``edges`` entries each ``(node, output_nr)`` answers.
    """

    def __init__(self, root: Tuple[object, int], order: list, dependencies: Dict, watched: Dict,
                 num_edges: int, options: BackwardOptions, cache: Dict):
        self.root = root
        self.order = order
        self.dependencies = dependencies
        self.watched = watched
        self.num_edges = num_edges
        self.options = options
        self.cache = cache
        # what every chunk's pass needs per node, resolved once (the walk runs in Python: under a tight
        # memory budget it runs for dozens of chunks per step): the outputs' watched edges, the rule,
        # which slots need a gradient, and each needed slot's receiving node, shape and dtype
        self.steps = _with_chains([self._step(node) for node in order])
        self._own_dtype: set = set()  # nodes whose kernels lack the message dtype here (see _apply)

    def _step(self, node) -> tuple:
        outputs = max(1, len(node._input_metadata))
        watched = [(number, self.watched[(node, number)]) for number in range(outputs) if (node, number) in self.watched]
        if not _leads_on(node, self.dependencies):
            return node, outputs, watched, None, None, ()
        need = [child is not None and child in self.dependencies for child, _ in node.next_functions]
        receivers = []
        for slot, (child, number) in enumerate(node.next_functions):
            if need[slot]:
                metadata = child._input_metadata[number]
                receivers.append((slot, child, number, torch.Size(metadata.shape), self.options.carried(metadata.dtype)))
        return node, outputs, watched, rule_for(node), need, receivers

    @classmethod
    def build(cls, source, edges: Sequence, options: BackwardOptions = BackwardOptions(),
              cache: Optional[Dict] = None) -> Optional["GraphVJP"]:
        """The plan, or ``None`` where the source or an edge is no graph node (a tensor without history,
        a torch without gradient edges) or where a node on the way has no batched rule.

        ``cache`` holds what rules derive from saved tensors (converted weights, hyper-parameters); plans of one
        backward graph may share it."""
        if isinstance(edges, Tensor) or not all(hasattr(edge, "node") for edge in edges):
            return None  # tensors (a torch without gradient edges): autograd's engine resolves them
        root = _key(source)
        keys = [_key(edge) for edge in edges]
        if root is None or any(k is None for k in keys) or not hasattr(root[0], "_input_metadata"):
            return None
        watched: Dict[Tuple[object, int], List[int]] = {}
        for index, key in enumerate(keys):
            watched.setdefault(key, []).append(index)
        watched_nodes = {node for node, _ in watched}
        relevant = _relevant_nodes(root[0], watched_nodes)
        if root[0] not in relevant:
            relevant.add(root[0])  # nothing below is wanted: the plan returns zeros (or the source itself)
        dependencies: Dict[object, int] = {node: 0 for node in relevant}
        for node in relevant:
            if not _leads_on(node, relevant):
                continue
            if rule_for(node) is None:
                return None
            for child, _ in node.next_functions:
                if child in relevant:
                    dependencies[child] += 1
        order, ready, pending = [], [root[0]], dict(dependencies)
        while ready:
            node = ready.pop()
            order.append(node)
            for child, _ in node.next_functions if _leads_on(node, relevant) else ():
                if child in relevant:
                    pending[child] -= 1
                    if pending[child] == 0:
                        ready.append(child)
        if len(order) != len(relevant):
            return None  # part of the walk is reached only through nodes outside it (cannot happen in a DAG)
        try:
            return cls(root, order, dependencies, watched, len(keys), options, {} if cache is None else cache)
        except AttributeError:  # a node without the input metadata the walk reads (an older torch)
            return None

    def positional(self, skeleton) -> Optional[tuple]:
        """This plan with its nodes replaced by their positions in ``skeleton``
        (:class:`~curvlib.engine.skeleton.GraphSkeleton` of the graph it was built on), for
        :meth:`rebound` to a graph of the same structure in a later step; ``None`` if a node is not in it."""
        index = skeleton.index
        try:
            steps = tuple(
                (index[node], outputs, tuple((number, tuple(indices)) for number, indices in watched), rule,
                 None if need is None else tuple(need),
                 tuple((slot, index[child], number, shape, dtype) for slot, child, number, shape, dtype in receivers))
                for node, outputs, watched, rule, need, receivers, _ in self.steps)
            return (index[self.root[0]], self.root[1]), steps, self.num_edges
        except KeyError:
            return None

    @classmethod
    def rebound(cls, positional: tuple, skeleton, options: BackwardOptions, cache: Dict) -> "GraphVJP":
        """The plan :meth:`positional` stored, on the nodes of ``skeleton`` (a graph of the same
        structure: equal :attr:`~curvlib.engine.skeleton.GraphSkeleton.key`); ``options`` must be those
        it was built with, ``cache`` is this graph's (what rules derive from its saved tensors)."""
        nodes = skeleton.nodes
        (root, number), steps, num_edges = positional
        plan = cls.__new__(cls)
        plan.root = (nodes[root], number)
        plan.order = [nodes[step[0]] for step in steps]
        plan.dependencies, plan.watched = {}, {}  # used while building only
        plan.num_edges = num_edges
        plan.options = options
        plan.cache = cache
        plan.steps = _with_chains([
            (nodes[at], outputs, list(watched), rule, None if need is None else list(need),
             [(slot, nodes[child], child_number, shape, dtype) for slot, child, child_number, shape, dtype in receivers])
            for at, outputs, watched, rule, need, receivers in steps])
        plan._own_dtype = set()
        return plan

    def run(self, vectors: Tensor, like: Sequence) -> List[Tensor]:
        """The gradients ``[J, *shape]`` at the edges for the vectors ``[J, *source shape]``. An edge the
        walk does not reach gets zeros of ``like[i]`` (a tensor or size); ``like[i] = None`` marks an edge
        that must be reached. Raises :class:`UnsupportedNode` where a rule cannot handle a node. Runs
        without recording a graph (the saved tensors require gradients; the results need none).

        The gradients of float32 tensors are in ``options.message_dtype`` where that is set
        (:class:`.BackwardOptions`), the vectors included. ``vectors`` may be a
        :class:`~curvlib.engine.staging.Handoff`: the walk then holds the only reference and releases
        the vectors once the source's node has used them."""
        with torch.no_grad():
            return self._run(vectors, like)

    def _apply(self, rule, node, g: Tensor, need) -> list:
        """``rule`` on ``g``; where ``g`` is carried in a message dtype that a kernel of this device lacks
        (CPU pooling in bfloat16), in the node's own dtype (its result is converted back by :func:`_fit`)."""
        own = node._input_metadata[0].dtype
        if node in self._own_dtype:
            return rule(node, g.to(own), need, self.cache, self.options)
        try:
            return rule(node, g, need, self.cache, self.options)
        except NotImplementedError:
            if g.dtype == own:
                raise
            self._own_dtype.add(node)
            return rule(node, g.to(own), need, self.cache, self.options)

    def _run(self, vectors, like: Sequence) -> List[Tensor]:
        results: List[Optional[Tensor]] = [None] * self.num_edges
        root, root_number = self.root
        grads: Dict[object, List[Optional[Tensor]]] = {root: [None] * self.steps[0][1]}
        grads[root][root_number] = taken(vectors)
        grads[root][root_number] = source = grads[root][root_number].to(self.options.carried(vectors.dtype))
        count, dtype, device = source.shape[0], source.dtype, source.device
        del source, vectors  # no reference of our own: the walk drops the vectors after the root's rule
        for node, outputs_count, watched, rule, need, receivers, chain in self.steps:
            outputs = grads.pop(node, None)
            if outputs is None:
                continue
            for number, indices in watched:
                if outputs[number] is not None:
                    for index in indices:
                        results[index] = outputs[number]
            if rule is None:
                continue
            g = outputs[0]
            if outputs_count > 1 and any(other is not None for other in outputs[1:]):
                raise UnsupportedNode(f"{type(node).__name__}: gradients at several outputs")
            if g is None:
                continue
            if chain is not None:  # this node and the next ones in one go where the chain's rule can
                nodes, run_chain, last_receivers = chain
                passed = run_chain(nodes, g, self.cache, self.options)
                if passed is not None:
                    _deliver(grads, passed, last_receivers, nodes[-1])
                    continue
            _deliver(grads, self._apply(rule, node, g, need), receivers, node)
        like = list(like)
        for index, result in enumerate(results):
            if result is None:
                if like[index] is None:
                    raise RuntimeError("GraphVJP: an edge that the backward pass must reach was not reached")
                shape = like[index] if isinstance(like[index], torch.Size) else like[index].shape
                results[index] = torch.zeros(count, *shape, dtype=dtype, device=device)
        return results


def _deliver(grads: Dict, passed: Sequence, receivers, node) -> None:
    """Hand the gradients ``passed`` by ``node``'s rule to the receiving nodes' slots (summed where
    several edges meet)."""
    for slot, child, number, shape, dtype in receivers:
        grad = passed[slot] if slot < len(passed) else None
        if grad is None:
            continue
        grad = _fit(grad, shape, dtype, node)
        slots = grads.get(child)
        if slots is None:
            slots = grads[child] = [None] * max(1, len(child._input_metadata))
        slots[number] = grad if slots[number] is None else slots[number] + grad


#: the longest chain of nodes a chain rule runs (:func:`.batched_rules.chain_rule`)
_LONGEST_CHAIN = 3


def _with_chains(steps: list) -> list:
    """``steps`` with a seventh entry each: ``(nodes, chain rule, the last node's receivers)`` where a
    chain rule (:func:`.batched_rules.chain_rule`) runs this node and the following ones at once, else
    ``None``. A node joins a chain only if the previous one's gradient is its only input from the walk,
    handed on through slot 0 of each, and nobody watches its outputs: the walk then never hands it a
    gradient of its own when the chain runs (its step is skipped), and where the chain rule declines
    at run time the nodes' own steps run as without it."""
    incoming: Dict[object, int] = {}
    for step in steps:
        for _, child, _, _, _ in step[5]:
            incoming[child] = incoming.get(child, 0) + 1
    by_node = {step[0]: step for step in steps}
    chained = []
    for step in steps:
        nodes, current = [step[0]], step
        while len(nodes) < _LONGEST_CHAIN and current[3] is not None and len(current[5]) == 1:
            slot, child, number, _, _ = current[5][0]
            after = by_node.get(child)
            if slot != 0 or number != 0 or incoming.get(child) != 1 or after is None or after[2] or after[1] != 1:
                break
            nodes.append(child)
            current = after
        chain = None
        for length in range(len(nodes), 1, -1):  # the longest chain that has a rule
            rule = chain_rule(nodes[:length])
            if rule is not None:
                chain = (tuple(nodes[:length]), rule, by_node[nodes[length - 1]][5])
                break
        chained.append((*step[:6], chain))
    return chained


def _leads_on(node, relevant) -> bool:
    """Whether the walk goes on below ``node`` (some input slot leads to a node of the walk)."""
    return any(child is not None and child in relevant for child, _ in node.next_functions)


def _fit(grad: Tensor, shape: torch.Size, dtype: torch.dtype, node) -> Tensor:
    """``grad [J, ...]`` in the ``shape`` the receiving node expects and in ``dtype`` (the node's, or the
    message dtype it is carried in): broadcast axes summed, as autograd's engine does between nodes."""
    if grad.shape[1:] != shape:
        expected = torch.Size((grad.shape[0], *shape))
        try:
            grad = grad.sum_to_size(expected)
        except RuntimeError:
            grad = None
        if grad is None or grad.shape != expected:
            raise UnsupportedNode(f"{type(node).__name__}: passes a gradient of shape {tuple(grad.shape[1:]) if grad is not None else '?'}"
                                  f" to a node that expects {tuple(shape)}")
    if grad.dtype != dtype:
        grad = grad.to(dtype)
    return grad


def _relevant_nodes(root, watched_nodes: set) -> set:
    """Nodes from ``root`` down that are watched or lead to a watched node (iterative post-order)."""
    leads: Dict[object, bool] = {}
    stack = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if node in leads and not expanded:
            continue
        children = [child for child, _ in node.next_functions if child is not None]
        if not expanded:
            leads.setdefault(node, False)
            stack.append((node, True))
            stack.extend((child, False) for child in children if child not in leads)
        else:
            leads[node] = node in watched_nodes or any(leads.get(child, False) for child in children)
    return {node for node, lead in leads.items() if lead}
