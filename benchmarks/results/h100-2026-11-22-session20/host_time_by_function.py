"""Inclusive host time per function level of one DiagGGNExact step (perf_counter wrappers, no cProfile)."""
import sys, argparse, time, collections, statistics, torch
sys.path.insert(0, "benchmarks"); sys.path.insert(0, "benchmarks/diagnostics"); sys.path.insert(0, ".")
import diag_ggn_profile as D, end_to_end
from curvlib import pathways
import curvlib, curvlib.kernels
end_to_end.set_global_precision("tf32")
p = argparse.ArgumentParser(); p.add_argument("--budget", type=float, default=1.25e9); a = p.parse_args()
args = argparse.Namespace(net="all_cnn_c", classes=100, batch=128, memory_budget=a.budget, column_backward="auto",
                          no_replay=False, channels_last=True)
step, model = D.build(args, torch.device("cuda"))
TOT, CNT = collections.Counter(), collections.Counter()
def wrap(label, fn):
    def w(*args, **kw):
        t = time.perf_counter()
        try: return fn(*args, **kw)
        finally: TOT[label] += time.perf_counter() - t; CNT[label] += 1
    return w
def patch_fn(modname, name):
    mod = sys.modules[modname]; orig = getattr(mod, name); label = f"{modname.split('.')[-1]}.{name}"
    new = wrap(label, orig)
    for m in list(sys.modules.values()):
        if m is not None and getattr(m, "__name__", "").startswith("curvlib"):
            for k, v in list(vars(m).items()):
                if v is orig: setattr(m, k, new)
def patch_method(cls, name, label):
    setattr(cls, name, wrap(label, getattr(cls, name)))
import importlib
for mn in ["curvlib.kernels.ggn_unfolded", "curvlib.kernels.weight_diag", "curvlib.kernels.unfold", "curvlib.kernels.input_vjp",
           "curvlib.kernels.threshold_backward", "curvlib.engine.extension", "curvlib.engine.batched_rules", "curvlib.functional",
           "curvlib.engine.staging", "curvlib.engine.context"]:
    importlib.import_module(mn)
patch_fn("curvlib.kernels.ggn_unfolded", "ggn_diag")
patch_fn("curvlib.kernels.weight_diag", "ggn_diag")
patch_fn("curvlib.kernels.unfold", "unfold_into")
patch_fn("curvlib.kernels.input_vjp", "input_vjp")
patch_fn("curvlib.kernels.input_vjp", "fastest")
patch_fn("curvlib.kernels.threshold_backward", "threshold_backward")
patch_fn("curvlib.engine.extension", "add_into")
patch_fn("curvlib.functional", "ggn_diag")
patch_fn("curvlib.functional", "_dispatch")
patch_fn("curvlib.engine.staging", "backpropagate")
from curvlib.kernels import _launch
from curvlib.engine import layers as L, graph_vjp as G, context as C
patch_method(_launch.Launcher, "__call__", "Launcher.__call__")
patch_method(_launch.Launcher, "_key", "Launcher._key")
patch_method(L.LayerCall, "ggn_diag", "LayerCall.ggn_diag")
patch_method(L.LayerCall, "conv_input_as", "LayerCall.conv_input_as")
patch_method(G.GraphVJP, "_run", "GraphVJP._run")
G.GraphVJP.build = classmethod(wrap("GraphVJP.build", G.GraphVJP.build.__func__))
for name in ["_stages", "_columns", "_compute", "_groups", "_chunk_memory", "_on_backward", "_store", "_graph_plan"]:
    patch_method(C.curvature, name, "context." + name)
import curvlib.engine.staging as ST
patch_fn("curvlib.engine.staging", "plan_stages")
patch_fn("curvlib.engine.staging", "merge_stages")
orig_apply = G.GraphVJP._apply
def apply(self, rule, node, g, need):
    t = time.perf_counter()
    try: return orig_apply(self, rule, node, g, need)
    finally: TOT["rule " + type(node).__name__] += time.perf_counter() - t; CNT["rule " + type(node).__name__] += 1
G.GraphVJP._apply = apply
orig_fit = G._fit
G._fit = wrap("graph_vjp._fit", orig_fit)
patch_method(C.curvature, "_run_columns", "context._run_columns")
import curvlib.extensions.diag_ggn as DG
for cname in dir(DG):
    c = getattr(DG, cname)
    if isinstance(c, type) and "accumulate" in vars(c): patch_method(c, "accumulate", f"{cname}.accumulate")
with pathways.options(precision="bf16"):
    D.warmed_up(step)
    for _ in range(3): step(); torch.cuda.synchronize()
    TOT.clear(); CNT.clear(); hs = []
    R = 7
    for _ in range(R):
        torch.cuda.synchronize(); t = time.perf_counter(); step(); hs.append(time.perf_counter() - t); torch.cuda.synchronize()
    print(f"host per step (wrapped) {statistics.median(hs)*1e3:.1f} ms")
    for k, v in sorted(TOT.items(), key=lambda kv: -kv[1]):
        print(f"{v/R*1e3:8.2f} ms/step {CNT[k]/R:6.0f} calls {v/CNT[k]*1e6:7.1f} us/call  {k}")
