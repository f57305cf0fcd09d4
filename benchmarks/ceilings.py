"""Measured device ceilings shared by the benchmarks: copy bandwidth (the KFAC-reduce floor)."""

from __future__ import annotations

import statistics

import torch

GIB = 2**30


def event_seconds(fn) -> float:
    """Device time of one ``fn()`` call between CUDA events, after a synchronisation."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def copy_bandwidth(device, repeats: int = 7) -> float:
    """Bytes read plus written per second by a 1 GiB device-to-device copy (median of ``repeats``)."""
    a = torch.empty(GIB // 4, device=device).normal_()
    b = torch.empty_like(a)
    b.copy_(a)
    seconds = statistics.median([event_seconds(lambda: b.copy_(a)) for _ in range(repeats)])
    return 2 * a.numel() * a.element_size() / seconds
