"""Work that needs only the recorded layer inputs, run on a side CUDA stream so it overlaps the backward passes.

The KFAC input factors (:func:`curvlib.functional.kfc`, :func:`curvlib.functional.kfac_reduce`) read
nothing but the layer inputs, which the forward pass has already produced. Computed in order, after
the Monte-Carlo backward pass, they add their whole time to a training step. Launched on a second
stream when the backward pass starts, their kernels run beside those of the backward passes and fill
the SMs those leave idle (launch tails, small late layers): on All-CNN-C at batch 128 on an H100 the
KFAC-expand step saves about 1 ms of ~20 (``benchmarks/results``).

Stream safety (PyTorch's rules for tensors shared between streams):

- the side stream first waits for everything queued on the launching stream (the inputs are written);
- each input is ``record_stream``-ed on the side stream, so its memory is not handed out again before
  the side work has read it, even if autograd frees it first;
- each result is ``record_stream``-ed on the launching stream (it is used there later);
- :meth:`SideWork.join` makes a stream wait for the side work; the engine joins the launching stream
  when the backward pass ends, before ``backward()`` returns. Until then the results may still be being
  written, and nothing but the engine touches them.

>>> work = SideWork(torch.device("cpu"))   # no CUDA: runs inline
>>> work.run(lambda: torch.ones(2) * 2, inputs=())
tensor([2., 2.])
>>> work.join()
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, Optional

import torch
from torch import Tensor

_STREAMS: Dict[torch.device, "torch.cuda.Stream"] = {}


def side_stream(device: torch.device) -> "torch.cuda.Stream":
    """The side stream of a CUDA ``device`` (one per device, created on first use and kept)."""
    device = torch.device(device)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    stream = _STREAMS.get(device)
    if stream is None:
        stream = _STREAMS[device] = torch.cuda.Stream(device)
    return stream


def _tensors(result) -> Iterable[Tensor]:
    if isinstance(result, Tensor):
        yield result
    elif isinstance(result, dict):
        for value in result.values():
            yield from _tensors(value)
    elif isinstance(result, (list, tuple)):
        for value in result:
            yield from _tensors(value)


class SideWork:
    """Calls launched on ``device``'s side stream after the work queued so far on its current stream.

    On a CPU device (or with ``enabled=False``) :meth:`run` calls inline and :meth:`join` does nothing.
    """

    def __init__(self, device: torch.device, enabled: bool = True):
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.on_stream = enabled and self.device.type == "cuda"
        self.origin: Optional["torch.cuda.Stream"] = None
        self.stream: Optional["torch.cuda.Stream"] = None
        self._event: Optional["torch.cuda.Event"] = None
        if self.on_stream:
            self.origin = torch.cuda.current_stream(self.device)
            self.stream = side_stream(self.device)
            self.stream.wait_stream(self.origin)

    def run(self, fn: Callable[[], object], inputs: Iterable[Tensor]):
        """``fn()`` on the side stream; ``inputs``: the tensors it reads that the launching stream made.
        Inline (on the current streams) when an input lives on another device (a model split over GPUs)."""
        inputs = list(inputs)
        if not self.on_stream or any(t.device != self.device for t in inputs):
            return fn()
        with torch.cuda.stream(self.stream):
            result = fn()
        for tensor in inputs:
            tensor.record_stream(self.stream)
        for tensor in _tensors(result):
            if tensor.device == self.device:
                tensor.record_stream(self.origin)
        self._event = None  # a later join must cover this call
        return result

    def join(self, *streams: "torch.cuda.Stream") -> None:
        """Make the launching stream (and ``streams``) wait for every call so far."""
        if not self.on_stream:
            return
        if self._event is None:
            self._event = torch.cuda.Event()
            self._event.record(self.stream)
        for stream in (self.origin, *streams):
            stream.wait_event(self._event)
