"""Profile the curvature operations of a small CNN, layer by layer, and find the hot layers.

    python examples/profile_model.py --quick              # a few seconds on a CPU
    python examples/profile_model.py --out hot.png --json profile.json

For every Conv/ConvTranspose/Linear layer, every curvature operation (forward, VJPs, KFAC factors,
GGN diagonal and Gram, HesScale) and every pathway (auto, native, tensor network …) it measures the
time (median after warm-up) and the extra peak memory, attaches the analytic cost (FLOPs, bytes,
largest intermediate) and the efficiency against the device's measured ceilings, then prints the
hot-layer table and the pathway comparison and draws the top entries to a PNG.
"""

import argparse
import os
import sys
import tempfile

import torch
from torch import nn

from curvlib.profile import measure_ceilings, profile_model


class SmallCNN(nn.Module):
    """A small CNN with a grouped convolution, a transposed convolution and a Linear head."""

    def __init__(self, width: int = 16, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.down = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, groups=2)
        self.mix = nn.Conv2d(2 * width, 2 * width, 3, padding=1)
        self.up = nn.ConvTranspose2d(2 * width, width, 2, stride=2)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.down(x))
        x = torch.relu(self.mix(x))
        x = torch.relu(self.up(x))
        return self.head(x.mean((2, 3)))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small batch, fewer pathways and repeats (seconds)")
    parser.add_argument("--out", default=None, help="PNG of the hot layers (default: a temporary directory)")
    parser.add_argument("--json", default=None, help="also write the whole profile as JSON here")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--top", type=int, default=8, help="entries in the table and the plot")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    device = torch.device(args.device)
    batch, size = (8, 16) if args.quick else (32, 32)
    model = SmallCNN().to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    pathways = ("auto", "native", "tn+simplify", "unfold") if args.quick else ("auto", "native", "tn", "tn+simplify", "unfold", "fused")

    ceilings = measure_ceilings(device, quick=args.quick)
    print(f"ceilings of {device}: {ceilings.flops_per_s / 1e9:.1f} GFLOP/s (fp32 matmul), "
          f"{ceilings.bytes_per_s / 1e9:.1f} GB/s (copy), {ceilings.call_overhead_s * 1e6:.1f} µs per call")
    profile = profile_model(
        model, x, pathways=pathways, columns=10, repeats=2 if args.quick else 5, warmup=1 if args.quick else 2,
        ceilings=ceilings,
    )

    print(f"\n{profile.summary(k=5)}")
    print(f"\nhot (layer, operation) pairs, pathway 'auto' (memory: {profile.settings['memory_method']}):")
    print(profile.table(k=args.top))
    print("\nper layer (time summed over operations, memory the largest):")
    for spot in profile.hot_layers(k=None, per="layer"):
        print(f"  {spot.layer:6s} {spot.module:16s} {spot.time_s * 1e3:8.3f} ms {100 * spot.time_share:5.1f}%  "
              f"{spot.extra_bytes / 2**20:8.2f} MiB")
    print("\npathways side by side [ms] (* fastest):")
    print(profile.compare(k=args.top))

    out = args.out or os.path.join(tempfile.mkdtemp(prefix="curvlib-profile-"), "hot_layers.png")
    try:
        profile.plot(out, k=args.top)
        print(f"\nplot written to {out}: {os.path.getsize(out) > 0}")
    except ImportError as error:
        print(f"\nno plot: {error}")
    if args.json:
        print(f"profile written to {profile.save(args.json)}")

    failed = [r for r in profile.rows if r.status in ("oom", "error")]
    print(f"every applicable (layer, operation, pathway) measured: {not failed}")
    for r in failed:
        print(f"  {r.layer} {r.op} {r.pathway}: {r.status} {r.message}")


if __name__ == "__main__":
    main(sys.argv[1:])
