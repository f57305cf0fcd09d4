"""KFACExpand / KFACReduce against the formulas of ``extensions/kfac.py``, computed independently.

Input factors from the layer inputs (captured by the test's own forward hooks) unfolded with
``torch.nn.functional.unfold`` (Conv2d), explicit loops / jacrev patches (Conv1d, Conv3d, transposed)
or reshapes (Linear). Output factors from ``M = Jᵀ H J`` w.r.t. each layer output, with ``J`` from
one ``autograd.grad`` per network output entry and ``H`` = torch.func.hessian of the loss
(type-2), or from the layer-output gradients of the loss (empirical).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from conftest import assert_close
from curvlib.extensions import DiagGGNMC, KFACExpand, KFACReduce, KroneckerFactors
from test_engine_references import (
    DT,
    GGNReference,
    kfac_input_reference,
    kfac_output_reference,
    layer_output_ggn,
    layer_output_gradient,
    loss_scale,
    make_loss,
    make_model,
    output_hessian,
    record_calls,
    run_engine,
)

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")

RTOL = 1e-9


@pytest.fixture(autouse=True)
def _seeded(seed):
    return seed


def layers_with_parameters(model):
    return [(name, m) for name, m in model.named_modules() if list(m.parameters(recurse=False))]


def kfac_references(model, X, loss_fn, y, fisher, approx, skip=()):
    """``{module name: (weight input, bias input, output)}`` summed over the module's calls."""
    named = [(name, m) for name, m in layers_with_parameters(model) if name not in skip]
    out, calls = record_calls(model, X, [name for name, _ in named])
    modules = dict(named)
    H = output_hessian(loss_fn, out, y)
    loss = loss_fn(out, y)
    scale = loss_scale(loss_fn, out)
    result = {}
    for name, x, layer_output in calls:
        module = modules[name]
        weight_in, bias_in = kfac_input_reference(module, x, approx)
        if fisher == "type-2":
            M = layer_output_ggn(out, layer_output, H)
        else:  # empirical: per-sample gradients √scale·∇ℓ_n at the layer output, one column
            g = layer_output_gradient(loss, layer_output).flatten() / math.sqrt(scale)
            M = torch.outer(g, g)
        output = kfac_output_reference(module, M, layer_output.shape, approx)
        if name in result:
            a, b, o = result[name]
            weight_in, bias_in, output = a + weight_in, b + bias_in, o + output
        result[name] = (weight_in, bias_in, output)
    assert set(result) == set(modules), "every layer was called"
    return result


CASES = [
    ("cnn", "ce"),
    ("cnn", "bce_sum"),
    ("mixed_conv", "ce"),
    ("mixed_conv", "mse"),
    ("shared", "ce_prob"),
    ("sequence", "mse_sum"),
    ("sequence", "ce"),
    ("sequence_output", "bce"),
    ("residual_eval_skip_bn", "ce"),
]


def _setup(model_name, loss_kind):
    skip = []
    if model_name == "residual_eval_skip_bn":
        model, X = make_model("residual_eval")
        skip = [model.bn]
    else:
        model, X = make_model(model_name)
    with torch.no_grad():
        out_shape = copy.deepcopy(model)(X).shape
    loss_fn, y = make_loss(loss_kind, out_shape)
    return model, X, loss_fn, y, copy.deepcopy(model), skip


@pytest.mark.parametrize("fisher", ["type-2", "empirical"])
@pytest.mark.parametrize("model_name,loss_kind", CASES, ids=[f"{m}-{l}" for m, l in CASES])
def test_kfac_factors(model_name, loss_kind, fisher):
    model, X, loss_fn, y, reference_model, skip = _setup(model_name, loss_kind)
    run_engine(model, loss_fn, X, y, KFACExpand(fisher=fisher), KFACReduce(fisher=fisher), skip=skip)
    modules = dict(model.named_modules())
    for approx in ("expand", "reduce"):
        references = kfac_references(reference_model, X, loss_fn, y, fisher, approx, skip=["bn"] if skip else [])
        if skip:
            assert not hasattr(model.bn.weight, f"kfac_{approx}"), "skipped module got a result"
        for name, (weight_in, bias_in, output) in references.items():
            module = modules[name]
            factors = getattr(module.weight, f"kfac_{approx}")
            assert isinstance(factors, KroneckerFactors)
            label = f"{name}.weight.kfac_{approx}[{fisher}]"
            assert_close(factors.input, weight_in, rtol=RTOL, name=f"{label}.input")
            assert_close(factors.output, output, rtol=RTOL, name=f"{label}.output")
            groups = getattr(module, "groups", 1)
            assert factors.output.shape[0] == factors.input.shape[0] == groups
            assert factors.output.shape[1] * factors.input.shape[1] == module.weight.numel() // groups, "factor sizes"
            if module.bias is not None:
                bias = getattr(module.bias, f"kfac_{approx}")
                assert_close(bias.input, bias_in, rtol=RTOL, name=f"{name}.bias.kfac_{approx}.input")
                assert bias.output is factors.output or torch.equal(bias.output, factors.output)


