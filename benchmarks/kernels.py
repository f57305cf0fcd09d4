"""GPU benchmark of the fused Triton kernels (:mod:`curvlib.kernels`) on Table E3 layers.

    python benchmarks/kernels.py --out DIR                   # representative layers, all four kernels
    python benchmarks/kernels.py --out DIR --layers anchors  # the 66 anchor layers
    python benchmarks/kernels.py --quick --out DIR           # 3 small layers: smoke test on a GPU
    python benchmarks/kernels.py --summarize DIR             # rebuild DIR/summary.md from DIR/kernels.jsonl

In one process, per layer and operation (``kfc``, ``kfac_reduce``, ``ggn_diag`` with C = 10 columns,
``hesscale_weight_diag``): PT (PyTorch built-ins: ``F.unfold`` + matrix products, the ``pt_*`` functions
of ``ops.py``), TN (``curvlib.functional`` with ``pathway="tn"``) and the fused kernel at each
precision (``--precisions``; for ``kfac_reduce`` also its float32-FMA averaging, ``fused-fma``).
Then the GGN diagonal of All-CNN-C's layers at batch 128 with C = 100 columns: fused vs the
``"unfold"`` pathway vs PT, and the fused kernel's extra memory at C = 10 and C = 100.

Device ceilings are measured in the same run: copy bandwidth (a 1 GiB ``copy_``, bytes read plus
written), float32 / TF32 / bf16 matrix-product rates (8192³ ``torch.mm``). Each kernel's achieved
bandwidth (bytes of its inputs read once and its output written once, over its time) and FLOP rate
(the useful products of the operation) are reported against them; KFAC-reduce against its floor,
the bytes of ``x`` read once at the copy bandwidth.

Protocol as ``ops.py``: float32 inputs, TF32 off for PT and TN; call 1 compiles / autotunes / plans,
call 2 measures extra memory (peak allocated during the call minus allocated before minus the
result) and the result (relative Frobenius error against PT's), then warm-ups and ``--repeats``
timed calls with CUDA events; median reported. Kernels are compiled in parallel worker processes
before the run (``--precompile-workers``) so compilation stays out of the device time.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import gc
import json
import math
import multiprocessing
import os
import statistics
import sys
import time
from typing import Callable, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import torch  # noqa: E402

from curvlib import functional as CF  # noqa: E402
from curvlib import kernels  # noqa: E402
from curvlib import precision as _precision  # noqa: E402
from curvlib.hyperparams import make_geometry  # noqa: E402

import table_e3  # noqa: E402
from ceilings import copy_bandwidth, event_seconds  # noqa: E402
from table_e3 import ConvLayer  # noqa: E402

MIB = 2**20
GIB = 2**30
OPS = ["kfc", "kfac_reduce", "ggn_diag", "hesscale_weight_diag"]

#: layers of the default run: the 14 anchor layers with the largest inputs (KFAC-reduce's target is
#: on the 10 largest) and one or more of every other kind (compute-bound, dense, dense mix, down-sampling,
#: depthwise, patchify, large kernel, small)
REPRESENTATIVE = [
    ("resnext101", "layer2.0.conv2"), ("mobilenetv2", "features.2.conv.1.0"), ("resnext101", "layer1.0.conv2"),
    ("resnext101", "layer2.0.downsample.0"), ("resnext101", "layer3.0.conv2"), ("inceptionv3", "Conv2d.2a.3x3.conv"),
    ("inceptionv3", "Conv2d.2b.3x3.conv"), ("mobilenetv2", "features.3.conv.1.0"), ("resnext101", "layer2.0.conv3"),
    ("resnext101", "layer2.1.conv2"), ("resnext101", "layer4.0.conv2"), ("convnext", "features.1.0.block.0"),
    ("convnext", "features.2.1"), ("mobilenetv2", "features.1.conv.0.0"),
    ("resnet18", "layer4.0.conv2"), ("resnet18", "layer3.0.conv2"), ("resnext101", "layer3.0.conv3"),
    ("inceptionv3", "Mixed.6b.branch7x7.2.conv"), ("alexnet", "features.0"), ("allcnnc", "conv2.1"),
    ("3c3d", "conv1.0"), ("convnext", "features.5.0.block.0"), ("convnext", "features.0.0"),
    ("mobilenetv2", "features.18.0"), ("inceptionv3", "Mixed.7c.branch1x1.conv"),
]

QUICK_LAYERS = [
    ConvLayer("quick", "general", 1, (16, 20, 20), (32, 10, 10), (3, 3), (2, 2), (1, 1), (1, 1), 2, False, "General"),
    ConvLayer("quick", "depthwise", 1, (32, 16, 16), (32, 16, 16), (3, 3), (1, 1), (1, 1), (1, 1), 32, False, "General"),
    ConvLayer("quick", "dense", 1, (64, 8, 8), (32, 8, 8), (1, 1), (1, 1), (0, 0), (1, 1), 1, False, "Dense"),
]


# ----------------------------------------------------------------------------------------------
# inputs and implementations


class Inputs:
    """Random float32 inputs of one layer (``x``; ``s`` ``[C, N, *out]``; ``d`` positive)."""

    def __init__(self, layer: ConvLayer, batch: int, columns: int, ops, device, seed: int = 0):
        self.layer, self.N, self.C = layer, batch, columns
        gen = torch.Generator(device=device).manual_seed(seed)
        self.x = torch.randn(batch, *layer.input_shape, generator=gen, device=device)
        self.s = torch.randn(columns, batch, *layer.output_shape, generator=gen, device=device) \
            if "ggn_diag" in ops else None
        self.d = torch.rand(batch, *layer.output_shape, generator=gen, device=device) \
            if "hesscale_weight_diag" in ops else None
        self.geometry = make_geometry(layer.input_shape[0], layer.output_shape[0], layer.input_shape[1:],
                                      layer.kernel, layer.stride, layer.padding, layer.dilation, layer.groups)
        self.hyper = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups)
        # ops.py's PT references take its Case; built lazily (it draws its own inputs)
        self._case = None

    def pt_case(self):
        import ops

        if self._case is None:
            case = ops.Case.__new__(ops.Case)
            lay = self.layer
            case.layer, case.N, case.C = lay, self.N, self.C
            c_in, c_out, groups = lay.input_shape[0], lay.output_shape[0], lay.groups
            case.G, case.c_in_g, case.c_out_g = groups, c_in // groups, c_out // groups
            case.K = math.prod(lay.kernel)
            case.D = case.c_in_g * case.K
            case.O = math.prod(lay.output_shape[1:])
            case.hyper = self.hyper
            case.x, case.s, case.d, case.w, case.v = self.x, self.s, self.d, None, None
            self._case = case
        return self._case


def implementations(op: str, inp: Inputs, precisions) -> Dict[str, Callable]:
    """``{impl: zero-argument callable}`` for one (layer, op)."""
    import ops

    k, g = inp.layer.kernel, inp.geometry
    x, s, d = inp.x, inp.s, inp.d
    pt = ops.PT[op]
    impls = {"PT": lambda: pt(inp.pt_case())}
    tn = {
        "kfc": lambda: CF.kfc(x, k, **inp.hyper, pathway="tn"),
        "kfac_reduce": lambda: CF.kfac_reduce(x, k, **inp.hyper, pathway="tn"),
        "ggn_diag": lambda: CF.ggn_diag(x, s, k, **inp.hyper, pathway="tn"),
        "hesscale_weight_diag": lambda: CF.hesscale_weight_diag(x, d, k, **inp.hyper, pathway="tn"),
    }[op]
    impls["TN"] = tn
    for p in precisions:
        impls[f"fused-{p}"] = {
            "kfc": lambda p=p: kernels.kfc(x, g, precision=p),
            "kfac_reduce": lambda p=p: kernels.kfac_reduce(x, g, precision=p),
            "ggn_diag": lambda p=p: kernels.ggn_diag(x, s, g, precision=p),
            "hesscale_weight_diag": lambda p=p: kernels.hesscale_weight_diag(x, d, g, precision=p),
        }[op]
    if op == "kfac_reduce" and "ieee" in precisions:
        from curvlib.kernels import _geometry, patch_mean

        kg = _geometry.kernel_geometry(g)
        impls["fused-fma"] = lambda: patch_mean.kfac_reduce_factor(x, kg, "ieee", mode="fma")
    return impls


def work(op: str, inp: Inputs) -> dict:
    """Useful FLOPs and the fewest bytes (inputs read once, output written once) of one call."""
    lay, e = inp.layer, 4
    N, C = inp.N, inp.C
    G = lay.groups
    D = lay.input_shape[0] // G * math.prod(lay.kernel)
    O = math.prod(lay.output_shape[1:])
    c_out = lay.output_shape[0]
    x_bytes = inp.x.numel() * e
    weight = c_out * D
    if op == "kfc":
        counts = dict(flops=2 * G * D * D * N * O, bytes=x_bytes + G * D * D * e)
    elif op == "kfac_reduce":
        counts = dict(flops=2 * G * D * D * N, bytes=x_bytes + G * D * D * e)
    elif op == "ggn_diag":
        counts = dict(flops=2 * C * N * c_out * D * O + 2 * C * N * weight, bytes=x_bytes + inp.s.numel() * e + weight * e)
    else:
        counts = dict(flops=2 * N * c_out * D * O, bytes=x_bytes + inp.d.numel() * e + weight * e)
    return dict(counts, x_bytes=x_bytes)


# ----------------------------------------------------------------------------------------------
# measurement


_time = event_seconds


def measure(fn: Callable, repeats: int, warmups: int = 2, cap_s: float = 1.5):
    """First call (compile, autotune, plan); memory call; warm-ups; timed calls. ``(stats, result)``."""
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    estimate_start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    estimate = time.perf_counter() - estimate_start
    mem = (torch.cuda.max_memory_allocated() - before - out.numel() * out.element_size()) / MIB
    for _ in range(warmups - 1):
        fn()
    n = max(1, min(repeats, int(cap_s / max(estimate, 1e-6))))
    times = [_time(fn) for _ in range(n)]
    return dict(time_s=statistics.median(times), min_s=min(times), repeats=n, mem_mib=mem), out


def relative_error(result: torch.Tensor, reference: torch.Tensor) -> float:
    a, b = result.reshape(-1).double(), reference.reshape(-1).double()
    scale = torch.linalg.vector_norm(b).item()
    return torch.linalg.vector_norm(a - b).item() / scale if scale > 0 else float("nan")


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def _free():
    gc.collect()
    torch.cuda.empty_cache()


def set_tf32(enabled: bool):
    """TF32 for PyTorch's float32 matrix products (off for every measured implementation)."""
    _precision.set_fp32_precision("tf32" if enabled else "ieee")


