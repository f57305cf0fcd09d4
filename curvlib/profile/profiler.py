"""Per-layer profile of a model's curvature operations: :func:`profile_model`.

For each recorded layer call (:func:`curvlib.profile.layers.record_layers`), operation
(:mod:`curvlib.profile.operations`) and pathway, the operation runs on the layer's recorded input and
weight with random backpropagated tensors of the right shapes, and the row records:

1. measured: median/min time (:func:`~curvlib.profile.timing.time_call`, after warm-up) and extra
   peak memory of one call (:func:`~curvlib.profile.memory.measure_memory`, after warm-up);
2. analytic: FLOPs and minimum bytes of the operation (:func:`curvlib.cost.minimum`), and of the
   pathway the FLOPs it performs and its largest intermediate — from the planned contraction path
   for tensor-network pathways (recorded with :func:`curvlib.contract.inspect_plans` while the
   operation runs), from :func:`curvlib.cost.operation_cost` for native and fused kernels;
3. derived: ideal (roofline) time on the ceilings, efficiency = ideal / measured (of the operation's
   standard FLOP count, and of the work the pathway performs), achieved useful FLOP/s and bytes/s,
   and the cost model's estimate for the pathway (to compare with the measurement).

>>> import torch
>>> from torch import nn
>>> from curvlib.profile import profile_model
>>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
>>> p = profile_model(model, torch.randn(4, 3, 8, 8), operations=("forward", "kfc"),
...                   pathways=("auto", "native"), repeats=2, warmup=1, ceilings="nominal")
>>> [(r.layer, r.op, r.pathway, r.status) for r in p.rows][:2]
[('0', 'forward', 'auto', 'ok'), ('0', 'forward', 'native', 'ok')]
"""

from __future__ import annotations

import platform
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from .. import cost as _cost
from .. import cuda_graphs as _cuda_graphs
from .. import pathways as _pathways
from ..contract import inspect_plans
from ..hyperparams import make_geometry
from .ceilings import ideal_time, measure_ceilings
from .layers import LayerRecord, record_layers
from .memory import cpu_method, measure_memory
from .operations import (
    DEFAULT_OPERATIONS,
    DEFAULT_PATHWAYS,
    OPERATIONS,
    PATHWAY_KWARGS,
    PATHWAYS,
    Operation,
    check_names,
    random_tensors,
)
from .report import Profile, ProfileRow
from .timing import check_count, time_call

__all__ = ["profile_model"]

_TN_PATHWAYS = ("tn", "tn+simplify", "unfold")


def _is_oom(error: BaseException) -> bool:
    if isinstance(error, getattr(torch.cuda, "OutOfMemoryError", ())):
        return True
    text = str(error).lower()
    return "out of memory" in text or "can't allocate memory" in text or "not enough memory" in text


def _resolve_ceilings(ceilings, device: torch.device) -> _cost.Ceilings:
    if isinstance(ceilings, _cost.Ceilings):
        return ceilings
    if ceilings == "measure":
        return measure_ceilings(device)
    if ceilings == "quick":
        return measure_ceilings(device, quick=True)
    if ceilings == "nominal":
        return _cost.ceilings(device.type)
    raise ValueError(
        f"ceilings must be 'measure', 'quick', 'nominal' or a curvlib.cost.Ceilings, got {ceilings!r}"
    )


def _auto_choice(op_name: str, before: set, geometry_text: str) -> Optional[str]:
    """The candidate ``pathway="auto"`` ran: a decision made during the call, or one cached earlier
    for this operation and geometry."""
    decisions = _pathways.decisions()
    new = [d for d in decisions if id(d) not in before and d.op == op_name]
    if new:
        return new[-1].choice
    # decision keys end with the settings they were taken under (memory budget, excluded candidates)
    settings = _pathways.settings()
    suffix = f", {settings.memory_budget!r}, {settings.exclude!r})"
    matching = [d for d in decisions if d.op == op_name and geometry_text in d.key and d.key.endswith(suffix)]
    choices = {d.choice for d in matching}
    return matching[-1].choice if len(choices) == 1 else None


def _functional_geometry_text(record: LayerRecord, op: Operation) -> str:
    """``repr`` of the geometry :mod:`curvlib.functional` builds for the call (its decision key contains it)."""
    geometry = record.geometry()
    if op.name in ("kfc", "kfac_reduce"):  # the factors do not know C_out: functional passes the groups
        geometry = make_geometry(
            record.x.shape[1], record.groups, tuple(record.x.shape[2:]), record.kernel_size, record.stride,
            record.padding, record.dilation, record.groups, record.transposed,
            record.output_padding if record.transposed else 0,
        )
    return repr(geometry)


