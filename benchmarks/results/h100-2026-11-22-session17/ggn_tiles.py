"""Time the unfolded GGN kernel's tiles on channels-last bf16 s, All-CNN-C layers, C=21, N=128."""
import itertools, time, torch
from curvlib.hyperparams import make_geometry
from curvlib.kernels import kernel_geometry
from curvlib.kernels import ggn_unfolded as gu
from curvlib.kernels import weight_diag as wd
dev = "cuda"
def ev(fn, r=10):
    fn(); torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(r): fn()
    b.record(); torch.cuda.synchronize(); return a.elapsed_time(b) / r
LAYERS = [(96, 96, 34, 3, 1), (96, 96, 33, 3, 2), (96, 192, 18, 3, 1), (192, 192, 18, 3, 1),
          (192, 192, 17, 3, 2), (192, 192, 8, 3, 1)]
C, N = 21, 128
total_auto = total_best = 0
for ci, co, size, k, st in LAYERS:
    geo = make_geometry(ci, co, (size, size), kernel_size=k, stride=st)
    kg = kernel_geometry(geo)
    x = torch.randn(N, ci, size, size, device=dev, dtype=torch.bfloat16)
    s = torch.randn(C * N, co, *geo.output_size, device=dev, dtype=torch.bfloat16)
    s = s.contiguous(memory_format=torch.channels_last).view(C, N, co, *geo.output_size)
    flops = 2 * C * N * co * kg.rows * kg.output_numel
    auto = ev(lambda: wd.ggn_diag(x, s, kg, False, "bf16"))
    cands = list(gu.candidates(C, co, kg.rows, kg.output_numel, "mma", True))
    co_b = min(32, 1 << (co - 1).bit_length())
    for rows, bd, bo, stages, flat, warps in itertools.product((128,), (128, 256), (64, 128), (3, 4), (False, True), (8,)):
        if rows * bd > 128 * 128 and warps == 4: continue
        bc = max(1, rows // co_b)
        cands.append(gu.UnfoldedGGNConfig(bc, co_b, min(bd, 1 << (kg.rows - 1).bit_length()), min(bo, 1 << (kg.output_numel - 1).bit_length()), warps, stages, flat, True))
    cands = list(dict.fromkeys(cands))
    res = []
    for cfg in cands:
        try:
            t = ev(lambda: gu.ggn_diag(x, s, kg, False, "bf16", cfg))
        except Exception as e:
            continue
        res.append((t, cfg))
    res.sort(key=lambda r: r[0])
    total_auto += auto; total_best += res[0][0]
    print(f"layer {ci}->{co} {size} s{st}: auto {auto:.3f} ms ({flops / auto / 1e9:.0f} TFLOP/s); best {res[0][0]:.3f} ms ({flops / res[0][0] / 1e9:.0f} TFLOP/s)", flush=True)
    for t, cfg in res[:4]:
        print(f"    {t:.3f} ms {cfg}")
print(f"total auto {total_auto:.2f} ms, best {total_best:.2f} ms (one chunk of {C} columns)")
