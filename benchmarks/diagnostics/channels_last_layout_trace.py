"""Layouts in and out of each batched rule of a channels-last column pass (DiagGGNExact, All-CNN-C).

    python benchmarks/diagnostics/channels_last_layout_trace.py

Runs one step of ``curvature(model, loss, DiagGGNExact(), column_backward="graph")`` with
``BackwardOptions(channels_last=True)`` and prints, for the first 40 rule calls, the node, the shape and
strides of the gradient it received and of the gradient it passed on, and whether each (with the
vectors folded into the batch) is channels-last or NCHW contiguous. Needs a CUDA device.
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # benchmarks/
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repository root

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import end_to_end  # noqa: E402
from curvlib import extensions as E  # noqa: E402
from curvlib.engine import batched_rules, curvature  # noqa: E402


def describe(t: torch.Tensor) -> str:
    folded = t.flatten(0, 1) if t.dim() >= 3 else t
    channels_last = folded.is_contiguous(memory_format=torch.channels_last) if folded.dim() == 4 else "-"
    return f"{tuple(t.shape)} strides {t.stride()} channels-last {channels_last} contiguous {t.is_contiguous()}"


def traced(rule, seen):
    def inner(node, g, need, cache, options):
        out = rule(node, g, need, cache, options)
        if seen[0] < 40:
            seen[0] += 1
            passed = next((t for t in out if t is not None), None)
            print(f"{type(node).__name__:32s} in  {describe(g)}\n{'':32s} out {describe(passed) if passed is not None else None}")
        return out

    return inner


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("channels_last_layout_trace.py needs a CUDA device")
    end_to_end.set_global_precision("tf32")
    model = end_to_end.all_cnn_c(100).cuda()
    x = torch.randn(128, 3, 32, 32, device="cuda")
    y = torch.randint(0, 100, (128,), device="cuda")
    seen = [0]
    for name in list(batched_rules._RULES):
        batched_rules._RULES[name] = traced(batched_rules._RULES[name], seen)
    loss_fn = nn.CrossEntropyLoss()
    ctx = curvature(model, loss_fn, E.DiagGGNExact(), memory_budget=3.5e9, column_backward="graph")
    ctx.backward_options = batched_rules.BackwardOptions(channels_last=True)
    with ctx:
        loss_fn(model(x), y).backward()


if __name__ == "__main__":
    main()
