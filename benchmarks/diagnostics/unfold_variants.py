"""Which materialised unfold makes the native GGN diagonal and KFC fastest?

    python benchmarks/diagnostics/unfold_variants.py [--ops ggn_diag kfc] [--nets convnext ...]

``curvlib.native.unfold_input`` can build ``[N, G, D, O]`` as a strided copy of overlapping windows
(``Tensor.unfold`` + one ``reshape``; N-d) or, for 2-d inputs, with PyTorch's im2col kernel
(``torch.nn.functional.unfold``, padding applied either by an explicit ``pad`` copy or, when
symmetric, inside im2col). This times the native operations with each variant on the Table E3
anchor layers (interleaved, CUDA events, median of the rounds) and prints per-layer ratios and the
geometric mean against the strided copy.
"""

import argparse
import math
import os
import statistics
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))
sys.path.insert(0, os.path.join(HERE, ".."))
import table_e3  # noqa: E402

from curvlib import native  # noqa: E402
from curvlib.hyperparams import make_geometry  # noqa: E402


def strided_copy(x, geometry):
    n, c = x.shape[:2]
    k = geometry.num_dims
    windows = native._pad(x, geometry.padding)
    for axis in range(k):
        span = geometry.dilation[axis] * (geometry.kernel_size[axis] - 1) + 1
        windows = windows.unfold(2 + axis, span, geometry.stride[axis])[..., :: geometry.dilation[axis]]
    windows = windows[(slice(None), slice(None), *(slice(0, o) for o in geometry.output_size))]
    order = [0, 1, *range(2 + k, 2 + 2 * k), *range(2, 2 + k)]
    return windows.permute(order).reshape(n, geometry.groups, (c // geometry.groups) * math.prod(geometry.kernel_size), -1)


def im2col_padded_copy(x, geometry):
    n, c = x.shape[:2]
    u = torch.nn.functional.unfold(native._pad(x, geometry.padding), geometry.kernel_size,
                                   dilation=geometry.dilation, stride=geometry.stride)
    return u.view(n, geometry.groups, (c // geometry.groups) * math.prod(geometry.kernel_size), -1)


def im2col(x, geometry):
    n, c = x.shape[:2]
    if any(left != right for left, right in geometry.padding):
        return im2col_padded_copy(x, geometry)
    u = torch.nn.functional.unfold(x, geometry.kernel_size, dilation=geometry.dilation,
                                   padding=[left for left, _ in geometry.padding], stride=geometry.stride)
    return u.view(n, geometry.groups, (c // geometry.groups) * math.prod(geometry.kernel_size), -1)


VARIANTS = {"strided": strided_copy, "im2col+pad": im2col_padded_copy, "im2col": im2col}


def event_ms(fn):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ops", nargs="+", default=["ggn_diag", "kfc"])
    parser.add_argument("--nets", nargs="+", default=None)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    torch.backends.cudnn.conv.fp32_precision = "ieee"
    original = native.unfold_input
    ratios = {op: {v: [] for v in VARIANTS} for op in args.ops}
    for layer in table_e3.layers(args.nets):
        geometry = make_geometry(layer.input_shape[0], layer.output_shape[0], layer.input_shape[1:],
                                 kernel_size=layer.kernel, stride=layer.stride, padding=layer.padding,
                                 dilation=layer.dilation, groups=layer.groups)
        n = layer.batch_size
        x = torch.randn(n, *layer.input_shape, device="cuda")
        s = torch.randn(10, n, *layer.output_shape, device="cuda")
        for op in args.ops:
            def run(variant, op=op):
                native.unfold_input = VARIANTS[variant]
                try:
                    return native.ggn_diag(x, s, geometry) if op == "ggn_diag" else native.kfc(x, geometry)
                finally:
                    native.unfold_input = original
            reference = run("strided")
            times = {v: [] for v in VARIANTS}
            for v in VARIANTS:
                torch.testing.assert_close(run(v), reference, rtol=1e-4, atol=1e-4)
            for _ in range(args.rounds):
                for v in VARIANTS:
                    times[v].append(event_ms(lambda: run(v)))
            med = {v: statistics.median(t) for v, t in times.items()}
            for v in VARIANTS:
                ratios[op][v].append(med[v] / med["strided"])
            print(f"{layer.net:12s} {layer.name:28s} {op:9s} " + " ".join(
                f"{v} {med[v]:.3f}ms ({med[v] / med['strided']:.2f})" for v in VARIANTS), flush=True)
        del x, s
        torch.cuda.empty_cache()
    for op in args.ops:
        print(op, " ".join(f"{v}: geomean {math.exp(statistics.mean(map(math.log, r))):.3f} "
                           f"max {max(r):.2f} min {min(r):.2f}" for v, r in ratios[op].items()))


if __name__ == "__main__":
    main()
