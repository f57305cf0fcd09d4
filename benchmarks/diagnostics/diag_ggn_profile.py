"""Where DiagGGNExact's device time goes: one end-to-end step profiled, by kernel category and by ATen op.

    python benchmarks/diagnostics/diag_ggn_profile.py --precision tf32 --memory-budget 3.5e9
    python benchmarks/diagnostics/diag_ggn_profile.py --precision tf32 --compare   # + fused-only, autotuned
    python benchmarks/diagnostics/diag_ggn_profile.py --precision tf32 --cudnn-benchmark   # cuDNN autotuned
    python benchmarks/diagnostics/diag_ggn_profile.py --column-backward autograd     # vmap over autograd
    python benchmarks/diagnostics/diag_ggn_profile.py --channels-last   # graph walk, channels-last dgrads
    python benchmarks/diagnostics/diag_ggn_profile.py --curvlib-precision bf16 --accuracy   # bf16 columns

One training step of a network of ``benchmarks/end_to_end.py`` (All-CNN-C or 3c3d; batch 128) inside
``curvlib.curvature(model, loss, DiagGGNExact(), memory_budget=...)``. Printed:

- the step's wall time (median of ``--repeats`` after two warm-ups; "host": until the step's Python returned,
  before the device finished), its extra peak memory (allocator peak
  during the step minus what was allocated before), the columns per chunk, the stages and the pathway the
  automatic choice took for each layer's GGN diagonal (by configuration key, in the order the layers were
  reached);
- with ``--compare``, the same for the fused kernel only (``exclude=("native",)``) and for measured
  (autotuned) pathway decisions;
- with ``--gaps``, the device's idle time between kernels, by the Python function launching the kernel after each gap;
- with ``--memory-peak``, the tensors alive at one step's allocator peak, summed by the line that allocated them;
- with ``--accuracy``, the relative error of each parameter's diagonal against a float64 step (``--curvlib-precision``:
  ``pathways.configure(precision=...)``, e.g. ``bf16`` for bfloat16 column passes);
- the device time of one profiled step summed by kernel category (cuDNN/cuBLAS products, copies and
  other elementwise kernels, reductions, ReLU backward, curvlib's Triton kernels) and the ATen ops with
  the most self device time, grouped by input shapes.

Needs a CUDA device.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # benchmarks/
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repository root

import torch  # noqa: E402
from torch import nn  # noqa: E402

import curvlib  # noqa: E402
from curvlib import extensions as E  # noqa: E402
from curvlib import pathways  # noqa: E402
from curvlib.engine.batched_rules import BackwardOptions  # noqa: E402

import end_to_end  # noqa: E402

#: kernel-name fragments per category, first match wins (Triton kernels: names starting with "_")
CATEGORIES = [
    ("curvlib Triton GGN", ("_ggn_diag",)),
    ("cuDNN layout transposes", ("nchwtonhwc", "nhwctonchw")),
    ("cuDNN/cuBLAS products", ("dgrad", "wgrad", "fprop", "xmma", "gemm", "cutlass", "implicit")),
    ("ReLU backward", ("threshold", "where")),
    ("reductions", ("reduce_kernel",)),
    ("copies and elementwise", ("elementwise", "copy", "memcpy", "memset")),
]


def category(name: str) -> str:
    low = name.lower()
    for label, fragments in CATEGORIES:
        if any(f in low for f in fragments):
            return label
    return "other Triton" if name.startswith("_") else "other"


def build(args, device):
    torch.manual_seed(0)
    make = {"all_cnn_c": end_to_end.all_cnn_c, "3c3d": end_to_end.three_c_three_d}[args.net]
    model = make(args.classes).to(device)
    x = torch.randn(args.batch, 3, 32, 32, device=device)
    y = torch.randint(0, args.classes, (args.batch,), device=device)
    loss_fn = nn.CrossEntropyLoss()

    def step(dtype=torch.float32):
        ctx = curvlib.curvature(model, loss_fn, E.DiagGGNExact(), memory_budget=args.memory_budget,
                                column_backward=args.column_backward, replay_chunks=not args.no_replay)
        ctx.backward_options = BackwardOptions(channels_last=args.channels_last)
        with ctx:
            model.zero_grad()
            loss_fn(model(x.to(dtype)), y).backward()
        return ctx

    return step, model


def accuracy(step, model) -> None:
    """Relative error (Frobenius) of each parameter's diagonal from ``step`` against a float64 step."""
    step()
    got = [p.diag_ggn_exact.double() for p in model.parameters()]
    model.double()
    try:
        with pathways.options(precision=None):
            step(torch.float64)
        expected = [p.diag_ggn_exact for p in model.parameters()]
    finally:
        model.float()
    errors = [((g - e).norm() / e.norm()).item() for g, e in zip(got, expected)]
    total = (sum(((g - e) ** 2).sum() for g, e in zip(got, expected)) ** 0.5
             / sum((e ** 2).sum() for e in expected) ** 0.5).item()
    print(f"relative error against float64: all parameters {total:.2e}, per parameter max {max(errors):.2e}, "
          f"median {statistics.median(errors):.2e}")
    print("    " + " ".join(f"{e:.1e}" for e in errors))