def ceilings(device) -> dict:
    """Measured copy bandwidth (bytes read + written per second) and matrix-product rates."""
    result = {"copy_bytes_per_s": copy_bandwidth(device)}
    n = 8192
    for name, dtype, tf32 in (("fp32", torch.float32, False), ("tf32", torch.float32, True), ("bf16", torch.bfloat16, False)):
        set_tf32(tf32)
        p, q = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        torch.mm(p, q)
        t = statistics.median([_time(lambda: torch.mm(p, q)) for _ in range(5)])
        result[f"{name}_flops_per_s"] = 2 * n**3 / t
        p = q = None
    set_tf32(False)
    _free()
    return result


# ----------------------------------------------------------------------------------------------
# compiling in parallel: every kernel variant the run will launch, compiled by worker processes into
# Triton's on-disk cache before any timing (the main process then loads them)


class _Recorder:
    """Stands in for a Triton kernel during a dry run on meta tensors: records what would be compiled."""

    def __init__(self, module: str, attribute: str, seen: set):
        self.key, self.seen = (module, attribute), seen

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            args = tuple(a.dtype if isinstance(a, torch.Tensor) else a for a in args)
            self.seen.add((self.key, args, tuple(sorted(kwargs.items()))))
        return record


def kernel_variants(layers, columns_list, precisions, ops) -> list:
    """Dry-run every launcher with every candidate configuration on meta tensors; the launches it records."""
    from curvlib.kernels import _geometry, ggn_unfolded, gram, patch_mean, weight_diag

    seen = set()
    launchers = [gram._launch_kfc, patch_mean._launch_patch_mean, weight_diag._launch_ggn, ggn_unfolded._launch,
                 weight_diag._launch_hesscale]
    originals = [(launcher.kernel, launcher._compiled) for launcher in launchers]
    meta = torch.device("meta")
    try:
        for launcher, (kernel, _) in zip(launchers, originals):
            launcher.kernel, launcher._compiled = _Recorder(kernel.fn.__module__, kernel.fn.__name__, seen), {}
        for layer, batch in layers:
            geometry = make_geometry(layer.input_shape[0], layer.output_shape[0], layer.input_shape[1:], layer.kernel,
                                     layer.stride, layer.padding, layer.dilation, layer.groups)
            kg = _geometry.kernel_geometry(geometry)
            x = torch.empty(batch, *layer.input_shape, device=meta)
            D, O = kg.rows, kg.output_numel
            for precision in precisions:
                unit = gram.unit_class(precision, torch.float32)
                if "kfc" in ops:
                    for cfg in gram.candidates(D, batch * O, kg.groups, meta, unit):
                        gram.kfc_factor(x, kg, precision, 1.0, cfg)
                if "kfac_reduce" in ops:
                    modes = [patch_mean._mode(precision, torch.float32)] + (["fma"] if precision == "ieee" else [])
                    for mode in modes:
                        for cfg in patch_mean.candidates(batch * kg.in_channels, kg.input_numel, kg.kernel_numel,
                                                         meta, mode):
                            patch_mean.patch_means(x, kg, precision, cfg, mode)
                    means = torch.empty(batch, kg.in_channels * kg.kernel_numel, device=meta)
                    trivial = _geometry.trivial_geometry(kg.groups, means.shape[1])
                    for cfg in gram.candidates(D, batch, kg.groups, meta, unit):
                        gram.kfc_factor(means, trivial, precision, 1.0, cfg)
                if "ggn_diag" in ops:
                    for columns in columns_list:
                        s = torch.empty(columns, batch, *layer.output_shape, device=meta)
                        for cfg in weight_diag.ggn_candidates(columns, kg.out_channels_per_group, D, O, unit):
                            weight_diag.ggn_diag(x, s, kg, False, precision, cfg)
                if "hesscale_weight_diag" in ops:
                    d = torch.empty(batch, *layer.output_shape, device=meta)
                    for cfg in weight_diag.hesscale_candidates(kg.out_channels_per_group, D, unit):
                        weight_diag.hesscale_weight_diag(x, d, kg, False, precision, cfg)
    finally:
        for launcher, (kernel, compiled) in zip(launchers, originals):
            launcher.kernel, launcher._compiled = kernel, compiled
    # one launch per compiled variant: integers are not specialised (do_not_specialize), so launches
    # differing only in integer values share one binary
    unique = {}
    for key, args, kwargs in seen:
        signature = (key, tuple(a if isinstance(a, torch.dtype) else type(a).__name__ for a in args), kwargs)
        unique.setdefault(signature, (key, args, kwargs))
    return sorted(unique.values(), key=repr)


