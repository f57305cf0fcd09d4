import torch, torch.nn.functional as F, time, sys
torch.backends.cudnn.benchmark = bool(int(sys.argv[1])) if len(sys.argv) > 1 else False
dev = 'cuda'; bf = torch.bfloat16; cl = torch.channels_last
def bench(fn, reps=20):
    for _ in range(3): fn()
    torch.cuda.synchronize(); s = torch.cuda.Event(enable_timing=True); e = torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(reps): fn()
    e.record(); torch.cuda.synchronize(); return s.elapsed_time(e) / reps
M = 2560
for (C, Hi, Ho) in [(96, 33, 16), (192, 17, 8)]:
    g = torch.randn(M, C, Ho, Ho, device=dev, dtype=bf).contiguous(memory_format=cl)
    w = torch.randn(C, C, 3, 3, device=dev, dtype=bf).contiguous(memory_format=cl)
    flops = 2 * M * C * Ho * Ho * C * 9
    base = lambda: F.conv_transpose2d(g, w, stride=2)
    ref = base(); print(C, 'base shape', tuple(ref.shape), f"{bench(base):.3f} ms {flops/bench(base)/1e9:.0f} TFLOP/s")
    for co in (128, 192, 256):
        if co <= C: continue
        wp = torch.zeros(C, co, 3, 3, device=dev, dtype=bf); wp[:, :C] = w; wp = wp.contiguous(memory_format=cl)
        f = lambda: F.conv_transpose2d(g, wp, stride=2)
        out = f(); err = (out[:, :C] - ref).abs().max().item()
        print(C, f'pad out channels to {co}', f"{bench(f):.3f} ms err {err:.1e}")
    # sub-pixel: phase (p,q) of output i=2a+p: taps k = p + 2t' ... out[2a+p] = sum_{k: k≡p} g[a - (k-p)/2] w[k]
    # kernel over g offsets u = (k-p)/2 in {0,1}: out[a] = sum_u g[a-u] w[p+2u]  -> correlation with flipped 2-tap kernel, pad 1 on the left
    W4 = torch.zeros(4 * C, C, 2, 2, device=dev, dtype=bf)  # conv2d weight [out=(p,q,c), in=o, 2, 2]
    for p in range(2):
        for q in range(2):
            for u in range(2):
                for v in range(2):
                    kh, kw = p + 2 * u, q + 2 * v
                    if kh < 3 and kw < 3:
                        # out[a,b] = sum g[a-u, b-v] w[o,c,kh,kw]; correlation index j = 1 - u on g padded by 1 (left)
                        W4[(p * 2 + q) * C:(p * 2 + q + 1) * C, :, 1 - u, 1 - v] = w[:, :, kh, kw].t()
    W4 = W4.contiguous(memory_format=cl)
    gp = F.pad(g, (1, 1, 1, 1)).contiguous(memory_format=cl)
    sub = lambda: F.conv2d(gp, W4)
    y = sub()  # [M, 4C, Ho+1, Ho+1]
    def interleave(y):
        a = y.shape[2]
        t = y.view(M, 2, 2, C, a, a).permute(0, 3, 4, 1, 5, 2).reshape(M, C, 2 * a, 2 * a)
        return t[:, :, :Hi, :Hi]
    err = (interleave(y) - ref).abs().max().item()
    out = torch.empty(M, C, 2 * (Ho + 1), 2 * (Ho + 1), device=dev, dtype=bf).contiguous(memory_format=cl)
    def shuffle():
        a = Ho + 1
        out.view(M, C, a, 2, a, 2).copy_(y.view(M, 2, 2, C, a, a).permute(0, 3, 4, 1, 5, 2))
    print(C, 'sub-pixel conv', tuple(y.shape), f"{bench(sub):.3f} ms; shuffle copy {bench(shuffle):.3f} ms; err {err:.1e}")
