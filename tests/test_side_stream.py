"""The KFAC input factors on a side CUDA stream (``curvature(overlap=True)``, ``curvlib.engine.side_stream``).

CPU: the factors are computed once per group and approximation, whichever extensions read them, and
equal the in-order computation. CUDA: they run on the side stream, equal ``overlap=False``, and the
caller's stream waits for them when ``backward()`` returns (a side call kept busy by ``torch.cuda._sleep``
leaves the caller's stream pending).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvlib
import curvlib.functional as F
from conftest import assert_close
from curvlib.engine import side_stream
from curvlib.engine.side_stream import SideWork
from curvlib.extensions import KFACExpand, KFACReduce

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _cnn(dtype=torch.float64, device="cpu"):
    model = nn.Sequential(
        nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 4, 3, stride=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 3 * 3, 3),
    )
    return model.to(dtype=dtype, device=device)


class _ExpandEmpirical(KFACExpand):
    """A second extension reading the expand input factors (under its own savefield)."""

    savefield = "kfac_expand_empirical"


def _counting(monkeypatch, name):
    calls = []
    original = getattr(F, name)

    def counted(x, *args, **kwargs):
        calls.append(torch.cuda.current_stream(x.device) if x.is_cuda else None)
        return original(x, *args, **kwargs)

    monkeypatch.setattr(F, name, counted)
    return calls


def _step(model, X, y, *extensions, **kwargs):
    loss_fn = nn.CrossEntropyLoss()
    with curvlib.curvature(model, loss_fn, *extensions, **kwargs):
        loss_fn(model(X), y).backward()


@pytest.mark.parametrize("overlap", [True, False])
def test_input_factors_once_per_approximation(monkeypatch, overlap):
    """Two extensions reading the expand factors and one the reduce factors: each convolution's
    ``kfc`` and ``kfac_reduce`` run once, and the two expand results are the same tensors."""
    expand, reduce = _counting(monkeypatch, "kfc"), _counting(monkeypatch, "kfac_reduce")
    model = _cnn()
    X, y = torch.randn(4, 3, 7, 7, dtype=torch.float64), torch.randint(0, 3, (4,))
    _step(model, X, y, KFACExpand(fisher="mc"), _ExpandEmpirical(fisher="empirical"), KFACReduce(fisher="mc"),
          overlap=overlap)
    assert len(expand) == len(reduce) == 3  # two convolutions and the Linear layer
    for layer in (model[0], model[2], model[5]):
        assert layer.weight.kfac_expand.input is layer.weight.kfac_expand_empirical.input
    x = model[1](model[0](X)).detach()  # the second convolution's input, its patches by unfold
    patches = nn.functional.unfold(x, 3, stride=2)
    expected = torch.einsum("ndl,nel->de", patches, patches) / X.shape[0]
    assert_close(model[2].weight.kfac_expand.input[0], expected, rtol=1e-12)


def test_overlap_must_be_a_bool():
    with pytest.raises(TypeError, match="overlap must be a bool"):
        curvlib.curvature(_cnn(), nn.CrossEntropyLoss(), KFACExpand(), overlap="yes")


def test_side_work_on_the_cpu_runs_inline():
    work = SideWork(torch.device("cpu"))
    assert not work.on_stream
    assert torch.equal(work.run(lambda: torch.arange(3) * 2, inputs=()), torch.tensor([0, 2, 4]))
    work.join()  # nothing to wait for


@cuda
def test_side_work_joins_the_launching_stream():
    """After ``join`` the launching stream waits for a side call that is still sleeping; its result is right."""
    origin = torch.cuda.current_stream()
    x = torch.randn(1000, device="cuda")
    work = SideWork(x.device)

    def slow():
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU cycles
        return x * 2

    result = work.run(slow, inputs=[x])
    assert work.stream is side_stream.side_stream(x.device) and work.stream != origin
    work.join()
    origin.synchronize()
    assert work.stream.query(), "the launching stream did not wait for the side work"
    assert torch.equal(result, x * 2)


@cuda
def test_engine_overlap_on_cuda(monkeypatch):
    """The factors are computed on the side stream, equal the in-order ones, and are waited for by the
    caller's stream when ``backward()`` returns."""
    model = _cnn(torch.float32, "cuda")
    X, y = torch.randn(16, 3, 7, 7, device="cuda"), torch.randint(0, 3, (16,), device="cuda")
    streams = _counting(monkeypatch, "kfc")
    _step(model, X, y, KFACExpand(fisher="type-2"), overlap=False)
    in_order = [m.weight.kfac_expand.input.clone() for m in (model[0], model[2], model[5])]
    assert all(s == torch.cuda.current_stream() for s in streams)
    streams.clear()

    original = F.kfc

    def slow_kfc(x, *args, **kwargs):  # keeps the side stream busy past the end of backward()
        torch.cuda._sleep(100_000_000)
        return original(x, *args, **kwargs)

    monkeypatch.setattr(F, "kfc", slow_kfc)
    _step(model, X, y, KFACExpand(fisher="type-2"), overlap=True)
    torch.cuda.current_stream().synchronize()
    assert side_stream.side_stream(X.device).query(), "backward() returned without joining the side stream"
    overlapped = [m.weight.kfac_expand.input for m in (model[0], model[2], model[5])]
    for a, b in zip(overlapped, in_order):
        assert_close(a, b, rtol=1e-6)
    monkeypatch.setattr(F, "kfc", original)
    streams = _counting(monkeypatch, "kfc")
    _step(model, X, y, KFACExpand(fisher="type-2"), overlap=True)
    assert streams and all(s == side_stream.side_stream(X.device) for s in streams)
    torch.cuda.synchronize()


def test_side_work_runs_inline_for_inputs_on_another_device(monkeypatch):
    """A model split over devices: an input that is not on the side stream's device runs inline."""
    def no_stream(stream):
        raise AssertionError("the call was moved to the side stream")

    monkeypatch.setattr(torch.cuda, "stream", no_stream)
    work = SideWork(torch.device("cpu"))
    work.on_stream, work.device = True, torch.device("cuda", 0)  # as if launched from a CUDA loss
    x = torch.randn(3)  # lives on another device (the CPU): inline, no stream involved
    assert torch.equal(work.run(lambda: x * 2, inputs=[x]), x * 2)
    with pytest.raises(AssertionError, match="moved to the side stream"):  # no input elsewhere: side stream
        work.run(lambda: None, inputs=[])
