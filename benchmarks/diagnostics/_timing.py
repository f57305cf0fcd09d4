"""CUDA-event timing shared by the diagnostics scripts (run as scripts: this folder is on ``sys.path``)."""

import statistics

import torch


def cuda_median_ms(fn, repeats: int = 10, warmups: int = 3) -> float:
    """Median device time of ``fn()`` in milliseconds (CUDA events around each call, after warm-ups)."""
    for _ in range(warmups):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end))
    return statistics.median(samples)
