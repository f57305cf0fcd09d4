import torch, time
dev = "cuda"
def timeit(fn, r=5):
    fn(); torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(r): fn()
    torch.cuda.synchronize(); return (time.perf_counter() - t) / r * 1e3
n, g, d, c, e = 128, 1, 864, 21, 96
for dt in (torch.bfloat16, torch.float32):
    mem = torch.randn(n, g, d, c, e, device=dev, dtype=dt)
    J = mem.permute(0, 1, 3, 4, 2)  # [n, g, c, e, d]
    ref = torch.linalg.vector_norm(J.float(), dim=(0, 2)).square()
    variants = {
        "direct (0,2)": lambda: torch.linalg.vector_norm(J, dim=(0, 2)).square_(),
        "mem (0,3)": lambda: torch.linalg.vector_norm(mem, dim=(0, 3)).square_().transpose(-1, -2),
        "two-step n then c": lambda: torch.linalg.vector_norm(J, dim=0).square_().sum(1),
        "two-step f32": lambda: torch.linalg.vector_norm(J, dim=0, dtype=torch.float32).square_().sum(1),
        "direct f32": lambda: torch.linalg.vector_norm(J, dim=(0, 2), dtype=torch.float32).square_(),
        "per-sample c": lambda: torch.linalg.vector_norm(J, dim=2).square_(),
        "nchw ref direct": None,
    }
    Jc = J.contiguous()
    variants["nchw ref direct"] = lambda: torch.linalg.vector_norm(Jc, dim=(0, 2)).square_()
    for name, fn in variants.items():
        out = fn()
        err = ((out.float() - ref).norm() / ref.norm()).item() if out.shape == ref.shape else float("nan")
        print(f"{dt} {name:20s} {timeit(fn):7.3f} ms  err {err:.1e} out stride {out.stride()}")
