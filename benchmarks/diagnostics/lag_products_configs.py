"""Lag products alone, per launch configuration, against the GEMM form and the convolution (CUDA).

    python benchmarks/diagnostics/lag_products_configs.py [--profile]

For a few Table E3 layers (stride 1): the time of ``curvlib.kernels.lag_products.lag_products`` for every
configuration in a grid (tile, reduction step, warps, split), its FLOP rate (the half of the lags it
computes, over their overlap regions), the time of ``lag_gram._lag_products_gemm`` / ``_conv`` for the
same products, and the whole ``kfc_by_lags`` per method. ``--profile``: a kernel table of one
``kfc_by_lags(..., lag_method="triton")`` per layer. CUDA events, median of 10 after 3 warm-ups, TF32 off.
"""

from __future__ import annotations

import argparse
import itertools
import math

import torch

from _timing import cuda_median_ms

from curvlib import lag_gram
from curvlib.hyperparams import make_geometry
from curvlib.kernels import lag_products as lp

LAYERS = [  # name, batch, channels, size, kernel, padding, groups
    ("allcnnc 96@32", 128, 96, 32, 3, 1, 1),
    ("allcnnc 192@16", 128, 192, 16, 3, 1, 1),
    ("resnet18 64@56", 32, 64, 56, 3, 1, 1),
    ("resnet18 512@7", 32, 512, 7, 3, 1, 1),
    ("allcnnc 3@32", 128, 3, 32, 3, 1, 1),
    ("convnext dw 96@56", 32, 96, 56, 7, 3, 96),
    ("convnext dw 768@7", 32, 768, 7, 7, 3, 768),
]


timed = cuda_median_ms


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--precision", default="ieee", help="of the configuration grid")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    for name, n, c, size, k, pad, groups in LAYERS:
        x = torch.randn(n, c, size, size, device="cuda")
        ci = c // groups
        shifts = list(lag_gram._gemm_plan((size, size), (k, k), (1, 1)))
        flops = 2 * c * ci * n * sum(math.prod(size - abs(s) for s in delta) for delta in shifts)
        total = n * size * size
        print(f"\n== {name} N={n}: {len(shifts)} lags, {flops / 1e9:.2f} GFLOP")
        default = lp.candidates(ci, groups, len(shifts), total, x.device)
        configs = list(default)
        if ci >= lp.DOT_MIN_CHANNELS:
            for block, block_r, warps in itertools.product((32, 64, 128), (16, 32, 64), (4, 8)):
                if block > max(32, 2 * ci):
                    continue
                for split in sorted({default[0].split, max(1, default[0].split // 2), 2 * default[0].split}):
                    configs.append(lp.LagConfig(False, block, block_r, warps, split))
        else:
            for block_r, warps in itertools.product((64, 128, 256, 512), (2, 4, 8)):
                configs.append(lp.LagConfig(True, default[0].block, block_r, warps, -(-total // block_r)))
        seen, rows = set(), []
        for config in configs:
            if config in seen:
                continue
            seen.add(config)
            try:
                ms = timed(lambda: lp.lag_products(x, shifts, groups, args.precision, config))
            except Exception as error:  # noqa: BLE001 (a configuration that does not compile)
                print(f"  {config}: {type(error).__name__}: {str(error).splitlines()[0][:100]}")
                continue
            rows.append((ms, config))
        rows.sort(key=lambda row: row[0])
        for ms, config in rows[:6]:
            mark = " (default)" if config in default else ""
            print(f"  {ms:8.3f} ms {flops / ms / 1e9:7.2f} TFLOP/s  {config}{mark}")
        chosen = [r for r in rows if r[1] in default]
        if chosen and rows:
            print(f"  autotune candidates best: {min(chosen, key=lambda r: r[0])[0]:.3f} ms; grid best {rows[0][0]:.3f} ms")
        kernels, dilations = (k, k), (1, 1)
        for method in ("gemm", "conv"):
            fn = getattr(lag_gram, f"_lag_products_{method}")
            print(f"  {method:>6} lag products: {timed(lambda: fn(x, kernels, dilations, groups)):8.3f} ms")
        geometry = make_geometry(c, c, (size, size), kernel_size=k, padding=pad, groups=groups)
        reference = lag_gram.kfc_by_lags(x.double(), geometry, lag_method="conv")
        runs = [(m, "ieee") for m in ("conv", "gemm", "triton")]
        runs += [("triton", p) for p in ("tf32x3", "tf32")] if ci >= lp.DOT_MIN_CHANNELS else []
        for method, precision in runs:
            ms = timed(lambda: lag_gram.kfc_by_lags(x, geometry, lag_method=method, precision=precision))
            result = lag_gram.kfc_by_lags(x, geometry, lag_method=method, precision=precision)
            error = ((result.double() - reference).norm() / reference.norm()).item()
            print(f"  kfc_by_lags {method:>6} {precision:>6}: {ms:8.3f} ms  rel. error {error:.1e}")
        del reference
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            lag_gram.kfc_by_lags(x, geometry, lag_method="triton")
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                lag_gram.kfc_by_lags(x, geometry, lag_method="triton")
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))


if __name__ == "__main__":
    main()
