"""Averaging curvature statistics across data-parallel ranks (``torch.distributed``).

Under ``DistributedDataParallel`` every rank sees its own shard of the batch and DDP averages the
gradients. The curvature statistics must be averaged the same way *before* they are inverted, so
that every rank holds the same preconditioner and takes the same step:

- with a ``mean`` loss and equal per-rank batches, the per-rank KFAC factors
  (``1/N_r Σ_n a aᵀ`` and ``1/N_r Σ_n G_n``), GGN diagonals and HesScale diagonals are means over
  the rank's samples, so their average over ranks is exactly the full-batch statistic — the same
  reasoning that makes DDP's gradient average the full-batch gradient;
- HesScale's diagonal is averaged *before* AdaHesScale squares it (the full-batch ``h`` is the
  mean of the per-rank ``h``, its square is not the mean of the squares).

:func:`all_reduce_mean` does one ``all_reduce`` for all statistics of a step: the tensors are
packed into one flat buffer per (dtype, device), symmetric matrices as their upper triangle only
(``D (D + 1) / 2`` instead of ``D²`` entries). A presence flag per entry travels with them, so a
statistic some rank did not produce (a layer whose output did not reach that rank's loss) is
averaged over the ranks that did.

Example::

    stats = {"layer0.A": A, "layer0.G": G}
    averaged = all_reduce_mean(stats, symmetric={"layer0.A", "layer0.G"})
"""

from __future__ import annotations

from typing import Dict, Iterable, Optional

import torch
from torch import Tensor


def world_size(process_group=None) -> int:
    """Number of ranks of ``process_group`` (1 when ``torch.distributed`` is unavailable or not initialised)."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return 1
    return torch.distributed.get_world_size(process_group)


def resolve_distributed(distributed, process_group=None) -> bool:
    """``distributed`` ``"auto"`` → whether a process group with more than one rank is initialised."""
    if distributed not in ("auto", True, False):
        raise ValueError(f"distributed must be 'auto', True or False, got {distributed!r}")
    if distributed == "auto":
        return world_size(process_group) > 1
    if distributed and (not torch.distributed.is_available() or not torch.distributed.is_initialized()):
        raise ValueError("distributed=True needs an initialised torch.distributed process group")
    return bool(distributed)


def _triu(matrix: Tensor) -> Tensor:
    rows, cols = torch.triu_indices(matrix.shape[-1], matrix.shape[-1], device=matrix.device)
    return matrix[..., rows, cols]


def _untriu(packed: Tensor, size: int) -> Tensor:
    rows, cols = torch.triu_indices(size, size, device=packed.device)
    matrix = packed.new_zeros(*packed.shape[:-1], size, size)
    matrix[..., rows, cols] = packed
    matrix[..., cols, rows] = packed
    return matrix


def packed_numel(tensor: Tensor, symmetric: bool) -> int:
    """Entries ``tensor`` takes in the communication buffer (upper triangle for symmetric matrices)."""
    if symmetric:
        size = tensor.shape[-1]
        return tensor[..., 0, 0].numel() * size * (size + 1) // 2
    return tensor.numel()


def all_reduce_mean(
    statistics: Dict[str, Optional[Tensor]],
    keys: Iterable[str],
    like: Dict[str, Tensor],
    symmetric: Iterable[str] = (),
    process_group=None,
) -> Dict[str, Tensor]:
    """Average ``statistics`` over the ranks that have them, in one ``all_reduce`` per (dtype, device).

    Args:
        statistics: this rank's tensors by key; a key absent (or ``None``) means this rank has none.
        keys: every key any rank may send, in the same order on every rank.
        like: a tensor of the right shape, dtype and device per key (for ranks that lack it).
        symmetric: keys of symmetric matrices ``[..., D, D]``, sent as their upper triangle.
        process_group: the group to reduce over (default: the world).

    Returns:
        The averaged tensors of the keys at least one rank had.
    """
    keys = list(keys)
    symmetric = set(symmetric)
    buckets: Dict[tuple, list] = {}
    for key in keys:
        ref = like[key]
        buckets.setdefault((ref.dtype, ref.device), []).append(key)
    result: Dict[str, Tensor] = {}
    for (dtype, device), bucket in buckets.items():
        pieces, flags = [], []
        for key in bucket:
            value = statistics.get(key)
            present = value is not None
            value = value if present else torch.zeros_like(like[key])
            value = value.to(dtype=dtype, device=device)
            pieces.append((_triu(value) if key in symmetric else value).reshape(-1))
            flags.append(1.0 if present else 0.0)
        buffer = torch.cat(pieces + [torch.tensor(flags, dtype=dtype, device=device)])
        torch.distributed.all_reduce(buffer, op=torch.distributed.ReduceOp.SUM, group=process_group)
        counts = buffer[-len(bucket):]
        offset = 0
        for key, count in zip(bucket, counts.tolist()):
            ref = like[key]
            numel = packed_numel(ref, key in symmetric)
            flat = buffer[offset : offset + numel]
            offset += numel
            if count == 0:
                continue
            flat = flat / count
            if key in symmetric:
                result[key] = _untriu(flat.reshape(*ref.shape[:-2], -1), ref.shape[-1])
            else:
                result[key] = flat.reshape(ref.shape)
    return result
