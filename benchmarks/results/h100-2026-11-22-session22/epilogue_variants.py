"""Epilogue variants of the fused window+mask polyphase kernel on All-CNN-C conv3/conv6 (J=20, N=128, bf16 CL):
the epilogue text of curvlib/kernels/input_vjp.py at commit ddcb2e8^ (one whole-tile store, the select on
the bfloat16 result) replaced by each variant (output: epilogue_variants.txt; it runs against that
revision of the file only)."""
import importlib.util, types, torch
import curvlib.kernels.input_vjp as base
from curvlib.kernels import threshold_backward as tb
src = open(base.__file__).read()
EPI_NOW = src[src.index("    result = acc.to(out_ptr.dtype.element_ty)"):src.index("_launch = Launcher(")]
V = {}
V["bf16-select"] = EPI_NOW
V["fp32-select"] = '''    i0, i1, i2 = R0 + S0 * a0, R1 + S1 * a1, R2 + S2 * a2
    in_channel = group * C_G + c
    stored = valid_p[:, None] & valid_c[None, :]
    if MASKED:
        mask_rows = n_mask * smn + i0 * sm0 + i1 * sm1 + i2 * sm2
        saved = tl.load(mask_ptr + mask_rows[:, None] + (in_channel * smc)[None, :], mask=stored, other=0.0)
        acc = tl.where(saved <= threshold, 0.0, acc)
    out_rows = n * son + i0 * so0 + i1 * so1 + i2 * so2
    tl.store(out_ptr + out_rows[:, None] + (in_channel * soc)[None, :], acc.to(out_ptr.dtype.element_ty), mask=stored)


'''
V["split-halves"] = '''    i0, i1, i2 = R0 + S0 * a0, R1 + S1 * a1, R2 + S2 * a2
    result = acc.to(out_ptr.dtype.element_ty)
    out_rows = n * son + i0 * so0 + i1 * so1 + i2 * so2
    halves = tl.split(tl.permute(tl.reshape(result, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
    for h in tl.static_range(2):
        part = halves[h]
        ch = (pid_n - group * CT) * BLOCK_N + h * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        st = valid_p[:, None] & (ch < C_G)[None, :]
        in_channel = group * C_G + ch
        if MASKED:
            mask_rows = n_mask * smn + i0 * sm0 + i1 * sm1 + i2 * sm2
            saved = tl.load(mask_ptr + mask_rows[:, None] + (in_channel * smc)[None, :], mask=st, other=0.0)
            part = tl.where(saved <= threshold, tl.zeros_like(part), part)
        tl.store(out_ptr + out_rows[:, None] + (in_channel * soc)[None, :], part, mask=st)


'''
V["mask-first"] = '''    i0, i1, i2 = R0 + S0 * a0, R1 + S1 * a1, R2 + S2 * a2
    in_channel = group * C_G + c
    stored = valid_p[:, None] & valid_c[None, :]
    out_rows = n * son + i0 * so0 + i1 * so1 + i2 * so2
    keep = stored
    if MASKED:
        mask_rows = n_mask * smn + i0 * sm0 + i1 * sm1 + i2 * sm2
        saved = tl.load(mask_ptr + mask_rows[:, None] + (in_channel * smc)[None, :], mask=stored, other=0.0)
        keep = stored & (saved > threshold)
        tl.store(out_ptr + out_rows[:, None] + (in_channel * soc)[None, :], tl.zeros((BLOCK_M, BLOCK_N), out_ptr.dtype.element_ty), mask=stored & (saved <= threshold))
    tl.store(out_ptr + out_rows[:, None] + (in_channel * soc)[None, :], acc.to(out_ptr.dtype.element_ty), mask=keep)


'''
mods = {}
for name, epi in V.items():
    text = src.replace(EPI_NOW, epi)
    mod = types.ModuleType(f"ivar_{name.replace('-', '_')}")
    mod.__dict__["__name__"] = mod.__name__
    mod.__package__ = "curvlib.kernels"
    fn = f"/tmp/ivar_{name.replace('-', '_')}.py"
    open(fn, "w").write(text)
    spec = importlib.util.spec_from_file_location(f"curvlib.kernels.ivar_{name.replace('-', '_')}", fn)
    m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
    mods[name] = m
from fused_kernel import J, LAYERS, N, bench, operands  # noqa: E402  (this folder on the path)
for lname, C, I in LAYERS:
    kg, g, w, saved, window = operands(C, I)
    d = torch.ops.aten.convolution(g, w, None, [2, 2], [0, 0], [1, 1], True, [1, 1], 1).unflatten(0, (J, N))[:, :, :, 1:I + 1, 1:I + 1]
    ref = tb.threshold_backward(d, saved, 0.0).flatten(0, 1).float()
    for cfg in [(128, 128, 32, 4, 4), (64, 128, 32, 4, 4), (128, 64, 32, 4, 4), (64, 64, 64, 4, 3), (128, 128, 32, 8, 4)]:
        line = [f"{lname} {cfg}"]
        for name, m in mods.items():
            try:
                tw = bench(lambda: m.input_vjp(g, w, kg, block=cfg, window=window))
                tf = bench(lambda: m.input_vjp(g, w, kg, block=cfg, window=window, mask=saved))
                got = m.input_vjp(g, w, kg, block=cfg, window=window, mask=saved).float()
                err = ((got - ref).norm() / ref.norm()).item()
                regs = sorted({(c[0].n_regs, c[0].n_spills) for c in m._launch._compiled.values()})
                line.append(f"{name}: window {tw:.3f} +mask {tf:.3f} err {err:.0e} regs/spills {regs}")
                m._launch._compiled.clear()
            except Exception as ex:
                line.append(f"{name}: failed {str(ex)[:150]}")
        print("\n   ".join(line), flush=True)
