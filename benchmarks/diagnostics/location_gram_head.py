"""DiagGGNExact on an ImageNet-like head (7x7 maps, 512 channels, 1000 classes, batch 32) on a GPU: the location
Gram of the late layers on against off (`LOCATION_GRAM_BYTES = 0`), with the relative difference of the results."""
import sys, time, torch, torch.nn as nn
import curvlib
from curvlib import extensions as E
from curvlib.engine import layers as L
dev = torch.device("cuda")
torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(512, 512, 3, padding=1), nn.ReLU(), nn.Conv2d(512, 512, 3, padding=1), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 1000)).to(dev)
X = torch.randn(32, 512, 7, 7, device=dev); y = torch.randint(0, 1000, (32,), device=dev)
loss_fn = nn.CrossEntropyLoss()
results = {}
for label, cap in (("location Gram", 2**29), ("direct", 0)):
    L.LOCATION_GRAM_BYTES = cap
    def step():
        with curvlib.curvature(model, loss_fn, E.DiagGGNExact(), memory_budget=8e9) as cv:
            model.zero_grad(); loss_fn(model(X), y).backward()
        return cv
    step(); torch.cuda.synchronize(); ts = []
    for _ in range(3):
        t = time.perf_counter(); step(); torch.cuda.synchronize(); ts.append(time.perf_counter() - t)
    torch.cuda.empty_cache(); base = torch.cuda.memory_allocated(); torch.cuda.reset_peak_memory_stats()
    cv = step(); torch.cuda.synchronize(); peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    results[label] = {n: p.diag_ggn_exact.clone() for n, p in model.named_parameters()}
    print(f"{label}: {min(ts)*1e3:.1f} ms, peak {peak:.0f} MiB, chunk {cv.last_chunk_size}", flush=True)
err = max(((results["location Gram"][n] - results["direct"][n]).norm() / results["direct"][n].norm()).item() for n in results["direct"])
print(f"max relative difference {err:.1e}")
