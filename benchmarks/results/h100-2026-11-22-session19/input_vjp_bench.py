"""The polyphase data-gradient kernel (curvlib.kernels.input_vjp) against cuDNN's transposed convolution
on All-CNN-C's layers, 20 columns x batch 128 in bfloat16 channels-last (the engine's column passes).
Usage: input_vjp_bench.py [layer ...]"""
import torch, torch.nn.functional as F, sys, itertools
from curvlib.hyperparams import make_geometry
from curvlib.kernels._geometry import kernel_geometry
from curvlib.kernels import input_vjp as K
torch.backends.cudnn.benchmark = False
dev = 'cuda'; bf = torch.bfloat16; cl = torch.channels_last
def bench(fn, reps=20):
    for _ in range(3): fn()
    torch.cuda.synchronize(); s = torch.cuda.Event(enable_timing=True); e = torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(reps): fn()
    e.record(); torch.cuda.synchronize(); return s.elapsed_time(e) / reps
M = 2560
layers = [("conv2", 96, 96, 34, 3, 1), ("conv3", 96, 96, 33, 3, 2), ("conv4", 96, 192, 18, 3, 1),
          ("conv5", 192, 192, 18, 3, 1), ("conv6", 192, 192, 17, 3, 2), ("conv7", 192, 192, 8, 3, 1),
          ("conv8", 192, 192, 6, 1, 1), ("conv9", 192, 100, 6, 1, 1)]
configs = [(128, 128, 32, 4, 4), (128, 64, 32, 4, 4), (128, 128, 64, 8, 3)]  # the candidates of kernels.input_vjp, and config()'s default
only = sys.argv[1:] 
for name, C, Co, I, k, s in layers:
    if only and name not in only: continue
    geo = make_geometry(C, Co, (I, I), kernel_size=k, stride=s)
    kg = kernel_geometry(geo)
    O = geo.output_size
    g = torch.randn(M, Co, *O, device=dev, dtype=bf).contiguous(memory_format=cl)
    w = (torch.randn(Co, C, k, k, device=dev, dtype=bf) / (C * k * k) ** 0.5).contiguous(memory_format=cl)
    extra = [I - ((o - 1) * s + k) for o in O]
    cud = lambda: torch.ops.aten.convolution(g, w, None, [s, s], [0, 0], [1, 1], True, extra, 1)
    ref = cud()
    flops = 2 * M * Co * O[0] * O[1] * C * k * k
    t_c = bench(cud)
    default = K.config(kg, bf)
    out = K.input_vjp(g, w, kg)
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    t_d = bench(lambda: K.input_vjp(g, w, kg))
    best = None
    for cfg in configs:
        try:
            t = bench(lambda: K.input_vjp(g, w, kg, block=cfg), reps=10)
        except Exception as ex:
            continue
        if best is None or t < best[0]: best = (t, cfg)
    o2 = K.input_vjp(g, w, kg, block=best[1])
    err2 = ((o2.float() - ref.float()).norm() / ref.float().norm()).item()
    print(f"{name}: cuDNN {t_c:.3f} ms ({flops/t_c/1e9:.0f} TFLOP/s); triton default {default} {t_d:.3f} ms ({flops/t_d/1e9:.0f}) err {err:.1e}; "
          f"best {best[1]} {best[0]:.3f} ms ({flops/best[0]/1e9:.0f}) err {err2:.1e}; layout {o2.is_contiguous(memory_format=cl)}", flush=True)
