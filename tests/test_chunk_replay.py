"""curvlib.engine.chunk_replay: the column pass of a chunk captured as a CUDA graph and replayed.

CPU: the in-place accumulation while capturing, the copies of the states, when replay applies, the
option's check. GPU: GGN diagonals (exact, MC, per sample) with replayed chunks against the float64
references of ``test_engine_references`` and against the same step without replay; a model whose walk
falls back to autograd, an uneven last chunk and a non-replayable extension run eagerly.
"""

import warnings

import pytest
import torch
from torch import nn

import curvlib
from curvlib import extensions as E
from curvlib.engine import chunk_replay
from curvlib.engine.extension import add_into, owned

from test_engine_references import DT, GGNReference, make_model, sequential_cnn

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def test_add_into_adds_in_place_while_capturing():
    first, second = torch.randn(3), torch.randn(3)
    state = {}
    add_into(state, {"w": first})
    assert state["w"] is first  # stored as is
    add_into(state, {"w": second})
    assert state["w"] is not first and torch.equal(state["w"], first + second)
    kept = state["w"]
    with chunk_replay._capturing():
        assert chunk_replay.capturing()
        add_into(state, {"w": second})
    assert not chunk_replay.capturing()
    assert state["w"] is kept and torch.allclose(kept, first + 2 * second)


def test_owned_replaces_tensors_by_copies():
    held = torch.randn(4)
    state = {"w": held, "note": "kept"}
    owned(state)
    assert state["w"] is not held and torch.equal(state["w"], held) and state["note"] == "kept"
    state["w"].add_(1.0)
    assert not torch.equal(state["w"], held)


def test_replay_applies_only_to_cuda_columns_enough_chunks_and_replayable_extensions():
    cpu = torch.randn(5, 2)
    assert not chunk_replay.replayable(cpu, 5, [E.DiagGGNExact()])
    if torch.cuda.is_available():
        gpu = cpu.cuda()
        many = chunk_replay.MIN_CHUNKS
        assert chunk_replay.replayable(gpu, many, [E.DiagGGNExact(), E.DiagGGNMC()])
        assert not chunk_replay.replayable(gpu, many - 1, [E.DiagGGNExact()])
        assert not chunk_replay.replayable(gpu, many, [E.DiagGGNExact(), E.KFACExpand()])


def test_replay_chunks_must_be_a_bool():
    with pytest.raises(TypeError, match="replay_chunks must be a bool, got 1"):
        curvlib.curvature(nn.Linear(2, 2), nn.MSELoss(), E.DiagGGNExact(), replay_chunks=1)


def test_cpu_steps_with_several_chunks_do_not_replay():
    model, X = sequential_cnn(12).to(DT), torch.randn(3, 2, 8, 8, dtype=DT)
    y = torch.randint(0, 12, (X.shape[0],))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss_fn = nn.CrossEntropyLoss()
        with curvlib.curvature(model, loss_fn, E.DiagGGNExact(), memory_budget=1, column_backward="graph") as ctx:
            loss_fn(model(X), y).backward()
    assert ctx.last_chunk_size == 1 and ctx.last_replays == 0


# ----------------------------------------------------------------------------------------------
# GPU


def _step(model, X, y, extension, replay: bool, chunk: int, monkeypatch, **kwargs):
    """One step on CUDA with ``chunk`` columns per chunk (the engine's chunk size fixed by patching
    its memory estimate's answer), with or without replay (from three chunks on); returns the context."""
    monkeypatch.setattr(curvlib.curvature, "_stages", lambda self, *args: (chunk, None))
    monkeypatch.setattr(chunk_replay, "MIN_CHUNKS", 3)  # these steps have 3-4 chunks
    loss_fn = nn.CrossEntropyLoss()
    with curvlib.curvature(model, loss_fn, extension, memory_budget=2**40, replay_chunks=replay, **kwargs) as ctx:
        loss_fn(model(X), y).backward()
    return ctx


def _results(model, field):
    return {name: getattr(p, field).detach().double().cpu() for name, p in model.named_parameters()}


