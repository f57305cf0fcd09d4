"""Measured device ceilings: copy bandwidth, fp32 matrix-multiply rate and per-call overhead.

These are the denominators of the roofline (cf. Lavin, *On the Efficiency of Convolutional Neural
Networks*, Eq. 11): the ideal time of a call with ``F`` FLOPs that must move ``B`` bytes is
``max(F / rate, B / bandwidth)`` (:func:`ideal_time`), and its computational efficiency is
ideal time / measured time.

- **bandwidth** (bytes/s): ``dst.copy_(src)`` of a large buffer, bytes read plus written over the
  median time (a buffer larger than the caches, so that memory, not cache, is measured).
- **rate** (FLOP/s): a square fp32 matrix product ``n × n @ n × n`` (``2·n³`` FLOPs) with TF32 off
  (``torch.set_float32_matmul_precision("highest")`` for the measurement, restored after).
- **call overhead** (s): time per call of an in-place add on a one-element tensor, in a loop of
  many (on CUDA: the launch throughput, synchronised once at the end).

On the CPU the rate depends on ``torch.get_num_threads()`` (part of the cache key). Results are cached
per device and sizes; ``register=True`` also hands them to :func:`curvlib.cost.set_ceilings`, so that
``pathway="auto"``'s cost model uses them.

>>> from curvlib.profile import measure_ceilings
>>> c = measure_ceilings("cpu", quick=True)
>>> c.flops_per_s > 0 and c.bytes_per_s > 0 and c.measured
True
"""

from __future__ import annotations

import contextlib
import statistics
import time
from typing import Dict, Optional

import torch

from .. import cost as _cost
from .. import precision as _precision
from .timing import check_count, synchronize, time_call

__all__ = ["measure_ceilings", "ideal_time", "clear_cache", "DEFAULT_SIZES"]

#: ``(copy bytes, matmul n)`` per (device type, quick): buffers well beyond the last-level cache,
#: products large enough to reach the arithmetic peak, yet a fraction of a second on each device
DEFAULT_SIZES = {
    ("cpu", True): (32 * 2**20, 384),
    ("cpu", False): (256 * 2**20, 1024),
    ("cuda", True): (256 * 2**20, 4096),
    ("cuda", False): (2**30, 8192),
}

_CACHE: Dict[tuple, _cost.Ceilings] = {}


def clear_cache() -> None:
    """Forget measured ceilings (the next :func:`measure_ceilings` measures again)."""
    _CACHE.clear()


def ideal_time(flops: float, min_bytes: float, ceilings: _cost.Ceilings) -> float:
    """Roofline time ``max(flops / rate, bytes / bandwidth)`` in seconds (no call overhead)."""
    if not isinstance(ceilings, _cost.Ceilings):
        raise TypeError(f"ceilings must be a curvlib.cost.Ceilings, got {type(ceilings).__name__}")
    return max(flops / ceilings.flops_per_s, min_bytes / ceilings.bytes_per_s)


@contextlib.contextmanager
def _matmul_precision(value: str):
    """fp32 matrix products at ``value`` (``"highest"``: without TF32, what the fp32 FLOP counts assume;
    ``"high"``: on the TF32 matrix units)."""
    # restored through the flags themselves: set_float32_matmul_precision(saved) would turn an inherited
    # ("none") cuBLAS flag into an explicit one
    with _precision.saved_fp32_flags():
        torch.set_float32_matmul_precision(value)
        yield


def _copy_bandwidth(device, dtype, nbytes: int, repeats: int) -> float:
    numel = max(1, nbytes // torch.empty((), dtype=dtype).element_size())
    src = torch.ones(numel, dtype=dtype, device=device)  # written once: every page resident
    dst = torch.zeros_like(src)
    timing = time_call(lambda: dst.copy_(src), device, repeats=repeats, warmup=1)
    moved = 2 * src.numel() * src.element_size()  # read src, write dst
    return moved / timing.median_s


def _matmul_rate(device, dtype, n: int, repeats: int, tf32: bool = False) -> float:
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    out = torch.empty(n, n, dtype=dtype, device=device)
    with _matmul_precision("high" if tf32 else "highest"):
        timing = time_call(lambda: torch.mm(a, b, out=out), device, repeats=repeats, warmup=1)
    return 2.0 * n**3 / timing.median_s


def _call_overhead(device, repeats: int, calls: int = 200) -> float:
    tiny = torch.zeros(1, device=device)
    per_call = []
    for _ in range(repeats + 1):  # the first round warms up
        synchronize(device)
        start = time.perf_counter()
        for _ in range(calls):
            tiny.add_(1.0)
        synchronize(device)
        per_call.append((time.perf_counter() - start) / calls)
    return statistics.median(per_call[1:])


def measure_ceilings(
    device=None,
    dtype: torch.dtype = torch.float32,
    quick: bool = False,
    repeats: int = 5,
    copy_bytes: Optional[int] = None,
    matmul_size: Optional[int] = None,
    register: bool = False,
    refresh: bool = False,
) -> _cost.Ceilings:
    """Measure (or return cached) ceilings of ``device``.

    Args:
        device: ``None`` (CPU), a device string or ``torch.device``.
        dtype: floating dtype of the copy and the matrix product (fp32 by default: the FLOP rate
            of another dtype differs).
        quick: smaller buffers (:data:`DEFAULT_SIZES`), for tests and quick looks.
        repeats: timed calls per measurement (median).
        copy_bytes, matmul_size: override the sizes (bytes of the copied buffer; ``n`` of the product).
        register: also install the result with :func:`curvlib.cost.set_ceilings` for the device type.
        refresh: measure even if cached.

    Returns:
        :class:`curvlib.cost.Ceilings` with ``measured=True`` (``flops_per_s``, ``bytes_per_s``,
        ``call_overhead_s``; on CUDA devices with TF32 matrix units and float32 also ``tf32_flops_per_s``).
    """
    device = torch.device("cpu") if device is None else torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    check_count(repeats, "repeats", 1)
    kind = "cuda" if device.type == "cuda" else "cpu"
    default_bytes, default_n = DEFAULT_SIZES[(kind, bool(quick))]
    copy_bytes = default_bytes if copy_bytes is None else check_count(copy_bytes, "copy_bytes", 1)
    matmul_size = default_n if matmul_size is None else check_count(matmul_size, "matmul_size", 1)
    threads = torch.get_num_threads() if device.type == "cpu" else None
    key = (str(device), dtype, copy_bytes, matmul_size, threads)
    if refresh or key not in _CACHE:
        # TF32 matrix units: CUDA devices since Ampere, for float32 products
        tf32 = device.type == "cuda" and dtype == torch.float32 and torch.cuda.get_device_capability(device)[0] >= 8
        _CACHE[key] = _cost.Ceilings(
            flops_per_s=_matmul_rate(device, dtype, matmul_size, repeats),
            bytes_per_s=_copy_bandwidth(device, dtype, copy_bytes, repeats),
            call_overhead_s=_call_overhead(device, repeats),
            measured=True,
            tf32_flops_per_s=_matmul_rate(device, dtype, matmul_size, repeats, tf32=True) if tf32 else None,
        )
    result = _CACHE[key]
    if register:
        _cost.set_ceilings(device.type, result)
    return result
