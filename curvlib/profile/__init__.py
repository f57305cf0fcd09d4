"""Per-layer profiling of curvature operations: measured time and memory, analytic cost, efficiency.

- :func:`profile_model` — one forward pass records every Conv/ConvTranspose/Linear call; each
  (layer, operation, pathway) is timed (CUDA events or ``perf_counter``, warm-up, median), its extra
  peak memory measured (CUDA allocator, or the process's peak RSS on CPU), and its analytic cost
  attached (FLOPs, minimum bytes, largest intermediate, ideal roofline time, efficiency).
- :class:`Profile` — the rows, with :meth:`~Profile.hot_layers`, :meth:`~Profile.table`,
  :meth:`~Profile.compare`, :meth:`~Profile.plot`, :meth:`~Profile.save` / :meth:`~Profile.load`.
- :func:`measure_ceilings` — copy bandwidth, fp32 matmul rate, per-call overhead of a device
  (``register=True`` hands them to :mod:`curvlib.cost`).
- :func:`measure_memory`, :func:`time_call` — the two meters, usable on any callable.

>>> import torch
>>> from torch import nn
>>> from curvlib.profile import profile_model
>>> model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2))
>>> profile = profile_model(model, torch.randn(8, 3, 16, 16), pathways=("auto", "native", "tn+simplify"),
...                         repeats=2, warmup=1, ceilings="quick")
>>> hot = profile.hot_layers(3)                  # (layer, op) pairs that dominate time
>>> print(profile.table(k=5))                    # doctest: +SKIP
>>> profile.plot("hot_layers.png")               # doctest: +SKIP
"""

from .ceilings import clear_cache, ideal_time, measure_ceilings
from .layers import LayerRecord, record_layers
from .memory import MemoryMeasurement, measure_memory
from .operations import DEFAULT_OPERATIONS, DEFAULT_PATHWAYS, OPERATIONS, PATHWAYS
from .profiler import profile_model
from .report import HotSpot, Profile, ProfileRow
from .timing import Timing, time_call

__all__ = [
    "profile_model",
    "Profile",
    "ProfileRow",
    "HotSpot",
    "measure_ceilings",
    "ideal_time",
    "clear_cache",
    "measure_memory",
    "MemoryMeasurement",
    "time_call",
    "Timing",
    "record_layers",
    "LayerRecord",
    "OPERATIONS",
    "DEFAULT_OPERATIONS",
    "PATHWAYS",
    "DEFAULT_PATHWAYS",
]