def _cost_of(record: LayerRecord, op: Operation, ran: Optional[str], plans, columns: int, element_size: int):
    """``(flops, min_bytes, cost of the pathway that ran or None)``."""
    function = op.function(record)
    geometry = record.geometry()
    batch = record.batch
    flops, min_bytes = _cost.minimum(function, geometry, batch, columns, element_size)
    cost = None
    if plans:
        cost = _cost.network_cost(
            function, ran or "tn", geometry, batch, sum(p.flops for p in plans),
            max(p.largest_intermediate for p in plans), columns, element_size,
        )
    elif ran in ("native", "fused", "unfold"):
        cost = _cost.operation_cost(function, ran, geometry, batch, columns, element_size)
    return flops, min_bytes, cost


def _measure_entry(row: ProfileRow, fn: Callable, record: LayerRecord, op: Operation, pathway: str,
                   device: torch.device, columns: int, repeats: int, warmup: int, time_limit_s, memory: bool,
                   ceilings: _cost.Ceilings) -> None:
    """Fill ``row`` with the measurements of ``fn`` (raises what ``fn`` raises)."""
    before = {id(d) for d in _pathways.decisions()}
    for _ in range(warmup):
        fn()
    with inspect_plans() as plans:
        if memory:
            with _cuda_graphs.eager():  # a replayed CUDA graph's temporaries live in its pool, unseen by the meter
                m = measure_memory(fn, device)
            row.extra_bytes, row.memory_method, row.result_bytes = m.extra_bytes, m.method, m.result_bytes
        else:
            fn()
    # on the CPU the memory meter handed free heap pages back to the system: one untimed call
    # faults them in again, so that the first timed call does not pay for it
    rewarm = 1 if memory and device.type != "cuda" else 0
    timing = time_call(fn, device, repeats=repeats, warmup=rewarm, time_limit_s=time_limit_s)
    row.time_s, row.min_s, row.repeats = timing.median_s, timing.min_s, timing.repeats
    if pathway == "auto":
        row.chosen = _auto_choice(op.decision_op(record), before, _functional_geometry_text(record, op))
        if row.chosen is None:
            row.chosen = "tn (or unfold)" if plans else None
    else:
        row.chosen = pathway
    # the plan of a call that did not contract (auto chose native) is empty
    ran = row.chosen if row.chosen in PATHWAYS else None
    used_columns = columns if op.uses_columns else 1
    flops, min_bytes, cost = _cost_of(record, op, ran, list(plans), used_columns, record.x.element_size())
    row.flops, row.min_bytes = float(flops), float(min_bytes)
    if cost is not None:
        row.pathway_flops = cost.flops
        row.largest_intermediate_bytes = cost.largest_intermediate_bytes
        row.bytes_moved = cost.bytes_moved
        row.estimated_s = (
            max(cost.flops / ceilings.flops_per_s, cost.bytes_moved / ceilings.bytes_per_s)
            + cost.overhead_s + ceilings.call_overhead_s
        )
    row.ideal_s = ideal_time(flops, min_bytes, ceilings)
    row.efficiency = row.ideal_s / row.time_s if row.time_s > 0 else None
    if row.pathway_flops is not None and row.time_s > 0:
        row.pathway_efficiency = ideal_time(row.pathway_flops, min_bytes, ceilings) / row.time_s
    row.flops_per_s = flops / row.time_s if row.time_s > 0 else None
    row.bytes_per_s = min_bytes / row.time_s if row.time_s > 0 else None