def _compile_variant(variant) -> str:
    import importlib

    (module, attribute), args, kwargs = variant
    kernel = getattr(importlib.import_module(module), attribute)
    started = time.perf_counter()
    kernel.warmup(*args, grid=(1,), **dict(kwargs))
    return f"{attribute} {dict(kwargs)} {time.perf_counter() - started:.1f}s"


def precompile(variants, workers: int) -> dict:
    started = time.perf_counter()
    failures = []
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = {pool.submit(_compile_variant, v): v for v in variants}
        for future in concurrent.futures.as_completed(futures):
            try:
                future.result()
            except Exception as error:  # reported; the run compiles (or fails) it again in place
                failures.append(f"{futures[future][0][1]} {dict(futures[future][2])}: {str(error)[:300]}")
    return dict(variants=len(variants), seconds=time.perf_counter() - started, failures=failures)


# ----------------------------------------------------------------------------------------------
# run


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results/h100-kernels)")
    p.add_argument("--quick", action="store_true", help="3 small layers, batch 4, no All-CNN-C part")
    p.add_argument("--layers", default="representative", choices=["representative", "anchors"])
    p.add_argument("--ops", nargs="+", default=OPS, choices=OPS)
    p.add_argument("--precisions", nargs="+", default=["ieee", "tf32"], choices=list(kernels.PRECISIONS))
    p.add_argument("--impls", nargs="+", default=["PT", "TN", "fused"], choices=["PT", "TN", "fused"])
    p.add_argument("--columns", type=int, default=10, help="columns C of s for ggn_diag on Table E3 layers")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--allcnnc", action=argparse.BooleanOptionalAction, default=True,
                   help="also the GGN diagonal of All-CNN-C's layers, batch 128, C = 100")
    p.add_argument("--allcnnc-precisions", nargs="+", default=["ieee", "tf32", "bf16"])
    p.add_argument("--precompile-workers", type=int, default=min(14, os.cpu_count() or 1))
    p.add_argument("--deadline-s", type=float, default=200.0,
                   help="skip the Table E3 layers left after this many seconds (All-CNN-C still runs)")
    p.add_argument("--summarize", metavar="DIR", default=None)
    return p.parse_args(argv)


