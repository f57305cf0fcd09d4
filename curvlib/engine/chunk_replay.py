"""Replaying the column pass of one chunk as a CUDA graph for the step's other chunks.

The engine backpropagates the loss Hessian's square-root columns (or MC samples) in chunks, and each
chunk runs the same work: the graph walk through the model (:class:`~curvlib.engine.graph_vjp.GraphVJP`)
and the extensions' layer quantities. Under a memory budget there are several chunks per step, and
their host time — Python per node, per layer and per kernel launch, 10-12 ms per chunk on All-CNN-C —
adds up to the device time or exceeds it (measured on an H100 host: 57 ms of host time for a step of
56 ms device time, five chunks of 20 columns). :class:`ChunkReplay` captures the second chunk's work
into a CUDA graph and replays it for that chunk and every later one of the same size: one launch
instead of a few hundred. The capture is redone every step (the graph reads the step's saved tensors)
and costs about one eager chunk's host time while the device runs out of queued work, so it pays only
with many chunks per step (:data:`MIN_CHUNKS`): on an H100 host, All-CNN-C's DiagGGNExact at a 0.6 GB
budget (15 chunks) took 92 ms instead of 176 ms; at 1.25 GB (5 chunks, not replayed) replaying would
have cost 1-12 ms more than the eager 63 ms.

When it applies (:func:`replayable`): CUDA columns, CUDA graphs enabled (``CURVLIB_CUDA_GRAPHS``, see
:mod:`curvlib.cuda_graphs`), at least :data:`MIN_CHUNKS` chunks, every extension declaring a :attr:`replayable
<curvlib.engine.extension.Extension.replayable>` accumulation (it only adds into its state with
:func:`~curvlib.engine.extension.add_into`), and the first chunk run by the graph walk alone (autograd's
engine runs nodes on their forward streams, which a capture on a side stream cannot follow). The first
chunk runs eagerly: it builds the walk, makes the pathway and kernel choices (autotuning synchronises,
which a capture cannot) and converts the saved tensors, so the captured work is exactly a later
chunk's. Accumulation in the captured chunk adds into the states in place (they are copied once
before the capture, so no tensor of a caller is written), so every replay adds its chunk.

Memory: the graph's temporaries live in a private pool of the allocator, one per device shared by the
captures of all steps. The most recent graph of a device is kept until the next capture replaces it
(PyTorch cannot capture into a pool whose last graph is gone), so the next step's capture reuses its
blocks. The step's allocated peak is unchanged, but the pool stays reserved, next to the default
pool's cached blocks: reserved memory is up to one chunk's working set larger than without replay,
also between steps. :func:`release` drops the kept graphs (their pool is then freed like other cached
memory, by ``torch.cuda.empty_cache()``).

A capture that fails (an operation a capture does not allow) is abandoned with a ``RuntimeWarning``
naming the error, and the chunk runs eagerly, as do the remaining chunks; nothing of the abandoned
capture ran. (PyTorch may leave the CUDA random generator unusable after a failed capture: an
extension whose chunks draw random numbers must not declare itself replayable.)
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Dict, Optional

import torch
from torch import Tensor

from .. import cuda_graphs as _cuda_graphs

__all__ = ["ChunkReplay", "replayable", "release", "capturing"]

#: chunks per step from which a replay pays for its capture. The capture costs about one eager chunk's
#: host time, during which the device has only the first chunk's work queued, plus the instantiation
#: (H100, All-CNN-C DiagGGNExact in bfloat16: 5 chunks of 20 columns, replayed 64-75 ms, eager 63 ms;
#: 15 chunks of 7 columns, replayed 92 ms, eager 176 ms)
MIN_CHUNKS = 8

_STREAMS: Dict[torch.device, torch.cuda.Stream] = {}
_POOLS: Dict[torch.device, object] = {}
_KEPT: Dict[torch.device, torch.cuda.CUDAGraph] = {}  # the latest graph per device: keeps its pool alive


def release() -> None:
    """Drop the kept graphs and their pools (module docstring); later steps capture into new pools."""
    _KEPT.clear()
    _POOLS.clear()


def replayable(columns: Tensor, chunks: int, extensions) -> bool:
    """Whether the column passes of a step may be replayed (module docstring), before the first chunk."""
    return (columns.is_cuda and _cuda_graphs.enabled() and chunks >= MIN_CHUNKS
            and all(getattr(ext, "replayable", False) for ext in extensions))


class ChunkReplay:
    """``replay(block)`` runs ``run_chunk(block)`` for a chunk of columns: the first call captures it
    (reading a copy of ``block`` the later calls overwrite), every call replays the graph. ``failed``:
    the capture failed and every call must run eagerly (the caller's job); ``replays``: graph launches.

    ``run_chunk`` must do the same device work for every chunk of this size, with no host
    synchronisation, and accumulate in place while :func:`capturing` is true.
    """

    def __init__(self, run_chunk: Callable[[Tensor], None]):
        self.run_chunk = run_chunk
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.input: Optional[Tensor] = None
        self.failed = False
        self.error: Optional[BaseException] = None  # why the capture failed
        self.replays = 0

    def __call__(self, block: Tensor) -> bool:
        """Replay the chunk ``block``; ``False`` (nothing ran) where the capture failed."""
        if self.failed:
            return False
        if self.graph is None:
            self.input = block.clone(memory_format=torch.contiguous_format)
            if not self._capture(block.device):
                self.input = None
                return False
        else:
            self.input.copy_(block)
        self.graph.replay()
        self.replays += 1
        return True

    def _capture(self, device: torch.device) -> bool:
        stream = _STREAMS.get(device)
        if stream is None:
            stream = _STREAMS[device] = torch.cuda.Stream(device)
        current = torch.cuda.current_stream(device)
        stream.wait_stream(current)  # the capture reads what the eager chunks wrote (states, caches)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.stream(stream), _capturing():
                # low-level calls: torch.cuda.graph would also synchronise and empty the allocator's
                # cache, which mid-step costs more than the capture (as in curvlib.cuda_graphs)
                pool = _POOLS.get(device)
                if pool is None:
                    pool = _POOLS[device] = torch.cuda.graph_pool_handle()
                graph.capture_begin(pool=pool, capture_error_mode="thread_local")
                try:
                    self.run_chunk(self.input)
                finally:
                    graph.capture_end()
        except Exception as error:  # an operation the capture does not allow: nothing of it ran
            self.failed = True
            self.error = error
            if device not in _KEPT:
                _POOLS.pop(device, None)  # no graph holds the pool: it cannot be captured into again
            warnings.warn(f"curvlib: the column pass of a chunk could not be captured as a CUDA graph; "
                          f"the chunks run eagerly ({error!r})", RuntimeWarning, stacklevel=2)
            return False
        current.wait_stream(stream)
        self.graph = _KEPT[device] = graph  # the previous step's graph goes (its pool stays ours)
        return True


_CAPTURING = [0]


@contextlib.contextmanager
def _capturing():
    _CAPTURING[0] += 1
    try:
        yield
    finally:
        _CAPTURING[0] -= 1


def capturing() -> bool:
    """Whether a chunk is being captured (accumulations must then add into their states in place)."""
    return _CAPTURING[0] > 0
