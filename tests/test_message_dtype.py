"""Column messages carried in a lower precision (``BackwardOptions(message_dtype=...)``, ``precision="bf16"``).

References: one ``torch.autograd.grad`` per vector and the engine's results on a float64 copy of the
model (fresh random inputs per test). bfloat16 rounds each node's result (relative ``4e-3``), so the
comparisons are norm-wise with tolerances of a few ``1e-2``, and each test also checks that the
rounding is visible (the option took effect).
"""

import copy

import pytest
import torch
import torch.nn as nn
from torch.autograd.graph import get_gradient_edge

from curvlib import extensions as ext
from curvlib import pathways
from curvlib.engine import curvature
from curvlib.engine.batched_rules import BackwardOptions
from curvlib.engine.context import ChunkMemory
from curvlib.engine.graph_vjp import GraphVJP
from curvlib.engine.layers import LayerCall, ModuleCalls
from curvlib.precision import fp32_precision

from conftest import relative_error
from test_graph_vjp import MODELS, Lambda, forward_recording, looped_vjp, randomize

BF16 = BackwardOptions(message_dtype=torch.bfloat16)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_graph_walk_carries_float32_gradients_in_the_message_dtype(name, device):
    make, shape, watched = MODELS[name]
    layers = randomize([layer.to(device) for layer in make()])
    for layer in layers:
        layer.train(isinstance(layer, nn.Dropout))
    x = torch.randn(*shape, device=device)
    with fp32_precision("ieee", torch.device(device)):
        out, outputs = forward_recording(layers, x)
    vectors = torch.randn(4, *out.shape, device=device)
    plan = GraphVJP.build(out, [get_gradient_edge(outputs[i]) for i in watched], BF16)
    got = plan.run(vectors, [outputs[i].shape for i in watched])
    with fp32_precision("ieee", torch.device(device)):
        expected = looped_vjp(out, [outputs[i] for i in watched], vectors)  # float32, exact per vector
    for g, e in zip(got, expected):
        assert g.dtype == torch.bfloat16
        error = relative_error(g, e)
        assert error < 6e-2, (name, error)  # up to 22 nodes, each rounding to bfloat16
    assert max(relative_error(g, e) for g, e in zip(got, expected)) > 1e-4  # rounded: the option took effect


def test_gradients_of_other_dtypes_keep_theirs():
    conv1, conv2 = nn.Conv2d(2, 3, 3).double(), nn.Conv2d(3, 2, 3).double()
    h = conv1(torch.randn(2, 2, 7, 7, dtype=torch.float64))
    out = conv2(torch.relu(h)).sum((2, 3))
    vectors = torch.randn(3, *out.shape, dtype=torch.float64)
    got = GraphVJP.build(out, [get_gradient_edge(h)], BF16).run(vectors, [h.shape])[0]
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, looped_vjp(out, [h], vectors)[0], rtol=1e-12, atol=1e-12)


def test_backward_options_are_checked():
    with pytest.raises(TypeError, match="message_dtype must be None or a floating torch.dtype, got torch.int32"):
        BackwardOptions(message_dtype=torch.int32)
    with pytest.raises(TypeError, match="message_dtype.*'bf16'"):
        BackwardOptions(message_dtype="bf16")
    with pytest.raises(TypeError, match="channels_last must be a bool"):
        BackwardOptions(channels_last=1)
    assert BF16.carried(torch.float32) == torch.bfloat16
    assert BF16.carried(torch.float64) == torch.float64 and BackwardOptions().carried(torch.float32) == torch.float32


