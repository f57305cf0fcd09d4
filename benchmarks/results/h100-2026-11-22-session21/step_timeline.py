"""Timeline of one DiagGGNExact step: host phases (record_function ranges, no Python stacks) against the
device's kernels; device idle attributed to the host phase that launched the kernel after each gap.

Run from the repository root on a CUDA machine: ``python benchmarks/results/h100-2026-11-22-session21/step_timeline.py``."""
import sys, argparse, json, tempfile, collections, torch
sys.path.insert(0, "benchmarks"); sys.path.insert(0, "benchmarks/diagnostics"); sys.path.insert(0, ".")
import diag_ggn_profile as D, end_to_end
from curvlib import pathways
import curvlib, curvlib.kernels
from torch.profiler import record_function
end_to_end.set_global_precision("tf32")
p = argparse.ArgumentParser(); p.add_argument("--budget", type=float, default=1.25e9)
p.add_argument("--no-replay", action="store_true"); p.add_argument("--steps", type=int, default=3)
a = p.parse_args()
args = argparse.Namespace(net="all_cnn_c", classes=100, batch=128, memory_budget=a.budget, column_backward="auto",
                          no_replay=a.no_replay, channels_last=True)
step, model = D.build(args, torch.device("cuda"))


def wrap(label, fn):
    def w(*args, **kw):
        with record_function("@" + label):
            return fn(*args, **kw)
    return w


from curvlib.engine import layers as L, graph_vjp as G, context as C, losses as LS
C.curvature._compute = wrap("compute", C.curvature._compute)
C.curvature._columns = wrap("columns", C.curvature._columns)
C.curvature._stages = wrap("stages", C.curvature._stages)
C.curvature._graph_plan = wrap("plan", C.curvature._graph_plan)
C.curvature._chunk_memory = wrap("chunk_memory", C.curvature._chunk_memory)
C.curvature._store = wrap("store", C.curvature._store)
G.GraphVJP._run = wrap("walk", G.GraphVJP._run)
L.LayerCall.ggn_diag = wrap("layer", L.LayerCall.ggn_diag)
model.forward = wrap("forward", model.forward)
orig_apply = G.GraphVJP._apply
def _apply(self, rule, node, g, need):
    with record_function("@rule " + type(node).__name__):
        return orig_apply(self, rule, node, g, need)
G.GraphVJP._apply = _apply
import curvlib.kernels.input_vjp as IV, curvlib.kernels.threshold_backward as TB, curvlib.functional as FF
IV.fastest = wrap("input_vjp.fastest", IV.fastest)
FF.ggn_diag = wrap("functional.ggn_diag", FF.ggn_diag)
L.F = FF
orig_step = step
step = wrap("step", orig_step)

with pathways.options(precision="bf16"):
    D.warmed_up(step)
    for _ in range(3):
        step(); torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(a.steps):
            step(); torch.cuda.synchronize()
with tempfile.NamedTemporaryFile(suffix=".json") as h:
    prof.export_chrome_trace(h.name)
    events = json.load(open(h.name))["traceEvents"]
kernels = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")), key=lambda e: e["ts"])
launch = {e["args"]["correlation"]: e["ts"] for e in events
          if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
ann = sorted((e for e in events if e.get("cat") == "user_annotation" and e["name"].startswith("@")), key=lambda e: e["ts"])
steps = [e for e in ann if e["name"] == "@step"]
for si, st in enumerate(steps):
    t0, t1 = st["ts"], st["ts"] + st["dur"]
    mine = [e for e in ann if t0 <= e["ts"] <= t1 and e is not st]
    ks = [k for k in kernels if t0 <= launch.get(k["args"].get("correlation"), -1) <= t1]
    layers = sorted(e["ts"] + e["dur"] for e in mine if e["name"] == "@layer")

    def phase(t):
        inner = [e for e in mine if e["ts"] <= t <= e["ts"] + e["dur"]]
        comp = [e for e in inner if e["name"] == "@compute"]
        if not comp:
            top = "forward" if any(e["name"] == "@forward" for e in inner) else (
                "after compute (autograd backward)" if any(e["name"] == "@compute" and e["ts"] + e["dur"] < t for e in mine) else "before/loss")
        else:
            walks = [e for e in mine if e["name"] == "@walk" and e["ts"] <= t]
            if not walks:
                top = "setup (compute before first walk)"
            else:
                done = sum(1 for x in layers if x <= t)
                top = f"chunk {done // 9}"
        innermost = min(inner, key=lambda e: e["dur"])["name"] if inner else "-"
        return top, innermost

    end = ks[-1]["ts"] + ks[-1]["dur"]
    busy = sum(k["dur"] for k in ks)
    print(f"\n=== step {si}: host {st['dur']/1e3:.2f} ms, wall (host start to last kernel end) {(end - t0)/1e3:.2f} ms, "
          f"device busy {busy/1e3:.2f} ms, first kernel at {(ks[0]['ts']-t0)/1e3:.2f} ms")
    seg = collections.OrderedDict()
    gap_by_inner = collections.Counter()
    prev_end = t0
    for k in ks:
        tl = launch[k["args"]["correlation"]]
        top, inner = phase(tl)
        s = seg.setdefault(top, dict(host0=tl, host1=tl, dev0=k["ts"], dev1=k["ts"] + k["dur"], busy=0.0, idle=0.0, n=0))
        s["host1"] = tl; s["dev1"] = k["ts"] + k["dur"]; s["busy"] += k["dur"]; s["n"] += 1
        gap = k["ts"] - prev_end
        if gap > 0:
            s["idle"] += gap
            gap_by_inner[(top, inner)] += gap
        prev_end = max(prev_end, k["ts"] + k["dur"])
    print(f"{'segment':36s} {'launch from':>10s} {'to':>8s} {'dev from':>9s} {'to':>8s} {'busy':>7s} {'idle':>7s} kernels")
    for top, s in seg.items():
        print(f"{top:36s} {(s['host0']-t0)/1e3:10.2f} {(s['host1']-t0)/1e3:8.2f} {(s['dev0']-t0)/1e3:9.2f} "
              f"{(s['dev1']-t0)/1e3:8.2f} {s['busy']/1e3:7.2f} {s['idle']/1e3:7.2f} {s['n']}")
    # host ranges inside compute before the first walk
    print("host ranges (ms from step start): " + ", ".join(
        f"{e['name'][1:]} {(e['ts']-t0)/1e3:.2f}+{e['dur']/1e3:.2f}" for e in mine
        if e["name"] in ("@forward", "@compute", "@columns", "@stages", "@plan", "@chunk_memory", "@store")))
    per = collections.defaultdict(collections.Counter)
    for e in mine:
        top, _ = phase(e["ts"])
        per[top][e["name"]] += e["dur"]
    for top in ("chunk 0", "chunk 1"):
        print(top, "host by range:", ", ".join(f"{k[1:]} {v/1e3:.2f}" for k, v in per[top].most_common(14)))
    print("device idle by (segment, innermost host range at the launch after the gap), top 15:")
    for (top, inner), g in gap_by_inner.most_common(15):
        print(f"   {g/1e3:6.2f} ms  {top:36s} {inner}")
