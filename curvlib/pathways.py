"""Pathway choice: which implementation evaluates an operation, per layer configuration.

Every operation of :mod:`curvlib.functional` has up to five implementations (*candidates*):

============== ===============================================================================
``native``     PyTorch's own kernels (cuDNN/ATen convolution and its gradients; for the KFAC
               factors, GGN and HesScale: explicit unfold plus batched matrix products) — :mod:`curvlib.native`
``tn``         the tensor network as built (index patterns kept)
``tn+simplify`` the tensor network after the exact rewrites of :mod:`curvlib.simplify`
``unfold``     the simplified network with overlapping windows viewed as the unfolded input
``fused``      a fused Triton kernel (:mod:`curvlib.kernels`, CUDA only)
``lags``       KFC of stride-1 layers from lag products and border corrections, never unfolding
               (:mod:`curvlib.lag_gram`)
============== ===============================================================================

``pathway=`` of the functional operations takes ``"auto"`` (the default), ``"native"``, ``"tn"`` (with
``simplify=`` choosing between ``tn`` and ``tn+simplify``), ``"unfold"``, ``"fused"`` or ``"lags"``.

``"auto"`` chooses, per configuration (operation, shapes, hyper-parameters, options, dtype, device),
the fastest candidate whose extra memory fits the memory limits — ``memory_budget`` (bytes) and
``memory_fraction`` (of what the unfold pathway needs for the call; e.g. ``0.05`` keeps every choice
within 5 % of PyTorch's unfold memory) — and caches the choice:

- **measured** (``configure(autotune=True)`` or ``CURVLIB_AUTOTUNE=1``): the first call of a
  configuration runs every candidate (one warm-up, then the median of ``repeats`` timed calls;
  extra peak memory of the warm-up, run without CUDA-graph replay, from the CUDA allocator on GPUs,
  from the analytic cost on CPUs) and keeps the
  winner. Decisions can persist in a JSON file (``configure(cache_file=...)`` or
  ``CURVLIB_PATHWAY_CACHE``), so later processes skip the measurement.
- **cost model** (the default, no measuring): the analytic roofline estimate of :mod:`curvlib.cost`
  (FLOPs, bytes moved, fixed per-call overhead; tensor networks from their planned path).

Example::

    import curvlib.pathways as pathways
    with pathways.options(autotune=True, memory_budget=2**30):
        F.kfc(x, 3, padding=1)                 # measures the candidates once, then reuses the winner
    pathways.decisions()                       # what was chosen, and the measurements
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field, fields, replace
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor

from . import cost as _cost
from . import cuda_graphs as _cuda_graphs
from . import precision as _precision

#: values of ``pathway=`` in :mod:`curvlib.functional`
PATHWAYS = ("auto", "native", "tn", "unfold", "fused", "lags")
#: when measuring, a candidate whose first call takes longer than this is timed once only (seconds)
SLOW_CALL_S = 0.5
#: candidates "auto" chooses from (``tn`` split by ``simplify``)
CANDIDATES = ("native", "tn", "tn+simplify", "unfold", "fused", "lags")


@dataclass
class Settings:
    """Global settings of the automatic choice (change with :func:`configure` or :func:`options`)."""

    autotune: bool = os.environ.get("CURVLIB_AUTOTUNE", "0") not in ("", "0")
    memory_budget: Optional[int] = None
    memory_fraction: Optional[float] = None
    cache_file: Optional[str] = os.environ.get("CURVLIB_PATHWAY_CACHE") or None
    repeats: int = 5
    exclude: tuple = ()
    precision: Optional[str] = os.environ.get("CURVLIB_PRECISION") or None


_SETTINGS = Settings()
_precision.check_precision(_SETTINGS.precision)  # a bad CURVLIB_PRECISION fails at import, naming the value
#: bumped whenever cached decisions are forgotten (with the settings' values: :func:`generation`)
_GENERATION = [0]
_DECISIONS: Dict[tuple, "Decision"] = {}
_DISK: Optional[Dict[str, dict]] = None
_DISK_PATH: Optional[str] = None
_LOCK = threading.Lock()


@dataclass
class Decision:
    """The candidate chosen for one configuration, and why."""

    op: str
    key: str
    choice: str
    how: str  # "measured", "cost model", "disk cache" or "only candidate"
    measurements: Dict[str, dict] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"op": self.op, "key": self.key, "choice": self.choice, "how": self.how,
                "measurements": self.measurements}


def _check_settings(autotune, memory_budget, cache_file, repeats, exclude, precision=..., memory_fraction=...) -> None:
    if precision is not ...:
        _precision.check_precision(precision)
    if autotune is not None and not isinstance(autotune, bool):
        raise TypeError(f"autotune must be a bool, got {autotune!r}")
    if memory_budget is not None and memory_budget is not ... and (
        isinstance(memory_budget, bool) or not isinstance(memory_budget, (int, float))
        or not math.isfinite(memory_budget) or memory_budget < 0
    ):
        raise ValueError(f"memory_budget must be None or a non-negative number of bytes, got {memory_budget!r}")
    if memory_fraction is not None and memory_fraction is not ... and (
        isinstance(memory_fraction, bool) or not isinstance(memory_fraction, (int, float))
        or not math.isfinite(memory_fraction) or memory_fraction < 0
    ):
        raise ValueError(f"memory_fraction must be None or a non-negative number, got {memory_fraction!r}")
    if cache_file is not None and cache_file is not ... and not isinstance(cache_file, (str, os.PathLike)):
        raise TypeError(f"cache_file must be None or a path, got {cache_file!r}")
    if repeats is not None and (isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1):
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    if exclude is not None:
        unknown = [c for c in exclude if c not in CANDIDATES]
        if isinstance(exclude, str) or unknown:
            raise ValueError(f"exclude must be a sequence of candidates from {CANDIDATES}, got {exclude!r}")


def configure(autotune: Optional[bool] = None, memory_budget=..., cache_file=..., repeats: Optional[int] = None,
              exclude: Optional[Sequence[str]] = None, precision=..., memory_fraction=...) -> Settings:
    """Change the settings of ``pathway="auto"``; arguments left out keep their value. Returns the new settings.

    Args:
        autotune: measure candidates (``True``) or use the cost model (``False``).
        memory_budget: bytes of extra memory a candidate may need; ``None``: no limit. When no
            candidate fits, the leanest one is taken.
        memory_fraction: extra memory a candidate may need as a fraction of what the unfold pathway
            (PyTorch's way: the unfolded input, for the KFC also its permuted copy; :mod:`curvlib.cost`)
            needs for the same call, e.g. ``0.05``; ``None``: no limit. With ``memory_budget`` too, the
            smaller limit holds.
        cache_file: JSON file that stores measured decisions across processes; ``None``: memory only.
        repeats: timed calls per candidate when measuring.
        exclude: candidates never chosen automatically (e.g. ``("fused",)``).
        precision: float32 products of every pathway on CUDA (:mod:`curvlib.precision`): ``"ieee"``
            (exact), ``"tf32"`` (matrix units, relative errors about ``1e-3``), ``"bf16"`` (fused
            kernels on bfloat16 operands and bfloat16 column passes in :class:`curvlib.curvature`,
            about ``1e-2``) or ``None`` (follow PyTorch's global flags; the default, also settable
            with ``CURVLIB_PRECISION``).
    """
    _check_settings(autotune, memory_budget, cache_file, repeats, exclude, precision, memory_fraction)
    global _SETTINGS
    changes = {}
    if autotune is not None:
        changes["autotune"] = autotune
    if memory_budget is not ...:
        changes["memory_budget"] = memory_budget
    if memory_fraction is not ...:
        changes["memory_fraction"] = memory_fraction
    if cache_file is not ...:
        changes["cache_file"] = None if cache_file is None else os.path.expanduser(os.fspath(cache_file))
    if repeats is not None:
        changes["repeats"] = repeats
    if exclude is not None:
        changes["exclude"] = tuple(exclude)
    if precision is not ...:
        changes["precision"] = precision
    _SETTINGS = replace(_SETTINGS, **changes)
    _SETTINGS_KEY[0] = _values(_SETTINGS)
    return _SETTINGS


def settings() -> Settings:
    """The current settings."""
    return _SETTINGS


@contextlib.contextmanager
def options(**kwargs):
    """Temporarily change the settings (same arguments as :func:`configure`)."""
    global _SETTINGS
    saved = _SETTINGS
    try:
        yield configure(**kwargs)
    finally:
        _SETTINGS = saved
        _SETTINGS_KEY[0] = _values(saved)


def clear(memory: bool = True, disk: bool = False) -> None:
    """Forget cached decisions (in memory; with ``disk=True`` also delete the cache file)."""
    global _DISK, _DISK_PATH
    with _LOCK:
        _GENERATION[0] += 1
        if memory:
            _DECISIONS.clear()
        if disk and _SETTINGS.cache_file and os.path.exists(_SETTINGS.cache_file):
            os.remove(_SETTINGS.cache_file)
        _DISK, _DISK_PATH = None, None


def _values(s: Settings) -> tuple:
    return tuple(getattr(s, f.name) for f in fields(Settings))


#: the current settings' values (hashable), kept with them
_SETTINGS_KEY = [_values(_SETTINGS)]


def generation() -> tuple:
    """A hashable key that changes whenever the settings' values change or cached decisions are forgotten
    (:func:`clear`); callers key their shortcuts of resolved choices on it. Settings restored to earlier
    values (leaving :func:`options`, entering it again with the same values) give the earlier key, so
    shortcuts made under them apply again."""
    return (_GENERATION[0], _SETTINGS_KEY[0])


def decisions() -> List[Decision]:
    """The decisions taken so far in this process (a copy)."""
    return list(_DECISIONS.values())


# ----------------------------------------------------------------------------------------------
# candidates of one call


@dataclass
class Call:
    """One call of an operation: the runners of its candidates and what the choice needs to know.

    ``runners`` maps candidate names to zero-argument functions computing the result;
    ``network`` builds the (unsimplified) tensor network, for the cost model of the TN candidates;
    ``analytic`` gives :class:`curvlib.cost.Cost` of the non-TN candidates; ``key`` identifies the
    configuration (hashable; shapes, hyper-parameters, options, dtype, device).
    """

    op: str
    key: tuple
    runners: Dict[str, Callable[[], Tensor]]
    device: torch.device
    analytic: Callable[[str], "_cost.Cost"]
    element_size: int = 4
    network: Optional[Callable[[], object]] = None


def resolve(pathway: str, simplify: bool, available: Sequence[str], op: str) -> Optional[str]:
    """The candidate a forced ``pathway`` names (``None`` for ``"auto"``); a clear error if it does not apply."""
    if pathway not in PATHWAYS:
        raise ValueError(f"pathway must be one of {PATHWAYS}, got {pathway!r}")
    if not isinstance(simplify, bool):
        raise TypeError(f"simplify must be a bool, got {simplify!r}")
    if pathway == "auto":
        return None
    name = ("tn+simplify" if simplify else "tn") if pathway == "tn" else pathway
    if name not in available:
        raise ValueError(
            f"pathway={pathway!r} is not available for {op} with these arguments "
            f"(available here: {sorted(set('tn' if a.startswith('tn') else a for a in available))})"
        )
    return name


def run(call: Call, pathway: str = "auto", simplify: bool = True) -> Tensor:
    """Evaluate ``call`` on the forced pathway, or on the automatic choice."""
    name = resolve(pathway, simplify, tuple(call.runners), call.op)
    if name is None:
        name = choose(call)
    return call.runners[name]()


def cached_choice(key: tuple) -> Optional[str]:
    """The choice already taken for configuration ``key`` under the current settings, or ``None``."""
    s = _SETTINGS
    decision = _DECISIONS.get((key, _limits(s), s.exclude, s.autotune))
    return None if decision is None else decision.choice


def choose(call: Call) -> str:
    """The automatic choice for ``call`` (cached per configuration and settings)."""
    s = _SETTINGS
    key = (call.key, _limits(s), s.exclude, s.autotune)
    decision = _DECISIONS.get(key)
    if decision is not None:
        return decision.choice
    candidates = [c for c in call.runners if c not in s.exclude] or list(call.runners)
    text_key = _text_key(call.key, s)
    if len(candidates) == 1:
        decision = Decision(call.op, text_key, candidates[0], "only candidate")
    elif s.autotune:
        decision = _from_disk(call.op, text_key, candidates) or _measure(call, candidates, text_key)
    else:
        decision = _cost_model(call, candidates, text_key)
    with _LOCK:
        _DECISIONS[key] = decision
    return decision.choice


def _limits(s: Settings):
    """The memory settings a decision depends on (the budget alone when no fraction is set: the cache
    files of earlier versions keep their keys)."""
    return s.memory_budget if s.memory_fraction is None else (s.memory_budget, s.memory_fraction)


def _text_key(key: tuple, s: Settings) -> str:
    return repr((key, _limits(s), s.exclude))


def _budget(call: Call) -> Optional[float]:
    """Bytes of extra memory a candidate of ``call`` may need: ``memory_budget`` and ``memory_fraction``
    times the unfold pathway's (analytic) extra memory, whichever is smaller; ``None``: no limit."""
    s = _SETTINGS
    budget = s.memory_budget
    if s.memory_fraction is not None:
        try:
            reference = call.analytic("unfold").extra_bytes
        except Exception:  # an operation without an unfold form (transposed layers): no relative limit
            reference = None
        if reference is not None:
            limit = s.memory_fraction * reference
            budget = limit if budget is None else min(budget, limit)
    return budget


def _fits(extra_bytes: Optional[float], budget: Optional[float]) -> bool:
    return budget is None or extra_bytes is None or extra_bytes <= budget


def _pick(entries: Dict[str, dict], budget: Optional[float]) -> str:
    """Fastest entry that fits the budget; the leanest if none fits."""
    usable = {name: e for name, e in entries.items() if e.get("time_s") is not None}
    fitting = {name: e for name, e in usable.items() if _fits(e.get("extra_bytes"), budget)}
    if fitting:
        return min(fitting, key=lambda name: fitting[name]["time_s"])
    return min(usable, key=lambda name: (usable[name].get("extra_bytes") or 0.0, usable[name]["time_s"]))


# ----------------------------------------------------------------------------------------------
# cost model


def _candidate_cost(call: Call, name: str) -> "_cost.Cost":
    if name in ("tn", "tn+simplify", "unfold") and call.network is not None:
        from . import simplify as _simplify
        from .contract import plan

        network = call.network()
        if name != "tn":
            network = _simplify.simplify(network, unfold_overlapping=name == "unfold")
        planned = plan(network)
        largest = planned.largest_intermediate * call.element_size
        min_bytes = call.analytic("fused").min_bytes  # pathway-independent
        # a pairwise step holds its operands and its result: at least two intermediates at once
        # (the profiler measured up to 4x the largest one for the GGN diagonal's network)
        return _cost.Cost(float(planned.flops), min_bytes, largest, min_bytes + 2 * largest, 2 * largest,
                          _cost.PYTHON_OVERHEAD_S[name], flop_efficiency=_cost.flop_efficiency(call.op, name))
    return call.analytic(name)


def _cost_model(call: Call, candidates: Sequence[str], text_key: str) -> Decision:
    entries = {}
    for name in candidates:
        try:
            c = _candidate_cost(call, name)
        except Exception as error:  # a candidate the cost model cannot price is not chosen by it
            entries[name] = {"error": f"{type(error).__name__}: {error}"}
            continue
        entries[name] = {"time_s": c.estimated_time(call.device.type), "extra_bytes": c.extra_bytes,
                         "flops": c.flops}
    return Decision(call.op, text_key, _pick(entries, _budget(call)), "cost model", entries)


# ----------------------------------------------------------------------------------------------
# measurement


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure_one(call: Call, name: str, repeats: int) -> dict:
    runner, device = call.runners[name], call.device
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    with _cuda_graphs.eager():  # a replayed graph's temporaries would not show in the peak
        out = runner()  # warm-up (plans, autotunes kernels); its peak memory counts
    _sync(device)
    warmup_s = time.perf_counter() - start
    if device.type == "cuda":
        extra = torch.cuda.max_memory_allocated(device) - before - out.numel() * out.element_size()
    else:
        extra = _candidate_cost(call, name).extra_bytes
    del out
    times = []
    # a candidate slower than SLOW_CALL_S even warm is not timed again: once is enough to lose
    for _ in range(1 if warmup_s > SLOW_CALL_S else repeats):
        _sync(device)
        start = time.perf_counter()
        runner()
        _sync(device)
        times.append(time.perf_counter() - start)
    return {"time_s": statistics.median(times), "min_s": min(times), "extra_bytes": max(0.0, float(extra))}


def _measure(call: Call, candidates: Sequence[str], text_key: str) -> Decision:
    entries = {}
    for name in candidates:
        try:
            entries[name] = _measure_one(call, name, _SETTINGS.repeats)
        except torch.cuda.OutOfMemoryError as error:
            entries[name] = {"error": f"out of memory: {str(error).splitlines()[0]}"}
            torch.cuda.empty_cache()
        except Exception as error:  # a failing candidate is reported, not chosen
            entries[name] = {"error": f"{type(error).__name__}: {error}"}
    if call.device.type == "cuda":
        # return what the losing candidates cached: a crowded allocator can change later kernels'
        # workspace (cuDNN picks algorithms by the workspace it gets)
        torch.cuda.empty_cache()
    if not any("time_s" in e for e in entries.values()):
        raise RuntimeError(f"every pathway failed for {call.op}: {entries}")
    decision = Decision(call.op, text_key, _pick(entries, _budget(call)), "measured", entries)
    _to_disk(decision)
    return decision


# ----------------------------------------------------------------------------------------------
# disk cache


def _load_disk() -> Dict[str, dict]:
    global _DISK, _DISK_PATH
    path = _SETTINGS.cache_file
    if _DISK is None or _DISK_PATH != path:
        _DISK, _DISK_PATH = {}, path
        if path and os.path.exists(path):
            try:
                with open(path) as handle:
                    _DISK = json.load(handle)
            except (OSError, ValueError):  # a damaged cache is ignored and rewritten
                _DISK = {}
    return _DISK


def _from_disk(op: str, text_key: str, candidates: Sequence[str]) -> Optional[Decision]:
    if not _SETTINGS.cache_file:
        return None
    entry = _load_disk().get(text_key)
    if entry is None or entry.get("choice") not in candidates:
        return None
    return Decision(op, text_key, entry["choice"], "disk cache", entry.get("measurements", {}))


def _to_disk(decision: Decision) -> None:
    path = _SETTINGS.cache_file
    if not path:
        return
    with _LOCK:
        disk = _load_disk()
        disk[decision.key] = decision.as_dict()
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=directory, suffix=".tmp")
        with os.fdopen(handle, "w") as out:
            json.dump(disk, out, indent=1, sort_keys=True)
        os.replace(temporary, path)  # atomic: a concurrent reader sees the old or the new file
