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


def _is_descriptor(value) -> bool:
    """A host-side TMA descriptor (``triton.tools.tensor_descriptor.TensorDescriptor``)."""
    return hasattr(value, "block_shape") and hasattr(value, "base")


class Launcher:
    """``launcher(grid, *args, num_warps=..., num_stages=..., **constexprs)`` launches ``kernel``.

    ``args`` are the run-time arguments in signature order (constexprs, which come last in every
    kernel here, by name).
    """

    def __init__(self, kernel, specialised: Sequence[str] = ()):
        self.kernel = kernel
        names = list(kernel.arg_names)
        self._specialised = [i for i, name in enumerate(names) if name in specialised]
        params = getattr(kernel, "params", None)  # absent on the interpreter's kernels (no fast path there)
        self._constexpr_names = [name for name, param in zip(names, params or ()) if param.is_constexpr]
        # argument positions of tensors, integers and TMA descriptors, per kind of the first argument
        # (a kernel may take its operands as pointers or as descriptors)
        self._positions: Dict[type, tuple] = {}
        self._compiled: Dict[tuple, tuple] = {}

    def _key(self, args, constexprs, num_warps, num_stages) -> tuple:
        positions = self._positions.get(type(args[0]))
        if positions is None:
            positions = self._positions[type(args[0])] = (
                [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)],
                [i for i, a in enumerate(args) if isinstance(a, int) and not isinstance(a, bool)],
                [i for i, a in enumerate(args) if _is_descriptor(a)],
            )
        tensors, integers, descriptors = positions
        # what Triton specialises on: pointer dtype and 16-byte alignment; for the specialised integers
        # divisibility by 16 and equality to 1; for every integer whether it fits 32 bits; for TMA
        # descriptors the element type, block shape and padding
        return (
            tuple((args[i].dtype, args[i].data_ptr() % 16 == 0) for i in tensors),
            tuple((args[i].base.dtype, tuple(args[i].block_shape), getattr(args[i], "padding", None))
                  for i in descriptors),
            tuple((args[i] % 16 == 0, args[i] == 1) for i in self._specialised),
            max((abs(args[i]) for i in integers), default=0) < 2**31,
            tuple(constexprs.items()),
            num_warps,
            num_stages,
        )

    def __call__(self, grid, *args, num_warps: int, num_stages: int = None, **constexprs):
        options = dict(num_warps=num_warps) if num_stages is None else dict(num_warps=num_warps, num_stages=num_stages)
        if not fast_launch_enabled():
            self.kernel[grid](*args, **constexprs, **options)
            return
        key = self._key(args, constexprs, num_warps, num_stages)
        entry = self._compiled.get(key)
        if entry is None:
            compiled = self.kernel[grid](*args, **constexprs, **options)
            if compiled is not None and hasattr(compiled, "__getitem__"):
                # the compiled kernel's launcher takes all parameters, constexprs included, in order
                self._compiled[key] = (compiled, tuple(constexprs[name] for name in self._constexpr_names))
            return
        compiled, constexpr_values = entry
        # the compiled kernel's launcher reads grid[0], grid[1] and grid[2] (the JIT pads shorter grids)
        compiled[tuple(grid) + (1,) * (3 - len(grid))](*args, *constexpr_values)
