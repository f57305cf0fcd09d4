"""Wall-clock time of a call: warm-up, then the median of repeated timed calls.

On CUDA each call is bracketed by CUDA events (the GPU's own clock, kernels queued by the call
included; the host waits for the end event before the next call, so calls do not overlap). On
other devices ``time.perf_counter`` brackets the call.

>>> import torch
>>> from curvlib.profile.timing import time_call
>>> t = time_call(lambda: torch.randn(64, 64) @ torch.randn(64, 64), repeats=3, warmup=1)
>>> t.median_s > 0 and t.repeats == 3
True
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch

__all__ = ["Timing", "time_call", "synchronize", "check_count"]


@dataclass(frozen=True)
class Timing:
    """Timed calls of one callable (seconds)."""

    median_s: float
    min_s: float
    repeats: int
    warmup: int
    times_s: List[float] = field(default_factory=list)


def check_count(value, name: str, minimum: int) -> int:
    """``value`` as an int ``>= minimum`` or a clear error naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (no-op off CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _one_call(fn: Callable, device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3  # ms → s
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def time_call(
    fn: Callable[[], object],
    device=None,
    repeats: int = 5,
    warmup: int = 2,
    time_limit_s: Optional[float] = None,
) -> Timing:
    """Median and minimum time of ``fn()`` over ``repeats`` calls after ``warmup`` untimed ones.

    Args:
        fn: zero-argument callable.
        device: where ``fn`` runs (``None``: CPU); CUDA uses events.
        repeats: timed calls (≥ 1).
        warmup: untimed calls first (≥ 0): plans, kernel autotuning, allocator growth.
        time_limit_s: if given, fewer timed calls (at least one) when ``repeats`` of them would take
            longer, judged from the first timed call.

    Returns:
        :class:`Timing`; ``repeats`` is the number of calls actually timed.
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    check_count(repeats, "repeats", 1)
    check_count(warmup, "warmup", 0)
    if time_limit_s is not None and (isinstance(time_limit_s, bool) or not isinstance(time_limit_s, (int, float))
                                     or not time_limit_s > 0):
        raise ValueError(f"time_limit_s must be None or a positive number of seconds, got {time_limit_s!r}")
    device = torch.device("cpu") if device is None else torch.device(device)
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = [_one_call(fn, device)]
    count = repeats
    if time_limit_s is not None:
        count = max(1, min(repeats, int(time_limit_s / max(times[0], 1e-9))))
    times += [_one_call(fn, device) for _ in range(count - 1)]
    return Timing(statistics.median(times), min(times), len(times), warmup, times)