def profile_model(
    model: nn.Module,
    inputs,
    operations: Sequence[str] = DEFAULT_OPERATIONS,
    pathways: Sequence[str] = DEFAULT_PATHWAYS,
    columns: int = 10,
    repeats: int = 5,
    warmup: int = 2,
    device=None,
    ceilings="measure",
    layers: Optional[Sequence[str]] = None,
    memory: bool = True,
    time_limit_s: Optional[float] = None,
    progress: Optional[Callable[[ProfileRow], None]] = None,
) -> Profile:
    """Profile every ``Conv``/``ConvTranspose``/``Linear`` layer of ``model`` on its curvature operations.

    Args:
        model: any ``nn.Module``; one forward pass without gradients records each layer's input
            (buffers are restored afterwards).
        inputs: a tensor, a tuple/list of positional inputs or a dict of keyword inputs.
        operations: names from :data:`curvlib.profile.operations.OPERATIONS` (default:
            forward, input/weight VJP, KFAC factors, GGN diagonal and Gram, HesScale weight diagonal).
        pathways: from ``("auto", "native", "tn", "tn+simplify", "unfold", "fused")``; a pathway that
            does not apply to a layer and operation gives a row with ``status="n/a"``.
        columns: ``C``, the columns of ``s`` for the GGN operations (10 classes, say).
        repeats: timed calls per entry (median and min are kept).
        warmup: untimed calls first (plans, autotuning; ``pathway="auto"`` decides here).
        device: where the operations run (``None``: where each layer's input was). The model is not moved.
        ceilings: ``"measure"`` (:func:`~curvlib.profile.ceilings.measure_ceilings`, cached per device),
            ``"quick"`` (smaller buffers), ``"nominal"`` (:func:`curvlib.cost.ceilings`, i.e. whatever is
            registered) or a :class:`curvlib.cost.Ceilings`.
        layers: names of the layers to profile (``None``: all).
        memory: measure the extra peak memory (one more call per entry; on the CPU one more untimed
            call after it, since the meter returns free heap memory to the system).
        time_limit_s: fewer timed calls (at least one) for entries whose repeats would take longer.
        progress: called with each finished row (e.g. to print it).

    Returns:
        :class:`~curvlib.profile.report.Profile`, one row per (layer call, operation, pathway).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    operations = check_names(operations, "operations", tuple(OPERATIONS))
    pathways = check_names(pathways, "pathways", PATHWAYS)
    check_count(columns, "columns", 1)
    check_count(repeats, "repeats", 1)
    check_count(warmup, "warmup", 0)
    if not isinstance(memory, bool):
        raise TypeError(f"memory must be a bool, got {memory!r}")
    if time_limit_s is not None and (isinstance(time_limit_s, bool) or not isinstance(time_limit_s, (int, float))
                                     or not time_limit_s > 0):
        raise ValueError(f"time_limit_s must be None or a positive number of seconds, got {time_limit_s!r}")
    if progress is not None and not callable(progress):
        raise TypeError(f"progress must be None or callable, got {type(progress).__name__}")
    if device is not None:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as error:
            raise ValueError(f"device must be None, a torch.device or a device string, got {device!r}") from error
    if not (ceilings in ("measure", "quick", "nominal") or isinstance(ceilings, _cost.Ceilings)):
        raise ValueError(f"ceilings must be 'measure', 'quick', 'nominal' or a curvlib.cost.Ceilings, got {ceilings!r}")

    skipped: List[tuple] = []
    records = record_layers(model, inputs, device=device, layers=layers, skipped=skipped)
    if not records:
        raise ValueError(
            "model has no Conv/ConvTranspose/Linear layer that the forward pass on inputs reaches"
            + (f" (skipped: {skipped})" if skipped else "")
        )
    run_device = records[0].x.device
    resolved: Dict[str, _cost.Ceilings] = {}
    rows: List[ProfileRow] = []
    for record in records:
        dev = record.x.device
        if str(dev) not in resolved:
            resolved[str(dev)] = _resolve_ceilings(ceilings, dev)
        ceil = resolved[str(dev)]
        needs = tuple(n for name in operations for n in OPERATIONS[name].needs)
        tensors = random_tensors(record, needs, columns)
        for name in operations:
            op = OPERATIONS[name]
            for pathway in pathways:
                row = ProfileRow(
                    layer=record.name, module=record.module_type, op=name, function=op.function(record),
                    pathway=pathway, input_shape=list(record.input_shape), output_shape=list(record.output_shape),
                    weight_shape=list(record.weight.shape),
                )
                kwargs = PATHWAY_KWARGS[pathway]
                fn = (lambda op=op, kwargs=kwargs, record=record, tensors=tensors: op.call(record, tensors, kwargs))
                try:
                    _measure_entry(row, fn, record, op, pathway, dev, columns, repeats, warmup, time_limit_s,
                                   memory, ceil)
                except ValueError as error:
                    text = str(error)
                    row.status = "n/a" if "is not available" in text else "error"
                    row.message = text.splitlines()[0] if text else type(error).__name__
                except (RuntimeError, MemoryError) as error:
                    row.status = "oom" if (isinstance(error, MemoryError) or _is_oom(error)) else "error"
                    row.message = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
                    if dev.type == "cuda":
                        torch.cuda.empty_cache()
                rows.append(row)
                if progress is not None:
                    progress(row)
        del tensors  # before the next layer's are drawn

    first = next(iter(resolved.values()))
    settings = dict(
        operations=list(operations), pathways=list(pathways), columns=columns, repeats=repeats, warmup=warmup,
        time_limit_s=time_limit_s, dtype=str(records[0].x.dtype), torch=torch.__version__,
        threads=torch.get_num_threads(), python=platform.python_version(),
        memory_method=("cuda" if run_device.type == "cuda" else cpu_method()) if memory else None,
        autotune=_pathways.settings().autotune,
        memory_budget=_pathways.settings().memory_budget,
    )
    return Profile(
        rows,
        device=str(run_device) if len(resolved) == 1 else ", ".join(resolved),
        ceilings=dict(flops_per_s=first.flops_per_s, bytes_per_s=first.bytes_per_s,
                      call_overhead_s=first.call_overhead_s, measured=first.measured),
        settings=settings,
        skipped=skipped,
    )
