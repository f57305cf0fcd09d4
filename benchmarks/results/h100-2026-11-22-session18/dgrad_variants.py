"""dgrad variants of All-CNN-C's conv layers, bf16, 2560 = 20 columns x 128 samples."""
import torch, statistics
import torch.nn.functional as F
aten = torch.ops.aten
dev = "cuda"
def bench(fn, reps=15):
    for _ in range(3): fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a = torch.cuda.Event(enable_timing=True); b = torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); torch.cuda.synchronize(); ts.append(a.elapsed_time(b))
    return statistics.median(ts)
M = 2560
layers = [("conv2 96->96 s1 34->32", 96, 96, 34, 1), ("conv3 96->96 s2 33->16", 96, 96, 33, 2),
          ("conv4 96->192 s1 18->16", 96, 192, 18, 1), ("conv5 192->192 s1 18->16", 192, 192, 18, 1),
          ("conv6 192->192 s2 17->8", 192, 192, 17, 2), ("conv7 192->192 s1 8->6", 192, 192, 8, 1)]
for bm in (False, True):
    torch.backends.cudnn.benchmark = bm
    for name, cin, cout, size, s in layers:
        out = (size - 3) // s + 1
        flops = 2 * M * cin * cout * 9 * out * out
        for fmt_name, fmt in (("CL", torch.channels_last), ("NCHW", torch.contiguous_format)):
            g = torch.randn(M, cout, out, out, device=dev, dtype=torch.bfloat16).contiguous(memory_format=fmt)
            w = torch.randn(cout, cin, 3, 3, device=dev, dtype=torch.bfloat16).contiguous(memory_format=fmt)
            dummy = torch.empty(M, cin, size, size, device=dev, dtype=torch.bfloat16, memory_format=fmt)
            op = size - ((out - 1) * s + 3)
            res = {}
            res["backward"] = bench(lambda: aten.convolution_backward(g, dummy, w, None, [s, s], [0, 0], [1, 1], False, [0, 0], 1, [True, False, False]))
            res["transpose"] = bench(lambda: F.conv_transpose2d(g, w, stride=s, output_padding=op))
            ref = aten.convolution_backward(g, dummy, w, None, [s, s], [0, 0], [1, 1], False, [0, 0], 1, [True, False, False])[0]
            got = F.conv_transpose2d(g, w, stride=s, output_padding=op)
            err = ((ref.float() - got.float()).norm() / ref.float().norm()).item()
            if s == 2:
                res["transpose+1"] = bench(lambda: F.conv_transpose2d(g, w, stride=s, output_padding=op + 1))
            print(f"bench={bm} {name} {fmt_name}: " + ", ".join(f"{k} {v:.3f} ms ({flops / v / 1e9:.0f} TFLOP/s)" for k, v in res.items())
                  + f"; layout out {got.is_contiguous(memory_format=fmt)}; err {err:.1e}", flush=True)
            del g, w, dummy, ref, got
