"""DiagGGNExact's column backpropagation with padding and layout changes (experiment, fourteenth session).

    python benchmarks/diagnostics/padding_layout_variants.py      # a CUDA GPU

All-CNN-C (batch 128, 100 classes, TF32), 3.5 and 2 GB budgets. A ``TorchDispatchMode`` around the
engine's backward passes (``curvature._vjp``) reroutes ops, per variant:

- ``pad views``: ``constant_pad_nd`` with negative pads (PyTorch's padding backward) returns the inner
  window as a view instead of a copy;
- ``+ CL weights/masks``: the data gradients with channels-last weights (cuDNN then returns
  channels-last gradients, no NCHW/NHWC transposes), ReLU masks converted to channels-last;
- ``CL model``: the model and input in channels-last memory format (engine unchanged, or with pad views).

Printed: the median step time, extra peak, columns per chunk, the largest relative deviation of any
GGN diagonal from the first variant, the rerouted-call counts and the device time by kernel category.
What came of it: the padding views, as a forward hook instead of a dispatch mode (whose Python cost per
op made the 4-column steps 40 % slower), are :mod:`curvlib.engine.padding`.
"""
import collections
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE), os.path.dirname(os.path.dirname(HERE))]
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
import curvlib
from curvlib import extensions as E, pathways
from curvlib.engine import context
import end_to_end
from diag_ggn_profile import category

aten = torch.ops.aten
CL = torch.channels_last


def cl_tail(t):
    """whether the last four dims are channels-last dense"""
    if t.dim() < 4:
        return False
    n, c, h, w = t.shape[-4:]
    s = t.stride()[-4:]
    return c > 1 and s[1] == 1 and s[3] == c and s[2] == w * c


class Mode(TorchDispatchMode):
    def __init__(self, pads=True, cl=False):
        super().__init__()
        self.pads, self.cl = pads, cl
        self.counts = collections.Counter()
        self.weights, self.masks = {}, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.counts["ops"] += 1
        if self.pads and func is aten.constant_pad_nd.default:
            x, pad = args[0], list(args[1])
            if all(p <= 0 for p in pad):
                self.counts["pad"] += 1
                out = x
                for i in range(len(pad) // 2):
                    dim = x.dim() - 1 - i
                    lo, hi = -pad[2 * i], -pad[2 * i + 1]
                    out = out.narrow(dim, lo, out.shape[dim] - lo - hi)
                return out
        if self.cl and func is aten.convolution_backward.default and args[0].dim() == 4:
            w = args[2]
            key = (w.data_ptr(), w._version)
            if key not in self.weights:
                self.weights[key] = w.contiguous(memory_format=CL)
            self.counts["conv"] += 1
            args = list(args); args[2] = self.weights[key]
            return func(*args, **kwargs)
        if self.cl and func is aten.threshold_backward.default:
            g, m = args[0], args[1]
            if cl_tail(g) and not cl_tail(m) and m.dim() == 4:
                key = (m.data_ptr(), m._version)
                if key not in self.masks:
                    self.masks[key] = m.contiguous(memory_format=CL)
                self.counts["mask"] += 1
                args = list(args); args[1] = self.masks[key]
        return func(*args, **kwargs)


def main():
    end_to_end.set_global_precision("tf32")
    dev = torch.device("cuda")
    torch.manual_seed(0)
    base_model = end_to_end.all_cnn_c(100).to(dev)
    loss_fn = nn.CrossEntropyLoss()
    x0 = torch.randn(128, 3, 32, 32, device=dev)
    y = torch.randint(0, 100, (128,), device=dev)
    plain = context.curvature._vjp
    reference = None
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, tf32", flush=True)
    variants = [("unchanged", None, False), ("pad views", dict(pads=True), False),
                ("pad views + CL weights/masks", dict(pads=True, cl=True), False),
                ("CL model, unchanged engine", None, True), ("CL model + pad views", dict(pads=True), True)]
    for budget in (3.5e9, 2e9):
        for label, opts, cl_model in variants:
            model = base_model.to(memory_format=CL if cl_model else torch.contiguous_format)
            x = x0.contiguous(memory_format=CL) if cl_model else x0
            modes = []

            def vjp(self, *a, **k):
                m = Mode(**opts)
                modes.append(m)
                with m:
                    return plain(self, *a, **k)
            context.curvature._vjp = plain if opts is None else vjp

            def step():
                with curvlib.curvature(model, loss_fn, E.DiagGGNExact(), memory_budget=budget) as ctx:
                    model.zero_grad()
                    loss_fn(model(x), y).backward()
                return ctx
            try:
                pathways.clear()
                for _ in range(2):
                    ctx = step()
                torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                times = []
                for _ in range(7):
                    modes.clear()
                    t = time.perf_counter(); step(); torch.cuda.synchronize()
                    times.append(time.perf_counter() - t)
                peak = (torch.cuda.max_memory_allocated() - base) / 1e9
                counts = sum((m.counts for m in modes), collections.Counter())
                diags = [p.diag_ggn_exact.clone() for p in model.parameters()]
                if reference is None:
                    reference = diags
                err = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(diags, reference))
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                    step(); torch.cuda.synchronize()
                totals = collections.Counter()
                for ev in prof.events():
                    if ev.device_type == torch.autograd.DeviceType.CUDA:
                        totals[category(ev.name)] += ev.device_time_total / 1e3
                cats = ", ".join(f"{k} {v:.1f}" for k, v in totals.most_common())
                print(f"budget {budget/1e9:g} GB | {label}: {statistics.median(times)*1e3:.1f} ms "
                      f"(min {min(times)*1e3:.1f}), peak {peak:.2f} GB, {ctx.last_chunk_size} cols, err {err:.1e}, "
                      f"counts {dict(counts)}\n    device {sum(totals.values()):.1f} ms: {cats}", flush=True)
            except Exception as e:
                import traceback; traceback.print_exc()
                print(f"budget {budget/1e9:g} GB | {label}: FAILED {type(e).__name__}: {e}", flush=True)
            finally:
                context.curvature._vjp = plain


if __name__ == "__main__":
    main()
