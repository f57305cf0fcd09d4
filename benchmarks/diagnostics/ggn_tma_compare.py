"""The unfolded GGN kernel with its TMA form against its pointer form only, and (TF32, C = 100) the unfold
pathway with PyTorch's TF32 flags: All-CNN-C's layers, batch 128, C = 100 and 10, each form autotuned
over its own tiles. Prints time, rate, extra peak memory and the chosen tile per layer, and the totals.

    python benchmarks/diagnostics/ggn_tma_compare.py   (a CUDA GPU; the TMA form needs compute capability 9.0)
"""

import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import table_e3  # noqa: E402
from _timing import cuda_median_ms  # noqa: E402
from kernels import Inputs  # noqa: E402

from curvlib import functional as CF  # noqa: E402
from curvlib import kernels  # noqa: E402
from curvlib.kernels import autotune, ggn_unfolded  # noqa: E402


def measure(fn, repeats=5):
    """Median CUDA-event milliseconds, extra peak MiB of one more call, and its result."""
    ms = cuda_median_ms(fn, repeats=repeats, warmups=1)
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    return ms, (torch.cuda.max_memory_allocated() - before) / 2**20, out


def set_tf32_flags(on: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


def main() -> None:
    layers = table_e3.layers(["allcnnc"], subset="all")
    tma_supported = ggn_unfolded.tma_supported
    for columns, precisions in ((100, ["tf32", "bf16", "tf32x3"]), (10, ["tf32", "bf16"])):
        for precision in precisions:
            totals = {}
            for index, layer in enumerate(layers):
                inp = Inputs(layer, 128, columns, ["ggn_diag"], "cuda", seed=index)
                weight = inp.geometry.weight_shape
                flops = 2 * columns * 128 * math.prod(weight) * inp.s[0, 0, 0].numel()
                line = [f"{precision} C={columns} {layer.name}:"]
                outs = {}
                for name, tma in (("tma", True), ("pointer", False)):
                    ggn_unfolded.tma_supported = tma_supported if tma else (lambda device: False)
                    autotune.clear_all()
                    ms, mib, outs[name] = measure(lambda: kernels.ggn_diag(inp.x, inp.s, inp.geometry,
                                                                           precision=precision))
                    chosen = [c for cache in autotune.chosen().values() for c in cache.values()]
                    totals[name] = totals.get(name, 0) + ms
                    line.append(f"{name} {ms:.2f}ms {flops / ms / 1e9:.0f}TF/s {mib:.0f}MiB "
                                f"[{chosen[-1] if chosen else '?'}]")
                ggn_unfolded.tma_supported = tma_supported
                difference = (outs["tma"] - outs["pointer"]).norm() / outs["pointer"].norm()
                line.append(f"relerr tma/pointer {difference.item():.1e}")
                if precision == "tf32" and columns == 100:
                    set_tf32_flags(True)
                    try:
                        ms, mib, _ = measure(lambda: CF.ggn_diag(inp.x, inp.s, layer.kernel, **inp.hyper,
                                                                 pathway="unfold"), 3)
                        totals["unfold"] = totals.get("unfold", 0) + ms
                        line.append(f"unfold(TF32 flags) {ms:.2f}ms {mib:.0f}MiB")
                    except Exception as error:  # out of memory on a smaller GPU
                        line.append(f"unfold failed {type(error).__name__}")
                    set_tf32_flags(False)
                print(" ".join(line), flush=True)
                del inp, outs
                torch.cuda.empty_cache()
            ratios = f"; pointer/tma {totals['pointer'] / totals['tma']:.2f}x"
            if "unfold" in totals:
                ratios += f" unfold/tma {totals['unfold'] / totals['tma']:.2f}x"
            print(f"TOTAL {precision} C={columns}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in totals.items())
                  + ratios, flush=True)


if __name__ == "__main__":
    main()
