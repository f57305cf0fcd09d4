"""Choose a kernel's launch configuration per problem shape, once, and remember it.

Each kernel family proposes a short list of candidate configurations for a shape (block sizes,
warps, split of the reduction), best guess first. On a CUDA device the first call for a key launches
every candidate once (compiling it), times a few bursts of launches with CUDA events and keeps the
fastest for the rest of the process; elsewhere (interpreter) or with ``CURVLIB_KERNEL_AUTOTUNE=0`` the first
candidate is used. Keys hold only shapes, dtypes and options, never data, so the cache stays small.

>>> cache = ConfigCache("demo")
>>> cache.choose(("shape",), ["a", "b"], launch=lambda config: None, device=torch.device("cpu"))
'a'
"""

from __future__ import annotations

import os
import statistics
from typing import Callable, Dict, Hashable, List, TypeVar

import torch

Config = TypeVar("Config")

#: timed bursts per candidate (after one launch that compiles and warms up)
REPEATS = 3
#: launches per timed burst: back to back, so that the device time of kernels of some 10-100 µs is
#: measured, not the host time of launching one on an idle GPU (which is the same for every candidate)
BURST = 4
#: a candidate whose one warm launch takes at least this long is timed by that launch alone (the
#: GGN diagonal of a large layer with 100 columns runs 20-100 ms per launch)
LONG_S = 2e-3


def enabled() -> bool:
    """Autotuning is on unless ``CURVLIB_KERNEL_AUTOTUNE=0``."""
    return os.environ.get("CURVLIB_KERNEL_AUTOTUNE", "1") not in ("0", "")


def _event_seconds(run: Callable[[], object]) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


class ConfigCache:
    """Per-key choice among candidate configurations (see the module docstring)."""

    _all: List["ConfigCache"] = []

    def __init__(self, name: str):
        self.name = name
        self._best: Dict[Hashable, object] = {}
        self.timings: Dict[Hashable, Dict[str, float]] = {}  # seconds per candidate, for reports
        ConfigCache._all.append(self)

    def choose(self, key: Hashable, candidates, launch: Callable[[Config], object], device: torch.device) -> Config:
        """The cached choice for ``key``, or the fastest of ``candidates`` (``launch(config)`` runs one).

        ``candidates`` is a sequence, or a callable returning one (called only when ``key`` is new).
        """
        best = self._best.get(key)
        if best is not None:
            return best
        if callable(candidates):
            candidates = candidates()
        if not candidates:
            raise ValueError(f"{self.name}: no candidate configuration for {key}")
        if len(candidates) == 1 or device.type != "cuda" or not enabled():
            best = candidates[0]
        else:
            times = {}
            for config in candidates:
                try:
                    launch(config)  # compiles on first use
                except Exception as error:  # e.g. out of shared memory for this block size: skip it
                    if "out of resource" in str(error).lower() or "shared memory" in str(error).lower():
                        continue
                    raise
                torch.cuda.synchronize(device)
                single = _event_seconds(lambda: launch(config))
                if single >= LONG_S:  # a launch this long times itself: bursts would only cost time
                    times[config] = single
                    continue
                samples = [_event_seconds(lambda: [launch(config) for _ in range(BURST)]) / BURST
                           for _ in range(REPEATS)]
                times[config] = statistics.median(samples)
            if not times:
                raise RuntimeError(f"{self.name}: no candidate configuration could be launched for {key}")
            best = min(times, key=times.get)
            self.timings[key] = {repr(config): t for config, t in times.items()}
        self._best[key] = best
        return best

    def clear(self) -> None:
        self._best.clear()
        self.timings.clear()


def clear_all() -> None:
    """Forget every cached choice (all kernel families)."""
    for cache in ConfigCache._all:
        cache.clear()


def chosen() -> Dict[str, Dict[Hashable, object]]:
    """The current choices of every kernel family, ``{family: {key: config}}`` (for reports)."""
    return {cache.name: dict(cache._best) for cache in ConfigCache._all}
