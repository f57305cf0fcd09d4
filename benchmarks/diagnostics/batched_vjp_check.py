"""Does autograd's batched VJP (``is_grads_batched``) run on this device for the end-to-end models?

    python benchmarks/diagnostics/batched_vjp_check.py

Prints, per model, whether the batched backward of C columns succeeds and its time against a loop
over the columns (the engine falls back to the loop when the batched call raises).
"""

import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from end_to_end import all_cnn_c, three_c_three_d  # noqa: E402


def main():
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for build, classes in ((three_c_three_d, 10), (all_cnn_c, 100)):
        model = build(classes).to(device)
        x = torch.randn(128 if device.type == "cuda" else 4, 3, 32, 32, device=device)
        outputs = []
        hooks = [m.register_forward_hook(lambda m, i, o: outputs.append(o)) for m in model
                 if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
        out = model(x)
        for h in hooks:
            h.remove()
        for columns in (2, 10):
            v = torch.randn(columns, *out.shape, device=device)
            try:
                torch.autograd.grad(out, outputs, v, is_grads_batched=True, retain_graph=True)
                torch.cuda.synchronize() if device.type == "cuda" else None
                start = time.perf_counter()
                torch.autograd.grad(out, outputs, v, is_grads_batched=True, retain_graph=True)
                torch.cuda.synchronize() if device.type == "cuda" else None
                batched = time.perf_counter() - start
            except Exception:
                batched = None
                print(f"{build.__name__} C={columns}: batched VJP FAILED:\n{traceback.format_exc()[-1500:]}")
            start = time.perf_counter()
            for c in range(columns):
                torch.autograd.grad(out, outputs, v[c], retain_graph=True)
            torch.cuda.synchronize() if device.type == "cuda" else None
            loop = time.perf_counter() - start
            print(f"{build.__name__} C={columns}: batched {batched}, loop {loop:.4f} s", flush=True)


if __name__ == "__main__":
    main()
