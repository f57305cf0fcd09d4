import torch, time
from curvlib import native
from curvlib.hyperparams import make_geometry
dev = "cuda"
def timeit(fn, r=5):
    fn(); torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(r): fn()
    torch.cuda.synchronize(); return (time.perf_counter() - t) / r * 1e3
for (ci, co, size, stride, chunk) in ((96, 96, 34, 1, 3.5e9 / 4), (192, 192, 18, 1, 0.9e9), (96, 96, 33, 2, 3.5e9 / 4)):
    geo = make_geometry(ci, co, (size, size), kernel_size=3, stride=stride)
    x = torch.randn(128, ci, size, size, device=dev, dtype=torch.bfloat16)
    s = torch.randn(21 * 128, co, *geo.output_size, device=dev, dtype=torch.bfloat16)
    scl = s.contiguous(memory_format=torch.channels_last).view(21, 128, co, *geo.output_size)
    s = s.view(21, 128, co, *geo.output_size)
    ref = native.ggn_diag(x.double(), s.double(), geo)
    for name, t in (("nchw", s), ("cl", scl)):
        out = native.ggn_diag(x, t, geo, chunk_bytes=chunk)
        err = ((out.double() - ref).norm() / ref.norm()).item()
        print(name, ci, co, size, stride, "ggn_diag", round(timeit(lambda: native.ggn_diag(x, t, geo, chunk_bytes=chunk)), 3), "ms", "blocks", len(list(native._channel_blocks(geo, 21 * 128 * ci * 9 * 2, chunk))), f"err {err:.1e}")
