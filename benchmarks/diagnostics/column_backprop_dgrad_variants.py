"""Convolution data gradients of DiagGGNExact's column backpropagation, computed other ways (experiment).

    python benchmarks/diagnostics/column_backprop_dgrad_variants.py --precision tf32

The engine backpropagates the loss Hessian's square-root columns through the model's own autograd
graph; every convolution there is a cuDNN data gradient (``convolution_backward`` with only the input
gradient requested) of the columns folded into the batch. This script reroutes those calls, during the
engine's backward passes only (a ``TorchDispatchMode`` around ``curvature._vjp``), to:

- ``bf16``: operands cast to bfloat16 (NCHW), the result cast back to float32;
- ``bf16-channels-last``: the same in channels-last layout (no layout transposes inside cuDNN);
- ``fp32-channels-last``: float32 in channels-last layout;
- ``uninitialised-input``: the same call with an uninitialised input tensor instead of functorch's
  stride-0 placeholder (which cuDNN's path makes contiguous);
- ``transposed-conv``: a transposed convolution (no input tensor at all).

Printed per memory budget: the step's median wall time, extra peak memory, columns per chunk, and the
largest relative error of any parameter's GGN diagonal against the unchanged run. All-CNN-C, batch 128,
100 classes. Needs a CUDA device (runs on a CPU with ``--device cpu --batch 8``, slowly).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # benchmarks/
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repository root

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import curvlib  # noqa: E402
from curvlib import extensions as E  # noqa: E402
from curvlib.engine import context  # noqa: E402

import end_to_end  # noqa: E402

_CONVOLUTION_BACKWARD = torch.ops.aten.convolution_backward.default
_TRANSPOSED = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
VARIANTS = ("bf16", "bf16-channels-last", "fp32-channels-last", "uninitialised-input", "transposed-conv")


class DataGradients(TorchDispatchMode):
    """Reroute input-only ``convolution_backward`` calls of non-transposed convolutions (see the module docstring)."""

    def __init__(self, variant: str):
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        super().__init__()
        self.variant, self.calls = variant, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not _CONVOLUTION_BACKWARD:
            return func(*args, **kwargs)
        grad, inp, weight, bias_sizes, stride, padding, dilation, transposed, out_pad, groups, mask = args
        if list(mask) != [True, False, False] or transposed or grad.dtype != torch.float32:
            return func(*args, **kwargs)
        self.calls += 1
        if self.variant == "transposed-conv":
            spatial = zip(inp.shape[2:], grad.shape[2:], stride, padding, dilation, weight.shape[2:])
            # the output padding that makes the transposed convolution's output the input's size
            extra = [i - ((o - 1) * s - 2 * p + d * (k - 1) + 1) for i, o, s, p, d, k in spatial]
            result = _TRANSPOSED[grad.dim() - 2](grad, weight, None, stride, padding, extra, groups, dilation)
            return result, None, None
        if self.variant == "uninitialised-input":
            placeholder = torch.empty(inp.shape, dtype=inp.dtype, device=inp.device)
            return func(grad, placeholder, *args[2:], **kwargs)
        dtype = torch.float32 if self.variant.startswith("fp32") else torch.bfloat16
        layout = torch.channels_last if self.variant.endswith("channels-last") and grad.dim() == 4 \
            else torch.contiguous_format
        result, _, _ = func(grad.to(dtype, memory_format=layout), torch.empty_like(inp, dtype=dtype, memory_format=layout),
                            weight.to(dtype, memory_format=layout), bias_sizes, stride, padding, dilation, transposed,
                            out_pad, groups, mask)
        return result.to(torch.float32, memory_format=torch.contiguous_format), None, None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--precision", choices=["ieee", "tf32", "default"], default="tf32")
    parser.add_argument("--memory-budgets", type=float, nargs="+", default=[3.5e9])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    end_to_end.set_global_precision(args.precision)
    torch.manual_seed(0)
    model = end_to_end.all_cnn_c(100).to(device)
    loss_fn = nn.CrossEntropyLoss()
    x = torch.randn(args.batch, 3, 32, 32, device=device)
    y = torch.randint(0, 100, (args.batch,), device=device)
    plain_vjp = context.curvature._vjp

    def run(mode, budget):
        def vjp(self, *a, **k):
            with mode:
                return plain_vjp(self, *a, **k)

        context.curvature._vjp = plain_vjp if mode is None else vjp
        try:
            def step():
                with curvlib.curvature(model, loss_fn, E.DiagGGNExact(), memory_budget=budget) as ctx:
                    model.zero_grad()
                    loss_fn(model(x), y).backward()
                return ctx

            for _ in range(2):
                ctx = step()
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated() if cuda else 0
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                step()
                if cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            peak = (torch.cuda.max_memory_allocated() - base) / 1e9 if cuda else float("nan")
        finally:
            context.curvature._vjp = plain_vjp
        return statistics.median(times) * 1e3, peak, ctx.last_chunk_size, [p.diag_ggn_exact.clone() for p in model.parameters()]

    print(f"# {torch.cuda.get_device_name() if cuda else 'cpu'}, torch {torch.__version__}, precision {args.precision}")
    for budget in args.memory_budgets:
        ms, peak, chunk, reference = run(None, budget)
        print(f"budget {budget / 1e9:g} GB, unchanged: {ms:.1f} ms, extra peak {peak:.2f} GB, {chunk} columns per chunk",
              flush=True)
        for variant in args.variants:
            mode = DataGradients(variant)
            ms, peak, chunk, result = run(mode, budget)
            error = max(((a - b).norm() / b.norm()).item() for a, b in zip(result, reference))
            print(f"budget {budget / 1e9:g} GB, {variant}: {ms:.1f} ms, extra peak {peak:.2f} GB, {chunk} columns per "
                  f"chunk, {mode.calls} rerouted calls, max relative error {error:.1e}", flush=True)


if __name__ == "__main__":
    main()