def _emit(path: str, record: dict) -> dict:
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")
    return record


def run_layers(args, layers, env, path, started, peaks) -> None:
    for index, layer in enumerate(layers):
        batch = 4 if args.quick else layer.batch_size
        inp = None
        for op in args.ops:
            base = dict(section="e3", net=layer.net, layer=layer.name, type=layer.type, op=op, N=batch,
                        C=args.columns if op == "ggn_diag" else None, **env)
            if time.perf_counter() - started > args.deadline_s:
                _emit(path, dict(base, status="skipped", reason="deadline"))
                continue
            try:
                inp = inp or Inputs(layer, batch, args.columns, args.ops, "cuda", seed=index)
                impls = implementations(op, inp, args.precisions)
            except Exception as error:
                _emit(path, dict(base, status="oom" if _is_oom(error) else "error", reason=str(error)[:300]))
                _free()
                continue
            impls = {k: v for k, v in impls.items() if k.split("-")[0] in args.impls or k == "PT"}
            counts = work(op, inp)
            reference, line = None, [f"{layer.net}/{layer.name} {op}:"]
            for impl, fn in impls.items():
                record = dict(base, impl=impl, **counts)
                try:
                    stats, out = measure(fn, args.repeats)
                    record.update(status="ok", **stats)
                    if reference is None:
                        reference = out.float()
                    else:
                        record["relerr_vs_pt"] = relative_error(out, reference)
                    record["gb_per_s"] = counts["bytes"] / stats["time_s"] / 1e9
                    record["tflop_per_s"] = counts["flops"] / stats["time_s"] / 1e12
                    record["bandwidth_efficiency"] = counts["bytes"] / stats["time_s"] / peaks["copy_bytes_per_s"]
                    ceiling = peaks["fp32_flops_per_s"] if impl in ("PT", "TN", "fused-ieee", "fused-fma") else \
                        peaks["bf16_flops_per_s" if impl == "fused-bf16" else "tf32_flops_per_s"]
                    record["flop_efficiency"] = counts["flops"] / stats["time_s"] / ceiling
                    line.append(f"{impl} {stats['time_s'] * 1e3:.3f}ms/{stats['mem_mib']:.0f}MiB")
                    del out
                except Exception as error:
                    record.update(status="oom" if _is_oom(error) else "error", reason=f"{type(error).__name__}: {str(error)[:400]}")
                    line.append(f"{impl} {record['status']}")
                _emit(path, record)
                _free()
            print(" ".join(line), flush=True)
        del inp
        _free()


