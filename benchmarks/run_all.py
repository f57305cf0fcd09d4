"""Every benchmark in one command (core paper §F/§G protocol on one GPU, in under 10 minutes).

    python benchmarks/run_all.py [--out DIR] [--quick]

1. ``ops.py``: the operations on the Table E3 anchor layers, PT / einconv / every curvlib pathway / auto;
2. ``end_to_end.py``: each extension vs BackPACK's equivalent on 3c3d and All-CNN-C (batch 128) and
   the GGN Gram vs a ``torch.func`` empirical NTK.

Results (JSON lines, Markdown, PNG; device, torch version and date in each) go to
``DIR`` (default ``benchmarks/results/<device>-<date>/``). ``--quick`` runs both on tiny CPU
configurations in seconds (the test suite does).
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402

import end_to_end  # noqa: E402
import ops  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="results folder")
    parser.add_argument("--quick", action="store_true", help="tiny CPU smoke run of both benchmarks")
    parser.add_argument("--ops-deadline-s", type=float, default=390.0, help="time limit of the ops benchmark")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.quick
    name = torch.cuda.get_device_name() if cuda else "cpu"
    out = args.out or os.path.join(
        HERE, "results", f"{re.sub(r'[^A-Za-z0-9]+', '-', name).strip('-').lower()}-{datetime.date.today()}"
    )
    os.makedirs(out, exist_ok=True)
    start = time.perf_counter()
    ops_args = ["--out", os.path.join(out, "ops")]
    if args.quick:
        ops_args.append("--quick")
    else:
        ops_args += ["--deadline-s", str(args.ops_deadline_s), "--budget-s", str(0.8 * args.ops_deadline_s)]
    ops.main(ops_args)
    e2e_args = ["--out", out] + (["--quick", "--device", "cpu"] if args.quick else ["--profile", "DiagGGNExact"])
    end_to_end.main(e2e_args)
    print(f"run_all: done in {time.perf_counter() - start:.0f} s; results in {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
