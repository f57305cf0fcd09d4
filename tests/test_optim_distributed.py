"""curvlib.optim under DistributedDataParallel: 2 CPU processes (gloo), half a batch each, give the
parameters of one process trained on the whole batch (float64, to round-off).

The ranks run in spawned processes (``tests/_ddp_worker.py``), one spawn for all configurations
(KFAC expand/type-2 with SGD, KFAC reduce/empirical with Adam and exact damping + KL clipping,
AdaHesScale, diagonal GGN) to keep the start-up cost (two Python processes importing torch) once.
"""

from __future__ import annotations

import pytest
import torch

import _ddp_worker
from curvlib.optim import distributed as dist_utils


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.fail("torch.distributed with the gloo backend is required for this test")
    return _ddp_worker.run_ranks(2, "gloo", "float64", str(tmp_path_factory.mktemp("ddp")))


@pytest.mark.parametrize("name", _ddp_worker.CONFIGS)
def test_two_gloo_ranks_match_one_process_on_the_whole_batch(rank_results, name):
    single, _, _ = _ddp_worker.train(name, torch.device("cpu"), torch.float64)
    initial = [p.detach() for p in _ddp_worker.build_model().double().parameters()]
    for rank, results in enumerate(rank_results):
        params, _, _ = results[name]
        for index, (p, q, p0) in enumerate(zip(params, single, initial)):
            assert not torch.equal(q, p0), "the reference did not train"
            scale = q.abs().max().item()
            error = (p - q).abs().max().item()
            assert error <= 1e-10 * scale, f"{name}, rank {rank}, parameter {index}: differs by {error:.3e} (scale {scale:.3e})"


def test_both_ranks_take_the_same_step(rank_results):
    for name in _ddp_worker.CONFIGS:
        for p, q in zip(rank_results[0][name][0], rank_results[1][name][0]):
            assert torch.equal(p, q), f"{name}: ranks differ"


def test_symmetric_packing_round_trip(seed):
    matrix = torch.randn(3, 5, 5, dtype=torch.float64)
    matrix = matrix + matrix.mT
    packed = dist_utils._triu(matrix)
    assert packed.shape == (3, 15) and dist_utils.packed_numel(matrix, True) == 45
    assert torch.equal(dist_utils._untriu(packed, 5), matrix)


def test_distributed_true_without_process_group_is_an_error():
    with pytest.raises(ValueError, match="initialised torch.distributed process group"):
        dist_utils.resolve_distributed(True)
    assert dist_utils.resolve_distributed("auto") is False
