"""Host (Python) time of a DiagGGNExact step against its wall time (fourteenth session).

    python benchmarks/diagnostics/diag_ggn_host_profile.py      # a CUDA GPU

All-CNN-C (batch 128, 100 classes, TF32) under 2 and 3.5 GB budgets: the wall time of a step (median
and minimum of 10), the host time until its last launch (no synchronisation inside the step), and a
``cProfile`` of one step sorted by own time. Where the host time reaches the device time the step is
bound by the host and its wall time varies from run to run.
"""

import cProfile
import os
import pstats
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), os.path.dirname(os.path.dirname(HERE))]
import torch
from torch import nn
import curvlib
from curvlib import extensions as E
import end_to_end


def main() -> None:
    end_to_end.set_global_precision("tf32")
    torch.manual_seed(0)
    dev = torch.device("cuda")
    model = end_to_end.all_cnn_c(100).to(dev)
    x = torch.randn(128, 3, 32, 32, device=dev); y = torch.randint(0, 100, (128,), device=dev)
    lf = nn.CrossEntropyLoss()
    for budget in (2e9, 3.5e9):
        def step():
            with curvlib.curvature(model, lf, E.DiagGGNExact(), memory_budget=budget):
                model.zero_grad(); lf(model(x), y).backward()
        for _ in range(3): step()
        torch.cuda.synchronize()
        times = []
        for _ in range(10):
            t = time.perf_counter(); step(); torch.cuda.synchronize(); times.append(time.perf_counter() - t)
        # host time alone: the same step without waiting (the queue fills; measured to the last launch)
        host = []
        for _ in range(3):
            torch.cuda.synchronize(); t = time.perf_counter(); step(); host.append(time.perf_counter() - t); torch.cuda.synchronize()
        print(f"budget {budget/1e9:g} GB: wall median {statistics.median(times)*1e3:.1f} ms (min {min(times)*1e3:.1f}), "
              f"host until the last launch {statistics.median(host)*1e3:.1f} ms", flush=True)
        pr = cProfile.Profile(); torch.cuda.synchronize(); pr.enable(); step(); pr.disable(); torch.cuda.synchronize()
        pstats.Stats(pr).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
