"""KFAC-expand (MC) steps on All-CNN-C with and without ``copy_moving_inputs`` of the graph caches.

In a training loop the layer inputs land at a new address in most steps, so graphs captured per
input address rarely replay (``curvlib.cuda_graphs``). With ``copy_moving_inputs`` (on by default for
the lags pathway and the chunked native KFC) such calls copy the input into the key's own buffer and
replay its graph. One process per setting (the caches are global):

    python benchmarks/diagnostics/moving_inputs.py --batch 32 --moving on
    python benchmarks/diagnostics/moving_inputs.py --batch 32 --moving off

Prints the median step time of a plain gradient and of a KFAC-expand (MC) step, float32, TF32 off.
"""

import argparse
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from end_to_end import all_cnn_c, measure  # noqa: E402

import curvlib  # noqa: E402
from curvlib import extensions as E, lag_gram, native  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--moving", choices=("on", "off"), default="on")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    moving = args.moving == "on"
    lag_gram._GRAPHS.copy_moving_inputs = moving
    native._KFC_GRAPHS.copy_moving_inputs = moving
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = all_cnn_c(100).to(device)
    loss_fn = nn.CrossEntropyLoss()
    X = torch.randn(args.batch, 3, 32, 32, device=device)
    y = torch.randint(0, 100, (args.batch,), device=device)

    def plain():
        model.zero_grad()
        loss_fn(model(X), y).backward()

    def step():
        with curvlib.curvature(model, loss_fn, E.KFACExpand(fisher="mc")):
            model.zero_grad()
            loss_fn(model(X), y).backward()

    base = measure(plain, device, args.repeats)[0]
    measure(step, device, 10)  # the first steps warm up, capture and meet new addresses
    t = measure(step, device, args.repeats)[0]
    print(f"batch {args.batch} moving {moving}: plain {base * 1e3:.2f} ms, KFAC-expand {t * 1e3:.2f} ms "
          f"({t / base:.2f}x)", flush=True)


if __name__ == "__main__":
    main()
