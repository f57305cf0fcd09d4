"""The engine's constant padding with a view backward (``curvlib.engine.padding``), against ``F.pad``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvlib
from curvlib.engine.layers import batched_vjp
from curvlib.engine.padding import ConstantPadding, inner_window
from curvlib.extensions import DiagGGNExact

DT = torch.float64

CASES = [  # input shape, pad (F.pad order)
    ((2, 3, 5), (1, 2)),
    ((2, 3, 4, 5), (0, 1, 2, 0)),
    ((1, 2, 3, 4, 2), (1, 0, 0, 2, 1, 1)),
    ((2, 3, 4, 5), (2, 1)),  # only the last axis of a 2-d map
]


@pytest.mark.parametrize("shape,pad", CASES)
def test_constant_padding_matches_f_pad_and_its_gradient_is_a_view(shape, pad):
    x = torch.randn(*shape, dtype=DT, requires_grad=True)
    value = torch.randn(()).item()
    y = ConstantPadding.apply(x, pad, value)
    expected = F.pad(x, pad, mode="constant", value=value)
    assert torch.equal(y, expected)
    upstream = torch.randn_like(y)
    (grad,) = torch.autograd.grad(y, x, upstream)
    (reference,) = torch.autograd.grad(expected, x, upstream)
    assert torch.equal(grad, reference)
    assert grad.untyped_storage().data_ptr() == upstream.untyped_storage().data_ptr(), "the gradient is not a view"


@pytest.mark.parametrize("shape,pad", CASES[:2])
def test_constant_padding_twice_differentiable(shape, pad):
    x = torch.randn(*shape, dtype=DT, requires_grad=True)
    value = torch.randn(()).item()
    assert torch.autograd.gradcheck(lambda t: ConstantPadding.apply(t, pad, value), (x,))
    assert torch.autograd.gradgradcheck(lambda t: ConstantPadding.apply(t, pad, value), (x,))


def test_constant_padding_under_batched_vjps():
    x = torch.randn(3, 2, 4, 4, dtype=DT, requires_grad=True)
    pad = (1, 0, 2, 1)
    y = ConstantPadding.apply(x, pad, 0.0).tanh()
    vectors = torch.randn(5, *y.shape, dtype=DT)
    (grads,) = batched_vjp(y, [x], vectors)
    for vector, grad in zip(vectors, grads):
        (expected,) = torch.autograd.grad(F.pad(x, pad).tanh(), x, vector)
        torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-14)


def test_inner_window_rejects_nothing_and_crops_each_axis():
    t = torch.randn(2, 7, 9)
    assert torch.equal(inner_window(t, (2, 3, 1, 4)), t[:, 1:3, 2:6])


def _padded_net():
    return nn.Sequential(
        nn.ZeroPad2d(1), nn.Conv2d(2, 3, 3), nn.ReLU(),
        nn.ConstantPad2d((0, 1, 1, 0), -0.3), nn.Conv2d(3, 2, 3, stride=2),
        nn.ZeroPad2d(-1),  # cropping: PyTorch's own backward
        nn.Flatten(), nn.Linear(2 * 1 * 1, 3),
    ).to(DT)


def test_context_replaces_padding_backward_only_inside_and_only_where_it_applies():
    model = _padded_net()
    X = torch.randn(4, 2, 6, 6, dtype=DT)
    nodes = {}

    def record(name):
        return lambda module, inputs, output: nodes.__setitem__(name, type(output.grad_fn).__name__)

    # registered after the context's hooks: they see the output the rest of the model receives
    with curvlib.curvature(model, nn.CrossEntropyLoss(), DiagGGNExact()):
        handles = [model[i].register_forward_hook(record(i)) for i in (0, 3, 5)]
        model(X)
    assert nodes == {0: "NoneType", 3: "ConstantPaddingBackward", 5: "ConstantPadNdBackward0"}, \
        "the first padding (input needs no gradient) and the cropping keep PyTorch's padding"
    for handle in handles:
        handle.remove()
    X.requires_grad_(True)
    with curvlib.curvature(model, nn.CrossEntropyLoss(), DiagGGNExact()):
        assert type(model[0](X).grad_fn).__name__ == "ConstantPaddingBackward"
        with torch.no_grad():
            assert model[0](X).grad_fn is None
    assert type(model[0](X).grad_fn).__name__ == "ConstantPadNdBackward0", "hook left after the context"


@pytest.mark.parametrize("in_place", [False, True])
def test_context_keeps_a_padding_output_an_earlier_hook_changed(in_place):
    """A user's forward hook on the padding module, registered before the context, that returns another
    output or changes it in place: the context must not undo it."""
    model = _padded_net()
    X = torch.randn(4, 2, 6, 6, dtype=DT)
    if in_place:
        handle = model[3].register_forward_hook(lambda module, inputs, output: output.mul_(2.0))
    else:
        handle = model[3].register_forward_hook(lambda module, inputs, output: output * 2.0)
    expected = model(X)
    with curvlib.curvature(model, nn.CrossEntropyLoss(), DiagGGNExact()):
        result = model(X)
    handle.remove()
    assert torch.equal(result, expected)
    assert not torch.equal(result, model(X)), "the hook had no effect: the test cannot tell"


def test_padded_network_ggn_diagonal_and_gradient_unchanged_by_the_view_backward(monkeypatch):
    """DiagGGNExact and the gradient of a network with padding layers equal those computed with
    PyTorch's padding backward (the context's padding hooks switched off): same values, other backward."""
    from curvlib.engine import context

    model = _padded_net()
    X = torch.randn(4, 2, 6, 6, dtype=DT)
    y = torch.randint(0, 3, (4,))
    loss_fn = nn.CrossEntropyLoss()

    def run():
        model.zero_grad()
        with curvlib.curvature(model, loss_fn, DiagGGNExact(), memory_budget=1) as ctx:
            with pytest.warns(UserWarning, match="memory_budget"):
                output = model(X)
                loss_fn(output, y).backward()
        assert ctx.last_chunk_size == 1
        return [(p.grad.clone(), p.diag_ggn_exact.clone()) for p in model.parameters()]

    with_views = run()
    monkeypatch.setattr(context, "CONSTANT_PAD_TYPES", ())
    for (grad, diag), (grad_ref, diag_ref) in zip(with_views, run()):
        torch.testing.assert_close(grad, grad_ref, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(diag, diag_ref, rtol=1e-12, atol=1e-14)
