"""KFC by the pathways that copy the input (native's unfold, the lags' GEMM form), in chunks of samples:
time and extra memory per chunk size, against PyTorch's unfold (PT) on the Table E3 anchor layers.

The chunk is a fraction of the whole unfolded input (PT holds it twice: unfold, then the permuted copy,
so a tenth of it is 5 % of PT's extra memory). The lags pathway runs its GEMM form here (the Triton
form copies nothing). The extra memory is the first (eager) call's; the timed calls repeat one input,
so the chunked calls replay CUDA graphs (``--no-graphs``: every call eager, ``CURVLIB_CUDA_GRAPHS=0``).

    python benchmarks/diagnostics/kfc_chunks.py [--nets allcnnc resnet18] [--fractions 0.25 0.1] [--no-graphs]
"""

import argparse
import os
import statistics
import sys

if "--no-graphs" in sys.argv:
    os.environ["CURVLIB_CUDA_GRAPHS"] = "0"

import torch  # noqa: E402

from _timing import cuda_median_ms  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import ops  # noqa: E402
import table_e3  # noqa: E402

from curvlib import lag_gram, native  # noqa: E402
from curvlib.hyperparams import make_geometry  # noqa: E402


def extra_mib(fn) -> float:
    """Peak allocated during ``fn()`` beyond what was allocated before and the result, MiB."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return (peak - before - out.numel() * out.element_size()) / 2**20


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--nets", nargs="*", default=None)
    p.add_argument("--fractions", nargs="*", type=float, default=[0.25, 0.1])
    p.add_argument("--no-graphs", action="store_true", help="CURVLIB_CUDA_GRAPHS=0 (set before importing curvlib)")
    args = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    print(f"{torch.cuda.get_device_name()}: KFC, ms and extra MiB; ratios to PT; chunks as fractions of the unfolded input")
    ratios = {}
    for layer in table_e3.layers(args.nets):
        case = ops.Case(layer, layer.batch_size, 1, ["kfc"], "cuda")
        x = case.x
        geometry = make_geometry(layer.input_shape[0], layer.output_shape[0], layer.input_shape[1:], layer.kernel,
                                 layer.stride, layer.padding, layer.dilation, layer.groups)
        total = native.unfolded_bytes(geometry, x.shape[0], x.element_size())
        variants = {"PT": lambda: ops.pt_kfc(case), "native": lambda: native.kfc(x, geometry)}
        for f in args.fractions:
            variants[f"native/{f:g}"] = (lambda f=f: native.kfc(x, geometry, chunk_bytes=f * total))
        if lag_gram.supports_lags(geometry):
            variants["lags"] = lambda: lag_gram.kfc_by_lags(x, geometry, "gemm")
            for f in args.fractions:
                variants[f"lags/{f:g}"] = (lambda f=f: lag_gram.kfc_by_lags(x, geometry, "gemm", chunk_bytes=f * total))
        row = {}
        for name, fn in variants.items():
            mem = extra_mib(fn)
            row[name] = (cuda_median_ms(fn, repeats=7, warmups=2), mem)
        pt_ms, pt_mib = row["PT"]
        cells = []
        for name, (ms, mib) in row.items():
            ratios.setdefault(name, []).append((ms / pt_ms, mib / max(pt_mib, 1e-9)))
            cells.append(f"{name} {ms:.3f} ({ms / pt_ms:.2f}x) {mib:.0f}MiB")
        print(f"{layer.net}/{layer.name}: " + " | ".join(cells), flush=True)
        case.free()
    print("\ngeometric mean time / PT, worst extra memory / PT's, over the layers each variant ran on")
    for name, values in ratios.items():
        times = [t for t, _ in values]
        print(f"{name:14s} layers {len(values):3d}  time {statistics.geometric_mean(times):.3f}  "
              f"worst memory {max(m for _, m in values):.3f}")


if __name__ == "__main__":
    main()
