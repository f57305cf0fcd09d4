"""Contraction of tensor networks with contraction paths planned once and cached.

Planning (``opt_einsum.contract_expression``) is separated from execution, as in opt_einsum: the
first call on an equation with given shapes, dtype and device searches a path; later calls reuse
it and do no search. Inspect what was chosen with :func:`plan` (returns a :class:`Plan`), or turn
on printing of every new plan with :func:`set_verbose` / the ``CURVLIB_VERBOSE=1`` environment
variable.

>>> import torch, curvlib.functional as F
>>> from curvlib.contract import inspect_plans
>>> with inspect_plans() as plans:
...     _ = F.kfc(torch.randn(2, 3, 8, 8), 3, pathway="tn")
>>> plans[0].flops > 0
True
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Dict, List, Tuple

import opt_einsum
import torch
from torch import Tensor

from .tensor_network import TensorNetwork, finalize

#: opt_einsum path optimiser used for new plans ("auto-hq" is optimal for small networks and
#: uses dynamic programming for larger ones; plans are cached, so search cost is paid once).
OPTIMIZE = "auto-hq"

_VERBOSE = os.environ.get("CURVLIB_VERBOSE", "0") not in ("", "0")
_PLANS: Dict[tuple, "Plan"] = {}
_RECORDERS: List[List["Plan"]] = []


@dataclass
class Plan:
    """A planned contraction: equation, pairwise path and its cost.

    Attributes:
        equation: einsum equation (one letter per leg).
        named_equation: the same with leg names.
        shapes: operand shapes.
        path: list of operand-position pairs contracted in order (opt_einsum format).
        flops: floating-point operations of the path (opt_einsum's count).
        largest_intermediate: number of elements of the largest intermediate.
        expression: the compiled ``opt_einsum`` expression.
        calls: how often the plan was used.
    """

    equation: str
    named_equation: str
    shapes: Tuple[Tuple[int, ...], ...]
    path: list
    flops: int
    largest_intermediate: int
    expression: object
    calls: int = 0

    def __str__(self) -> str:
        return (
            f"{self.named_equation}\n  equation: {self.equation}\n  shapes: {self.shapes}\n"
            f"  path: {self.path}\n  flops: {self.flops:.3e}, largest intermediate: "
            f"{self.largest_intermediate:.3e} elements"
        )


def set_verbose(verbose: bool = True) -> None:
    """Print each newly planned contraction (equation, path, FLOPs, largest intermediate)."""
    global _VERBOSE
    _VERBOSE = bool(verbose)


@contextlib.contextmanager
def inspect_plans():
    """Collect the :class:`Plan` of every contraction run inside the block (also cached ones)."""
    plans: List[Plan] = []
    _RECORDERS.append(plans)
    try:
        yield plans
    finally:
        # by identity: list.remove compares by equality, and two recorders holding the same plans
        # are equal (nested blocks), which would stop the wrong one
        del _RECORDERS[next(pos for pos, rec in enumerate(_RECORDERS) if rec is plans)]


def clear_cache() -> None:
    """Forget all plans (they are rebuilt on next use)."""
    _PLANS.clear()


def cache_size() -> int:
    return len(_PLANS)


def plan(network: TensorNetwork) -> Plan:
    """The cached plan for ``network`` (planned now if new)."""
    shapes = tuple(network.operand_shape(op) for op in network.operands)
    equation = network.equation
    key = (equation, shapes, network.dtype, network.device)
    cached = _PLANS.get(key)
    if cached is not None:
        return cached
    path, info = opt_einsum.contract_path(equation, *shapes, shapes=True, optimize=OPTIMIZE)
    expression = opt_einsum.contract_expression(equation, *shapes, optimize=path)
    new = Plan(
        equation=equation,
        named_equation=network.named_equation,
        shapes=shapes,
        path=list(path),
        flops=int(info.opt_cost),
        largest_intermediate=int(info.largest_intermediate),
        expression=expression,
    )
    _PLANS[key] = new
    if _VERBOSE:
        print(f"[curvlib] new plan for {network.label or 'network'}:\n{new}")
    return new


def contract(network: TensorNetwork) -> Tensor:
    """Evaluate ``network``: einsum along the cached plan, then embeddings, scale and reshape."""
    chosen = plan(network)
    chosen.calls += 1
    for plans in _RECORDERS:
        plans.append(chosen)
    tensors = network.tensors()
    if len(tensors) == 1:
        result = torch.einsum(chosen.equation, tensors[0])
    else:
        result = chosen.expression(*tensors, backend="torch")
    return finalize(network, result)
