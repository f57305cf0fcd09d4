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

import operator
import os
from typing import Dict, Optional, Sequence

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
        self._specialised = _getter([i for i, name in enumerate(names) if name in specialised])
        params = getattr(kernel, "params", None)  # absent on the interpreter's kernels (no fast path there)
        self._constexpr_names = [name for name, param in zip(names, params or ()) if param.is_constexpr]
        # getters of the tensors, integers and TMA descriptors among the arguments, per kind of the first
        # argument (a kernel may take its operands as pointers or as descriptors)
        self._positions: Dict[type, tuple] = {}
        self._compiled: Dict[tuple, tuple] = {}

    def _key(self, args, constexprs, num_warps, num_stages) -> tuple:
        positions = self._positions.get(type(args[0]))
        if positions is None:
            positions = self._positions[type(args[0])] = (
                _getter([i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]),
                _getter([i for i, a in enumerate(args) if isinstance(a, int) and not isinstance(a, bool)]),
                _getter([i for i, a in enumerate(args) if _is_descriptor(a)]),
            )
        tensors, integers, descriptors = (get(args) for get in positions)
        # what Triton specialises on, and the device: pointer dtype and 16-byte alignment; for the
        # specialised integers divisibility by 16 and equality to 1; for every integer whether it fits
        # 32 bits; for TMA descriptors the element type, block shape and padding (list comprehensions:
        # this runs for every launch)
        return (
            tuple([t.dtype for t in tensors]),
            tuple([t.data_ptr() % 16 == 0 for t in tensors]),
            tuple([(d.base.dtype, tuple(d.block_shape), getattr(d, "padding", None)) for d in descriptors]),
            tuple([(v % 16 == 0, v == 1) for v in self._specialised(args)]),
            not integers or (-2**31 < min(integers) and max(integers) < 2**31),
            tuple(constexprs.items()),
            num_warps,
            num_stages,
            # the compiled kernel's handles belong to the device current at its first launch
            torch.cuda.current_device() if torch.cuda.is_initialized() else None,
        )

    def __call__(self, grid, *args, num_warps: int, num_stages: int = None, **constexprs):
        if not fast_launch_enabled():
            self.kernel[grid](*args, **constexprs, **_options(num_warps, num_stages))
            return
        key = self._key(args, constexprs, num_warps, num_stages)
        entry = self._compiled.get(key)
        if entry is None:
            compiled = self.kernel[grid](*args, **constexprs, **_options(num_warps, num_stages))
            if compiled is not None and hasattr(compiled, "__getitem__"):
                # the compiled kernel's launcher takes all parameters, constexprs included, in order
                self._compiled[key] = (compiled, tuple(constexprs[name] for name in self._constexpr_names),
                                       _direct_launch(compiled))
            return
        compiled, constexpr_values, direct = entry
        if direct is not None and not _launch_hooks():
            run, function, metadata = direct
            # grid[1] and grid[2] default to 1 (the JIT pads shorter grids)
            stream = torch._C._cuda_getCurrentRawStream(torch.cuda.current_device())
            run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1, stream, function,
                metadata, None, None, None, *args, *constexpr_values)
            return
        # the compiled kernel's launcher reads grid[0], grid[1] and grid[2]
        compiled[tuple(grid) + (1,) * (3 - len(grid))](*args, *constexpr_values)


def _options(num_warps: int, num_stages: Optional[int]) -> dict:
    return dict(num_warps=num_warps) if num_stages is None else dict(num_warps=num_warps, num_stages=num_stages)


def _getter(positions: Sequence[int]):
    """``args -> tuple of args[i] for i in positions`` (``operator.itemgetter`` returns a bare value for one)."""
    if not positions:
        return lambda args: ()
    if len(positions) == 1:
        only = positions[0]
        return lambda args: (args[only],)
    return operator.itemgetter(*positions)


def _launch_hooks() -> bool:
    """Whether a launch hook is installed (Triton's hooks are chains of callables, or one callable)."""
    hooks = (_knobs.runtime.launch_enter_hook, _knobs.runtime.launch_exit_hook)
    return any(hook is not None and getattr(hook, "calls", True) for hook in hooks)


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
