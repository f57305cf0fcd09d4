"""Where channels-last convolution data gradients copy, and how fast ReLU backward runs on cropped gradients.

    python benchmarks/diagnostics/channels_last_dgrad_variants.py

One All-CNN-C conv2-shaped data gradient (bf16, 21 columns x 128 samples) per variant of the layouts of the
gradient, the weight and the stand-in input `aten.convolution_backward` gets (time, kernels, where copies come
from), then PyTorch's ReLU backward variants on the cropped gradient of a zero-padded input, with the bandwidth
they reach. Needs a CUDA device. Results: `benchmarks/results/h100-2026-11-22-session16`.
"""
import collections
import time

import torch

torch.backends.cudnn.benchmark = False
dev = "cuda"
JN, C, H = 2688, 96, 32
w = torch.randn(96, 96, 3, 3, device=dev, dtype=torch.bfloat16)
def variants():
    g_nchw = torch.randn(JN, C, H, H, device=dev, dtype=torch.bfloat16)
    g_cl = g_nchw.contiguous(memory_format=torch.channels_last)
    w_cl = w.contiguous(memory_format=torch.channels_last)
    shape = (JN, 96, H + 2, H + 2)
    dummy = lambda g: g.new_empty(1).expand(shape)
    real_cl = torch.empty(shape, device=dev, dtype=torch.bfloat16, memory_format=torch.channels_last)
    real_cl_small = torch.empty(shape, device=dev, dtype=torch.bfloat16).as_strided(shape, (0, 1, 0, 0))
    return {
        "nchw g, nchw w, expanded dummy": (g_nchw, w, dummy(g_nchw)),
        "cl g, cl w, expanded dummy": (g_cl, w_cl, dummy(g_cl)),
        "cl g, cl w, real cl input": (g_cl, w_cl, real_cl),
        "cl g, cl w, dummy strided (0,1,0,0)": (g_cl, w_cl, real_cl_small),
    }
def call(g, weight, inp):
    return torch.ops.aten.convolution_backward(g, inp, weight, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
                                               [True, False, False])[0]
for name, (g, weight, inp) in variants().items():
    for _ in range(3):
        out = call(g, weight, inp)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        out = call(g, weight, inp)
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t) / 10 * 1e3
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA, torch.profiler.ProfilerActivity.CPU],
                                record_shapes=True, with_stack=True) as prof:
        call(g, weight, inp)
        torch.cuda.synchronize()
    kernels = collections.Counter()
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            kernels[e.name[:70]] += e.device_time_total / 1e3
    print(f"== {name}: {ms:.2f} ms, out strides {out.stride()}")
    for k, v in kernels.most_common(6):
        print(f"    {v:7.3f} ms  {k}")
    for e in prof.events():
        if e.name in ("aten::copy_", "aten::contiguous", "aten::clone") and e.device_type != torch.autograd.DeviceType.CUDA:
            print("    ", e.name, e.input_shapes[:1], " <- ", " | ".join((e.stack or [])[:4]))

print("\n== ReLU backward on the cropped dgrad output, bf16 [21, 128, 96, 32, 32]")
def bench(fn, n=10):
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e3
for layout in ("nchw", "cl"):
    big = torch.randn(21 * 128, 96, 34, 34, device=dev, dtype=torch.bfloat16)
    saved = torch.randn(128, 96, 32, 32, device=dev, dtype=torch.bfloat16).relu()
    if layout == "cl":
        big = big.contiguous(memory_format=torch.channels_last)
        saved = saved.contiguous(memory_format=torch.channels_last)
    cropped = big.unflatten(0, (21, 128))[..., 1:33, 1:33]
    contiguous = cropped.contiguous() if layout == "nchw" else cropped.flatten(0, 1).contiguous(memory_format=torch.channels_last).unflatten(0, (21, 128))
    mask = saved > 0
    nbytes = 2 * cropped.numel() * 2
    for name, fn in [
        ("threshold_backward(cropped)", lambda: torch.ops.aten.threshold_backward(cropped, saved, 0)),
        ("threshold_backward(contiguous)", lambda: torch.ops.aten.threshold_backward(contiguous, saved, 0)),
        ("where(mask, cropped, 0)", lambda: torch.where(mask, cropped, 0)),
        ("copy of cropped", lambda: cropped.clone()),
    ]:
        ms = bench(fn)
        print(f"  {layout} {name:34s} {ms:7.3f} ms  {nbytes / ms / 1e9:6.2f} TB/s (g read + written)")
