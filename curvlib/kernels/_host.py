"""Host-side helpers of the kernel launchers: device facts, output buffers, launch-size arithmetic."""

from __future__ import annotations

import contextlib
import functools

import torch

_POISON = False

#: largest sample chunk of the unfolded input that a kernel materialises (the unfolded-chunk GGN
#: diagonal, :mod:`.ggn_unfolded`); a third of ``pathways.configure(memory_budget=...)`` if smaller.
#: 64 MiB keeps several hundred programs busy per chunk on All-CNN-C's layers
UNFOLDED_CHUNK_BYTES = 64 * 2**20

#: the unfolded chunk takes at most this fraction's inverse of the pathways' memory budget (the
#: engine counts a chunk this many times when it sizes its chunks of columns for the fused kernels)
UNFOLDED_CHUNK_SHARE = 3


def unfolded_chunk_bytes() -> float:
    """The unfolded chunk's byte limit under the current memory budget (at least one sample is unfolded)."""
    from ..pathways import settings  # here: pathways imports the kernels lazily

    budget = settings().memory_budget
    return UNFOLDED_CHUNK_BYTES if budget is None else min(UNFOLDED_CHUNK_BYTES, budget / UNFOLDED_CHUNK_SHARE)


#: TMA descriptors need 16-byte aligned strides (all but the last) and base addresses
TMA_ALIGNMENT = 16


def tma_shape_ok(locations: int, element_size: int) -> bool:
    """Whether ``S [C, N, C_out, O]`` (contiguous) has TMA-compatible strides: ``O`` entries a multiple of
    16 bytes (the GGN kernel's TMA form, :mod:`.ggn_unfolded`)."""
    return locations * element_size % TMA_ALIGNMENT == 0


@contextlib.contextmanager
def poison_outputs():
    """Within this context, output buffers that a kernel must overwrite start as NaN (tests use it
    to catch elements a kernel never writes; buffers accumulated atomically still start at zero)."""
    global _POISON
    previous, _POISON = _POISON, True
    try:
        yield
    finally:
        _POISON = previous


def new_output(shape, device, zero: bool) -> torch.Tensor:
    """A float32 buffer: zeros when kernels add into it, else uninitialised (NaN when poisoned)."""
    if zero:
        return torch.zeros(shape, device=device, dtype=torch.float32)
    if _POISON:
        return torch.full(shape, float("nan"), device=device, dtype=torch.float32)
    return torch.empty(shape, device=device, dtype=torch.float32)


@functools.lru_cache(maxsize=None)
def _multiprocessors(device_type: str, index) -> int:
    if device_type == "cuda":
        return torch.cuda.get_device_properties(index).multi_processor_count
    return 4  # interpreter: few programs keep it fast


def multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (a small constant off the GPU)."""
    index = device.index if device.index is not None else (torch.cuda.current_device() if device.type == "cuda" else 0)
    return _multiprocessors(device.type, index)


def next_power_of_2(value: int, minimum: int = 16) -> int:
    """Smallest power of two ``>= max(value, minimum)`` (``tl.dot`` needs tiles of at least 16)."""
    value = max(int(value), minimum)
    return 1 << (value - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def split_count(programs: int, work: int, device: torch.device, min_work: int, waves: float = 2.0) -> int:
    """Into how many slices to split a reduction of ``work`` steps so that ``programs`` tiles times the
    slices fill about ``waves`` times the multiprocessors, each slice keeping at least ``min_work`` steps."""
    wanted = cdiv(int(waves * multiprocessors(device)), max(programs, 1))
    return max(1, min(wanted, work // max(min_work, 1)))


def finish(result: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Kernels accumulate in float32; return the caller's dtype."""
    return result if result.dtype == dtype else result.to(dtype)


@functools.lru_cache(maxsize=None)
def _capability(index) -> tuple:
    return tuple(torch.cuda.get_device_capability(index))


def compute_capability(device: torch.device) -> tuple:
    """``(major, minor)`` of a CUDA device; ``(0, 0)`` elsewhere."""
    if device.type != "cuda":
        return (0, 0)
    return _capability(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=256)
def rounded_threshold(threshold: float, dtype: torch.dtype) -> float:
    """``threshold`` rounded to ``dtype``, as PyTorch's ``threshold_backward`` compares it with a saved
    tensor of that dtype (0.3 in bfloat16 is 0.30078)."""
    return torch.tensor(threshold, dtype=dtype).item()
