"""Correctness on a GPU: every curvlib.functional operation on CUDA (float32) against float64 on the CPU.

    python benchmarks/gpu_check.py
"""

import torch

from curvlib import functional as F

torch.manual_seed(0)
cuda = torch.device("cuda")
x = torch.randn(4, 6, 12, 10, dtype=torch.float64)
w = torch.randn(8, 3, 3, 2, dtype=torch.float64)
hyper = dict(stride=(2, 1), padding=1, dilation=(1, 2), groups=2)
y = torch.nn.functional.conv2d(x, w, **hyper)
s = torch.randn(5, *y.shape, dtype=torch.float64)
d = torch.rand_like(y)
v = torch.randn_like(y)
cases = {
    "conv": lambda x, w, s, d, v: F.conv(x, w, **hyper),
    "input_vjp": lambda x, w, s, d, v: F.input_vjp(w, v, x.shape[2:], **hyper),
    "weight_vjp": lambda x, w, s, d, v: F.weight_vjp(x, v, (3, 2), **hyper),
    "kfc": lambda x, w, s, d, v: F.kfc(x, (3, 2), **hyper),
    "kfac_reduce": lambda x, w, s, d, v: F.kfac_reduce(x, (3, 2), **hyper),
    "ggn_diag": lambda x, w, s, d, v: F.ggn_diag(x, s, (3, 2), **hyper),
    "ggn_mini_block": lambda x, w, s, d, v: F.ggn_mini_block(x, s, (3, 2), blocks=(4, 1, 3, 1), **hyper),
    "ggn_gram": lambda x, w, s, d, v: F.ggn_gram(x, s, (3, 2), **hyper),
    "hesscale_weight_diag": lambda x, w, s, d, v: F.hesscale_weight_diag(x, d, (3, 2), **hyper),
    "hesscale_input_diag": lambda x, w, s, d, v: F.hesscale_input_diag(w, d, x.shape[2:], **hyper),
}
worst = 0.0
for name, fn in cases.items():
    ref = fn(x, w, s, d, v)
    out = fn(*(t.to(cuda, torch.float32) for t in (x, w, s, d, v))).double().cpu()
    err = ((out - ref).norm() / ref.norm()).item()
    worst = max(worst, err)
    print(f"{name:22s} relative error (cuda float32 vs cpu float64) {err:.2e}")
print("GPU check", "passed" if worst < 1e-5 else "FAILED", f"(worst {worst:.2e})")
