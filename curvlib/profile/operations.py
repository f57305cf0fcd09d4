"""The curvature operations the profiler runs on a recorded layer, and the pathways it runs them on.

Each :class:`Operation` says which :mod:`curvlib.functional` function it calls for a layer, which
random backpropagated tensors it needs and whether it works on ``C`` columns:

=========================  ===================================  ============================================
operation                  functional call                      random tensors (``O`` the layer output)
=========================  ===================================  ============================================
``forward``                ``conv`` / ``conv_transpose``         —
``input_vjp``              ``input_vjp(weight, v, …)``           ``v`` ``[N, C_out, *O]``
``weight_vjp``             ``weight_vjp(x, v, …)``               ``v`` ``[N, C_out, *O]``
``input_jvp``              ``input_jvp(weight, v_x, …)``         ``v_x`` like ``x``
``weight_jvp``             ``weight_jvp(x, v_weight, …)``        ``v_weight`` like the weight
``kfc``                    ``kfc(x, …)`` (KFAC-expand factor)    —
``kfac_reduce``            ``kfac_reduce(x, …)``                 —
``ggn_diag``               ``ggn_diag(x, s, …)``                 ``s`` ``[C, N, C_out, *O]``
``ggn_gram``               ``ggn_gram(x, s, …)``                 ``s`` ``[C, N, C_out, *O]``
``hesscale_weight_diag``   ``hesscale_weight_diag(x, d, …)``     ``d`` ``[N, C_out, *O]``
``hesscale_input_diag``    ``hesscale_input_diag(weight, d, …)`` ``d`` ``[N, C_out, *O]``
=========================  ===================================  ============================================

Pathways (:mod:`curvlib.pathways`) and the keyword arguments that force them: :data:`PATHWAY_KWARGS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Sequence, Tuple

import torch
from torch import Tensor

from .. import functional as F
from ..pathways import CANDIDATES
from .layers import LayerRecord

__all__ = ["Operation", "OPERATIONS", "DEFAULT_OPERATIONS", "PATHWAYS", "DEFAULT_PATHWAYS", "PATHWAY_KWARGS",
           "random_tensors", "check_names"]

#: keyword arguments of :mod:`curvlib.functional` that select each pathway
PATHWAY_KWARGS: Dict[str, dict] = {
    "auto": dict(pathway="auto"),
    "native": dict(pathway="native"),
    "tn": dict(pathway="tn", simplify=False),
    "tn+simplify": dict(pathway="tn", simplify=True),
    "unfold": dict(pathway="unfold"),
    "fused": dict(pathway="fused"),
    "lags": dict(pathway="lags"),
}
#: every pathway name the profiler accepts: ``"auto"`` and the candidates it chooses from
PATHWAYS: Tuple[str, ...] = ("auto",) + tuple(CANDIDATES)
DEFAULT_PATHWAYS: Tuple[str, ...] = PATHWAYS
assert set(PATHWAYS) == set(PATHWAY_KWARGS), "PATHWAY_KWARGS must name every candidate of curvlib.pathways"


@dataclass(frozen=True)
class Operation:
    """One profiled operation.

    Attributes:
        name: the profiler's name (``"forward"``, ``"kfc"`` …).
        needs: random tensors it takes besides the layer's ``x`` and ``weight`` (see :func:`random_tensors`).
        uses_columns: whether it works on the ``C`` columns of ``s`` (its cost scales with ``C``).
        call: ``(record, tensors, pathway_kwargs) -> Tensor``.
    """

    name: str
    needs: Tuple[str, ...]
    uses_columns: bool
    call: Callable[[LayerRecord, Dict[str, Tensor], dict], Tensor]

    def function(self, record: LayerRecord) -> str:
        """Name of the :mod:`curvlib.functional` operation (and of its cost in :mod:`curvlib.cost`)."""
        if self.name == "forward":
            return "conv_transpose" if record.transposed else "conv"
        return self.name

    def decision_op(self, record: LayerRecord) -> str:
        """The operation name :mod:`curvlib.pathways` files its decision under (JVPs run as convolutions)."""
        if self.name in ("forward", "weight_jvp", "input_jvp"):
            return "conv_transpose" if record.transposed else "conv"
        return self.name


def _forward(r: LayerRecord, t, kw):
    if r.transposed:
        return F.conv_transpose(r.x, r.weight, None, r.stride, r.padding, r.output_padding, r.groups, r.dilation, **kw)
    return F.conv(r.x, r.weight, None, r.stride, r.padding, r.dilation, r.groups, **kw)


def _input_vjp(r: LayerRecord, t, kw):
    return F.input_vjp(r.weight, t["v"], tuple(r.x.shape[2:]), **r.hyper(), **kw)


def _weight_vjp(r: LayerRecord, t, kw):
    return F.weight_vjp(r.x, t["v"], r.kernel_size, **r.hyper(), **kw)


def _input_jvp(r: LayerRecord, t, kw):
    return F.input_jvp(r.weight, t["v_x"], **r.hyper(), **kw)


def _weight_jvp(r: LayerRecord, t, kw):
    return F.weight_jvp(r.x, t["v_weight"], **r.hyper(), **kw)


def _kfc(r: LayerRecord, t, kw):
    return F.kfc(r.x, r.kernel_size, **r.hyper(), **kw)


def _kfac_reduce(r: LayerRecord, t, kw):
    return F.kfac_reduce(r.x, r.kernel_size, **r.hyper(), **kw)


def _ggn_diag(r: LayerRecord, t, kw):
    return F.ggn_diag(r.x, t["s"], r.kernel_size, **r.hyper(), **kw)


def _ggn_gram(r: LayerRecord, t, kw):
    return F.ggn_gram(r.x, t["s"], r.kernel_size, **r.hyper(), **kw)


def _hesscale_weight_diag(r: LayerRecord, t, kw):
    return F.hesscale_weight_diag(r.x, t["d"], r.kernel_size, **r.hyper(), **kw)


def _hesscale_input_diag(r: LayerRecord, t, kw):
    return F.hesscale_input_diag(r.weight, t["d"], tuple(r.x.shape[2:]), **r.hyper(), **kw)


#: every operation the profiler knows, by name
OPERATIONS: Dict[str, Operation] = {
    op.name: op
    for op in (
        Operation("forward", (), False, _forward),
        Operation("input_vjp", ("v",), False, _input_vjp),
        Operation("weight_vjp", ("v",), False, _weight_vjp),
        Operation("input_jvp", ("v_x",), False, _input_jvp),
        Operation("weight_jvp", ("v_weight",), False, _weight_jvp),
        Operation("kfc", (), False, _kfc),
        Operation("kfac_reduce", (), False, _kfac_reduce),
        Operation("ggn_diag", ("s",), True, _ggn_diag),
        Operation("ggn_gram", ("s",), True, _ggn_gram),
        Operation("hesscale_weight_diag", ("d",), False, _hesscale_weight_diag),
        Operation("hesscale_input_diag", ("d",), False, _hesscale_input_diag),
    )
}

#: what :func:`curvlib.profile.profile_model` runs unless told otherwise
DEFAULT_OPERATIONS: Tuple[str, ...] = (
    "forward", "input_vjp", "weight_vjp", "kfc", "kfac_reduce", "ggn_diag", "ggn_gram", "hesscale_weight_diag",
)


def check_names(values, name: str, known: Sequence[str]) -> Tuple[str, ...]:
    """``values`` (a name or a sequence of names) as a tuple of known names without repeats, or a clear error."""
    if isinstance(values, str):
        values = (values,)
    try:
        values = tuple(values)
    except TypeError:
        raise TypeError(f"{name} must be a name or a sequence of names from {tuple(known)}, got {values!r}") from None
    if not values:
        raise ValueError(f"{name} must name at least one of {tuple(known)}, got an empty sequence")
    unknown = [v for v in values if not isinstance(v, str) or v not in known]
    if unknown:
        raise ValueError(f"{name} must be names from {tuple(known)}, got unknown {unknown!r}")
    return tuple(dict.fromkeys(values))


def random_tensors(record: LayerRecord, needs: Sequence[str], columns: int) -> Dict[str, Tensor]:
    """Random tensors of the right shapes, dtype and device for ``record`` (normal entries, never zero):
    ``v``/``d`` ``[N, C_out, *O]``, ``s`` ``[C, N, C_out, *O]``, ``v_x`` like ``x``, ``v_weight`` like the weight."""
    like = dict(dtype=record.x.dtype, device=record.x.device)
    shapes = {
        "v": record.out_shape,
        "d": record.out_shape,
        "s": (columns, *record.out_shape),
        "v_x": tuple(record.x.shape),
        "v_weight": tuple(record.weight.shape),
    }
    return {name: torch.randn(shapes[name], **like) for name in dict.fromkeys(needs)}