class Twice(nn.Module):
    """One convolution applied twice (its parameters' GGN sums the per-column gradients of both calls)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(torch.relu(self.conv(x)))


def _cnn():
    return nn.Sequential(nn.ZeroPad2d(1), nn.Conv2d(3, 4, 3), nn.ReLU(), nn.ZeroPad2d((0, 1, 0, 1)),
                         nn.Conv2d(4, 4, 3, stride=2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16, 5))


def _shared():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), Twice(), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 5))


def _run(model, X, y, extensions, options=None, **kwargs):
    loss_fn = nn.CrossEntropyLoss()
    model.zero_grad()
    with curvature(model, loss_fn, *extensions, **kwargs) as ctx:
        if options is not None:
            ctx.backward_options = options
        loss_fn(model(X.to(next(model.parameters()).dtype)), y).backward()
    return ctx


def _results(model, savefield):
    return [getattr(p, savefield).clone() for p in model.parameters()]


@pytest.mark.parametrize("make", [_cnn, _shared], ids=["cnn", "shared"])
@pytest.mark.parametrize("extension", [ext.DiagGGNExact, ext.BatchDiagGGNExact])
@pytest.mark.parametrize("budget", [None, 7e4])
@pytest.mark.parametrize("device", DEVICES)
def test_engine_diagonals_from_bfloat16_messages(make, extension, budget, device, seed):
    model = make().to(device)
    X, y = torch.randn(6, 3, 8, 8, device=device), torch.randint(0, 5, (6,), device=device)
    reference = copy.deepcopy(model).double()
    _run(reference, X, y, [extension()])
    # "graph": chunks of one column too (in "auto" they run on autograd, in float32)
    ctx = _run(model, X, y, [extension()], BF16, memory_budget=budget, column_backward="graph")
    assert ctx.last_column_backward == "graph" and ctx.last_message_dtype == torch.bfloat16
    assert budget is None or ctx.last_chunk_size < 5
    savefield = extension().savefield
    errors = []
    for got, expected in zip(_results(model, savefield), _results(reference, savefield)):
        assert got.dtype == torch.float32 and got.shape == expected.shape
        errors.append(relative_error(got, expected))
    assert max(errors) < 3e-2, errors
    assert max(errors) > 1e-5, errors  # bfloat16 rounding is visible


def test_monte_carlo_diagonal_from_bfloat16_messages():
    model = _cnn()
    X, y = torch.randn(5, 3, 8, 8), torch.randint(0, 5, (5,))
    reference = copy.deepcopy(model).double()
    generator = lambda device: torch.Generator(device).manual_seed(3)  # noqa: E731 - the same samples in both
    _run(reference, X, y, [ext.DiagGGNMC(mc_samples=4)], generator=generator)
    ctx = _run(model, X, y, [ext.DiagGGNMC(mc_samples=4)], BF16, generator=generator)
    assert ctx.last_message_dtype == torch.bfloat16
    for got, expected in zip(_results(model, "diag_ggn_mc"), _results(reference, "diag_ggn_mc")):
        assert relative_error(got, expected) < 3e-2


def test_columns_stay_float32_where_an_extension_does_not_accept_bfloat16():
    model = _cnn()
    X, y = torch.randn(6, 3, 8, 8), torch.randint(0, 5, (6,))
    plain = copy.deepcopy(model)
    _run(plain, X, y, [ext.DiagGGNExact(), ext.KFACExpand(fisher="type-2")])
    ctx = _run(model, X, y, [ext.DiagGGNExact(), ext.KFACExpand(fisher="type-2")], BF16)
    assert ctx.last_message_dtype == torch.float32  # KFAC shares the columns and reads them in float32
    for got, expected in zip(_results(model, "diag_ggn_exact"), _results(plain, "diag_ggn_exact")):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-7)


def test_fallback_to_autograd_hands_on_float32_messages():
    model = nn.Sequential(nn.Linear(4, 6), Lambda(lambda t: torch.cumsum(t, 1)), nn.Linear(6, 3))
    X, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    reference = copy.deepcopy(model).double()
    _run(reference, X, y, [ext.DiagGGNExact()])
    ctx = _run(model, X, y, [ext.DiagGGNExact()], BF16)
    assert ctx.last_column_backward == "autograd" and ctx.last_message_dtype == torch.float32
    for got, expected in zip(_results(model, "diag_ggn_exact"), _results(reference, "diag_ggn_exact")):
        assert relative_error(got, expected) < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the bf16 setting acts on CUDA devices")
@pytest.mark.parametrize("channels_last", [False, True])
def test_bf16_precision_setting_carries_bfloat16_columns_on_cuda(channels_last):
    model = _cnn().cuda()
    X, y = torch.randn(6, 3, 8, 8, device="cuda"), torch.randint(0, 5, (6,), device="cuda")
    reference = copy.deepcopy(model).double()
    _run(reference, X, y, [ext.DiagGGNExact()])
    with pathways.options(precision="bf16"):
        ctx = _run(model, X, y, [ext.DiagGGNExact()], BackwardOptions(channels_last=channels_last))
    assert ctx.last_message_dtype == torch.bfloat16
    for got, expected in zip(_results(model, "diag_ggn_exact"), _results(reference, "diag_ggn_exact")):
        assert got.dtype == torch.float32 and relative_error(got, expected) < 3e-2


def test_bf16_precision_setting_leaves_cpu_passes_in_float32():
    model = _cnn()
    X, y = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))
    with pathways.options(precision="bf16"):
        ctx = _run(model, X, y, [ext.DiagGGNExact()])
    assert ctx.last_message_dtype == torch.float32


def test_chunk_memory_counts_messages_at_their_size():
    model = _cnn()
    X, y = torch.randn(6, 3, 8, 8), torch.randint(0, 5, (6,))
    ctx = _run(model, X, y, [ext.DiagGGNExact()], memory_budget=1e5)
    float32_chunk = ctx.last_chunk_size
    ctx = _run(model, X, y, [ext.DiagGGNExact()], BF16, memory_budget=1e5)
    assert ctx.last_chunk_size > float32_chunk
    calls = [LayerCall(layer, x, layer(x)) for layer, x in ((nn.Conv2d(3, 4, 3), torch.randn(2, 3, 6, 6)),
                                                            (nn.Linear(5, 2), torch.randn(2, 5)))]
    groups = [ModuleCalls(call.module, [call]) for call in calls]
    full, half = ChunkMemory(groups, False), ChunkMemory(groups, False, message_itemsize=2)
    assert full.per_column == (2 * 4 * 4 * 4 + 2 * 2 + 2 * 2 * 4 * 4 * 4) * 4  # outputs + twice the largest
    assert half.per_column * 2 == full.per_column
