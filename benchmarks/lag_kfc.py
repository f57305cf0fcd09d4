"""KFC (KFAC-expand input factor) of stride-1 convolutions: unfold + matmul against lag products.

    python benchmarks/lag_kfc.py --quick                  # tiny layers, batch 2, CPU: seconds
    python benchmarks/lag_kfc.py [--device cuda|cpu] [--repeats 5] [--batch N] [--nets allcnnc convnext resnet18]
                                 [--dtype float32|float64] [--lag-method auto|conv|gemm|triton]
                                 [--both-methods | --no-both-methods] [--json FILE]

Implementations, side by side in one process on the same input:

- ``unfold``: :func:`curvlib.native.kfc` (materialise the unfolded input, one batched product:
  ``(C/G·K^d)²·G·N·O`` multiply-adds),
- ``lags``: :func:`curvlib.lag_gram.kfc_by_lags` (the ``(2K-1)^d`` lag products, thin border corrections,
  assembly to ``[G, D, D]``) with the lag products by ``lag_method``: ``conv`` (one convolution weight
  gradient), ``gemm`` (matrix products of slices, half the lags), ``triton`` (the same half in one Triton
  launch, operands read in place) or ``auto`` (``triton`` for float32 on CUDA with Triton, ``gemm`` for
  other float32, else ``conv``; the column ``method`` shows the choice). ``--both-methods`` (the default
  on CUDA) times the methods side by side (``triton`` where it runs); the ``unfold/lags`` ratio, GFLOP and
  memory columns are those of the chosen method.

Layers (stride 1, the default batch in brackets): All-CNN-C's 3×3 layers (128): 3→96@32, 96→96@32,
96→192@16, 192→192@16 (padding 1), 192→192@8 (padding 0); ConvNeXt's depthwise 7×7 (``groups=C``,
padding 3; 32): 96@56, 192@28, 384@14, 768@7; ResNet-18's 3×3 (padding 1; 32): 64@56, 128@28, 256@14,
512@7. The KFC depends on the input channels only; the output channels are listed for reference.

Protocol: random normal input, one warm-up call per implementation (plans and caches), then
``--repeats`` rounds, interleaved with a rotating start; each call is timed alone (``time.perf_counter``
around it, ``torch.cuda.synchronize`` before and after on CUDA), the median is reported. TF32 is off.
The error of each implementation is ``max|result - reference| / max|reference|`` against a float64
reference computed once per layer (:func:`curvlib.native.kfc` of the input in float64; if that runs out of
memory, ``kfc_by_lags`` in float64 with ``lag_method="conv"``, exact there); the JSON records hold the
Frobenius relative errors as well (``*_frob_error``). On CUDA the extra memory of a call (peak allocated
during it minus allocated before it minus the result) is reported as well. A layer that runs out of
memory is reported as such and the run goes on.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Dict, List, NamedTuple, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402

from curvlib import native  # noqa: E402
from curvlib import precision as _precision  # noqa: E402
from curvlib.hyperparams import make_geometry  # noqa: E402
from curvlib.lag_gram import (kfc_by_lags, lag_flops, resolve_lag_method, supports_lags, triton_usable,  # noqa: E402
                               unfold_flops)


class Layer(NamedTuple):
    net: str
    c_in: int
    c_out: int
    size: int
    kernel: int
    padding: int
    groups: int
    batch: int

    @property
    def name(self) -> str:
        dw = " dw" if self.groups == self.c_in > 1 else ""
        return f"{self.c_in}->{self.c_out}@{self.size} k{self.kernel}{dw}"


LAYERS: List[Layer] = [
    *(Layer("allcnnc", ci, co, s, 3, p, 1, 128) for ci, co, s, p in
      [(3, 96, 32, 1), (96, 96, 32, 1), (96, 192, 16, 1), (192, 192, 16, 1), (192, 192, 8, 0)]),
    *(Layer("convnext", c, c, s, 7, 3, c, 32) for c, s in [(96, 56), (192, 28), (384, 14), (768, 7)]),
    *(Layer("resnet18", c, c, s, 3, 1, 1, 32) for c, s in [(64, 56), (128, 28), (256, 14), (512, 7)]),
]


def quick_layer(layer: Layer) -> Layer:
    """A tiny version of ``layer`` (channels /16, sizes /4, batch 2) of the same kind."""
    c_in = max(3, layer.c_in // 16) if layer.groups == 1 else max(2, layer.c_in // 16)
    c_out = c_in if layer.groups > 1 else max(3, layer.c_out // 16)
    size = max(layer.kernel - 2 * layer.padding, layer.size // 4, 2)
    return layer._replace(c_in=c_in, c_out=c_out, size=size, groups=c_in if layer.groups > 1 else 1, batch=2)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reference(x: torch.Tensor, geometry) -> Optional[torch.Tensor]:
    """The float64 KFC of ``x``: unfolded (independent of the lag code), else by lags (exact in float64)."""
    for fn in (native.kfc, lambda x64, g: kfc_by_lags(x64, g, lag_method="conv")):
        try:
            return fn(x.double(), geometry)
        except (torch.OutOfMemoryError, RuntimeError):  # RuntimeError: CPU allocation failures
            if x.device.type == "cuda":
                torch.cuda.empty_cache()
    return None


def measure(layer: Layer, device: torch.device, dtype: torch.dtype, repeats: int, lag_method: str,
            both_methods: bool) -> Dict:
    geometry = make_geometry(layer.c_in, layer.c_out, (layer.size, layer.size), kernel_size=layer.kernel,
                             padding=layer.padding, groups=layer.groups)
    assert supports_lags(geometry)
    chosen = resolve_lag_method(lag_method, dtype, device, channels_per_group=layer.c_in // layer.groups)
    methods = timed_methods(device, dtype) if both_methods else [chosen]
    record = dict(net=layer.net, layer=layer.name, batch=layer.batch, device=str(device), dtype=str(dtype),
                  method=chosen, unfold_gflop=unfold_flops(geometry, layer.batch) / 1e9,
                  lags_gflop=lag_flops(geometry, layer.batch, chosen) / 1e9,
                  **{f"{m}_gflop": lag_flops(geometry, layer.batch, m) / 1e9 for m in methods})
    impls = {"unfold": lambda x: native.kfc(x, geometry),
             **{m: (lambda x, m=m: kfc_by_lags(x, geometry, lag_method=m)) for m in methods}}
    try:
        x = torch.randn(layer.batch, layer.c_in, layer.size, layer.size, device=device, dtype=dtype)
    except torch.OutOfMemoryError:
        record["error"] = "out of memory (input)"
        return record
    reference = _reference(x, geometry)
    results: Dict[str, Optional[torch.Tensor]] = {}
    times: Dict[str, List[float]] = {name: [] for name in impls}
    for name, fn in impls.items():  # warm-up, error, extra memory
        try:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            result = fn(x)
            _sync(device)
            results[name] = result
            if device.type == "cuda":
                extra = torch.cuda.max_memory_allocated(device) - before - result.numel() * x.element_size()
                record[f"{name}_extra_mib"] = extra / 2**20
            if reference is not None:
                difference = result.double() - reference
                record[f"{name}_max_rel_error"] = (difference.abs().max()
                                                   / reference.abs().max().clamp_min(1e-300)).item()
                record[f"{name}_frob_error"] = (difference.norm() / reference.norm().clamp_min(1e-300)).item()
                del difference
            del result
        except (torch.OutOfMemoryError, RuntimeError) as error:  # RuntimeError: CPU allocation failures
            results[name] = None
            record[f"{name}_error"] = str(error).splitlines()[0][:120]
    del reference, results
    names = [name for name in impls if f"{name}_error" not in record]
    for r in range(repeats):
        for k in range(len(names)):
            name = names[(r + k) % len(names)]
            _sync(device)
            start = time.perf_counter()
            impls[name](x)
            _sync(device)
            times[name].append(time.perf_counter() - start)
    for name in names:
        record[f"{name}_ms"] = statistics.median(times[name]) * 1e3
    for key in ("ms", "extra_mib", "max_rel_error", "frob_error", "error"):  # the chosen method's, as "lags"
        if f"{chosen}_{key}" in record:
            record[f"lags_{key}"] = record[f"{chosen}_{key}"]
    if "unfold_ms" in record and "lags_ms" in record:
        record["speedup"] = record["unfold_ms"] / record["lags_ms"]
    for m in methods:
        if m != "conv" and "conv_ms" in record and f"{m}_ms" in record:
            record[f"{m}_over_conv"] = record[f"{m}_ms"] / record["conv_ms"]
    del x
    return record


def timed_methods(device: torch.device, dtype: torch.dtype) -> List[str]:
    """The lag methods timed side by side: the convolution, the GEMM form, and the Triton kernel where it
    runs (float32 on CUDA)."""
    return ["conv", "gemm"] + (["triton"] if device.type == "cuda" and triton_usable(dtype, device) else [])


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(records: List[Dict]) -> None:
    cuda = any(r["device"].startswith("cuda") for r in records)
    timed = [m for m in ("conv", "gemm", "triton") if any(f"{m}_gflop" in r for r in records)]
    both = len(timed) > 1
    header = f"{'net':<9} {'layer':<22} {'N':>4} {'method':>6} {'unfold ms':>10}"
    header += "".join(f" {m + ' ms':>9}" for m in timed) if both else f" {'lags ms':>9}"
    header += f" {'unfold/lags':>11} {'err unfold':>10}"
    header += "".join(f" {'err ' + m:>10}" for m in timed) if both else f" {'err lags':>9}"
    header += f" {'unfold GF':>10} {'lags GF':>8} {'GF ratio':>8}"
    if cuda:
        header += f" {'unfold MiB':>10} {'lags MiB':>9}"
    print(header)
    print("-" * len(header))
    for r in records:
        line = f"{r['net']:<9} {r['layer']:<22} {r['batch']:>4} {r['method']:>6} {_fmt(r.get('unfold_ms'), '10.2f')}"
        if both:
            line += "".join(f" {_fmt(r.get(f'{m}_ms'), '9.2f')}" for m in timed)
        else:
            line += f" {_fmt(r.get('lags_ms'), '9.2f')}"
        line += f" {_fmt(r.get('speedup'), '11.2f')} {_fmt(r.get('unfold_max_rel_error'), '10.1e')}"
        if both:
            line += "".join(f" {_fmt(r.get(f'{m}_max_rel_error'), '10.1e')}" for m in timed)
        else:
            line += f" {_fmt(r.get('lags_max_rel_error'), '9.1e')}"
        line += f" {r['unfold_gflop']:>10.3g} {r['lags_gflop']:>8.3g} {r['unfold_gflop'] / r['lags_gflop']:>8.2f}"
        if cuda:
            line += f" {_fmt(r.get('unfold_extra_mib'), '10.0f')} {_fmt(r.get('lags_extra_mib'), '9.0f')}"
        errors = [f"{k}: {v}" for k, v in r.items()
                  if k.endswith("error") and isinstance(v, str) and not k.startswith("lags_")]
        print(line + ("  " + "; ".join(errors) if errors else ""))
    speedups = [r["speedup"] for r in records if "speedup" in r]
    if speedups:
        geo = statistics.geometric_mean(speedups)
        print(f"\nunfold/lags time ratio: geometric mean {geo:.2f}, min {min(speedups):.2f}, max {max(speedups):.2f}"
              f" over {len(speedups)} layers (> 1: lags faster)")
    for m in timed[1:]:
        ratios = [r[f"{m}_over_conv"] for r in records if f"{m}_over_conv" in r]
        if ratios:
            geo = statistics.geometric_mean(ratios)
            print(f"{m}/conv time ratio: geometric mean {geo:.2f}, min {min(ratios):.2f}, max {max(ratios):.2f}"
                  f" over {len(ratios)} layers (< 1: {m} faster)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 5, --quick 2)")
    parser.add_argument("--quick", action="store_true", help="tiny layers, batch 2, on the CPU unless --device")
    parser.add_argument("--batch", type=int, default=None, help="override every layer's batch size")
    parser.add_argument("--nets", nargs="+", default=["allcnnc", "convnext", "resnet18"],
                        choices=["allcnnc", "convnext", "resnet18"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on the CPU")
    parser.add_argument("--lag-method", default="auto", choices=["auto", "conv", "gemm", "triton"],
                        help="kfc_by_lags' lag_method (auto: triton for float32 on CUDA, gemm for other float32, "
                             "else conv)")
    parser.add_argument("--both-methods", action=argparse.BooleanOptionalAction, default=None,
                        help="time the lag methods side by side: conv, gemm and (CUDA, float32) triton "
                             "(default: on CUDA only)")
    parser.add_argument("--json", default=None, help="also write the records to this file (JSON lines)")
    args = parser.parse_args(argv)
    if args.quick and "--device" not in (argv if argv is not None else sys.argv[1:]):
        args.device = "cpu"
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 5)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    both_methods = device.type == "cuda" if args.both_methods is None else args.both_methods
    if args.threads:
        torch.set_num_threads(args.threads)
    _precision.set_fp32_precision("ieee")
    layers = [quick_layer(layer) if args.quick else layer for layer in LAYERS if layer.net in args.nets]
    if args.batch:
        layers = [layer._replace(batch=args.batch) for layer in layers]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    chosen = resolve_lag_method(args.lag_method, dtype, device, channels_per_group=16)  # per layer in the table
    print(f"# KFC by lags vs unfold: {name}, torch {torch.__version__}, {args.dtype}, median of {repeats}, "
          f"lag_method={args.lag_method} ({chosen}){', both methods timed' if both_methods else ''}\n")
    torch.manual_seed(0)
    records = []
    for layer in layers:
        records.append(measure(layer, device, dtype, repeats, args.lag_method, both_methods))
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(records[-1]) + "\n")
    print_table(records)


if __name__ == "__main__":
    main()
