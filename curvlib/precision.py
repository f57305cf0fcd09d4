"""Float32 precision of curvlib's own contractions on CUDA devices.

A float32 product on an NVIDIA GPU since Ampere can run as exact float32 multiply-adds (``"ieee"``)
or on the matrix units with operands rounded to TF32 (10-bit mantissa) and float32 accumulation
(``"tf32"``): about 8x the arithmetic rate on an H100, relative errors around ``1e-3`` instead of
``1e-6``. PyTorch decides this per backend with global flags
(``torch.backends.cuda.matmul.fp32_precision``, ``torch.backends.cudnn.conv.fp32_precision``; before
torch 2.9 the ``allow_tf32`` flags). Its defaults differ between backends: cuBLAS matrix products
are exact, cuDNN convolutions use TF32.

curvlib follows PyTorch's flags unless told otherwise (``precision=None``, the default), so its
native pathway computes what ``torch.nn.functional`` computes. :func:`curvlib.pathways.configure`
(``precision="ieee"`` or ``"tf32"``) overrides them for curvlib's contractions only — cuBLAS and
cuDNN calls, tensor networks and the fused kernels — leaving the user's model untouched.

``"bf16"`` goes further, for the curvature of float32 models where ``1e-2`` relative errors are
acceptable: curvlib's fused kernels round their operands to bfloat16 (float32 accumulation, twice the
TF32 rate), cuBLAS and cuDNN run float32 calls as for ``"tf32"`` (they have no bfloat16 mode for float32
tensors), and :class:`curvlib.curvature` carries the backpropagated columns in bfloat16 where the
extensions reading them accept it (the GGN/Fisher diagonals): half the memory traffic of the
column passes, whose errors then add up over the model's depth.

>>> from curvlib import pathways
>>> with pathways.options(precision="tf32"):   # KFAC factors, GGN diagonals, ... on the matrix units
...     pass

Other dtypes (float16, bfloat16, float64) and the CPU are unaffected.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

__all__ = ["PRECISIONS", "check_precision", "matmul_allows_tf32", "effective_precision", "fp32_precision",
           "backend_flags", "set_fp32_precision", "saved_fp32_flags"]

#: values of ``precision=``: ``None`` follows PyTorch's global flags
PRECISIONS = (None, "ieee", "tf32", "bf16")

# torch >= 2.9 has per-backend ``fp32_precision`` strings; mixing them with the legacy ``allow_tf32``
# flags makes PyTorch raise, so only one of the two APIs is ever touched here
_NEW_API = hasattr(torch.backends.cuda.matmul, "fp32_precision") and hasattr(torch.backends.cudnn, "conv")


def _public_flags() -> tuple:
    """``(cuBLAS, cuDNN convolution, generic)`` fp32 precision strings, read through ``torch.backends``."""
    return (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision,
            getattr(torch.backends, "fp32_precision", None))


def _direct_reader():
    """The same three strings from PyTorch's C getter (what ``torch.backends`` calls through a Python
    ``__getattr__``: ~10x faster, and the flags are read on every call of small kernels), or ``None``
    where this PyTorch lacks it or it does not agree with the public attributes."""
    getter = getattr(torch._C, "_get_fp32_precision_getter", None)
    if not _NEW_API or getter is None:
        return None

    def read() -> tuple:
        return getter("cuda", "matmul"), getter("cuda", "conv"), getter("generic", "all")

    try:
        return read if read() == _public_flags() else None
    except Exception:  # pragma: no cover - a PyTorch whose getter takes other arguments
        return None


_read_flags = _direct_reader() or _public_flags


def check_precision(precision) -> Optional[str]:
    """``precision`` if it is one of :data:`PRECISIONS`, else a ``ValueError``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


def matmul_allows_tf32() -> bool:
    """Whether PyTorch's global flags let cuBLAS use TF32 for float32 matrix products."""
    if _NEW_API:
        matmul, _, generic = _read_flags()
        if matmul == "none":  # inherits the generic setting
            matmul = generic or "ieee"
        return matmul == "tf32"
    return bool(torch.backends.cuda.matmul.allow_tf32)


def backend_flags() -> tuple:
    """The float32 precision flags of cuBLAS and cuDNN as they stand (hashable): which kernels the
    libraries pick depends on them (a key of :class:`curvlib.cuda_graphs.GraphCache`)."""
    if _NEW_API:
        return _read_flags()
    return (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)  # pragma: no cover


def effective_precision(precision: Optional[str]) -> str:
    """``precision``, or for ``None`` what PyTorch's matmul flag implies (``"tf32"`` or ``"ieee"``)."""
    if precision is not None:
        return precision
    return "tf32" if matmul_allows_tf32() else "ieee"


def _flag_owners() -> tuple:
    """The ``torch.backends`` objects whose ``fp32_precision`` a global setting changes: cuBLAS, cuDNN
    convolutions, cuDNN RNNs."""
    return (torch.backends.cuda.matmul, torch.backends.cudnn.conv, torch.backends.cudnn.rnn)


@contextlib.contextmanager
def saved_fp32_flags() -> Iterator[None]:
    """Within the block, PyTorch's float32 precision flags may change; afterwards they are exactly as
    before (for scripts and tests that set them globally with :func:`set_fp32_precision`)."""
    if _NEW_API:
        owners = _flag_owners()
        saved = [owner.fp32_precision for owner in owners]
    else:  # pragma: no cover - torch < 2.9
        saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        yield
    finally:
        if _NEW_API:
            for owner, value in zip(owners, saved):
                owner.fp32_precision = value
        else:  # pragma: no cover
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def set_fp32_precision(precision: str) -> None:
    """Set PyTorch's float32 precision of cuBLAS products and cuDNN convolutions and RNNs globally to
    ``"ieee"`` or ``"tf32"``, through one flag API only. For benchmark scripts that measure every
    implementation at one precision; :func:`fp32_precision` is the scoped version curvlib uses itself.

    With torch >= 2.9 the new per-backend flags are set. PyTorch's legacy readers then work only while
    they report TF32: ``torch.backends.cudnn.allow_tf32`` (and ``torch.backends.cudnn.flags(...)``, which
    reads it first) raise a ``RuntimeError`` after ``"ieee"``. Use the new flags, or :func:`fp32_precision`.

    >>> set_fp32_precision("ieee")   # exact float32 everywhere, e.g. before timing against a baseline
    """
    if precision not in ("ieee", "tf32"):
        raise ValueError(f"precision must be 'ieee' or 'tf32', got {precision!r}")
    if _NEW_API:
        for owner in _flag_owners():
            owner.fp32_precision = precision
    else:  # pragma: no cover - torch < 2.9
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"


@contextlib.contextmanager
def fp32_precision(precision: Optional[str], device: torch.device) -> Iterator[None]:
    """Within the block, float32 cuBLAS products and cuDNN convolutions on CUDA use ``precision``
    (``"bf16"``: TF32, the libraries' fastest float32 mode; ``None`` or a CPU device: nothing changes).
    The previous flags are restored afterwards."""
    if precision is None or device.type != "cuda":
        yield
        return
    if precision == "bf16":
        precision = "tf32"
    if _NEW_API:
        matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
        saved = (matmul.fp32_precision, conv.fp32_precision)
        matmul.fp32_precision = conv.fp32_precision = precision
        try:
            yield
        finally:
            matmul.fp32_precision, conv.fp32_precision = saved
        return
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)  # pragma: no cover
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
