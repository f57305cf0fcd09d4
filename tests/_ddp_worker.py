"""Data-parallel check of curvlib.optim: ranks with half batches vs one process with the whole batch.

Used by ``tests/test_optim_distributed.py`` (2 CPU processes, gloo) and runnable by hand on GPUs::

    python tests/_ddp_worker.py --backend nccl --world-size 2      # one process per GPU

Each configuration trains the same network for a few steps; rank ``r`` takes the ``r``-th shard
of every batch, wrapped in ``DistributedDataParallel``. The parameters every rank ends with are
compared with those of a single process that sees the whole batch.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch
from torch import nn

STEPS = 4
BATCH = 8


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3, groups=2), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5)
    )


def batches(device, dtype):
    generator = torch.Generator().manual_seed(1)
    return [
        (torch.randn(BATCH, 1, 8, 8, generator=generator, dtype=dtype).to(device), torch.randint(0, 5, (BATCH,), generator=generator).to(device))
        for _ in range(STEPS)
    ]


def make_optimizer(name: str, model: nn.Module, loss_fn: nn.Module, params):
    from curvlib.optim import KFAC, AdaHesScale, DiagGGNNaturalGradient

    if name == "kfac-expand-type2-sgd":
        return KFAC(model, loss_fn, torch.optim.SGD(params, lr=0.1, momentum=0.9), approx="expand", fisher="type-2",
                    damping=1e-2, inverse_update_every=2)
    if name == "kfac-reduce-empirical-adam":
        return KFAC(model, loss_fn, torch.optim.Adam(params, lr=1e-2), approx="reduce", fisher="empirical",
                    damping=1e-2, inverse="eigen", damping_split="exact", kl_clip=1e-2)
    if name == "adahesscale":
        return AdaHesScale(model, loss_fn, lr=1e-2, params=params)
    if name == "diag-ggn-exact":
        return DiagGGNNaturalGradient(model, loss_fn, torch.optim.SGD(params, lr=0.1), fisher="exact", damping=1e-2)
    raise ValueError(name)


CONFIGS = ["kfac-expand-type2-sgd", "kfac-reduce-empirical-adam", "adahesscale", "diag-ggn-exact"]


def train(name, device, dtype, rank=0, world_size=1, ddp=False):
    """Final parameters (on CPU) and seconds per step after the first."""
    model = build_model().to(device=device, dtype=dtype)
    loss_fn = nn.CrossEntropyLoss()
    wrapped = model
    if ddp:
        device_ids = [device.index] if device.type == "cuda" else None
        wrapped = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    opt = make_optimizer(name, wrapped, loss_fn, model.parameters())
    shard = BATCH // world_size
    times = []
    for X, y in batches(device, dtype):
        X, y = X[rank * shard : (rank + 1) * shard], y[rank * shard : (rank + 1) * shard]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        opt.zero_grad()
        loss_fn(wrapped(X), y).backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    info = {}
    if hasattr(opt, "communication_bytes"):
        info["bytes"] = opt.communication_bytes()
    return [p.detach().cpu() for p in model.parameters()], sum(times[1:]) / max(1, len(times) - 1), info


def worker(rank: int, world_size: int, init_file: str, result_file: str, backend: str, dtype_name: str) -> None:
    torch.set_num_threads(1)
    dtype = getattr(torch, dtype_name)
    if backend == "nccl":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        device = torch.device("cpu")
    torch.distributed.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        results = {name: train(name, device, dtype, rank, world_size, ddp=True) for name in CONFIGS}
        torch.save(results, f"{result_file}.{rank}")
        torch.distributed.barrier()  # no rank tears down while another still communicates
    finally:
        torch.distributed.destroy_process_group()


def run_ranks(world_size: int, backend: str, dtype_name: str, directory: str):
    """Spawn ``world_size`` ranks; return each rank's results."""
    init_file = os.path.join(directory, "init")
    result_file = os.path.join(directory, "result")
    torch.multiprocessing.spawn(worker, args=(world_size, init_file, result_file, backend, dtype_name), nprocs=world_size, join=True)
    return [torch.load(f"{result_file}.{rank}", weights_only=False) for rank in range(world_size)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--dtype", default="float64")
    args = parser.parse_args()
    device = torch.device("cuda", 0) if args.backend == "nccl" else torch.device("cpu")
    with tempfile.TemporaryDirectory() as directory:
        ranks = run_ranks(args.world_size, args.backend, args.dtype, directory)
    dtype = getattr(torch, args.dtype)
    print(f"torch {torch.__version__}, backend {args.backend}, {args.world_size} ranks, {args.dtype}, "
          f"{STEPS} steps of batch {BATCH} (shards of {BATCH // args.world_size})")
    if device.type == "cuda":
        print(f"devices: {[torch.cuda.get_device_name(i) for i in range(args.world_size)]}")
    worst = 0.0
    for name in CONFIGS:
        single, single_time, info = train(name, device, dtype)
        for rank, results in enumerate(ranks):
            params, rank_time, _ = results[name]
            error = max(((p - q).abs().max() / q.abs().max()).item() for p, q in zip(params, single))
            worst = max(worst, error)
            print(f"{name:28s} rank {rank}: max relative difference to one process {error:.2e}; "
                  f"{rank_time * 1e3:.1f} ms/step (one process, whole batch: {single_time * 1e3:.1f} ms/step)")
        if "bytes" in info:
            print(f"{'':28s} all-reduce per factor update: {sum(info['bytes'].values())} bytes ({info['bytes']})")
    print(f"worst relative difference: {worst:.2e}")
    sys.exit(0 if worst < (1e-10 if dtype == torch.float64 else 1e-4) else 1)


if __name__ == "__main__":
    main()
