"""How fast do the three ways of :func:`curvlib.engine.layers.batched_vjp` backpropagate C columns through
the end-to-end models on this device?

    python benchmarks/diagnostics/batched_vjp_check.py

Per model and number of columns: ``torch.func.vmap`` over ``torch.autograd.grad`` (what the engine tries
first: functorch's batching rules fold the columns into each backward kernel's batch), autograd's own
``is_grads_batched`` (the legacy vmap, which loops over the columns inside convolutions) and a plain loop
over the columns; each checked against the loop.
"""

import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from end_to_end import all_cnn_c, three_c_three_d  # noqa: E402

from curvlib.engine import layers  # noqa: E402

WAYS = {"functorch vmap": layers._functorch_vjp, "legacy is_grads_batched": layers._legacy_batched_vjp,
        "loop": layers._looped_vjp}


def _seconds(run, device) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    run()
    sync()
    start = time.perf_counter()
    run()
    sync()
    return time.perf_counter() - start


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
            reference = layers._looped_vjp(out, outputs, v)
            cells = []
            for name, way in WAYS.items():
                try:
                    grads = way(out, outputs, v)
                    error = max(((g - r).abs().max() / r.abs().max().clamp_min(1e-30)).item()
                                for g, r in zip(grads, reference))
                    cells.append(f"{name} {_seconds(lambda: way(out, outputs, v), device) * 1e3:.2f} ms "
                                 f"(rel. err. {error:.1e})")
                except Exception:
                    cells.append(f"{name} FAILED")
                    print(traceback.format_exc()[-1500:])
            print(f"{build.__name__} C={columns}: " + ", ".join(cells), flush=True)


if __name__ == "__main__":
    main()