def warmed_up(step):
    """The step after fresh pathway decisions and two warm-up steps (compilation, decisions, allocator);
    returns the last warm-up's context."""
    pathways.clear()
    for _ in range(2):
        ctx = step()
    torch.cuda.synchronize()
    return ctx


def profiled(step, **options):
    """One step under the profiler (CPU and CUDA activities; ``options`` for ``torch.profiler.profile``)."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities, **options) as prof:
        step()
        torch.cuda.synchronize()
    return prof


def measure(label: str, step, repeats: int, **options) -> None:
    with pathways.options(**options):
        ctx = warmed_up(step)
        torch.cuda.reset_peak_memory_stats()
        base, base_reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
        times, host = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            step()
            host.append(time.perf_counter() - start)  # the step's Python and launches, before the device is done
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated() - base
        reserved = torch.cuda.max_memory_reserved() - base_reserved  # beyond what warming up reserved
        decisions = [decision for decision in pathways._DECISIONS.values() if decision.op == "ggn_diag"]
    stages = None if ctx.last_stages is None else [len(s.calls) + len(s.gate_calls) for s in ctx.last_stages]
    print(f"{label}: {statistics.median(times) * 1e3:.1f} ms (host {statistics.median(host) * 1e3:.1f} ms), "
          f"extra peak {peak / 1e9:.2f} GB (reserved {torch.cuda.memory_reserved() / 1e9:.2f} GB, "
          f"{reserved / 1e9:.2f} GB more while timing), "
          f"{ctx.last_chunk_size} columns per chunk, {ctx.last_replays} replayed, layers per stage {stages}, "
          f"column backward {ctx.last_column_backward}, messages {ctx.last_message_dtype}", flush=True)
    for decision in decisions:  # in the order the layers were reached (the stages run the last layers first)
        print(f"    GGN diagonal {decision.key}: {decision.choice} ({decision.how})")


def memory_at_peak(step, top: int = 20) -> None:
    """The tensors alive at the allocator's peak during one step, summed by the curvlib line that allocated
    them (the allocator's trace replayed; blocks allocated before the step are not counted)."""
    warmed_up(step)
    torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
    try:
        step()
        torch.cuda.synchronize()
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    live, current, peak, at_peak = {}, 0, 0, {}
    for event in snapshot["device_traces"][torch.cuda.current_device()]:
        if event["action"] == "alloc":
            live[event["addr"]] = event
            current += event["size"]
            if current > peak:
                peak, at_peak = current, dict(live)
        elif event["action"] == "free_completed" and event["addr"] in live:
            current -= live.pop(event["addr"])["size"]

    def site(event) -> str:
        frames = [f for f in event.get("frames", []) if "curvlib" in f["filename"] or "benchmarks" in f["filename"]]
        return " < ".join(f"{os.path.basename(f['filename'])}:{f['line']} {f['name']}" for f in frames[:3]) or "?"

    sizes, counts = collections.Counter(), collections.Counter()
    for event in at_peak.values():
        sizes[site(event)] += event["size"]
        counts[site(event)] += 1
    print(f"\nlive at the step's peak: {peak / 1e9:.2f} GB in {len(at_peak)} blocks, by allocating line")
    for where, size in sizes.most_common(top):
        print(f"  {size / 1e6:9.1f} MB  {counts[where]:4d} blocks  {where}")


def device_gaps(step, top: int = 15, threshold_us: float = 20.0) -> None:
    """Where the device waits for the host during one step: the idle intervals between kernels (over
    ``threshold_us``), summed by the Python function (innermost curvlib or benchmark frame) that
    launched the kernel ending each. Traced with Python stacks, which slow the host down: the sums
    show where the host is late, not by exactly how much."""
    import json
    import tempfile

    warmed_up(step)
    prof = profiled(step, with_stack=True)
    with tempfile.NamedTemporaryFile(suffix=".json") as handle:
        prof.export_chrome_trace(handle.name)
        events = json.load(open(handle.name))["traceEvents"]
    device = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")),
                    key=lambda e: e["ts"])
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {})}
    frames = [e for e in events if e.get("cat") == "python_function"
              and ("curvlib" in e["name"] or "benchmarks" in e["name"])]
    frames.sort(key=lambda e: e["ts"])

    def launcher(kernel) -> str:
        launch = launches.get(kernel.get("args", {}).get("correlation"))
        if launch is None:
            return "?"
        inside = [f for f in frames if f["tid"] == launch["tid"] and f["ts"] <= launch["ts"] <= f["ts"] + f["dur"]]
        return min(inside, key=lambda f: f["dur"])["name"] if inside else "?"

    totals, counts, idle, largest = collections.Counter(), collections.Counter(), 0.0, []
    for before, after in zip(device, device[1:]):
        gap = after["ts"] - (before["ts"] + before["dur"])
        if gap > threshold_us:
            where = launcher(after)
            totals[where] += gap
            counts[where] += 1
            idle += gap
            largest.append((gap, after["ts"] - device[0]["ts"], where))
    span = device[-1]["ts"] + device[-1]["dur"] - device[0]["ts"] if device else 0.0
    print(f"\ndevice idle between kernels (gaps over {threshold_us:.0f} us, traced with Python stacks): "
          f"{idle / 1e3:.1f} of {span / 1e3:.1f} ms, by the function launching the kernel after the gap")
    steps = [f for f in frames if f["name"].endswith(": step")]
    if steps and device:  # the host's time around the device's: before the first kernel, after the last
        first = steps[-1]
        print(f"  step (host, traced): {first['dur'] / 1e3:.2f} ms; first kernel after "
              f"{(device[0]['ts'] - first['ts']) / 1e3:.2f} ms, last kernel ends "
              f"{(first['ts'] + first['dur'] - device[-1]['ts'] - device[-1]['dur']) / 1e3:.2f} ms before the step returns")
    for where, total in totals.most_common(top):
        print(f"  {total / 1e3:7.2f} ms  {counts[where]:4d} gaps  {where}")
    print("  the largest gaps (length, when after the first kernel, launching function):")
    for gap, when, where in sorted(largest, reverse=True)[:top]:
        print(f"    {gap / 1e3:6.2f} ms at {when / 1e3:6.2f} ms  {where}")