@pytest.mark.parametrize("loss_kind", ["ce", "mse", "bce_sum"])
@pytest.mark.parametrize("fisher", ["type-2", "empirical"])
def test_linear_expand_equals_reduce_equals_kfac(fisher, loss_kind):
    """For Linear on [N, D] both approximations are KFAC: E[x xᵀ] and Σ_{c,n} s sᵀ with Jᵀ/gradient columns."""
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    X = torch.randn(4, 5, dtype=DT)
    loss_fn, y = make_loss(loss_kind, (4, 3))
    reference_model = copy.deepcopy(model)
    run_engine(model, loss_fn, X, y, KFACExpand(fisher=fisher), KFACReduce(fisher=fisher))
    first = reference_model[0](X)  # layer outputs, part of one graph
    hidden = reference_model[1](first)
    out = reference_model[2](hidden)
    H = output_hessian(loss_fn, out, y)
    scale = loss_scale(loss_fn, out)
    for k, layer_input, layer_output in ((0, X, first), (2, hidden.detach(), out)):
        expand, reduce = model[k].weight.kfac_expand, model[k].weight.kfac_reduce
        assert_close(expand.input, reduce.input, name="input expand = reduce")
        assert_close(expand.output, reduce.output, name="output expand = reduce")
        # KFAC: A = 1/N Σ_n x xᵀ, B = Σ_n J_nᵀ H_n J_n (type-2) or 1/scale · Σ_n g_n g_nᵀ (empirical)
        A = layer_input.T @ layer_input / 4
        if fisher == "type-2":
            rows = [torch.autograd.grad(out.flatten()[i], layer_output, retain_graph=True)[0] for i in range(out.numel())]
            J = torch.stack(rows).reshape(out.numel(), 4, -1)  # [|f|, N, D_out]
            B = sum(J[:, n].T @ H @ J[:, n] for n in range(4))
        else:
            g = torch.autograd.grad(loss_fn(out, y), layer_output, retain_graph=True)[0]
            B = g.T @ g / scale
        assert_close(expand.input[0], A, name=f"layer {k} input factor")
        assert_close(expand.output[0], B, name=f"layer {k} output factor")
        assert_close(model[k].bias.kfac_expand.input, torch.ones(1, 1, 1, dtype=DT), name="bias input factor")


