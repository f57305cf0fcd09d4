"""GGN diagonal of All-CNN-C's convolutions (batch 128, C = 100): tensor network vs unfold pathway vs
a BackPACK-style reference (explicit unfold, per-(c, n) gradients by batched matmul, squared).

    python benchmarks/ggn_pathways.py
"""

import statistics
import sys

import torch
import torch.nn.functional as tf

from curvlib import functional as F
from curvlib import precision

precision.set_fp32_precision("ieee")
device = torch.device("cuda")
LAYERS = [(3, 96, 34, 1), (96, 96, 34, 1), (96, 96, 33, 2), (96, 192, 18, 1), (192, 192, 18, 1), (192, 192, 17, 2), (192, 192, 8, 1)]
N, C = 128, 100


def timed(fn, repeats=5):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return statistics.median(times), (torch.cuda.max_memory_allocated() - before) / 2**20


def reference(x, s, stride, chunk=10):
    unfolded = tf.unfold(x, 3, stride=stride)  # [N, ci*9, O]
    out = 0
    for c in range(0, s.shape[0], chunk):
        grads = torch.einsum("cnko,nio->cnki", s[c : c + chunk].flatten(3), unfolded)
        out = out + (grads**2).sum((0, 1))
    return out.reshape(s.shape[2], x.shape[1], 3, 3)


total = {"tn": 0.0, "unfold": 0.0, "reference": 0.0}
for c_in, c_out, size, stride in LAYERS:
    x = torch.randn(N, c_in, size, size, device=device)
    out = (size - 3) // stride + 1
    s = torch.randn(C, N, c_out, out, out, device=device)
    ref = reference(x, s, stride)
    line = f"conv {c_in:3d}->{c_out:3d} {size}x{size} s{stride}:"
    for name, fn in (
        ("tn", lambda: F.ggn_diag(x, s, 3, stride=stride, pathway="tn")),
        ("unfold", lambda: F.ggn_diag(x, s, 3, stride=stride, pathway="unfold")),
        ("reference", lambda: reference(x, s, stride)),
    ):
        try:
            ms, mib = timed(fn)
            err = ((fn() - ref).norm() / ref.norm()).item()
            total[name] += ms
            line += f"  {name} {ms:8.1f} ms {mib:8.0f} MiB (err {err:.1e})"
        except torch.cuda.OutOfMemoryError:
            line += f"  {name} OOM"
            torch.cuda.empty_cache()
    print(line, flush=True)
print("total ms:", {k: round(v, 1) for k, v in total.items()}, flush=True)
