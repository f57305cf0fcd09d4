"""End-to-end cost of curvlib's extensions on 3c3d (CIFAR-10 shapes) and All-CNN-C (CIFAR-100 shapes).

    python benchmarks/end_to_end.py [--device cuda] [--batch 128] [--repeats 10] [--out DIR] [--quick]

For each model: a plain forward + backward, then forward + backward inside ``curvlib.curvature``
with one extension at a time. Time: median wall-clock of ``--repeats`` steps after warm-up
(CUDA-synchronised); peak: ``max_memory_allocated`` during one step minus the memory before it.
Also the GGN Gram matrix (``GGNGram`` with ``MSELoss(reduction='sum')``, i.e. twice the empirical
NTK) against an empirical NTK from ``torch.func`` (vmap over jacrev) on 3c3d.
Writes ``end_to_end.jsonl`` and ``end_to_end.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import curvlib  # noqa: E402
from curvlib import extensions as E  # noqa: E402
from curvlib import precision as _precision  # noqa: E402


def three_c_three_d(num_classes: int = 10) -> nn.Module:
    """DeepOBS 3c3d with the layer shapes of the core paper's Table E3a."""
    return nn.Sequential(
        nn.Conv2d(3, 64, 5), nn.ReLU(), nn.MaxPool2d(3, 2, padding=1),
        nn.Conv2d(64, 96, 3), nn.ReLU(), nn.MaxPool2d(3, 2, padding=1),
        nn.ZeroPad2d(1), nn.Conv2d(96, 128, 3), nn.ReLU(), nn.MaxPool2d(3, 2, padding=1),
        nn.Flatten(), nn.Linear(128 * 3 * 3, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(),
        nn.Linear(256, num_classes),
    )


def all_cnn_c(num_classes: int = 100) -> nn.Module:
    """DeepOBS All-CNN-C (without dropout) with the layer shapes of Table E3c."""
    def block(c_in, c_out, stride=1):
        pad = nn.ZeroPad2d((0, 1, 0, 1)) if stride == 2 else nn.ZeroPad2d(1)
        return [pad, nn.Conv2d(c_in, c_out, 3, stride=stride), nn.ReLU()]
    return nn.Sequential(
        *block(3, 96), *block(96, 96), *block(96, 96, 2),
        *block(96, 192), *block(192, 192), *block(192, 192, 2),
        nn.Conv2d(192, 192, 3), nn.ReLU(), nn.Conv2d(192, 192, 1), nn.ReLU(),
        nn.Conv2d(192, num_classes, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )


def measure(step, device, repeats: int):
    for _ in range(2):
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    peak = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        sync()
        peak = (torch.cuda.max_memory_allocated() - before) / 2**20
    return statistics.median(times), min(times), peak


def write_profile(step, path, device):
    """Kernel-level table (torch.profiler, sorted by device time) of one step: where the time goes."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    with open(path, "w") as f:
        f.write(prof.key_averages().table(sort_by=key, row_limit=30))
    print(f"wrote {path}", flush=True)


def _mib(value):
    return "–" if value is None else f"{value:.0f}"


def backpack_extensions():
    """curvlib extension name -> factory of BackPACK's equivalent (empty if BackPACK is not importable)."""
    try:
        import backpack.extensions as B
    except Exception:  # BackPACK is an optional extra
        return {}
    return {
        "DiagGGNMC": lambda: B.DiagGGNMC(mc_samples=1),
        "DiagGGNExact": lambda: B.DiagGGNExact(),
        "KFACExpand(mc)": lambda: B.KFAC(mc_samples=1),
        "KFACExpand(type-2)": lambda: B.KFLR(),
        "BatchGrad": lambda: B.BatchGrad(),
    }


def run_backpack(net, ext_name, make, model, loss_fn, X, y, device, repeats, base):
    """Time BackPACK's equivalent of ``ext_name`` on an extended copy of ``model``."""
    import copy

    from backpack import backpack, extend

    bp_model, bp_loss = extend(copy.deepcopy(model)), extend(copy.deepcopy(loss_fn))
    ext = make()

    def step():
        with backpack(ext):
            bp_model.zero_grad()
            bp_loss(bp_model(X), y).backward()

    name = "BackPACK " + ext_name
    try:
        t, t_min, peak = measure(step, device, repeats)
    except Exception as error:  # out of memory or a layer BackPACK does not support: record and go on
        message = "out of memory" if isinstance(error, torch.cuda.OutOfMemoryError) else f"{type(error).__name__}"
        print(f"{net:10s} {name:28s} failed: {message}: {str(error)[:200]}", flush=True)
        return dict(net=net, ext=name, impl="backpack", error=message)
    finally:
        del bp_model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"{net:10s} {name:28s} {t * 1e3:8.1f} ms  ({t / base:5.2f}x plain)  peak {peak} MiB", flush=True)
    return dict(net=net, ext=name, impl="backpack", s=t, min_s=t_min, peak_mib=peak, vs_plain=t / base)


def set_global_precision(precision: str) -> None:
    """PyTorch's float32 flags for cuBLAS and cuDNN (one API only: mixing them makes torch >= 2.9 raise);
    ``"default"`` leaves PyTorch's defaults (exact cuBLAS products, TF32 cuDNN convolutions)."""
    if precision == "default":
        return
    _precision.set_fp32_precision(precision)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--memory-budget", type=float, default=3.5e9,
                        help="curvature(memory_budget=...) in bytes (default 3.5e9: the 4 GB target leaves room)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--quick", action="store_true", help="batch 4, 1 repeat (CPU smoke test)")
    parser.add_argument("--no-backpack", action="store_true", help="leave BackPACK's equivalents out")
    parser.add_argument("--profile", nargs="*", default=(), metavar="EXT",
                        help="also write a torch.profiler kernel table of one All-CNN-C step per extension named")
    parser.add_argument("--precision", choices=("ieee", "tf32", "default"), default="ieee",
                        help="float32 products of every step (plain, curvlib and BackPACK alike) on the GPU: exact "
                             "(the default), TF32 on the matrix units, or PyTorch's defaults (exact matrix products, "
                             "TF32 convolutions); set through PyTorch's global flags")
    parser.add_argument("--nets", nargs="+", choices=("3c3d", "all_cnn_c"), default=("3c3d", "all_cnn_c"))
    parser.add_argument("--extensions", nargs="+", default=None, metavar="EXT",
                        help="only these extensions (default: all)")
    parser.add_argument("--no-gram", action="store_true", help="leave the GGN Gram / eNTK comparison out")
    parser.add_argument("--no-overlap", action="store_true",
                        help="curvature(overlap=False): KFAC input factors in order instead of on a side stream")
    parser.add_argument("--autotune", action="store_true",
                        help="pathways.configure(autotune=True): curvlib measures its candidates once per layer")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.repeats = 2, 1
    device = torch.device(args.device)
    set_global_precision(args.precision)
    if args.autotune:
        curvlib.pathways.configure(autotune=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    out = args.out or os.path.join("benchmarks", "results", f"{name.replace(' ', '_')}-{datetime.date.today()}")
    os.makedirs(out, exist_ok=True)
    records = []
    extensions = {
        "DiagGGNMC": lambda: E.DiagGGNMC(),
        "DiagGGNExact": lambda: E.DiagGGNExact(),
        "KFACExpand(mc)": lambda: E.KFACExpand(fisher="mc"),
        "KFACExpand(type-2)": lambda: E.KFACExpand(fisher="type-2"),
        "KFACReduce(mc)": lambda: E.KFACReduce(fisher="mc"),
        "KFACReduce(type-2)": lambda: E.KFACReduce(fisher="type-2"),
        "BatchGrad": lambda: E.BatchGrad(),
        "HesScale": lambda: E.HesScale(),
    }
    if args.extensions is not None:
        unknown = sorted(set(args.extensions) - set(extensions))
        if unknown:
            parser.error(f"--extensions: unknown {unknown}; choose from {sorted(extensions)}")
        extensions = {name: make for name, make in extensions.items() if name in args.extensions}
    backpack_equivalents = backpack_extensions() if not args.no_backpack else {}
    # --quick: a CPU smoke test for the test suite (All-CNN-C with 10 classes keeps the exact GGN cheap)
    nets = (("3c3d", three_c_three_d, 10), ("all_cnn_c", all_cnn_c, 10 if args.quick else 100))
    for net, build, classes in nets:
        if net not in args.nets:
            continue
        torch.manual_seed(0)
        model = build(classes).to(device)
        loss_fn = nn.CrossEntropyLoss()
        X = torch.randn(args.batch, 3, 32, 32, device=device)
        y = torch.randint(0, classes, (args.batch,), device=device)

        def plain():
            model.zero_grad()
            loss_fn(model(X), y).backward()

        base, base_min, base_peak = measure(plain, device, args.repeats)
        records.append(dict(net=net, ext="plain", s=base, min_s=base_min, peak_mib=base_peak))
        print(f"{net:10s} plain              {base * 1e3:8.1f} ms  peak {base_peak} MiB", flush=True)
        for ext_name, make in extensions.items():
            ext = make()

            def step():
                with curvlib.curvature(model, loss_fn, ext, memory_budget=args.memory_budget,
                                       overlap=not args.no_overlap):
                    model.zero_grad()
                    loss_fn(model(X), y).backward()

            try:
                t, t_min, peak = measure(step, device, args.repeats)
            except torch.cuda.OutOfMemoryError as error:  # record and go on
                print(f"{net:10s} {ext_name:18s} OOM: {error}", flush=True)
                records.append(dict(net=net, ext=ext_name, error="out of memory"))
                continue
            records.append(dict(net=net, ext=ext_name, s=t, min_s=t_min, peak_mib=peak, vs_plain=t / base))
            print(f"{net:10s} {ext_name:18s} {t * 1e3:8.1f} ms  ({t / base:5.2f}x plain)  peak {peak} MiB", flush=True)
            if ext_name in args.profile and net == "all_cnn_c":
                write_profile(step, os.path.join(out, f"profile_{net}_{ext_name}.txt"), device)
            if ext_name in backpack_equivalents:
                records.append(run_backpack(net, ext_name, backpack_equivalents[ext_name], model, loss_fn, X, y,
                                            device, args.repeats, base))

    relerr = None if args.no_gram else compare_gram(records, device, args.batch, args.repeats)
    write_tables(records, out, name, args, relerr)


def compare_gram(records, device, batch, repeats):
    """GGN Gram (square loss) against a torch.func empirical NTK on 3c3d; returns the relative error."""
    torch.manual_seed(0)
    model = three_c_three_d().to(device)
    X = torch.randn(batch, 3, 32, 32, device=device)
    target = torch.randn(batch, 10, device=device)
    mse = nn.MSELoss(reduction="sum")
    gram = E.GGNGram()

    def curvlib_gram():
        with curvlib.curvature(model, mse, gram):
            model.zero_grad()
            mse(model(X), target).backward()

    params = {k: v.detach() for k, v in model.named_parameters()}

    def func_ntk():
        def f(p, x):
            return torch.func.functional_call(model, p, (x[None],))[0]
        jac = torch.func.vmap(torch.func.jacrev(f), (None, 0))(params, X)
        flat = torch.cat([j.flatten(2) for j in jac.values()], 2)  # [N, 10, P]
        return torch.einsum("nap,mbp->anbm", flat, flat)

    for impl, step in (("GGNGram (curvlib)", curvlib_gram), ("eNTK torch.func", func_ntk)):
        t, t_min, peak = measure(step, device, repeats)
        records.append(dict(net="3c3d", ext=impl, s=t, min_s=t_min, peak_mib=peak))
        print(f"3c3d       {impl:18s} {t * 1e3:8.1f} ms  peak {peak} MiB", flush=True)
    ntk = func_ntk()
    curvlib_gram()
    relerr = ((gram.gram - 2 * ntk).norm() / (2 * ntk).norm()).item()
    print(f"GGN Gram vs 2·eNTK relative error {relerr:.2e}", flush=True)
    return relerr


def write_tables(records, out, name, args, relerr):
    meta = dict(device=name, torch=torch.__version__, date=str(datetime.date.today()), batch=args.batch,
                memory_budget=args.memory_budget, gram_relerr=relerr, precision=args.precision,
                overlap=not args.no_overlap, autotune=args.autotune)
    with open(os.path.join(out, "end_to_end.jsonl"), "w") as f:
        for r in records:
            f.write(json.dumps({**meta, **r}) + "\n")
    with open(os.path.join(out, "end_to_end.md"), "w") as f:
        f.write(f"End to end, batch {args.batch}, {name}, torch {torch.__version__}, {meta['date']}, "
                f"float32 products: {args.precision}, overlap {not args.no_overlap}, autotune {args.autotune}\n\n")
        f.write("Time: median of the steps (forward + backward with the extension); × plain: multiple of one "
                "plain gradient step; peak: extra peak memory of one step (GPU allocator). BackPACK rows run "
                "BackPACK's equivalent extension on an extended copy of the same model and batch.\n\n")
        f.write("| model | extension | curvlib ms | × plain | curvlib peak MiB | BackPACK ms | BackPACK × plain "
                "| BackPACK peak MiB | BackPACK / curvlib time |\n|---|---|---|---|---|---|---|---|---|\n")
        by_key = {(r["net"], r["ext"]): r for r in records}
        for r in records:
            if r.get("impl") == "backpack" or "s" not in r:
                continue
            ratio = f"{r['vs_plain']:.2f}" if "vs_plain" in r else ""
            bp = by_key.get((r["net"], "BackPACK " + r["ext"]), {})
            bp_cells = ["–", "–", "–", "–"]
            if "s" in bp:
                bp_cells = [f"{bp['s'] * 1e3:.1f}", f"{bp['vs_plain']:.2f}", _mib(bp["peak_mib"]),
                            f"{bp['s'] / r['s']:.2f}"]
            elif bp:
                bp_cells[0] = bp.get("error", "–")
            f.write(f"| {r['net']} | {r['ext']} | {r['s'] * 1e3:.1f} | {ratio} | {_mib(r['peak_mib'])} | "
                    + " | ".join(bp_cells) + " |\n")
    print(f"wrote {out}", flush=True)


if __name__ == "__main__":
    main()
