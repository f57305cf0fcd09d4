"""Replaying captured CUDA graphs of a function for repeated calls on one input address.

Some of curvlib's functions run dozens of small operations per call (:func:`curvlib.lag_gram.kfc_by_lags`:
the lag products, the border terms, the assembly: 30-70 kernels). Each costs 15-35 µs of host time
(Python, the dispatcher, the launch), so on layers whose kernels take less than that the GPU waits for
the host: measured on an H200, the lags pathway on All-CNN-C's 192-channel 16x16 layer at batch 128
spent 2.6 ms of host time for 1.5 ms of device work. A CUDA graph replays all kernels of a call
with one launch.

:class:`GraphCache` does that for a function of one tensor ``x`` whose work depends only on ``x``'s
shape, strides, dtype and device and on a key the caller gives (the hyper-parameters; no data-dependent
control flow, no host synchronisation — except on the first call, which may autotune):

- a call whose ``x`` is at an address not seen before for the key runs eagerly (the very first warms
  up: autotuning, compilation, device-side caches);
- a call at an address seen before (training loops usually get the same blocks from the caching
  allocator every step) captures the call into a graph that reads ``x`` at that address and writes its
  result to a buffer owned by the graph, up to :data:`ADDRESSES_PER_KEY` graphs per key;
- later calls at a captured address replay that graph: one launch, plus a copy of the result (the next
  replay overwrites the graph's buffer). The graph reads whatever ``x`` holds now, so new data at the
  same address is correct by construction;
- with ``copy_moving_inputs=True``, once a key has seen more addresses than it may capture (in a
  training loop the layer inputs land at a new address in most steps: measured on All-CNN-C, 7-56
  addresses per layer over 50 steps), a call at an address without a graph copies ``x`` into a buffer
  of the key's own graph (captured once, reading that buffer) and replays it: one copy of ``x`` in
  device time for the many kernels' host time. For functions with many kernels per byte of input
  (the lags pathway, the chunked native KFC), not for one-pass kernels, which the copy would slow.

Memory: the graphs' temporaries live in one private pool per device, shared by all graphs (they run
one at a time, on the caller's stream, and no graph reads another's temporaries): it stays reserved, as
large as the largest call's temporaries, plus each graph's result buffer and the input buffers of the
moving-input graphs (at most :data:`MAX_HELD_BYTES` per cache). :func:`clear` releases them.

Off with ``CURVLIB_CUDA_GRAPHS=0``; CPU tensors always run eagerly, and so does a call made while the
caller captures a graph of its own (the call's kernels then become part of that graph).
"""

from __future__ import annotations

import contextlib
import os
from collections import OrderedDict
from typing import Callable, Dict, Hashable, List, Optional

import torch
from torch import Tensor

from .precision import backend_flags

__all__ = ["GraphCache", "enabled", "clear", "eager"]

#: graphs per key (input addresses) before further addresses run eagerly
ADDRESSES_PER_KEY = 2

#: bytes of result buffers the graphs of one cache hold at most (a KFC factor of a 512-channel 3x3
#: layer is 85 MB): beyond it, new addresses run eagerly
MAX_HELD_BYTES = 2**30

#: addresses remembered per key (a graph is captured for an address seen before)
SEEN_PER_KEY = 16

#: keys kept per cache (least recently used dropped, with their graphs)
MAX_KEYS = 128


_EAGER = [0]  # depth of eager() blocks


def enabled() -> bool:
    """CUDA graphs are used unless ``CURVLIB_CUDA_GRAPHS=0`` or inside :func:`eager`."""
    return not _EAGER[0] and os.environ.get("CURVLIB_CUDA_GRAPHS", "1") not in ("0", "")


@contextlib.contextmanager
def eager():
    """Run every call eagerly inside the block: no replay, no capture, no address remembered. For
    measuring a call's own extra memory (a replay's temporaries live in the graphs' pool, which the
    allocator's peak of the call does not show; :mod:`curvlib.pathways` measures candidates so)."""
    _EAGER[0] += 1
    try:
        yield
    finally:
        _EAGER[0] -= 1


_POOLS: Dict[torch.device, object] = {}


def _pool(device: torch.device):
    if device not in _POOLS:
        _POOLS[device] = torch.cuda.graph_pool_handle()
    return _POOLS[device]


_STREAMS: Dict[torch.device, torch.cuda.Stream] = {}


class _Captured:
    """One captured call: its graph and the buffer the graph writes the result to.

    Captured on a side stream (capture is not allowed on the default stream) with the graph's low-level
    calls: ``torch.cuda.graph`` would also synchronise the device and empty the allocator's cache, which
    in the middle of a training step costs more than the capture."""

    def __init__(self, fn: Callable[[Tensor], Tensor], x: Tensor):
        device = x.device
        stream = _STREAMS.get(device)
        if stream is None:
            stream = _STREAMS[device] = torch.cuda.Stream(device)
        current = torch.cuda.current_stream(device)
        stream.wait_stream(current)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream):
            self.graph.capture_begin(pool=_pool(device), capture_error_mode="thread_local")
            try:
                self.result = fn(x)
            finally:
                self.graph.capture_end()
        current.wait_stream(stream)

    def __call__(self) -> Tensor:
        self.graph.replay()
        return self.result.clone()

    @property
    def held_bytes(self) -> int:
        return _bytes(self.result)