def run_allcnnc(args, env, path, peaks) -> None:
    """GGN diagonal of All-CNN-C's conv layers, batch 128, C = 100 (and C = 10 for the memory check)."""
    import ops

    layers = table_e3.layers(["allcnnc"], subset="all")
    for columns in (100, 10):
        for index, layer in enumerate(layers):
            inp = Inputs(layer, 128, columns, ["ggn_diag"], "cuda", seed=100 + index)
            impls = {f"fused-{p}": (lambda p=p: kernels.ggn_diag(inp.x, inp.s, inp.geometry, precision=p))
                     for p in (args.allcnnc_precisions if columns == 100 else ["ieee"])}
            if columns == 100:
                impls["unfold"] = lambda: CF.ggn_diag(inp.x, inp.s, layer.kernel, **inp.hyper, pathway="unfold")
                impls["PT"] = lambda: ops.pt_ggn_diag(inp.pt_case())
            counts = work("ggn_diag", inp)
            reference, line = None, [f"allcnnc/{layer.name} ggn_diag C={columns}:"]
            for impl, fn in impls.items():
                record = dict(section="allcnnc", net="allcnnc", layer=layer.name, op="ggn_diag", N=128, C=columns,
                              impl=impl, **counts, **env)
                try:
                    stats, out = measure(fn, 3)
                    record.update(status="ok", **stats, tflop_per_s=counts["flops"] / stats["time_s"] / 1e12)
                    if reference is None:
                        reference = out.float()
                    record["relerr_vs_first"] = relative_error(out, reference)
                    line.append(f"{impl} {stats['time_s'] * 1e3:.2f}ms/{stats['mem_mib']:.0f}MiB")
                    del out
                except Exception as error:
                    record.update(status="oom" if _is_oom(error) else "error", reason=f"{type(error).__name__}: {str(error)[:400]}")
                    line.append(f"{impl} {record['status']}")
                _emit(path, record)
                _free()
            print(" ".join(line), flush=True)
            inp = None
            _free()


