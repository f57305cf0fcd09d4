"""Launching a Triton kernel cheaply: the compiled binary directly after its first launch.

``kernel[grid](*args)`` goes through Triton's JIT dispatch on every call: binding ~35 arguments,
building a string cache key, reading settings. For the small layers of a CNN that costs more than
the kernel runs. :class:`Launcher` keys the compiled kernel by what Triton specialises on (argument
dtypes, 16-byte alignment of pointers, divisibility by 16 of the integers it specialises, constexpr
values, warps, stages) and launches later calls through the compiled kernel's own
``CompiledKernel[grid](*args)``, which takes every argument in signature order. Under the
interpreter, or with ``CURVLIB_KERNEL_FAST_LAUNCH=0``, every call goes through ``kernel[grid]``.
"""

from __future__ import annotations

import os
from typing import Dict, Sequence

import torch

from ._triton import INTERPRET


def fast_launch_enabled() -> bool:
    return not INTERPRET and os.environ.get("CURVLIB_KERNEL_FAST_LAUNCH", "1") not in ("0", "")


def _argument_key(value, specialised: bool):
    if isinstance(value, torch.Tensor):
        return (value.dtype, value.data_ptr() % 16 == 0)
    if isinstance(value, bool):
        return ("b", value)
    if isinstance(value, int):
        in_int32 = -(2**31) <= value < 2**31
        if specialised:
            return (in_int32, value % 16 == 0, value == 1)
        return in_int32
    return type(value)


class Launcher:
    """``launcher(grid, *args, num_warps=..., num_stages=..., **constexprs)`` launches ``kernel``.

    ``args`` are the run-time arguments in signature order (constexprs, which come last in every
    kernel here, by name).
    """

    def __init__(self, kernel, specialised: Sequence[str] = ()):
        self.kernel = kernel
        names = list(kernel.arg_names)
        self._specialised = tuple(name in specialised for name in names)
        params = getattr(kernel, "params", None)  # absent on the interpreter's kernels (no fast path there)
        self._constexpr_names = [name for name, param in zip(names, params or ()) if param.is_constexpr]
        self._compiled: Dict[tuple, tuple] = {}

    def __call__(self, grid, *args, num_warps: int, num_stages: int = None, **constexprs):
        options = dict(num_warps=num_warps) if num_stages is None else dict(num_warps=num_warps, num_stages=num_stages)
        if not fast_launch_enabled():
            self.kernel[grid](*args, **constexprs, **options)
            return
        key = (
            tuple(_argument_key(a, s) for a, s in zip(args, self._specialised)),
            tuple(constexprs[name] for name in self._constexpr_names),
            num_warps,
            num_stages,
        )
        entry = self._compiled.get(key)
        if entry is None:
            compiled = self.kernel[grid](*args, **constexprs, **options)
            if compiled is not None and hasattr(compiled, "__getitem__"):
                # the compiled kernel's launcher takes all parameters, constexprs included, in order
                self._compiled[key] = (compiled, key[1])
            return
        compiled, constexpr_values = entry
        compiled[grid](*args, *constexpr_values)