class _MovingInput(_Captured):
    """A graph that reads its own copy of the input: each call copies ``x`` into it, then replays."""

    def __init__(self, fn: Callable[[Tensor], Tensor], x: Tensor):
        self.input = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
        self.input.copy_(x)
        super().__init__(fn, self.input)

    def run(self, x: Tensor) -> Tensor:
        self.input.copy_(x)
        return self()

    @property
    def held_bytes(self) -> int:
        return _bytes(self.result) + _bytes(self.input)


def _bytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _dense(t: Tensor) -> bool:
    """Contiguous in the default or a channels-last layout: a buffer with ``t``'s strides holds exactly it."""
    formats = {4: torch.channels_last, 5: torch.channels_last_3d}
    return t.is_contiguous() or (t.dim() in formats and t.is_contiguous(memory_format=formats[t.dim()]))


class _Entry:
    """Per key: the graphs by input address, the addresses seen (insertion-ordered, bounded) and the
    moving-input graph (``copy_moving_inputs``)."""

    def __init__(self):
        self.graphs: Dict[int, _Captured] = {}
        self.seen: Dict[int, None] = {}
        self.moving: Optional[_MovingInput] = None
        self.result_bytes = 0  # of an eager call's result: what a graph of this key will hold


class GraphCache:
    """``cache(key, fn, x)`` returns ``fn(x)``, replaying a captured graph where it can (module docstring).

    ``key`` must hold everything besides ``x``'s layout that ``fn``'s work depends on (hyper-parameters,
    options); the cache adds ``x``'s shape, strides, dtype, device and the float32 precision flags, which
    change the kernels cuBLAS and cuDNN pick (:func:`curvlib.precision.backend_flags`).
    ``copy_moving_inputs``: replay a graph of the key's own input buffer for inputs that move (module
    docstring).

    >>> cache = GraphCache("demo")
    >>> cache(("double",), lambda t: 2 * t, torch.ones(2))  # CPU: always eager
    tensor([2., 2.])
    """

    _all: List["GraphCache"] = []

    def __init__(self, name: str, copy_moving_inputs: bool = False):
        self.name = name
        self.copy_moving_inputs = copy_moving_inputs
        self._entries: "OrderedDict[Hashable, _Entry]" = OrderedDict()
        self.replays = 0  # for tests and reports
        self.held_bytes = 0  # result (and moving-input) buffers of the graphs
        GraphCache._all.append(self)

    def __call__(self, key: Hashable, fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
        if not (x.is_cuda and enabled()) or torch.cuda.is_current_stream_capturing():
            return fn(x)
        full_key = (key, tuple(x.shape), x.stride(), x.dtype, x.device, backend_flags())
        entry = self._entries.get(full_key)
        if entry is None:
            entry = self._entries[full_key] = _Entry()
            while len(self._entries) > MAX_KEYS:
                _, dropped = self._entries.popitem(last=False)
                self.held_bytes -= sum(g.held_bytes for g in dropped.graphs.values())
                self.held_bytes -= dropped.moving.held_bytes if dropped.moving is not None else 0
        self._entries.move_to_end(full_key)
        address = x.data_ptr()
        captured = entry.graphs.get(address)
        if captured is None:
            if (address not in entry.seen or len(entry.graphs) >= ADDRESSES_PER_KEY
                    or self.held_bytes + entry.result_bytes > MAX_HELD_BYTES):
                # first sight of this address (the first call of a key warms up: autotuning, compilation):
                # eager; an address seen before is likely to come back (a loop), so the next call captures
                entry.seen[address] = None
                while len(entry.seen) > SEEN_PER_KEY:
                    entry.seen.pop(next(iter(entry.seen)))
                if self.copy_moving_inputs and len(entry.seen) > ADDRESSES_PER_KEY and entry.result_bytes:
                    moving = self._moving(entry, fn, x)
                    if moving is not None:
                        self.replays += 1
                        return moving.run(x)
                result = fn(x)
                entry.result_bytes = _bytes(result)
                return result
            captured = entry.graphs[address] = _Captured(fn, x)
            self.held_bytes += captured.held_bytes
        self.replays += 1
        return captured()

    def _moving(self, entry: _Entry, fn: Callable[[Tensor], Tensor], x: Tensor) -> Optional[_MovingInput]:
        """The key's moving-input graph, captured on first need; ``None`` where it cannot be held (the
        byte cap) or ``x`` is not dense (its buffer could not have ``x``'s strides)."""
        if entry.moving is None:
            if (not _dense(x)
                    or self.held_bytes + entry.result_bytes + _bytes(x) > MAX_HELD_BYTES):
                return None
            entry.moving = _MovingInput(fn, x)
            self.held_bytes += entry.moving.held_bytes
        return entry.moving

    def clear(self) -> None:
        self._entries.clear()
        self.replays = 0
        self.held_bytes = 0


def clear() -> None:
    """Drop every captured graph (their result buffers; the shared pools go when no graph holds them)."""
    for cache in GraphCache._all:
        cache.clear()
    _POOLS.clear()
