"""Per-operation benchmark on the convolution layers of Table E3 (core paper §E–§G).

    python benchmarks/ops.py [--quick] [--device cuda|cpu] [--nets NET ...] [--ops OP ...]
                             [--impls IMPL ...] [--layers anchors|all] [--out DIR] [--repeats 10]
    python benchmarks/ops.py --summarize DIR      # rebuild summary.md / ratios.png from DIR/ops.jsonl

For every layer and operation (forward, input_vjp, weight_vjp, kfc, kfac_reduce, ggn_diag, ggn_gram,
hesscale_weight_diag) the implementations run side by side in one process:

- ``PT``: PyTorch built-ins (``F.conv2d``, ``torch.nn.grad.conv2d_input/_weight``, ``F.unfold`` plus
  batched matmuls; see the ``pt_*`` functions),
- ``curvlib-TN`` / ``curvlib-TN+opt``: ``curvlib.functional`` with ``simplify=False`` / ``True``,
- ``einconv-TN`` / ``einconv-TN+opt``: einconv's expressions (first five operations only), if importable.

Protocol (core paper §F/§G, shared/anchors/README.md): float32, TF32 off, random inputs. Call 1 plans
the contraction paths (curvlib caches them). Call 2 gives the extra memory (GPU only:
``max_memory_allocated`` during the call minus the memory allocated before it minus the result's
size, after ``reset_peak_memory_stats``) and the result, compared once with PT's (relative error in
the Frobenius norm). Call 3 is the last warm-up, then ``--repeats`` timed calls, interleaved in
rounds across the implementations with a rotating start (CUDA events on GPU,
``time.perf_counter`` on CPU); median and minimum are recorded. Out-of-memory and other errors are
recorded per (layer, op, impl) and the run goes on. Every record is appended to ``ops.jsonl`` as soon
as it is measured; ``summary.md`` (and ``ratios.png`` if matplotlib is importable) are written at the end.

Times include everything a user of each implementation pays per call: for curvlib the Python that
builds, simplifies and looks up the planned network; for einconv building and simplifying its
expression (its path is planned once and cached here). The anchors planned einconv's paths once
before timing; whether their times include building the expressions is not stated.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# optional pure-Python dependencies carried next to the script (e.g. opt_einsum on a machine without
# internet): pip install --no-deps --target benchmarks/_vendor opt_einsum
if os.path.isdir(os.path.join(HERE, "_vendor")):
    sys.path.insert(0, os.path.join(HERE, "_vendor"))
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import torch  # noqa: E402
import torch.nn.functional as TF  # noqa: E402

try:
    import opt_einsum  # noqa: E402
except ImportError:  # pragma: no cover - depends on the machine
    sys.exit(
        "opt_einsum is required (curvlib contracts with it). Without internet, install it beside the script:\n"
        "  pip install --no-deps --target benchmarks/_vendor opt_einsum   (on a machine with internet)\n"
        "and carry benchmarks/_vendor along; ops.py puts it on sys.path."
    )

from curvlib import cuda_graphs  # noqa: E402
from curvlib import functional as CF  # noqa: E402
from curvlib import pathways  # noqa: E402
from curvlib import precision as _precision  # noqa: E402
from curvlib.contract import inspect_plans  # noqa: E402

import table_e3  # noqa: E402
from ceilings import copy_bandwidth, event_seconds  # noqa: E402
from table_e3 import ConvLayer  # noqa: E402

try:  # einconv is optional (not installed on every machine)
    from einconv.expressions import (  # noqa: E402
        convNd_forward as _ein_forward,
        convNd_input_vjp as _ein_input_vjp,
        convNd_kfac_reduce as _ein_kfac_reduce,
        convNd_kfc as _ein_kfc,
        convNd_weight_vjp as _ein_weight_vjp,
    )

    HAVE_EINCONV = True
except Exception:  # ImportError, or einconv's own imports (einops) missing
    HAVE_EINCONV = False

#: benchmark op name -> curvlib.functional name where they differ
_FUNCTIONAL_NAME = {"forward": "conv"}
OPS = ["forward", "input_vjp", "weight_vjp", "kfc", "kfac_reduce", "ggn_diag", "ggn_gram", "hesscale_weight_diag"]
GGN_OPS = ("ggn_diag", "ggn_gram")
EINCONV_OPS = ("forward", "input_vjp", "weight_vjp", "kfc", "kfac_reduce")
#: curvlib implementations: one per pathway (curvlib.pathways) and the automatic choice
CURVLIB_ROUTES = {
    "curvlib-TN": dict(pathway="tn", simplify=False),
    "curvlib-TN+opt": dict(pathway="tn", simplify=True),
    "curvlib-unfold": dict(pathway="unfold"),
    "curvlib-native": dict(pathway="native"),
    "curvlib-fused": dict(pathway="fused"),
    "curvlib-lags": dict(pathway="lags"),
    "curvlib-auto": dict(pathway="auto"),
}
IMPLS = ["PT", *CURVLIB_ROUTES, "einconv-TN", "einconv-TN+opt"]
TYPES = table_e3.TYPES
MIB = 2**20
GIB = 2**30

#: shared/anchors/ops_summary.md (einconv 0.1.0 vs PT on one H100, PyTorch 2.11, float32, TF32 off,
#: median of 20): (op, type) -> (layers, TN/PT median, TN+opt/PT median, TN+opt/PT max,
#: TN+opt extra memory max MiB, PT extra memory max MiB)
ANCHOR_EINCONV = {
    ("forward", "General"): (47, 2.83, 2.45, 9.32, 1088, 661),
    ("forward", "Dense"): (12, 2.47, 1.20, 2.67, 64, 1),
    ("forward", "Dense mix"): (3, 2.64, 1.87, 1.90, 64, 0),
    ("forward", "Down"): (4, 4.71, 1.70, 1.93, 32, 0),
    ("input_vjp", "General"): (47, 1.90, 1.65, 6.95, 1183, 242),
    ("input_vjp", "Dense"): (12, 2.49, 0.92, 1.47, 192, 1),
    ("input_vjp", "Dense mix"): (3, 2.20, 1.51, 1.62, 64, 0),
    ("input_vjp", "Down"): (4, 3.29, 2.06, 2.80, 128, 0),
    ("weight_vjp", "General"): (47, 3.30, 2.82, 8.85, 1536, 390),
    ("weight_vjp", "Dense"): (12, 2.19, 1.08, 1.70, 224, 64),
    ("weight_vjp", "Dense mix"): (3, 2.08, 1.21, 1.39, 70, 12),
    ("weight_vjp", "Down"): (4, 2.46, 0.84, 1.04, 96, 192),
    ("kfc", "General"): (47, 1.40, 1.35, 5.80, 7680, 6271),
    ("kfc", "Dense"): (12, 1.36, 0.51, 0.79, 128, 127),
    ("kfc", "Dense mix"): (3, 0.82, 0.52, 0.84, 72, 60),
    ("kfc", "Down"): (4, 1.63, 0.54, 0.59, 64, 160),
    ("kfac_reduce", "General"): (47, 0.92, 0.92, 2.05, 277, 3199),
    ("kfac_reduce", "Dense"): (12, 1.66, 0.51, 0.61, 48, 63),
    ("kfac_reduce", "Dense mix"): (3, 1.65, 1.11, 1.14, 5, 33),
    ("kfac_reduce", "Down"): (4, 1.65, 0.51, 0.55, 0, 128),
}

#: tiny layers of --quick: one per kind of index pattern (grouped strided dilated, dense mix, down-sampling)
QUICK_LAYERS = [
    ConvLayer("quick", "general", 1, (4, 9, 9), (6, 5, 4), (3, 3), (2, 2), (1, 1), (1, 2), 2, True, "General"),
    ConvLayer("quick", "dense-mix", 1, (4, 6, 6), (5, 6, 6), (1, 3), (1, 1), (0, 1), (1, 1), 1, False, "Dense mix"),
    ConvLayer("quick", "down", 1, (4, 7, 7), (6, 4, 4), (1, 1), (2, 2), (0, 0), (1, 1), 1, False, "Down"),
]


# ----------------------------------------------------------------------------------------------
# inputs


class Case:
    """Random inputs of one layer: ``x`` (input), ``w`` (weight), ``v`` (output-shaped vector for the
    VJPs), ``s`` (``[C, N, *output]`` for the GGN ops), ``d`` (positive, output-shaped, HesScale)."""

    def __init__(self, layer: ConvLayer, batch: int, columns: int, ops, device, seed: int = 0):
        self.layer, self.N, self.C = layer, batch, columns
        gen = torch.Generator(device=device).manual_seed(seed)
        c_in, c_out, groups = layer.input_shape[0], layer.output_shape[0], layer.groups
        self.G, self.c_in_g, self.c_out_g = groups, c_in // groups, c_out // groups
        self.K = math.prod(layer.kernel)
        self.D = self.c_in_g * self.K
        self.O = math.prod(layer.output_shape[1:])
        self.hyper = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=groups)

        def randn(*shape):
            return torch.randn(*shape, generator=gen, device=device)

        self.x = randn(batch, *layer.input_shape)
        self.w = randn(c_out, self.c_in_g, *layer.kernel)
        self.v = randn(batch, *layer.output_shape) if {"input_vjp", "weight_vjp"} & set(ops) else None
        self.s = randn(columns, batch, *layer.output_shape) if set(GGN_OPS) & set(ops) else None
        if "hesscale_weight_diag" in ops:
            self.d = torch.rand(batch, *layer.output_shape, generator=gen, device=device)
        else:
            self.d = None

    def free(self):
        self.x = self.w = self.v = self.s = self.d = None


# ----------------------------------------------------------------------------------------------
# PT: PyTorch built-ins


def _unfold(c: Case) -> torch.Tensor:
    """``[N, C_in·K, O]``, rows ordered (channel, kernel) like ``weight.flatten(1)`` per group."""
    lay = c.layer
    return TF.unfold(c.x, lay.kernel, dilation=lay.dilation, padding=lay.padding, stride=lay.stride)


def pt_forward(c: Case):
    return TF.conv2d(c.x, c.w, None, **c.hyper)


def pt_input_vjp(c: Case):
    return torch.nn.grad.conv2d_input(c.x.shape, c.w, c.v, **c.hyper)


def pt_weight_vjp(c: Case):
    return torch.nn.grad.conv2d_weight(c.x, c.w.shape, c.v, **c.hyper)


def pt_kfc(c: Case):
    """``1/N Σ_{n,o} u uᵀ`` per group: unfold, one copy to ``[G, D, N·O]``, one batched matmul."""
    u = _unfold(c).view(c.N, c.G, c.D, c.O).permute(1, 2, 0, 3).reshape(c.G, c.D, c.N * c.O)
    return torch.bmm(u, u.transpose(1, 2)).div_(c.N)


def pt_kfac_reduce(c: Case):
    """``1/N Σ_n ū ūᵀ`` per group, ``ū`` the unfolded input averaged over output locations."""
    u = _unfold(c).view(c.N, c.G, c.D, c.O).mean(-1).transpose(0, 1)  # [G, N, D]
    return torch.bmm(u.transpose(1, 2), u).div_(c.N)


def _channel_blocks(c: Case, budget_bytes: float):
    """Blocks ``(g0, g1, c0, c1)`` of output channels whose per-(column, sample) gradients fit the budget:
    whole groups when one group fits, else channel slices of one group."""
    per_channel = c.C * c.N * c.D * c.x.element_size()
    per_group = per_channel * c.c_out_g
    if per_group <= budget_bytes:
        step = max(1, int(budget_bytes // per_group))
        return [(g, min(g + step, c.G), 0, c.c_out_g) for g in range(0, c.G, step)]
    step = max(1, int(budget_bytes // per_channel))
    return [(g, g + 1, c0, min(c0 + step, c.c_out_g)) for g in range(c.G) for c0 in range(0, c.c_out_g, step)]


def _per_sample_gradients(c: Case, budget_bytes: float):
    """Yield ``(g0, g1, c0, c1, J)`` with ``J[n, g, col, co, d]`` the weight gradient of column ``col``
    of ``s`` for sample ``n`` (unfold, then one batched matmul per block of output channels)."""
    u = _unfold(c).view(c.N, c.G, c.D, c.O)
    s = c.s.view(c.C, c.N, c.G, c.c_out_g, c.O)
    for g0, g1, c0, c1 in _channel_blocks(c, budget_bytes):
        gb, cb = g1 - g0, c1 - c0
        sb = s[:, :, g0:g1, c0:c1].permute(1, 2, 0, 3, 4).reshape(c.N, gb, c.C * cb, c.O)
        J = torch.matmul(sb, u[:, g0:g1].transpose(-1, -2))  # [N, gb, C·cb, D]
        yield g0, g1, c0, c1, J.view(c.N, gb, c.C, cb, c.D)


def pt_ggn_diag(c: Case, budget_bytes: float = 2 * GIB):
    """``Σ_{c,n} J_{c,n}²`` from per-(column, sample) weight gradients (chunked over output channels)."""
    out = torch.empty(c.G, c.c_out_g, c.D, device=c.x.device, dtype=c.x.dtype)
    for g0, g1, c0, c1, J in _per_sample_gradients(c, budget_bytes):
        out[g0:g1, c0:c1] = J.square_().sum((0, 2))
    return out.view(c.G * c.c_out_g, c.c_in_g, *c.layer.kernel)


def pt_ggn_gram(c: Case, budget_bytes: float = 2 * GIB):
    """``[C, N, C, N]`` Gram matrix ``⟨J_{c,n}, J_{c',n'}⟩`` from per-(column, sample) weight gradients."""
    gram = torch.zeros(c.C * c.N, c.C * c.N, device=c.x.device, dtype=c.x.dtype)
    for *_, J in _per_sample_gradients(c, budget_bytes / 2):  # the reshape below copies J
        Jm = J.permute(2, 0, 1, 3, 4).reshape(c.C * c.N, -1)
        gram.addmm_(Jm, Jm.t())
    return gram.view(c.C, c.N, c.C, c.N)


def pt_hesscale_weight_diag(c: Case):
    """``Σ_{n,o} d[n, co, o] u[n, ci k, o]²`` per group: squared unfold, one batched matmul."""
    u2 = _unfold(c).square_().view(c.N, c.G, c.D, c.O).permute(1, 0, 3, 2).reshape(c.G, c.N * c.O, c.D)
    d = c.d.view(c.N, c.G, c.c_out_g, c.O).permute(1, 2, 0, 3).reshape(c.G, c.c_out_g, c.N * c.O)
    return torch.bmm(d, u2).view(c.G * c.c_out_g, c.c_in_g, *c.layer.kernel)


PT = {
    "forward": pt_forward,
    "input_vjp": pt_input_vjp,
    "weight_vjp": pt_weight_vjp,
    "kfc": pt_kfc,
    "kfac_reduce": pt_kfac_reduce,
    "ggn_diag": pt_ggn_diag,
    "ggn_gram": pt_ggn_gram,
    "hesscale_weight_diag": pt_hesscale_weight_diag,
}


def pt_memory_estimate(c: Case, op: str, chunk_bytes: float) -> float:
    """Upper estimate (bytes) of what the PT reference allocates beyond its inputs."""
    e = c.x.element_size()
    unfold = c.N * c.G * c.D * c.O * e
    out_size = c.N * c.layer.output_shape[0] * c.O * e
    s_size = c.C * out_size
    weight = c.G * c.c_out_g * c.D * e
    J = c.C * c.N * c.G * c.c_out_g * c.D * e
    return {
        "forward": out_size,
        "input_vjp": c.x.numel() * e,
        "weight_vjp": weight,
        "kfc": 2 * unfold + c.G * c.D**2 * e,
        "kfac_reduce": unfold + c.G * c.D**2 * e,
        "ggn_diag": unfold + min(s_size, max(chunk_bytes, s_size / max(c.G, 1))) + min(J, chunk_bytes) + weight,
        "ggn_gram": unfold + min(s_size, max(chunk_bytes, s_size / max(c.G, 1))) + min(J, chunk_bytes)
        + (c.C * c.N) ** 2 * e,
        "hesscale_weight_diag": 2 * unfold + out_size + weight,
    }[op]


# ----------------------------------------------------------------------------------------------
# curvlib and einconv


def curvlib_fn(op: str, c: Case, route: dict) -> Callable:
    lay, hp = c.layer, dict(c.hyper, **route)
    k = lay.kernel
    return {
        "forward": lambda: CF.conv(c.x, c.w, None, **hp),
        "input_vjp": lambda: CF.input_vjp(c.w, c.v, lay.input_shape[1:], **hp),
        "weight_vjp": lambda: CF.weight_vjp(c.x, c.v, k, **hp),
        "kfc": lambda: CF.kfc(c.x, k, **hp),
        "kfac_reduce": lambda: CF.kfac_reduce(c.x, k, **hp),
        "ggn_diag": lambda: CF.ggn_diag(c.x, c.s, k, **hp),
        "ggn_gram": lambda: CF.ggn_gram(c.x, c.s, k, **hp),
        "hesscale_weight_diag": lambda: CF.hesscale_weight_diag(c.x, c.d, k, **hp),
    }[op]


_EINCONV_PLANS: Dict[tuple, object] = {}


def _einconv_contract(equation, operands, shape):
    key = (equation, tuple(tuple(o.shape) for o in operands), operands[0].dtype, operands[0].device)
    expression = _EINCONV_PLANS.get(key)
    if expression is None:  # planned once per equation and shapes, like the anchors
        expression = opt_einsum.contract_expression(equation, *key[1])
        _EINCONV_PLANS[key] = expression
    return expression(*operands, backend="torch").reshape(shape)


def einconv_fn(op: str, c: Case, simplify: bool) -> Optional[Callable]:
    if not HAVE_EINCONV or op not in EINCONV_OPS:
        return None
    lay = c.layer
    hp = dict(stride=lay.stride, padding=lay.padding, dilation=lay.dilation, groups=lay.groups, simplify=simplify)
    build = {
        "forward": lambda: _ein_forward.einsum_expression(c.x, c.w, **hp),
        "input_vjp": lambda: _ein_input_vjp.einsum_expression(c.w, c.v, lay.input_shape[1:], **hp),
        "weight_vjp": lambda: _ein_weight_vjp.einsum_expression(c.x, c.v, lay.kernel, **hp),
        "kfc": lambda: _ein_kfc.einsum_expression(c.x, lay.kernel, **hp),
        "kfac_reduce": lambda: _ein_kfac_reduce.einsum_expression(c.x, lay.kernel, **hp),
    }[op]
    return lambda: _einconv_contract(*build())


def implementation(impl: str, op: str, c: Case) -> Optional[Callable]:
    if impl == "PT":
        fn = PT[op]
        return lambda: fn(c)
    if impl in CURVLIB_ROUTES:
        return curvlib_fn(op, c, CURVLIB_ROUTES[impl])
    if impl.startswith("einconv-"):
        return einconv_fn(op, c, simplify=impl.endswith("+opt"))
    raise ValueError(impl)


# ----------------------------------------------------------------------------------------------
# measurement


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable, device: torch.device) -> float:
    """Seconds of one call: CUDA events on GPU (idle stream before), ``perf_counter`` on CPU."""
    if device.type == "cuda":
        _sync(device)
        return event_seconds(fn)
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def relative_error(result: torch.Tensor, reference: torch.Tensor) -> float:
    a, b = result.reshape(-1).double(), reference.reshape(-1).double()
    if a.shape != b.shape:
        raise ValueError(f"result has {a.numel()} entries, reference {b.numel()}")
    scale = torch.linalg.vector_norm(b).item()
    diff = torch.linalg.vector_norm(a - b).item()
    return diff / scale if scale > 0 else diff


def measure(fn: Callable, device: torch.device, repeats: int, warmups: int, cap_s: float, interleaved: bool = False):
    """Plan, measure memory, warm up, time.

    Call 1 plans (curvlib caches its contraction paths; recorded: FLOPs and largest intermediate of
    the plans). Call 2 measures the extra memory (GPU), gives the result for the accuracy check and
    an estimate of one call; it runs eagerly (``curvlib.cuda_graphs.eager``): the memory is the call's
    own, also for the implementations whose later calls replay CUDA graphs. Then warm-ups up to ``warmups`` calls in all and ``repeats`` timed
    calls; when one call is so slow that they would take longer than ``cap_s``, fewer are made (at
    the least, call 2's time is used) and the record says how many. With ``interleaved=True`` the timed
    calls are left to :func:`time_interleaved`: returns ``(stats, result, times so far, calls to make)``.
    """
    with inspect_plans() as plans:
        out = fn()
        _sync(device)
    plan_flops = sum(p.flops for p in plans) if plans else None
    plan_largest = max(p.largest_intermediate for p in plans) * out.element_size() / MIB if plans else None
    del out
    mem = None
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        with cuda_graphs.eager():  # the call's own temporaries (a replay keeps them in the graphs' pool)
            out = fn()
        end.record()
        end.synchronize()
        estimate = start.elapsed_time(end) / 1e3
        peak = torch.cuda.max_memory_allocated(device)
        mem = (peak - before - out.numel() * out.element_size()) / MIB
    else:
        t0 = time.perf_counter()
        out = fn()
        estimate = time.perf_counter() - t0
    if estimate > cap_s:
        times, done_warmups, n = [estimate], 1, 0
    else:
        done_warmups = max(2, warmups)
        for _ in range(done_warmups - 2):
            time_call(fn, device)
        n = min(repeats, max(1, int(cap_s / max(estimate, 1e-9))))
        times = []
    stats = dict(
        warmups=done_warmups,
        mem_mib=mem,
        result_mib=out.numel() * out.element_size() / MIB,
        plan_flops=plan_flops,
        plan_largest_mib=plan_largest,
    )
    if not interleaved:
        times += [time_call(fn, device) for _ in range(n)]
        stats.update(_time_stats(times))
        return stats, out
    return stats, out, times, n


def _time_stats(times: List[float]) -> dict:
    return dict(time_s=statistics.median(times), min_s=min(times), repeats=len(times))


def time_interleaved(entries: Dict[str, tuple], device: torch.device) -> Dict[str, dict]:
    """Timed calls of several implementations in rounds (the starting implementation rotates), so that
    no implementation is always timed right after the same other one; ``entries[impl] = (fn, times,
    planned)`` with the times gathered so far and the number of timed calls to make."""
    names = list(entries)
    rounds = max((planned for _, _, planned in entries.values()), default=0)
    for r in range(rounds):
        shift = r % max(len(names), 1)
        for name in names[shift:] + names[:shift]:
            fn, times, planned = entries[name]
            if len(times) - (1 if planned == 0 else 0) < planned:
                times.append(time_call(fn, device))
    return {name: _time_stats(times) for name, (_, times, _) in entries.items()}


def _is_oom(error: BaseException) -> bool:
    if isinstance(error, getattr(torch.cuda, "OutOfMemoryError", ())):
        return True
    text = str(error).lower()
    return "out of memory" in text or "can't allocate memory" in text or "not enough memory" in text


def _free(device: torch.device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def disable_tf32():
    """float32 everywhere: TF32 off for cuBLAS and cuDNN (new API where present, else the legacy flags)."""
    _precision.set_fp32_precision("ieee")
    return "off (fp32_precision=ieee)" if _precision._NEW_API else "off (allow_tf32=False)"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu-{platform.machine()}-{os.cpu_count()}cores"


def git_commit() -> Optional[str]:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip() or None
    except Exception:
        return None


# ----------------------------------------------------------------------------------------------
# run


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="3 tiny layers, batch 2, CPU, 2 repeats (seconds)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available; cpu with --quick)")
    p.add_argument("--nets", nargs="+", default=None, choices=table_e3.NETS)
    p.add_argument("--ops", nargs="+", default=OPS, choices=OPS)
    p.add_argument("--impls", nargs="+", default=IMPLS, choices=IMPLS, help="PT is always run (reference)")
    p.add_argument("--layers", default="anchors", choices=["anchors", "all"],
                   help="'anchors': the 66 layers of shared/anchors (default); 'all': the 132 rows of Table E3")
    p.add_argument("--columns", type=int, default=10, help="columns C of s for the GGN ops (default 10)")
    p.add_argument("--batch", type=int, default=None, help="override the batch size (default: 128 / 32 per net)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls (default 10; 2 with --quick)")
    p.add_argument("--warmups", type=int, default=3, help="warm-up calls incl. the planning call (default 3)")
    p.add_argument("--max-gib", type=float, default=20.0, help="skip (layer, op) whose PT reference needs more")
    p.add_argument("--chunk-gib", type=float, default=2.0, help="per-sample gradient chunk of the PT GGN ops")
    p.add_argument("--cap-s", type=float, default=2.0, help="at most this long for one measurement's timed calls")
    p.add_argument("--budget-s", type=float, default=360.0,
                   help="after this many seconds use 3 repeats and 2 warm-ups for the rest (default 360)")
    p.add_argument("--deadline-s", type=float, default=450.0,
                   help="after this many seconds record the rest as skipped and write the summary (default 450)")
    p.add_argument("--cost-model", action="store_true", help="curvlib-auto chooses by its cost model, not by measuring")
    p.add_argument("--auto-budget-mib", type=float, default=None, help="memory budget of curvlib-auto (MiB)")
    p.add_argument("--auto-memory-fraction", type=float, default=None,
                   help="memory_fraction of curvlib-auto (of the unfold pathway's extra memory, e.g. 0.05)")
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results/<device>-<date>/)")
    p.add_argument("--summarize", metavar="DIR", default=None, help="only rebuild summary.md/ratios.png of DIR")
    args = p.parse_args(argv)
    if args.device is None:
        args.device = "cpu" if args.quick or not torch.cuda.is_available() else "cuda"
    if args.repeats is None:
        args.repeats = 2 if args.quick else 10
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.summarize:
        records = [json.loads(line) for line in open(os.path.join(args.summarize, "ops.jsonl"))]
        write_summary(records, args.summarize)
        print(f"wrote {args.summarize}/summary.md", flush=True)
        return 0

    device = torch.device(args.device)
    tf32 = disable_tf32()
    # curvlib-auto: choice by measurement, once per configuration (curvlib.pathways)
    pathways.configure(autotune=not args.cost_model, repeats=3,
                       memory_budget=None if args.auto_budget_mib is None else args.auto_budget_mib * MIB,
                       memory_fraction=args.auto_memory_fraction)
    impls = ["PT"] + [i for i in args.impls if i != "PT"]
    if not HAVE_EINCONV:
        impls = [i for i in impls if not i.startswith("einconv")]
    if args.quick:
        layers = QUICK_LAYERS
        for lay in layers:  # the quick layers are hand-written: check them like the table
            probe = torch.empty(1, *lay.input_shape, device="meta")
            w = torch.empty(lay.output_shape[0], lay.input_shape[0] // lay.groups, *lay.kernel, device="meta")
            out_shape = TF.conv2d(probe, w, None, lay.stride, lay.padding, lay.dilation, lay.groups).shape[1:]
            assert tuple(out_shape) == lay.output_shape, (lay, out_shape)
    else:
        layers = table_e3.layers(args.nets, subset=args.layers)
    name = device_name(device)
    date = datetime.datetime.now().strftime("%Y-%m-%d")
    out_dir = args.out or os.path.join(HERE, "results", f"{re.sub(r'[^A-Za-z0-9]+', '-', name).strip('-')}-{date}")
    os.makedirs(out_dir, exist_ok=True)
    jsonl = os.path.join(out_dir, "ops.jsonl")
    open(jsonl, "w").close()
    env = dict(
        device=name,
        torch=torch.__version__,
        cuda=torch.version.cuda if device.type == "cuda" else None,
        curvlib_commit=git_commit(),
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        tf32=tf32,
        dtype="float32",
    )
    if device.type == "cuda" and "kfac_reduce" in args.ops:  # KFAC-reduce's floor: x read once at this rate
        env["copy_bytes_per_s"] = copy_bandwidth(device)
    print(f"ops.py: {len(layers)} layers x {len(args.ops)} ops x {impls} on {name}, torch {torch.__version__}, "
          f"repeats {args.repeats}, C={args.columns}, einconv {'yes' if HAVE_EINCONV else 'not importable'}; "
          f"writing {out_dir}", flush=True)

    records: List[dict] = []
    t_start = time.perf_counter()
    repeats, warmups, degraded = args.repeats, args.warmups, False
    n_total = len(layers) * len(args.ops)
    step = 0
    for li, layer in enumerate(layers):
        batch = args.batch or (2 if args.quick else layer.batch_size)
        case = None
        for op in args.ops:
            step += 1
            elapsed = time.perf_counter() - t_start
            base = dict(
                net=layer.net, layer=layer.name, anchor_layer=layer.anchor_name if layer.net != "quick" else None,
                count=layer.count, type=layer.type, op=op, N=batch, C=args.columns if op in GGN_OPS else None,
                x_bytes=batch * math.prod(layer.input_shape) * 4,
            )
            if elapsed > args.deadline_s:
                for impl in impls:
                    records.append(_emit(jsonl, dict(base, impl=impl, status="skipped", reason="deadline", **env)))
                continue
            if elapsed > args.budget_s and not degraded:
                degraded, repeats, warmups = True, min(repeats, 3), 2
                print(f"  [budget] {elapsed:.0f}s > {args.budget_s:.0f}s: 3 repeats from here on", flush=True)
            if case is None:
                try:
                    case = Case(layer, batch, args.columns, args.ops, device, seed=li)
                except Exception as error:  # inputs do not fit: record every op of the layer
                    status = "oom" if _is_oom(error) else "error"
                    message = f"{type(error).__name__}: {str(error)[:300]}"
                    del error
                    _free(device)
                    for op2 in args.ops:
                        for impl in impls:
                            records.append(_emit(jsonl, dict(base, op=op2, impl=impl, status=status,
                                                             reason="inputs: " + message, **env)))
                    step += len(args.ops) - 1
                    break
            line = [f"[{step}/{n_total} {elapsed:5.0f}s] {layer.net}/{layer.name} {op}:"]
            estimate = pt_memory_estimate(case, op, args.chunk_gib * GIB)
            if estimate > args.max_gib * GIB:
                for impl in impls:
                    records.append(_emit(jsonl, dict(base, impl=impl, status="skipped",
                                                     reason=f"PT needs ~{estimate / GIB:.1f} GiB > {args.max_gib} GiB",
                                                     **env)))
                print(" ".join(line) + f" skipped (PT ~{estimate / GIB:.1f} GiB)", flush=True)
                continue
            reference, pt_time = None, None
            prepared: Dict[str, tuple] = {}  # impl -> (record, fn, times, planned)
            for impl in impls:
                fn = implementation(impl, op, case)
                if fn is None:
                    continue
                if impl == "PT" and op in GGN_OPS:
                    chunk = args.chunk_gib * GIB
                    fn = (lambda f: (lambda: f(case, chunk)))(PT[op])
                record = dict(base, impl=impl, **env)
                result, failure = None, None
                try:
                    stats, result, times, planned = measure(fn, device, repeats, warmups, args.cap_s, interleaved=True)
                    record.update(status="ok", **stats)
                    prepared[impl] = (record, fn, times, planned)
                except Exception as error:
                    failure = ("oom" if _is_oom(error) else "error", f"{type(error).__name__}: {str(error)[:300]}")
                    if isinstance(error, ValueError) and "is not available" in str(error):
                        failure = ("n/a", str(error)[:300])  # a pathway that does not apply to this layer
                    del error
                if failure is not None:
                    result = None
                    _free(device)
                    record.update(status=failure[0], reason=failure[1])
                    if failure[0] != "n/a":
                        line.append(f"{impl} {failure[0].upper()}")
                else:
                    if impl == "PT":
                        reference = result
                        record["relerr"] = 0.0
                    elif reference is not None:
                        try:
                            record["relerr"] = relative_error(result, reference)
                        except Exception as error:
                            record["relerr"], record["reason"] = None, f"relerr: {error}"
                    if impl != "PT":
                        result = None
                    if impl == "curvlib-auto":
                        chosen = [d for d in pathways.decisions() if d.op == _FUNCTIONAL_NAME.get(op, op)]
                        record["auto_choice"] = chosen[-1].choice if chosen else None
                        record["auto_how"] = chosen[-1].how if chosen else None
                if failure is not None:
                    records.append(_emit(jsonl, record))
            reference = result = None
            # timed calls of all implementations in rotating rounds: no order effects between them
            try:
                timed = time_interleaved({i: (fn, times, n) for i, (_, fn, times, n) in prepared.items()}, device)
            except Exception as error:  # e.g. out of memory under fragmentation: record, go on
                status = "oom" if _is_oom(error) else "error"
                timed = {}
                for record, *_ in prepared.values():
                    record.update(status=status, reason=f"timing: {type(error).__name__}: {str(error)[:200]}")
                del error
                _free(device)
            pt_time = timed.get("PT", {}).get("time_s")
            for impl, (record, *_) in prepared.items():
                if impl in timed:
                    record.update(timed[impl])
                    ratio = f" x{record['time_s'] / pt_time:.2f}" if pt_time and impl != "PT" else ""
                    err = f" err {record['relerr']:.1e}" if impl != "PT" and record.get("relerr") is not None else ""
                    line.append(f"{impl} {1e3 * record['time_s']:.3f}ms{ratio}{err}")
                records.append(_emit(jsonl, record))
            prepared.clear()
            print(" | ".join(line), flush=True)
        if case is not None:
            case.free()
        case = None
        _free(device)

    write_summary(records, out_dir)
    total = time.perf_counter() - t_start
    bad = [r for r in records if r["status"] != "ok"]
    print(f"done in {total:.0f}s: {len(records)} records ({len(bad)} not ok) in {out_dir}", flush=True)
    return 0


def _emit(path: str, record: dict) -> dict:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
    return record


# ----------------------------------------------------------------------------------------------
# summary


def _median(values):
    return statistics.median(values) if values else None


def _fmt(value, digits=2):
    if value is None:
        return "–"
    if isinstance(value, float) and (value >= 1e4 or (0 < abs(value) < 10 ** -digits)):
        return f"{value:.1e}"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def ratio_table(records: List[dict]):
    """``{(net, layer, op): {impl: record}}`` of the ok records."""
    table: Dict[tuple, Dict[str, dict]] = {}
    for r in records:
        table.setdefault((r["net"], r["layer"], r["op"]), {})[r["impl"]] = r
    return table


def _ratios(entries, impl, type_=None, op=None, key="time_s"):
    out = []
    for (net, layer, op_), by_impl in entries.items():
        pt, other = by_impl.get("PT"), by_impl.get(impl)
        if op is not None and op_ != op:
            continue
        if pt is None or other is None or pt["status"] != "ok" or other["status"] != "ok":
            continue
        if type_ is not None and pt["type"] != type_:
            continue
        if pt[key] and pt[key] > 0:
            out.append(other[key] / pt[key])
    return out


def _mem_max(entries, impl, type_, op):
    values = [
        by_impl[impl]["mem_mib"] for (_, _, op_), by_impl in entries.items()
        if op_ == op and impl in by_impl and by_impl[impl]["status"] == "ok" and by_impl[impl]["type"] == type_
        and by_impl[impl].get("mem_mib") is not None
    ]
    return max(values) if values else None


def _geomean(values):
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


#: implementations in the summary tables, with short column names
SUMMARY_IMPLS = [("curvlib-TN", "TN"), ("curvlib-TN+opt", "TN+opt"), ("curvlib-unfold", "unfold"),
                 ("curvlib-native", "native"), ("curvlib-fused", "fused"), ("curvlib-lags", "lags"),
                 ("curvlib-auto", "auto"),
                 ("einconv-TN", "einconv TN"), ("einconv-TN+opt", "einconv TN+opt")]

#: issue targets for curvlib auto on every layer: (op, statistic, bound); the pathway issue's, then the
#: fused-kernel issue's (KFC ≤ 0.6x, KFAC-reduce ≤ 0.3x)
TARGETS = [
    ("forward", "max", 1.05), ("input_vjp", "max", 1.05), ("weight_vjp", "max", 1.05),
    ("kfc", "geomean", 1.0), ("kfc", "max", 1.05), ("kfac_reduce", "geomean", 0.5), ("kfac_reduce", "max", 1.05),
    ("ggn_diag", "max", 1.05), ("ggn_gram", "max", 1.05), ("hesscale_weight_diag", "max", 1.05),
    ("kfc", "geomean", 0.6), ("kfac_reduce", "geomean", 0.3),
]

#: the fused-kernel issue's memory target: curvlib auto's extra memory (result excluded) at most this
#: share of PT's on every layer, per operation
MEMORY_SHARE_TARGETS = {"kfc": 0.05}


def _memory_share_line(entries, op: str, share: float) -> Optional[str]:
    """The row of :data:`MEMORY_SHARE_TARGETS`: how many layers' auto extra memory exceeds ``share`` of
    PT's (both without their results; a PT extra below zero counts as zero), and the largest share."""
    over, worst, layers = 0, 0.0, 0
    for (_, _, op_), by_impl in entries.items():
        pt, auto = by_impl.get("PT"), by_impl.get("curvlib-auto")
        if op_ != op or not pt or not auto or pt["status"] != "ok" or auto["status"] != "ok":
            continue
        if pt.get("mem_mib") is None or auto.get("mem_mib") is None:
            continue
        layers += 1
        reference = max(pt["mem_mib"] - pt.get("result_mib", 0.0), 0.0)
        extra = auto["mem_mib"] - auto.get("result_mib", 0.0)
        over += extra > share * reference
        worst = max(worst, extra / reference if reference > 0 else (math.inf if extra > 0 else 0.0))
    if not layers:
        return None
    return (f"| {op} | layers with extra memory > {share:.0%} of PT's (results excluded) | 0 | {over} of {layers} "
            f"(largest share {worst:.3f}) | {'yes' if over == 0 else '**no**'} | |")


def _target_lines(entries, ops) -> List[str]:
    lines = ["| op | statistic over layers | target | curvlib auto | met | auto's choices |", "|---|---|---|---|---|---|"]
    for op, stat, bound in TARGETS:
        if op not in ops:
            continue
        ratios = _ratios(entries, "curvlib-auto", None, op)
        if not ratios:
            continue
        value = max(ratios) if stat == "max" else _geomean(ratios)
        choices: Dict[str, int] = {}
        for (_, _, op_), by_impl in entries.items():
            rec = by_impl.get("curvlib-auto")
            if op_ == op and rec and rec["status"] == "ok":
                choices[str(rec.get("auto_choice"))] = choices.get(str(rec.get("auto_choice")), 0) + 1
        chosen = ", ".join(f"{k} {v}" for k, v in sorted(choices.items(), key=lambda kv: -kv[1]))
        lines.append(f"| {op} | {stat} time / PT | ≤ {bound} | {value:.2f} | {'yes' if value <= bound else '**no**'} "
                     f"| {chosen} |")
    mems = [by_impl["curvlib-auto"]["mem_mib"] for (_, _, op_), by_impl in entries.items()
            if op_ == "kfac_reduce" and "curvlib-auto" in by_impl and by_impl["curvlib-auto"]["status"] == "ok"
            and by_impl["curvlib-auto"].get("mem_mib") is not None]
    if mems:
        lines.append(f"| kfac_reduce | max extra memory | ≤ 1 MiB | {max(mems):.2f} MiB | "
                     f"{'yes' if max(mems) <= 1 else '**no**'} | |")
    for op, share in MEMORY_SHARE_TARGETS.items():
        line = _memory_share_line(entries, op, share) if op in ops else None
        if line:
            lines.append(line)
    line = _floor_line(entries) if "kfac_reduce" in ops else None
    if line:
        lines.append(line)
    return lines


#: the fused-kernel issue's bandwidth target: KFAC-reduce (curvlib auto) within this multiple of the time
#: to read ``x`` once at the measured copy bandwidth, on the :data:`FLOOR_LAYERS` largest inputs
FLOOR_MULTIPLE, FLOOR_LAYERS = 4.0, 10


def floor_ratios(entries) -> List[tuple]:
    """``[(net/layer, time / floor)]`` of curvlib auto's KFAC-reduce on the largest inputs, largest first
    (records with the copy bandwidth and the input's bytes; CUDA runs)."""
    rows = []
    for (net, layer, op), by_impl in entries.items():
        auto = by_impl.get("curvlib-auto")
        if op != "kfac_reduce" or not auto or auto["status"] != "ok":
            continue
        if not auto.get("copy_bytes_per_s") or not auto.get("x_bytes"):
            continue
        floor = auto["x_bytes"] / auto["copy_bytes_per_s"]
        rows.append((auto["x_bytes"], f"{net}/{layer}", auto["time_s"] / floor))
    rows.sort(key=lambda row: -row[0])
    return [(name, ratio) for _, name, ratio in rows[:FLOOR_LAYERS]]


def _floor_line(entries) -> Optional[str]:
    ratios = floor_ratios(entries)
    if not ratios:
        return None
    within = sum(ratio <= FLOOR_MULTIPLE for _, ratio in ratios)
    worst = max(ratios, key=lambda row: row[1])
    return (f"| kfac_reduce | time / bandwidth floor on the {len(ratios)} largest inputs | ≤ {FLOOR_MULTIPLE:g} each | "
            f"{within} of {len(ratios)} within, worst {worst[1]:.1f} ({worst[0]}) | "
            f"{'yes' if within == len(ratios) else '**no**'} | |")


def write_summary(records: List[dict], out_dir: str) -> None:
    entries = ratio_table(records)
    present = [(i, short) for i, short in SUMMARY_IMPLS if any(r["impl"] == i and r["status"] == "ok" for r in records)]
    ops = [op for op in OPS if any(r["op"] == op for r in records)]
    first = records[0] if records else {}
    lines = [
        "# Per-operation benchmark (Table E3 layers)",
        "",
        f"Device {first.get('device')}, torch {first.get('torch')}, CUDA {first.get('cuda')}, curvlib commit "
        f"{first.get('curvlib_commit')}, {first.get('date')}; float32, TF32 {first.get('tf32')}.",
        f"{len({(r['net'], r['layer']) for r in records})} layers; batch "
        f"{sorted({r['N'] for r in records})}; GGN ops with C = {sorted({r['C'] for r in records if r.get('C')})} "
        "columns of s; HesScale with d ~ U(0, 1). Timed calls per measurement: "
        f"{max((r.get('repeats') or 0) for r in records) if records else 0} after "
        f"{max((r.get('warmups') or 0) for r in records) if records else 0} warm-ups (fewer where one call "
        "is slow; see `repeats` in ops.jsonl).",
        "Ratio = median time of the implementation / median time of PT on the same layer (> 1: slower than "
        "PT). Extra memory: peak allocated during one call minus memory before minus result size (GPU only). "
        "curvlib-auto measured its candidates on its first call of each configuration "
        "(`curvlib.pathways`, autotune) and is timed on its choice.",
        "",
        "## Targets (curvlib auto)",
        "",
        *_target_lines(entries, ops),
        "",
        "## Median ratio to PT per operation and convolution type (geometric mean in the **all** rows)",
        "",
    ]
    header = ["op", "type", "layers"] + [short for _, short in present] + ["auto max"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for op in ops:
        for type_ in TYPES + [None]:
            n_layers = len({(k[0], k[1]) for k, v in entries.items() if k[2] == op and "PT" in v
                            and (type_ is None or v["PT"]["type"] == type_)})
            if n_layers == 0:
                continue
            stat = _geomean if type_ is None else _median
            row = [op, type_ or "**all**", str(n_layers)]
            row += [_fmt(stat(_ratios(entries, impl, type_, op))) for impl, _ in present]
            auto = _ratios(entries, "curvlib-auto", type_, op)
            row.append(_fmt(max(auto) if auto else None))
            lines.append("| " + " | ".join(row) + " |")

    lines += ["", "## Extra memory, max over layers (MiB; like the core paper's Table G9)", "",
              "| op | type | PT | " + " | ".join(short for _, short in present) + " |",
              "|---|---|---|" + "---|" * len(present)]
    for op in ops:
        for type_ in TYPES:
            if not any(k[2] == op and v.get("PT", {}).get("type") == type_ for k, v in entries.items()):
                continue
            row = [op, type_, _fmt(_mem_max(entries, "PT", type_, op), 1)]
            row += [_fmt(_mem_max(entries, impl, type_, op), 1) for impl, _ in present]
            lines.append("| " + " | ".join(row) + " |")

    # comparison with the anchors (einconv on an H100)
    anchor_entries = {k: v for k, v in entries.items() if "PT" in v and v["PT"].get("anchor_layer")}
    lines += [
        "",
        "## Against the anchors (einconv 0.1.0 on one H100, shared/anchors/ops_summary.md)",
        "",
        "Medians of time / PT over the anchor layers present in this run (meaningful on an H100 with the "
        "default layer set).",
        "",
        "| op | type | layers (anchor / here) | anchor einconv TN+opt | curvlib TN+opt | curvlib auto "
        "| anchor einconv TN+opt mem max (MiB) | curvlib auto mem max (MiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (op, type_), (n, a_tn, a_opt, a_max, a_mem, _a_pt_mem) in ANCHOR_EINCONV.items():
        if op not in ops or not anchor_entries:
            continue
        opt = _ratios(anchor_entries, "curvlib-TN+opt", type_, op)
        auto = _ratios(anchor_entries, "curvlib-auto", type_, op)
        lines.append(
            f"| {op} | {type_} | {n} / {len(opt) or len(auto)} | {a_opt:.2f} | {_fmt(_median(opt))} | "
            f"{_fmt(_median(auto))} | {a_mem} | {_fmt(_mem_max(anchor_entries, 'curvlib-auto', type_, op), 0)} |"
        )

    # accuracy
    lines += ["", "## Relative error against PT (worst over layers)", "",
              "| op | " + " | ".join(short for _, short in present) + " |", "|---|" + "---|" * len(present)]
    for op in ops:
        row = [op]
        for impl, _ in present:
            errs = [r["relerr"] for r in records if r["op"] == op and r["impl"] == impl
                    and r["status"] == "ok" and r.get("relerr") is not None]
            row.append(f"{max(errs):.1e}" if errs else "–")
        lines.append("| " + " | ".join(row) + " |")

    # per layer
    lines += ["", "## curvlib auto / PT per layer (median times; auto's choice in brackets)", "",
              "| net | layer | type | " + " | ".join(ops) + " |", "|---|---|---|" + "---|" * len(ops)]
    layer_keys = []
    for r in records:
        if (r["net"], r["layer"]) not in layer_keys:
            layer_keys.append((r["net"], r["layer"]))
    for net, layer in layer_keys:
        cells, type_ = [], ""
        for op in ops:
            by_impl = entries.get((net, layer, op), {})
            pt, auto = by_impl.get("PT"), by_impl.get("curvlib-auto")
            type_ = (pt or auto or {}).get("type", type_)
            if pt and auto and pt["status"] == "ok" and auto["status"] == "ok":
                cells.append(f"{auto['time_s'] / pt['time_s']:.2f} ({auto.get('auto_choice')})")
            else:
                bad = [x["status"] for x in (pt, auto) if x and x["status"] != "ok"]
                cells.append({"oom": "OOM", "error": "err", "skipped": "skip"}.get(bad[0], "–") if bad else "–")
        lines.append(f"| {net} | {layer} | {type_} | " + " | ".join(cells) + " |")

    failed = [r for r in records if r["status"] not in ("ok", "n/a")]
    lines += ["", f"## Not measured ({len(failed)} records; pathways that do not apply are left out)", ""]
    if failed:
        lines += ["| net | layer | op | impl | status | reason |", "|---|---|---|---|---|---|"]
        for r in failed:
            reason = str(r.get("reason", "")).replace("|", "/").replace("\n", " ")[:160]
            lines.append(f"| {r['net']} | {r['layer']} | {r['op']} | {r['impl']} | {r['status']} | {reason} |")
    else:
        lines.append("none")
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    write_plot(entries, ops, out_dir)


#: implementations in the box plots (core paper Figure F16 style), with colours
PLOT_IMPLS = [("einconv-TN+opt", "tab:gray"), ("curvlib-TN+opt", "tab:orange"), ("curvlib-fused", "tab:purple"),
              ("curvlib-auto", "tab:green")]


def write_plot(entries, ops, out_dir: str) -> Optional[str]:
    """Box plots of time / PT per op, one panel per convolution type (core paper Figure F16)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.patches  # noqa: F401
        import matplotlib.pyplot as plt
    except Exception:
        return None
    types = [t for t in TYPES if any(v.get("PT", {}).get("type") == t for v in entries.values())]
    impls = [(i, c) for i, c in PLOT_IMPLS if _ratios(entries, i)]
    if not types or not impls:
        return None
    width = len(impls) + 1
    fig, axes = plt.subplots(1, len(types), figsize=(4.5 * len(types), 4), squeeze=False)
    for ax, type_ in zip(axes[0], types):
        data, positions, colors = [], [], []
        for i, op in enumerate(ops):
            for j, (impl, color) in enumerate(impls):
                values = _ratios(entries, impl, type_, op)
                if values:
                    data.append(values)
                    positions.append(width * i + j)
                    colors.append(color)
        if data:
            boxes = ax.boxplot(data, positions=positions, widths=0.8, patch_artist=True,
                               medianprops=dict(color="black"))
            for patch, color in zip(boxes["boxes"], colors):
                patch.set_facecolor(color)
        ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
        ax.set_yscale("log")
        ax.set_xticks([width * i + (len(impls) - 1) / 2 for i in range(len(ops))])
        ax.set_xticklabels(ops, rotation=60, ha="right", fontsize=8)
        ax.set_title(type_)
    axes[0][0].set_ylabel("time / PT time")
    handles = [matplotlib.patches.Patch(color=c, label=i) for i, c in impls]
    axes[0][-1].legend(handles=handles, fontsize=8)
    fig.tight_layout()
    path = os.path.join(out_dir, "ratios.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main())
