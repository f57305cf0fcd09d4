"""Extra peak memory of a call: what it needs beyond the memory in use before it and its result.

``extra = peak during the call − in use before the call − size of the result`` (bytes, never below 0).

How the peak is read depends on the device:

=========================  ===================================================================  ============
device / platform          measurement                                                          ``method``
=========================  ===================================================================  ============
CUDA                       ``torch.cuda.reset_peak_memory_stats`` then ``max_memory_allocated``  ``"cuda"``
                           (blocks the caching allocator hands out: sizes rounded up to 512 B,
                           large ones to multiples of 2 MiB)
CPU, Linux                 peak resident set size: writing ``"5"`` to ``/proc/self/clear_refs``  ``"rss"``
                           resets ``VmHWM`` to the current ``VmRSS``; ``VmHWM`` afterwards is
                           the peak
CPU, ``/proc`` readable    ``VmHWM`` after − ``VmRSS`` before; the peak could not be reset, so   ``"rss-upper"``
but not resettable         an older, higher peak inflates it: an **upper bound**
CPU, no ``/proc``          growth of ``resource.getrusage().ru_maxrss`` (cannot be reset; only  ``"rusage-lower"``
                           growth beyond the process's earlier peak shows): a **lower bound**
=========================  ===================================================================  ============

Limits of the CPU measurement (it measures the whole *process*, in pages):

- Page granularity: memory counts once it is touched; ``torch.empty`` that is never written costs
  nothing, a tensor written in part counts the pages written.
- Allocator caching: freed memory the C allocator keeps (glibc's heap below its mmap threshold) is
  reused without growing the RSS, so a call can look cheaper than it is. Before measuring, the
  free heap memory is handed back to the system (glibc ``malloc_trim``), which removes most of it.
  Allocations above 32 MiB are always their own mappings and are always seen.
- Other threads of the process (data loaders, another measurement) count too.

Example::

    >>> import torch
    >>> from curvlib.profile.memory import measure_memory
    >>> m = measure_memory(lambda: torch.ones(2**24).sum())   # a 64 MiB temporary
    >>> m.method, round(m.extra_bytes / 2**20)               # doctest: +SKIP
    ('rss', 64)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import resource
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

__all__ = ["MemoryMeasurement", "measure_memory", "cpu_method", "result_bytes", "process_rss"]

_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"

_CAN_RESET: Optional[bool] = None
_LIBC = None


@dataclass(frozen=True)
class MemoryMeasurement:
    """Result of :func:`measure_memory`.

    Attributes:
        extra_bytes: peak beyond the memory in use before the call, minus the result (≥ 0).
        peak_bytes: peak in use during the call (process RSS on CPU, allocated tensors on CUDA).
        before_bytes: in use before the call.
        result_bytes: size of the tensors returned (subtracted from the peak).
        method: ``"cuda"``, ``"rss"``, ``"rss-upper"`` (upper bound) or ``"rusage-lower"`` (lower bound).
    """

    extra_bytes: float
    peak_bytes: float
    before_bytes: float
    result_bytes: float
    method: str

    @property
    def exact(self) -> bool:
        """Whether the value is a measurement rather than a bound."""
        return self.method in ("cuda", "rss")


def result_bytes(value: Any) -> int:
    """Bytes of the tensor storages in ``value`` (a tensor, or nested tuples/lists/dicts of them), each storage once."""
    seen, total = set(), 0
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            key = (storage.data_ptr(), item.device)
            if key not in seen:
                seen.add(key)
                total += storage.nbytes()
        elif isinstance(item, (tuple, list)):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
    return total


# ----------------------------------------------------------------------------------------------
# process memory (CPU)


def _read_status() -> Optional[dict]:
    """``{"VmRSS": bytes, "VmHWM": bytes}`` from ``/proc/self/status``, or ``None`` without ``/proc``."""
    try:
        with open(_STATUS) as handle:
            text = handle.read()
    except OSError:
        return None
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024  # reported in kB
    return values if len(values) == 2 else None


def _reset_peak() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux ≥ 4.0); ``False`` where not permitted."""
    global _CAN_RESET
    if _CAN_RESET is False:
        return False
    try:
        with open(_CLEAR_REFS, "w") as handle:
            handle.write("5")
        _CAN_RESET = True
    except OSError:
        _CAN_RESET = False
    return _CAN_RESET


def _trim_heap() -> None:
    """Hand free heap memory back to the system (glibc), so reused cached memory does not hide a peak."""
    global _LIBC
    if _LIBC is None:
        _LIBC = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                _LIBC = libc if hasattr(libc, "malloc_trim") else False
            except OSError:
                pass
    if _LIBC:
        _LIBC.malloc_trim(0)


def _maxrss_bytes() -> int:
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, kB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def process_rss() -> Optional[int]:
    """Current resident set size of this process in bytes (``None`` without ``/proc``)."""
    status = _read_status()
    return None if status is None else status["VmRSS"]


def cpu_method() -> str:
    """The method :func:`measure_memory` uses on the CPU here (see the module docstring)."""
    if _read_status() is None:
        return "rusage-lower"
    return "rss" if _reset_peak() else "rss-upper"


# ----------------------------------------------------------------------------------------------


def _check_device(device) -> torch.device:
    if device is None:
        return torch.device("cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device must be a torch.device or a device string like 'cpu' or 'cuda:0', got {device!r}") from error


def measure_memory(fn: Callable[[], Any], device=None, keep_result: bool = False):
    """Run ``fn()`` once and measure its extra peak memory on ``device`` (default: CPU).

    Args:
        fn: zero-argument callable (its return value counts as result and is subtracted).
        device: where ``fn`` allocates: ``"cpu"`` (process RSS) or a CUDA device (allocator statistics).
        keep_result: also return the result: ``(MemoryMeasurement, result)``.

    Returns:
        :class:`MemoryMeasurement` (bytes), or ``(measurement, result)`` with ``keep_result=True``.
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    device = _check_device(device)
    if device.type == "cuda":
        measurement, result = _measure_cuda(fn, device)
    else:
        measurement, result = _measure_cpu(fn)
    return (measurement, result) if keep_result else measurement


def _measure_cuda(fn, device):
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    result = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    size = result_bytes(result)
    return MemoryMeasurement(float(max(0, peak - before - size)), float(peak), float(before), float(size), "cuda"), result


def _measure_cpu(fn):
    _trim_heap()
    status = _read_status()
    if status is None:  # no /proc: the lifetime peak only grows; what shows is a lower bound
        before = _maxrss_bytes()
        result = fn()
        peak = _maxrss_bytes()
        size = result_bytes(result)
        extra = max(0, peak - before - size)
        return MemoryMeasurement(float(extra), float(peak), float(before), float(size), "rusage-lower"), result
    method = "rss" if _reset_peak() else "rss-upper"
    before = _read_status()["VmRSS"]
    result = fn()
    peak = _read_status()["VmHWM"]
    size = result_bytes(result)
    # the result is what the caller keeps, not workspace (a result viewing an input is subtracted
    # all the same; the clamp at 0 keeps such a value sane)
    extra = max(0, peak - before - size)
    return MemoryMeasurement(float(extra), float(peak), float(before), float(size), method), result

