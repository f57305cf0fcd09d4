"""The polyphase data-gradient kernel, plain, cropped to a window and with the ReLU mask fused, against
cuDNN's data gradient followed by the crop and the mask kernel: All-CNN-C conv3/conv6, 20 × 128 samples,
bf16 channels-last (output: fused_kernel.txt)."""
import torch
import curvlib.kernels.input_vjp as base
from curvlib.kernels._geometry import kernel_geometry
from curvlib.hyperparams import make_geometry
from curvlib.kernels import threshold_backward as tb
mods = {"library": base}


def bench(fn, reps=10):
    fn(); torch.cuda.synchronize()
    s, e = torch.cuda.Event(True), torch.cuda.Event(True); ts = []
    for _ in range(3):
        s.record()
        for _ in range(reps): fn()
        e.record(); e.synchronize(); ts.append(s.elapsed_time(e) / reps)
    return min(ts)


J, N = 20, 128
LAYERS = [("conv3", 96, 32), ("conv6", 192, 16)]


def operands(C, I):
    """``(kernel geometry, g, weight, saved ReLU output, window)`` of a stride-2 3×3 layer on a padded ``I×I`` input."""
    cl = torch.channels_last
    geo = make_geometry(C, C, (I + 2, I + 2), 3, 2)
    g = torch.randn(J * N, C, *geo.output_size, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=cl)
    w = torch.randn(C, C, 3, 3, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=cl)
    saved = torch.relu(torch.randn(N, C, I, I, device="cuda", dtype=torch.bfloat16)).contiguous(memory_format=cl)
    return kernel_geometry(geo), g, w, saved, ((1, I), (1, I))


def main():
    for lname, C, I in LAYERS:
        kg, g, w, saved, window = operands(C, I)
        cud = lambda: torch.ops.aten.convolution(g, w, None, [2, 2], [0, 0], [1, 1], True, [1, 1], 1)
        sep = lambda: tb.threshold_backward(cud().unflatten(0, (J, N))[:, :, :, 1:I + 1, 1:I + 1], saved, 0.0)
        print(f"{lname}: cuDNN {bench(cud):.3f} ms, cuDNN + crop + mask kernel {bench(sep):.3f} ms; out {J*N*C*I*I*2/1e6:.0f} MB", flush=True)
        ref = sep().flatten(0, 1).float()
        for cfg in base.candidates(kg, torch.bfloat16)[1:] + [(128, 128, 32, 8, 4)]:
            line = [f"  {cfg}"]
            for name, mod in mods.items():
                tp = bench(lambda: mod.input_vjp(g, w, kg, block=cfg))
                tw = bench(lambda: mod.input_vjp(g, w, kg, block=cfg, window=window))
                tf = bench(lambda: mod.input_vjp(g, w, kg, block=cfg, window=window, mask=saved))
                err = ((mod.input_vjp(g, w, kg, block=cfg, window=window, mask=saved).float() - ref).norm() / ref.norm()).item()
                line.append(f"{name}: plain {tp:.3f} window {tw:.3f} window+mask {tf:.3f} ms (err {err:.0e})")
            print("  ".join(line), flush=True)


if __name__ == "__main__":
    main()
