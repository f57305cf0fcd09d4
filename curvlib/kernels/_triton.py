"""Triton, if importable: the one place that knows whether fused kernels can run at all.

Kernel modules (``kfc``, ``kfac_reduce``, ``weight_diag``) are imported only when :data:`HAVE_TRITON`
is true, so ``import curvlib.kernels`` works without Triton (every function then falls back to the
tensor network). ``TRITON_INTERPRET=1`` in the environment *before* the kernel modules are imported
runs the kernels on CPU tensors through Triton's interpreter (slow; for tests on small shapes).
"""

from __future__ import annotations

import inspect
import os

try:  # Triton ships with CUDA builds of PyTorch; CPU-only installs usually lack it
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except Exception:  # ImportError, or a broken install
    triton = tl = None
    HAVE_TRITON = False

#: kernels run through Triton's interpreter (CPU tensors) instead of compiled for a GPU
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

#: Triton >= 3.0 selects the matrix-unit mode of ``tl.dot`` with ``input_precision=``; older versions
#: only had ``allow_tf32=`` (no three-pass TF32 mode)
HAS_INPUT_PRECISION = HAVE_TRITON and "input_precision" in inspect.signature(tl.dot).parameters


def version() -> str:
    """Triton's version, or ``"missing"``."""
    return triton.__version__ if HAVE_TRITON else "missing"