def profile(step, exclude=()) -> None:
    with pathways.options(exclude=tuple(exclude)):
        warmed_up(step)
        prof = profiled(step, record_shapes=True)
    totals, counts = collections.Counter(), collections.Counter()
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        label = category(event.name)
        totals[label] += event.device_time_total / 1e3
        counts[label] += 1
    print(f"\ndevice time of one step: {sum(totals.values()):.1f} ms")
    for label, ms in totals.most_common():
        print(f"  {label:26s} {ms:8.2f} ms  ({counts[label]} kernels)")
    print("\nATen ops by self device time:")
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=50))
    print("\nATen ops by self device time, grouped by input shapes:")
    print(prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_device_time_total", row_limit=30, max_name_column_width=34, max_shapes_column_width=70))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--precision", choices=["ieee", "tf32", "default"], default="tf32")
    parser.add_argument("--memory-budget", type=float, default=3.5e9)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--net", choices=("all_cnn_c", "3c3d"), default="all_cnn_c")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compare", action="store_true", help="also the fused kernel only and autotuned decisions")
    parser.add_argument("--cudnn-benchmark", action="store_true",
                        help="torch.backends.cudnn.benchmark = True (cuDNN times its algorithms per shape)")
    parser.add_argument("--column-backward", choices=("auto", "graph", "autograd"), default="auto",
                        help="curvature(column_backward=...): the engine's graph walk or vmap over autograd")
    parser.add_argument("--channels-last", action="store_true",
                        help="the graph walk's data gradients channels-last (BackwardOptions(channels_last=True))")
    parser.add_argument("--curvlib-precision", choices=("none", "ieee", "tf32", "bf16"), default="none",
                        help="pathways.configure(precision=...): bf16 carries the columns in bfloat16")
    parser.add_argument("--accuracy", action="store_true", help="also the error against a float64 step")
    parser.add_argument("--no-replay", action="store_true",
                        help="curvature(replay_chunks=False): every chunk of columns runs eagerly")
    parser.add_argument("--gaps", action="store_true",
                        help="also where the device waits for the host (one step traced with Python stacks)")
    parser.add_argument("--memory-peak", action="store_true",
                        help="also the tensors alive at one step's memory peak, by the line that allocated them")
    parser.add_argument("--profile-exclude", nargs="*", default=[], metavar="PATHWAY",
                        help="pathways the profiled step may not use (e.g. native: the fused kernel only)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("diag_ggn_profile.py needs a CUDA device")
    end_to_end.set_global_precision(args.precision)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, precision {args.precision}, "
          f"cudnn.benchmark {args.cudnn_benchmark}, column_backward {args.column_backward}, "
          f"channels_last {args.channels_last}, curvlib precision {args.curvlib_precision}, "
          f"memory_budget {args.memory_budget:.3g} bytes, batch {args.batch}, {args.classes} classes")
    pathways.configure(precision=None if args.curvlib_precision == "none" else args.curvlib_precision)
    step, model = build(args, torch.device("cuda"))
    measure("automatic pathways (cost model)", step, args.repeats)
    if args.accuracy:
        accuracy(step, model)
    if args.compare:
        measure("fused kernel only", step, args.repeats, exclude=("native",))
        measure("automatic pathways (measured)", step, args.repeats, autotune=True)
    if args.memory_peak:
        memory_at_peak(step)
    if args.gaps:
        device_gaps(step)
    print(f"\nprofiled step: pathways excluded {args.profile_exclude or 'none'}")
    profile(step, args.profile_exclude)


if __name__ == "__main__":
    main()
