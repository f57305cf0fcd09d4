"""Launching a Triton kernel cheaply: the compiled binary directly after its first launch.

``kernel[grid](*args)`` goes through Triton's JIT dispatch on every call: binding ~35 arguments,
building a string cache key, reading settings. For the small layers of a CNN that costs more than
the kernel runs. :class:`Launcher` keys the compiled kernel by what Triton specialises on (argument
dtypes, 16-byte alignment of pointers, divisibility by 16 of the integers it specialises, constexpr
values, warps, stages) and launches later calls through the compiled kernel's launcher, which takes
every argument in signature order: ``CompiledKernel.run`` with the current stream where no launch
hook is installed (Triton's ``CompiledKernel[grid]`` would build a closure and look the device and
stream up again: measured on an H100 host, 8.5 µs per launch instead of 17; the JIT dispatch takes
about 45), else ``CompiledKernel[grid]``, which calls the hooks. Under the interpreter, or with
``CURVLIB_KERNEL_FAST_LAUNCH=0``, every call goes through ``kernel[grid]``.
"""

from __future__ import annotations

import os
from typing import Dict, Sequence

import torch

from ._triton import INTERPRET

try:  # launch hooks (a profiler's): the direct launch must not skip them (Triton >= 3.4)
    from triton import knobs as _knobs
except ImportError:  # older Triton: every launch through CompiledKernel[grid]
    _knobs = None


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
        values = [args[i] for i in integers]
        # what Triton specialises on, and the device: pointer dtype and 16-byte alignment; for the specialised integers
        # divisibility by 16 and equality to 1; for every integer whether it fits 32 bits; for TMA
        # descriptors the element type, block shape and padding
        return (
            tuple((args[i].dtype, args[i].data_ptr() % 16 == 0) for i in tensors),
            tuple((args[i].base.dtype, tuple(args[i].block_shape), getattr(args[i], "padding", None))
                  for i in descriptors) if descriptors else (),
            tuple((args[i] % 16 == 0, args[i] == 1) for i in self._specialised),
            not values or (-2**31 < min(values) and max(values) < 2**31),
            tuple(constexprs.items()),
            num_warps,
            num_stages,
            # the compiled kernel's handles belong to the device current at its first launch
            torch.cuda.current_device() if torch.cuda.is_initialized() else None,
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
                self._compiled[key] = (compiled, tuple(constexprs[name] for name in self._constexpr_names),
                                       _direct_launch(compiled))
            return
        compiled, constexpr_values, direct = entry
        if direct is not None and (_knobs.runtime.launch_enter_hook is None
                                   and _knobs.runtime.launch_exit_hook is None):
            run, function, metadata = direct
            # grid[1] and grid[2] default to 1 (the JIT pads shorter grids)
            stream = torch._C._cuda_getCurrentRawStream(torch.cuda.current_device())
            run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1, stream, function,
                metadata, None, None, None, *args, *constexpr_values)
            return
        # the compiled kernel's launcher reads grid[0], grid[1] and grid[2]
        compiled[tuple(grid) + (1,) * (3 - len(grid))](*args, *constexpr_values)


def _direct_launch(compiled):
    """``(run, function, packed metadata)`` of a compiled CUDA kernel for :meth:`Launcher.__call__`'s
    direct launch, or ``None`` where this Triton's compiled kernels lack them (launches then go through
    ``CompiledKernel[grid]``)."""
    if _knobs is None or not torch.cuda.is_available():
        return None
    try:
        compiled._init_handles()
        return compiled.run, compiled.function, compiled.packed_metadata
    except AttributeError:
        return None