def probe_overhead(env, path) -> None:
    """Host time per call on a tiny layer (the GPU work is a few microseconds): fused with and without
    launching the compiled kernel directly (``CURVLIB_KERNEL_FAST_LAUNCH``), and PT."""
    by_key = {layer.key: layer for layer in table_e3.LAYERS}
    layer = by_key[("mobilenetv2", "features.18.0")]
    inp = Inputs(layer, 32, 2, OPS, "cuda")
    result = {}
    for op in OPS:
        impls = implementations(op, inp, ["ieee"])
        for name in ("PT", "fused-ieee"):
            for fast in (("1", "0") if name != "PT" else ("1",)):
                os.environ["CURVLIB_KERNEL_FAST_LAUNCH"] = fast
                fn = impls[name]
                for _ in range(3):
                    fn()
                torch.cuda.synchronize()
                started = time.perf_counter()
                for _ in range(50):
                    fn()
                torch.cuda.synchronize()
                label = name if name == "PT" else f"{name} fast={fast}"
                result[f"{op} {label}"] = (time.perf_counter() - started) / 50
    os.environ["CURVLIB_KERNEL_FAST_LAUNCH"] = "1"
    # where the host time of the fused KFAC-reduce goes (two kernels, two small allocations)
    import cProfile
    import io
    import pstats

    profile = cProfile.Profile()
    fn = implementations("kfac_reduce", inp, ["ieee"])["fused-ieee"]
    profile.enable()
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    profile.disable()
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(12)
    # device time per kernel of the fused calls (is a tiny call bound by the GPU or the host?)
    device_table = None
    try:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        fused = [implementations(op, inp, ["ieee"])["fused-ieee"] for op in OPS]
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for fn in fused:
                for _ in range(10):
                    fn()
            torch.cuda.synchronize()
        device_table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=40)
        print(device_table, flush=True)
    except Exception as error:  # profiler unavailable: the host-time numbers stand alone
        device_table = f"profiler failed: {error!r}"
    _emit(path, dict(section="overhead", layer=f"{layer.net}/{layer.name}", seconds_per_call=result,
                     kfac_reduce_profile=text.getvalue()[-3000:], device_table=device_table, **env))
    print("per call: " + ", ".join(f"{k} {v * 1e6:.0f}us" for k, v in result.items()), flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    out_dir = args.summarize or args.out or os.path.join(HERE, "results", "h100-kernels")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "kernels.jsonl")
    if args.summarize:
        write_summary([json.loads(line) for line in open(path)], out_dir)
        return 0
    if not torch.cuda.is_available():
        sys.exit("kernels.py measures GPU kernels: no CUDA device")
    started = time.perf_counter()
    open(path, "w").close()
    from curvlib.kernels import _triton

    env = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=_triton.version(),
               date=datetime.datetime.now().isoformat(timespec="seconds"))
    if args.quick:
        layers = QUICK_LAYERS
    elif args.layers == "anchors":
        layers = table_e3.layers()
    else:
        by_key = {layer.key: layer for layer in table_e3.LAYERS}
        layers = [by_key[key] for key in REPRESENTATIVE]
    batches = [(layer, 4 if args.quick else layer.batch_size) for layer in layers]
    compile_jobs = [(batches, [args.columns], args.precisions, args.ops)]
    if args.allcnnc and not args.quick:
        allc = [(layer, 128) for layer in table_e3.layers(["allcnnc"], subset="all")]
        compile_jobs.append((allc, [100, 10], args.allcnnc_precisions, ["ggn_diag"]))
    variants = {}
    for job in compile_jobs:
        for key, call_args, kwargs in kernel_variants(*job):
            signature = (key, tuple(a if isinstance(a, torch.dtype) else type(a).__name__ for a in call_args), kwargs)
            variants.setdefault(signature, (key, call_args, kwargs))
    variants = list(variants.values())
    if args.precompile_workers > 0:
        report = precompile(variants, args.precompile_workers)
        print(f"precompiled {report['variants']} kernel variants in {report['seconds']:.1f}s with "
              f"{args.precompile_workers} workers; failures: {report['failures'] or 'none'}", flush=True)
        _emit(path, dict(section="precompile", **report, **env))
    peaks = ceilings(torch.device("cuda"))
    _emit(path, dict(section="ceilings", **peaks, **env))
    print("ceilings: copy {:.0f} GB/s, fp32 {:.1f} TFLOP/s, tf32 {:.0f} TFLOP/s, bf16 {:.0f} TFLOP/s".format(
        peaks["copy_bytes_per_s"] / 1e9, peaks["fp32_flops_per_s"] / 1e12, peaks["tf32_flops_per_s"] / 1e12,
        peaks["bf16_flops_per_s"] / 1e12), flush=True)
    set_tf32(False)
    probe_overhead(env, path)
    run_layers(args, layers, env, path, started, peaks)
    if args.allcnnc and not args.quick:
        run_allcnnc(args, env, path, peaks)
    from curvlib.kernels import autotune

    _emit(path, dict(section="autotune", choices={f: {repr(k): repr(v) for k, v in c.items()}
                                                   for f, c in autotune.chosen().items()}, **env))
    write_summary([json.loads(line) for line in open(path)], out_dir)
    print(f"total {time.perf_counter() - started:.0f}s; wrote {out_dir}/summary.md", flush=True)
    return 0


