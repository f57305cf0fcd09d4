"""Is ``pathway="auto"`` (after its measured choice) as fast as forcing the chosen pathway?

    python benchmarks/diagnostics/auto_overhead_check.py

Times, on a few Table E3 layers, PT, ``pathway="native"`` and ``pathway="auto"`` (autotune on),
interleaved, with CUDA events around each call (the protocol of ``ops.py``).
"""

import gc
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import curvlib.functional as F  # noqa: E402
import curvlib.pathways as pathways  # noqa: E402


def event_time(fn):
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3


def main():
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    pathways.configure(autotune=True, repeats=3)
    layers = [((32, 1280, 7, 7), (1280, 1280 // 1, 1, 1), dict(stride=1, padding=0)),  # weight VJP 1x1
              ((32, 768, 17, 17), (192, 768, 1, 1), dict(stride=1, padding=0)),
              ((32, 192, 17, 17), (192, 192, 7, 1), dict(stride=1, padding=(3, 0)))]
    for x_shape, w_shape, hyper in layers:
        x = torch.randn(x_shape, device="cuda")
        w = torch.randn(w_shape, device="cuda")
        v = torch.nn.functional.conv2d(x, w, **hyper)
        k = w_shape[2:]
        fns = {
            "PT": lambda: torch.nn.grad.conv2d_weight(x, w.shape, v, **hyper),
            "native": lambda: F.weight_vjp(x, v, k, pathway="native", **hyper),
            "auto": lambda: F.weight_vjp(x, v, k, pathway="auto", **hyper),
            "PT kfc": lambda: None,
            "kfc native": lambda: F.kfc(x, k, pathway="native", **hyper),
            "kfc auto": lambda: F.kfc(x, k, pathway="auto", **hyper),
        }
        for fn in fns.values():
            fn(), fn()
        for gc_on in (True, False):
            if not gc_on:
                gc.disable()
            times = {name: [] for name in fns}
            for _ in range(20):
                for name, fn in fns.items():
                    times[name].append(event_time(fn))
            gc.enable()
            print(x_shape, w_shape, "gc" if gc_on else "no gc",
                  {n: round(statistics.median(t), 1) for n, t in times.items()}, flush=True)
    print([(d.op, d.choice) for d in pathways.decisions()])


if __name__ == "__main__":
    main()