@cuda
@pytest.mark.parametrize("extension", ["exact", "mc", "exact_per_sample"])
def test_replayed_chunks_match_the_reference_and_the_eager_step(extension, monkeypatch):
    classes, chunk = 12, 3
    reference_model = sequential_cnn(classes).to(DT)
    X = torch.randn(3, 2, 8, 8, dtype=DT)
    y = torch.randint(0, classes, (3,))
    model = sequential_cnn(classes).cuda()
    model.load_state_dict(reference_model.state_dict())
    make = {"exact": lambda: E.DiagGGNExact(), "mc": lambda: E.DiagGGNMC(mc_samples=12),
            "exact_per_sample": lambda: E.BatchDiagGGNExact()}[extension]
    field = make().savefield
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    results = {}
    for replay in (False, True):
        generator = torch.Generator(device="cuda").manual_seed(7)  # the same MC samples in both steps
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            ctx = _step(model, X.float().cuda(), y.cuda(), make(), replay, chunk, monkeypatch, generator=generator)
        assert ctx.last_column_backward == "graph"
        assert ctx.last_replays == (-(-classes // chunk) - 1 if replay else 0)
        results[replay] = _results(model, field)
    for name in results[False]:
        eager, replayed = results[False][name], results[True][name]
        assert torch.allclose(replayed, eager, rtol=1e-5, atol=1e-7 * eager.abs().max()), name
    if extension == "exact":
        reference = GGNReference(reference_model, nn.CrossEntropyLoss(), X, y)
        for name, got in results[True].items():
            expected = reference.diag(name)
            assert ((got - expected).norm() / expected.norm()).item() < 1e-4, name


@cuda
def test_uneven_last_chunk_and_autograd_fallback_and_other_extensions_run_eagerly(monkeypatch):
    classes = 12
    model = sequential_cnn(classes).cuda()
    X, y = torch.randn(3, 2, 8, 8, device="cuda"), torch.randint(0, classes, (3,), device="cuda")
    monkeypatch.setattr("curvlib.engine.context.balanced_chunk", lambda largest, total: largest)
    ctx = _step(model, X, y, E.DiagGGNExact(), True, 5, monkeypatch)  # chunks 5, 5, 2: the last eager
    assert ctx.last_chunk_size == 5 and ctx.last_replays == 1
    expected = _results(model, "diag_ggn_exact")
    ctx = _step(model, X, y, E.DiagGGNExact(), False, 5, monkeypatch)
    for name, value in _results(model, "diag_ggn_exact").items():
        assert torch.allclose(expected[name], value, rtol=1e-5, atol=1e-7 * value.abs().max()), name

    # batch norm in training mode: the walk falls back to autograd in the first chunk, nothing replayed
    bn_model, bn_X = make_model("residual_train")
    bn_model = bn_model.float().cuda()
    bn_y = torch.randint(0, 3, (bn_X.shape[0],), device="cuda")
    ctx = _step(bn_model, bn_X.float().cuda(), bn_y, E.DiagGGNExact(), True, 1, monkeypatch)
    assert ctx.last_column_backward == "autograd" and ctx.last_replays == 0


def test_capture_failure_runs_the_chunk_eagerly(monkeypatch):
    """A chunk whose capture raises is marked failed and reports that nothing ran (the engine then runs
    it eagerly); needs no GPU: the capture's first step is made to fail."""
    replay = chunk_replay.ChunkReplay(lambda block: None)

    def failing(self, device):
        self.failed = True
        return False

    monkeypatch.setattr(chunk_replay.ChunkReplay, "_capture", failing)
    assert replay(torch.randn(2, 3)) is False and replay.failed and replay.replays == 0
    assert replay(torch.randn(2, 3)) is False


@cuda
def test_consecutive_steps_each_replay_into_the_kept_pool(monkeypatch):
    """Each step captures a new graph into the pool the previous step's graph keeps (PyTorch refuses a
    pool whose graphs are all gone); after release() the next step starts a new pool."""
    classes = 12
    model = sequential_cnn(classes).cuda()
    X, y = torch.randn(3, 2, 8, 8, device="cuda"), torch.randint(0, classes, (3,), device="cuda")
    first = None
    for step in range(4):
        if step == 2:
            chunk_replay.release()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a failed capture warns
            ctx = _step(model, X, y, E.DiagGGNExact(), True, 3, monkeypatch)
        assert ctx.last_replays == 3, step
        result = _results(model, "diag_ggn_exact")
        first = first or result
        for name in first:
            assert torch.allclose(result[name], first[name], rtol=1e-5, atol=1e-7 * first[name].abs().max()), name