# ----------------------------------------------------------------------------------------------
# summary


def _geomean(values):
    values = [v for v in values if v and v > 0 and math.isfinite(v)]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def write_summary(records: List[dict], out_dir: str) -> None:
    ok = [r for r in records if r.get("status") == "ok"]
    peaks = next((r for r in records if r.get("section") == "ceilings"), None)
    lines = ["# Fused kernels (curvlib.kernels) on Table E3 layers", ""]
    env = next((r for r in records if "device" in r), {})
    lines.append(f"Device {env.get('device')}, torch {env.get('torch')}, Triton {env.get('triton')}, {env.get('date')}. "
                 "float32 inputs; PT/TN with TF32 off. Times: median of CUDA-event-timed calls after compile/autotune "
                 "and warm-up. Extra memory: peak allocated during a call minus allocated before minus the result.")
    lines.append("")
    if peaks:
        lines.append(f"Measured ceilings: copy {peaks['copy_bytes_per_s'] / 1e9:.0f} GB/s (read + write), "
                     f"fp32 matmul {peaks['fp32_flops_per_s'] / 1e12:.1f} TFLOP/s, "
                     f"TF32 {peaks['tf32_flops_per_s'] / 1e12:.0f} TFLOP/s, bf16 {peaks['bf16_flops_per_s'] / 1e12:.0f} TFLOP/s.")
        lines.append("")
    pre = next((r for r in records if r.get("section") == "precompile"), None)
    if pre:
        lines.append(f"{pre['variants']} kernel variants compiled before the run in {pre['seconds']:.0f} s "
                     f"(failures: {len(pre['failures'])}).")
        lines.append("")

    over = next((r for r in records if r.get("section") == "overhead"), None)
    if over:
        lines.append(f"Host time per call on {over['layer']} (tiny: mostly launch overhead): " + ", ".join(
            f"{k} {v * 1e6:.0f} µs" for k, v in over["seconds_per_call"].items()) + ".")
        lines.append("")
    e3 = [r for r in ok if r.get("section") == "e3"]
    by = {}
    for r in e3:
        by.setdefault((r["op"], r["net"], r["layer"]), {})[r["impl"]] = r
    impls = sorted({r["impl"] for r in e3 if r["impl"].startswith("fused")},
                   key=lambda i: ["fused-ieee", "fused-fma", "fused-tf32x3", "fused-tf32", "fused-bf16"].index(i)
                   if i in ["fused-ieee", "fused-fma", "fused-tf32x3", "fused-tf32", "fused-bf16"] else 9)
    targets = []
    for op in OPS:
        rows = {k: v for k, v in by.items() if k[0] == op and "PT" in v}
        if not rows:
            continue
        lines.append(f"## {op}")
        lines.append("")
        header = ["layer", "PT ms", "TN ms"] + [f"{i[6:]} ms" for i in impls] + [f"{i[6:]}/PT" for i in impls] + \
                 ["PT MiB", "TN MiB", "fused MiB (max)"] + ["ieee GB/s (eff.)", "ieee TFLOP/s (eff.)", "best rel. err."]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for (_, net, layer), v in rows.items():
            pt = v["PT"]["time_s"]
            cells = [f"{net}/{layer}", f"{pt * 1e3:.3f}", f"{v['TN']['time_s'] * 1e3:.3f}" if "TN" in v else ""]
            cells += [f"{v[i]['time_s'] * 1e3:.3f}" if i in v else "" for i in impls]
            cells += [f"{v[i]['time_s'] / pt:.2f}" if i in v else "" for i in impls]
            fused_mem = max((v[i]["mem_mib"] for i in impls if i in v), default=float("nan"))
            cells += [f"{v['PT']['mem_mib']:.0f}", f"{v['TN']['mem_mib']:.0f}" if "TN" in v else "", f"{fused_mem:.1f}"]
            f = v.get("fused-ieee")
            cells += [f"{f['gb_per_s']:.0f} ({f['bandwidth_efficiency']:.0%})" if f else "",
                      f"{f['tflop_per_s']:.1f} ({f['flop_efficiency']:.0%})" if f else ""]
            errs = [v[i].get("relerr_vs_pt") for i in impls if i in v and v[i].get("relerr_vs_pt") is not None]
            cells.append(f"{min(errs):.1e}" if errs else "")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        for impl in impls:
            ratios = [v[impl]["time_s"] / v["PT"]["time_s"] for v in rows.values() if impl in v]
            # memory ratio over layers where PT needs at least 1 MiB (below, both are noise)
            mem = [v[impl]["mem_mib"] / v["PT"]["mem_mib"] for v in rows.values() if impl in v and v["PT"]["mem_mib"] >= 1]
            if ratios:
                lines.append(f"- {impl}: geometric mean time / PT = **{_geomean(ratios):.2f}** over {len(ratios)} layers "
                             f"(max {max(ratios):.2f}); extra memory / PT's at most {max(mem, default=0):.1%}")
                targets.append((op, impl, _geomean(ratios), max(mem, default=0), len(ratios)))
        if op == "kfac_reduce" and peaks:
            def x_bytes(record):
                return record.get("x_bytes", record["N"] * math.prod(
                    next(l.input_shape for l in table_e3.LAYERS if (l.net, l.name) == (record["net"], record["layer"]))) * 4)

            largest = sorted(rows.items(), key=lambda kv: -x_bytes(kv[1]["PT"]))[:10]
            lines.append("")
            lines.append("Against the bandwidth floor (bytes of x read once at the measured copy bandwidth) on the 10 "
                         "largest inputs (time / floor): " + ", ".join(
                             f"{k[1]}/{k[2]} {v['fused-ieee']['time_s'] / (x_bytes(v['PT']) / peaks['copy_bytes_per_s']):.1f}x"
                             for k, v in largest if "fused-ieee" in v))
        lines.append("")

    allc = [r for r in ok if r.get("section") == "allcnnc"]
    if allc:
        lines.append("## GGN diagonal, All-CNN-C, batch 128")
        lines.append("")
        impls_a = list(dict.fromkeys(r["impl"] for r in allc if r["C"] == 100))
        lines.append("| layer | " + " | ".join(f"{i} ms (MiB)" for i in impls_a) + " | fused-ieee MiB at C=10 |")
        lines.append("|---|" + "---|" * (len(impls_a) + 1))
        totals = {i: 0.0 for i in impls_a}
        for layer in dict.fromkeys(r["layer"] for r in allc):
            cells = [layer]
            for impl in impls_a:
                r = next((r for r in allc if r["layer"] == layer and r["impl"] == impl and r["C"] == 100), None)
                cells.append(f"{r['time_s'] * 1e3:.2f} ({r['mem_mib']:.0f})" if r else "")
                if r:
                    totals[impl] += r["time_s"]
            r10 = next((r for r in allc if r["layer"] == layer and r["impl"] == "fused-ieee" and r["C"] == 10), None)
            cells.append(f"{r10['mem_mib']:.0f}" if r10 else "")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("| **total** | " + " | ".join(f"**{t * 1e3:.1f}**" for t in totals.values()) + " | |")
        lines.append("")
        if "unfold" in totals:
            for impl in impls_a:
                if impl.startswith("fused") and totals[impl] > 0:
                    lines.append(f"- {impl}: {totals['unfold'] / totals[impl]:.1f}x faster than the unfold pathway "
                                 f"over the 9 layers")
        lines.append("")
    if targets:
        lines.append("## Summary per kernel and precision")
        lines.append("")
        lines.append("| op | impl | layers | geo-mean time / PT | max extra memory / PT's |")
        lines.append("|---|---|---|---|---|")
        for op, impl, g, m, n in targets:
            lines.append(f"| {op} | {impl} | {n} | {g:.2f} | {m:.1%} |")
        lines.append("")
    errors = [r for r in records if r.get("status") in ("error", "oom")]
    if errors:
        lines.append("## Errors")
        lines.append("")
        for r in errors[:40]:
            lines.append(f"- {r.get('net')}/{r.get('layer')} {r.get('op')} {r.get('impl')}: {r['status']} {r.get('reason', '')[:200]}")
    with open(os.path.join(out_dir, "summary.md"), "w") as handle:
        handle.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
