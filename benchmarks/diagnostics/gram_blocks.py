"""``native.gram`` by blocks of rows (upper triangle only) against one product, on the unfolded-input
shapes of KFC layers (``[G, D, N·O]``): median CUDA-event time per block count.

    python benchmarks/diagnostics/gram_blocks.py
"""

import torch

from _timing import cuda_median_ms

from curvlib.native import gram

SHAPES = [  # name, G, D, M
    ("allcnnc conv3 96@32 s2", 1, 864, 128 * 256),
    ("allcnnc conv6 192@16 s2", 1, 1728, 128 * 64),
    ("allcnnc conv7 192@8", 1, 1728, 128 * 36),
    ("resnet18 64@56", 1, 576, 32 * 3136),
    ("resnet18 128@28", 1, 1152, 32 * 784),
    ("resnet18 256@14", 1, 2304, 32 * 196),
    ("resnet18 512@7", 1, 4608, 32 * 49),
    ("resnext grouped 32x4 3x3", 32, 36, 32 * 3136),
]


def main() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    print(f"{torch.cuda.get_device_name()}: native.gram, ms per block count (1 = one product)")
    for name, g, d, m in SHAPES:
        u = torch.randn(g, d, m, device="cuda")
        row = {b: cuda_median_ms(lambda: gram(u, b), repeats=9, warmups=1) for b in (1, 2, 3, 4, 6, 8)}
        full = row[1]
        print(f"{name:28s} D={d:5d} M={m:6d}  " + "  ".join(f"{b}: {t:6.3f} ({t / full:4.2f})" for b, t in row.items()))


if __name__ == "__main__":
    main()
