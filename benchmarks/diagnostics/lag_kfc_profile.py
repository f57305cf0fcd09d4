"""Where the time of one ``kfc_by_lags`` call goes on CUDA: kernels by device time (``torch.profiler``),
launch count, and the call's wall and device time, per layer and lag method.

    python benchmarks/diagnostics/lag_kfc_profile.py [--methods gemm triton] [--rows 12]
"""

import argparse
import time

import torch

from curvlib.hyperparams import make_geometry
from curvlib.lag_gram import kfc_by_lags

LAYERS = [  # name, N, C, size, kernel, padding, groups
    ("allcnnc 3@32", 128, 3, 32, 3, 1, 1),
    ("allcnnc 96@32", 128, 96, 32, 3, 1, 1),
    ("allcnnc 192@16", 128, 192, 16, 3, 1, 1),
    ("allcnnc 192@8 pad 0", 128, 192, 8, 3, 0, 1),
    ("resnet18 64@56", 32, 64, 56, 3, 1, 1),
    ("convnext dw 96@56", 32, 96, 56, 7, 3, 96),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--methods", nargs="+", default=["gemm", "triton"])
    parser.add_argument("--rows", type=int, default=12)
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    for name, n, c, size, k, pad, groups in LAYERS:
        geometry = make_geometry(c, c, (size, size), kernel_size=k, padding=pad, groups=groups)
        x = torch.randn(n, c, size, size, device="cuda")
        for method in args.methods:
            for _ in range(3):
                kfc_by_lags(x, geometry, lag_method=method)
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            start.record()
            kfc_by_lags(x, geometry, lag_method=method)
            end.record()
            host = time.perf_counter() - t0
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                kfc_by_lags(x, geometry, lag_method=method)
                torch.cuda.synchronize()
            events = [e for e in prof.key_averages()]
            kernels = sum(e.count for e in events if e.device_time_total > 0 and not e.key.startswith("aten::"))
            busy = sum(e.self_device_time_total for e in events) / 1e3
            print(f"\n== {name} N={n} {method}: {start.elapsed_time(end):.3f} ms (events), host {host * 1e3:.3f} ms, "
                  f"kernels {kernels}, device busy {busy:.3f} ms")
            print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