def test_linear_single_sample_kfac_is_the_exact_ggn():
    """With one sample the Kronecker product output ⊗ input is the exact GGN block (row-major vec(W))."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Sigmoid(), nn.Linear(4, 3)).to(DT)
    X = torch.randn(1, 3, dtype=DT)
    loss_fn, y = make_loss("ce", (1, 3))
    reference_model = copy.deepcopy(model)
    run_engine(model, loss_fn, X, y, KFACReduce(fisher="type-2"))
    ref = GGNReference(reference_model, loss_fn, X, y)
    for k in (0, 2):
        factors = model[k].weight.kfac_reduce
        exact = ref.block(f"{k}.weight")
        assert_close(torch.kron(factors.output[0], factors.input[0]), exact, name=f"layer {k}")
        bias = model[k].bias.kfac_reduce
        assert_close(torch.kron(bias.output[0], bias.input[0]), ref.block(f"{k}.bias"), name=f"layer {k} bias")


def test_kfac_mc_is_unbiased_and_shares_samples():
    """MC output factors: unbiased for the type-2 factor (6 standard errors over R runs); with equal
    mc_samples they share the sampled columns with DiagGGNMC (a Linear bias's GGN diagonal is the
    diagonal of its output factor)."""
    R, M = 60, 4
    model = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 3 * 3, 3)).to(DT)
    X = torch.randn(3, 2, 8, 8, dtype=DT)
    loss_fn, y = make_loss("ce", (3, 3))
    run_engine(model, loss_fn, X, y, KFACExpand(fisher="type-2"), KFACReduce(fisher="type-2"))
    exact = {(k, a): getattr(model[k].weight, f"kfac_{a}").output.clone() for k in (0, 3) for a in ("expand", "reduce")}
    draws = {key: [] for key in exact}
    for _ in range(R):
        run_engine(model, loss_fn, X, y, KFACExpand(fisher="mc", mc_samples=M), KFACReduce(fisher="mc", mc_samples=M), DiagGGNMC(M))
        for k, a in exact:
            draws[(k, a)].append(getattr(model[k].weight, f"kfac_{a}").output.clone())
        assert_close(model[3].bias.diag_ggn_mc, model[3].bias.kfac_reduce.output[0].diagonal(), name="shared MC columns")
    power = False
    for key, target in exact.items():
        stacked = torch.stack(draws[key])
        mean, std = stacked.mean(0), stacked.std(0)
        bound = 6 * std / math.sqrt(R) + 1e-12 * target.abs().max()
        error = (mean - target).abs()
        assert (error <= bound).all(), f"{key}: MC factor off by {(error / bound).max():.2f} bounds"
        power |= bool(((mean - 1.5 * target).abs() > bound).any())
    assert power, "bound too loose to reject 1.5× the type-2 factor"


def test_kfac_options_validation():
    for cls in (KFACExpand, KFACReduce):
        with pytest.raises(ValueError, match="fisher must be one of"):
            cls(fisher="type-1")
        with pytest.raises(ValueError, match="mc_samples"):
            cls(fisher="mc", mc_samples=0)


@pytest.mark.parametrize("groups,length", [(1, 3), (3, 2), (2, 1)])
def test_summed_outer_in_chunks_equals_the_einsum(groups, length, monkeypatch):
    """The output factor's ``Σ_b s_b s_bᵀ`` (per-``b`` products summed, in chunks of ``b``) against a plain
    float64 einsum, in one chunk and in uneven chunks."""
    from curvlib.engine import layers

    flat = torch.randn(11, groups, 5, length, dtype=DT)
    expected = torch.einsum("bgel,bgfl->gef", flat, flat)
    assert_close(layers._summed_outer(flat), expected, rtol=1e-12)
    monkeypatch.setattr(layers, "OUTER_CHUNK_ELEMENTS", 1)  # chunks of max(numel / (G·E²), 1) samples
    chunk = max(1, flat.numel() // (groups * 25))
    assert chunk < 11
    assert_close(layers._summed_outer(flat), expected, rtol=1e-12)


def test_batched_vjp_of_one_vector_is_the_plain_vjp():
    """One vector takes a plain backward; its result equals the batched one's for the same vector."""
    from curvlib.engine.layers import batched_vjp

    lin = nn.Linear(4, 3).to(DT)
    x = torch.randn(5, 4, dtype=DT, requires_grad=True)
    hidden = torch.tanh(lin(x))
    out = hidden ** 2
    vectors = torch.randn(2, 5, 3, dtype=DT)
    both = batched_vjp(out, [hidden, x], vectors)
    for j in range(2):
        one = batched_vjp(out, [hidden, x], vectors[j:j + 1])
        assert [t.shape for t in one] == [(1, 5, 3), (1, 5, 4)]
        for single, batched in zip(one, both):
            assert_close(single[0], batched[j], rtol=1e-12)
        manual = torch.autograd.grad(out, x, vectors[j], retain_graph=True)[0]
        assert_close(one[1][0], manual, rtol=1e-12)


def test_batched_vjp_folds_the_vectors_into_each_convolution_backward():
    """Several vectors through a conv net (padding, ReLU, pooling, BatchNorm in eval mode): the same VJPs
    as a loop of plain backward passes, with one ``convolution_backward`` per layer for all vectors
    (functorch's batching rule), not one per vector (autograd's legacy ``is_grads_batched``)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from curvlib.engine import layers

    class CountConvolutionBackward(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.convolution_backward.default:
                CountConvolutionBackward.calls += 1
            return func(*args, **(kwargs or {}))

    net = nn.Sequential(nn.ZeroPad2d(1), nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(3, 4, 2, padding=1)).to(DT).eval()
    net[2].running_mean.uniform_(-1, 1)
    x = torch.randn(5, 2, 6, 6, dtype=DT, requires_grad=True)
    hidden = net[:4](x)
    out = net[4:](hidden)
    vectors = torch.randn(7, *out.shape, dtype=DT)
    layers._LAST_BATCHED_VJP_ERROR[0] = None
    with CountConvolutionBackward():
        batched = layers.batched_vjp(out, [hidden, x], vectors)
    assert layers._LAST_BATCHED_VJP_ERROR[0] is None
    assert CountConvolutionBackward.calls == 2  # one per convolution for all 7 vectors
    for j, vector in enumerate(vectors):
        for got, expected in zip(batched, torch.autograd.grad(out, [hidden, x], vector, retain_graph=True)):
            assert_close(got[j], expected, rtol=1e-12)
