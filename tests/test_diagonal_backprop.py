"""Tests of :mod:`curvlib.engine.diagonal_backprop` (HesScale / BL89 Hessian-diagonal backpropagation).

References are independent of the code under test: Jacobians and Hessians from ``torch.func``
(``jacrev``/``hessian``) in float64, combined by the defining formula

    d_x = diag(Jᵀ diag(d_y) J) + diag(∇²_x (g_yᵀ f(x)))        (the second term dropped for GN).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian, jacrev

from curvlib.engine.diagonal_backprop import backpropagate_diagonal, parameter_diagonals, supported_nodes

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")

DT = torch.float64
TOL = dict(rtol=1e-7, atol=1e-9)


@pytest.fixture(autouse=True)
def _seeded(seed):
    """Fresh random inputs per session, replayable with the suite's CURVLIB_TEST_SEED (tests/conftest.py)."""
    return seed


def randn(*shape):
    return torch.randn(*shape, dtype=DT)


def positive(*shape):
    return torch.rand(*shape, dtype=DT) + 0.5


def double(module: nn.Module) -> nn.Module:
    return module.to(DT)


def reference(f, x, d, g, gauss_newton=False):
    """(d_x, g_x) of y = f(x) by the defining formula, from dense Jacobian and Hessian."""
    x = x.detach()
    jac = jacrev(f)(x).reshape(d.numel(), x.numel())
    d_x = (jac.square() * d.reshape(-1, 1)).sum(0)
    if not gauss_newton:
        hess = hessian(lambda z: (f(z) * g).sum())(x).reshape(x.numel(), x.numel())
        d_x = d_x + hess.diagonal()
    return d_x.reshape(x.shape), (jac.T @ g.reshape(-1)).reshape(x.shape)


def run_single(f, x, gauss_newton=False, f_ref=None):
    """Watch the producer of ``x`` (a clone of a leaf) and backpropagate through ``f``."""
    leaf = x.clone().requires_grad_(True)
    xx = leaf.clone()
    node = xx.grad_fn
    y = f(xx)
    d = torch.rand_like(y) + 0.1
    g = torch.randn_like(y)
    found = backpropagate_diagonal(y, d, g, watch={node: "x"}, gauss_newton=gauss_newton)
    d_ref, g_ref = reference(f_ref or f, x, d, g, gauss_newton)
    d_x, g_x = found["x"]
    torch.testing.assert_close(g_x, g_ref, **TOL)
    torch.testing.assert_close(d_x, d_ref, **TOL)
    # the graph is intact afterwards (saved tensors were not released)
    y.backward(g)
    torch.testing.assert_close(leaf.grad, g_ref, **TOL)
    return d_x


def _frozen(module):
    for p in module.parameters():
        p.requires_grad_(False)
    return module


CASES = {
    # layers
    "linear": lambda: (randn(3, 5), double(nn.Linear(5, 4))),
    "linear_3d": lambda: (randn(2, 3, 5), double(nn.Linear(5, 4))),
    "linear_3d_nobias": lambda: (randn(2, 3, 5), double(nn.Linear(5, 4, bias=False))),
    "linear_1d": lambda: (randn(5), double(nn.Linear(5, 4))),
    "linear_1d_nobias": lambda: (randn(5), double(nn.Linear(5, 4, bias=False))),
    "linear_frozen": lambda: (randn(3, 5), _frozen(double(nn.Linear(5, 4)))),
    "matmul_3d_const": lambda: (randn(2, 3, 5), (lambda c: lambda x: x @ c)(randn(5, 4))),
    "matmul_param": lambda: (randn(3, 5), (lambda c: lambda x: x @ c)(nn.Parameter(randn(5, 4)))),
    "bmm_first": lambda: (randn(2, 3, 4), (lambda c: lambda x: torch.bmm(x, c))(randn(2, 4, 5))),
    "bmm_second": lambda: (randn(2, 4, 5), (lambda c: lambda x: torch.bmm(c, x))(randn(2, 3, 4))),
    "mv_vector": lambda: (randn(4), (lambda c: lambda x: torch.mv(c, x))(randn(3, 4))),
    "mv_matrix": lambda: (randn(3, 4), (lambda c: lambda x: torch.mv(x, c))(randn(4))),
    "addmm_mat1": lambda: (randn(3, 4), (lambda b, c: lambda x: torch.addmm(b, x, c, beta=0.5, alpha=2.0))(randn(5), randn(4, 5))),
    "addmm_mat2": lambda: (randn(4, 5), (lambda b, c: lambda x: torch.addmm(b, c, x, alpha=-1.5))(randn(3, 5), randn(3, 4))),
    "addmm_input": lambda: (randn(5), (lambda a, c: lambda x: torch.addmm(x, a, c, beta=3.0))(randn(3, 4), randn(4, 5))),
    "conv1d": lambda: (randn(2, 3, 9), double(nn.Conv1d(3, 4, 3, stride=2, padding=1, dilation=2))),
    "conv2d_groups_stride": lambda: (randn(2, 4, 7, 7), double(nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2))),
    "conv2d_dilation_rect": lambda: (randn(1, 3, 6, 5), double(nn.Conv2d(3, 2, (3, 2), padding=(2, 1), dilation=(2, 1)))),
    "conv2d_same_even": lambda: (randn(2, 2, 5, 5), double(nn.Conv2d(2, 3, 4, padding="same", bias=False))),
    "conv2d_frozen": lambda: (randn(2, 2, 5, 5), _frozen(double(nn.Conv2d(2, 3, 3)))),
    "conv3d": lambda: (randn(1, 2, 4, 4, 3), double(nn.Conv3d(2, 3, 2, stride=(1, 2, 1), padding=1))),
    "conv_transpose2d": lambda: (
        randn(2, 4, 3, 3),
        double(nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2)),
    ),
    "conv_transpose1d": lambda: (randn(2, 3, 4), double(nn.ConvTranspose1d(3, 2, 3, stride=3, dilation=2, output_padding=1))),
    # element-wise activations
    "relu": lambda: (randn(3, 7), F.relu),
    "leaky_relu": lambda: (randn(3, 7), lambda x: F.leaky_relu(x, 0.1)),
    "sigmoid": lambda: (randn(3, 7), torch.sigmoid),
    "tanh": lambda: (randn(3, 7), torch.tanh),
    "elu": lambda: (randn(3, 7), lambda x: F.elu(x, alpha=1.3)),
    "selu": lambda: (randn(3, 7), F.selu),
    # CELU alphas with exact binary reciprocals: PyTorch evaluates CELU with 1/alpha rounded to float32
    "celu": lambda: (randn(3, 7), lambda x: F.celu(x, alpha=0.5)),
    "gelu": lambda: (randn(3, 7), F.gelu),
    "gelu_tanh": lambda: (randn(3, 7), lambda x: F.gelu(x, approximate="tanh")),
    "silu": lambda: (randn(3, 7), F.silu),
    "softplus": lambda: (randn(3, 7), lambda x: F.softplus(x, beta=2.0, threshold=1.5)),
    "mish": lambda: (randn(3, 7), F.mish),
    "hardtanh": lambda: (randn(3, 7), lambda x: F.hardtanh(x, -0.5, 0.7)),
    "relu6": lambda: (3 * randn(3, 7), F.relu6),
    "logsigmoid": lambda: (randn(3, 7), F.logsigmoid),
    "exp": lambda: (randn(3, 7), torch.exp),
    "log": lambda: (positive(3, 7), torch.log),
    "sqrt": lambda: (positive(3, 7), torch.sqrt),
    "abs": lambda: (randn(3, 7), torch.abs),
    "square": lambda: (randn(3, 7), torch.square),
    "pow3": lambda: (randn(3, 7), lambda x: x**3),
    "pow2.5": lambda: (positive(3, 7), lambda x: x**2.5),
    # pooling
    "max_pool1d": lambda: (randn(2, 3, 9), lambda x: F.max_pool1d(x, 3, stride=2)),
    "max_pool2d": lambda: (randn(2, 3, 7, 7), lambda x: F.max_pool2d(x, 3, stride=2, padding=1)),
    "max_pool2d_dil_ceil": lambda: (randn(1, 2, 8, 8), lambda x: F.max_pool2d(x, 2, stride=3, dilation=2, ceil_mode=True)),
    "max_pool3d": lambda: (randn(1, 2, 4, 4, 4), lambda x: F.max_pool3d(x, 2)),
    "adaptive_max_pool1d": lambda: (randn(2, 3, 7), lambda x: F.adaptive_max_pool1d(x, 3)),
    "adaptive_max_pool2d": lambda: (randn(2, 3, 5, 7), lambda x: F.adaptive_max_pool2d(x, (3, 4))),
    "adaptive_max_pool3d": lambda: (randn(1, 2, 5, 4, 3), lambda x: F.adaptive_max_pool3d(x, (2, 3, 2))),
    "avg_pool1d": lambda: (randn(2, 3, 9), lambda x: F.avg_pool1d(x, 3, stride=2, padding=1)),
    "avg_pool1d_ceil_nopad": lambda: (
        randn(2, 3, 8), lambda x: F.avg_pool1d(x, 3, stride=2, padding=1, ceil_mode=True, count_include_pad=False)
    ),
    "avg_pool2d": lambda: (randn(2, 3, 7, 7), lambda x: F.avg_pool2d(x, 3, stride=2, padding=1)),
    "avg_pool2d_ceil_nopad": lambda: (
        randn(1, 2, 8, 7), lambda x: F.avg_pool2d(x, 3, stride=2, padding=1, ceil_mode=True, count_include_pad=False)
    ),
    "avg_pool2d_ceil_pad": lambda: (
        randn(1, 2, 8, 7), lambda x: F.avg_pool2d(x, (3, 2), stride=2, padding=1, ceil_mode=True)
    ),
    "avg_pool2d_divisor": lambda: (randn(1, 2, 6, 6), lambda x: F.avg_pool2d(x, 3, stride=2, padding=1, divisor_override=5)),
    "avg_pool3d": lambda: (randn(1, 2, 5, 4, 4), lambda x: F.avg_pool3d(x, 2, stride=(2, 1, 2), padding=(1, 0, 1))),
    "adaptive_avg_pool1d": lambda: (randn(2, 3, 7), lambda x: F.adaptive_avg_pool1d(x, 3)),
    "adaptive_avg_pool2d": lambda: (randn(2, 3, 5, 7), lambda x: F.adaptive_avg_pool2d(x, (3, 4))),
    "adaptive_avg_pool3d": lambda: (randn(1, 2, 5, 4, 7), lambda x: F.adaptive_avg_pool3d(x, (2, 3, 3))),
    # shape operations and constants
    "reshape_flatten": lambda: (randn(2, 3, 4), lambda x: x.reshape(2, 12).flatten() * 1.0),
    "permute_transpose_t": lambda: (randn(2, 3, 4), lambda x: x.permute(2, 0, 1).transpose(1, 2)[0].t()),
    "view_contiguous": lambda: (randn(2, 3, 4), lambda x: x.transpose(1, 2).contiguous().view(-1)),
    "expand_squeeze": lambda: (randn(3, 1, 4), lambda x: x.expand(3, 2, 4).unsqueeze(0).squeeze(0)[:, 1:]),
    "cat_stack": lambda: (randn(2, 3), lambda x: torch.stack([torch.cat([x, 2 * x], 1), torch.cat([x, -x], 1)])),
    "split_unbind": lambda: (randn(4, 5), lambda x: torch.cat([x.split([1, 3], 0)[1].flatten() * 3.0, x.chunk(2, 1)[1].flatten(), x.unbind(0)[0][:2]])),
    "slice_select_index": lambda: (randn(4, 5), lambda x: torch.cat([x[1:, 2:], x[[0, 0, 3]][:, [1, 4]].T, x[2, None, :3]], 0)),
    "index_select_gather": lambda: (
        randn(3, 4), lambda x: x.index_select(1, torch.tensor([3, 0, 3])) + x.gather(1, torch.tensor([[0, 1, 1]] * 3))
    ),
    "pad_reflect_replicate": lambda: (
        randn(1, 2, 4, 4), lambda x: F.pad(F.pad(F.pad(x, (1, 2, 0, 1)), (1, 1, 1, 1), mode="reflect"), (0, 1, 2, 0), mode="replicate")
    ),
    "upsample_nearest": lambda: (randn(1, 2, 3, 3), lambda x: F.interpolate(x, scale_factor=2)),
    "pixel_shuffle": lambda: (randn(1, 4, 2, 3), lambda x: F.pixel_unshuffle(F.pixel_shuffle(x, 2).flip(2).roll(1, 3), 2)),
    "unfold": lambda: (randn(1, 2, 4, 4), lambda x: F.unfold(x, 2, padding=1, stride=(1, 2))),
    "fold": lambda: (randn(1, 8, 9), lambda x: F.fold(x, (4, 4), 2)),
    "repeat_tensor_unfold": lambda: (randn(2, 5), lambda x: x.repeat(2, 1).unfold(1, 3, 2)),
    "sum_dims": lambda: (randn(2, 3, 4), lambda x: torch.cat([x.sum((0, 2)), x.sum(1, keepdim=True).flatten(), x.sum()[None]])),
    "mean_dims": lambda: (randn(2, 3, 4), lambda x: torch.cat([x.mean((0, 2)), x.mean(1).flatten(), x.mean()[None]])),
    "max_min_dim": lambda: (randn(3, 4), lambda x: torch.cat([x.max(1).values, x.min(0).values])),
    "add_alpha": lambda: (randn(2, 6), lambda x: torch.add(x[:, :3], x[:, 3:], alpha=3.0)),
    "add_broadcast": lambda: (randn(4), (lambda c: lambda x: torch.add(c, x, alpha=-2.0))(randn(3, 4))),
    "add_scalar_sub_scalar": lambda: (randn(2, 3), lambda x: (x + 1.5) - 2),
    "sub_alpha": lambda: (randn(2, 6), lambda x: torch.sub(x[:, :3], x[:, 3:], alpha=0.5)),
    "rsub": lambda: (randn(2, 6), lambda x: torch.cat([2.0 - x, torch.rsub(x[:, :3], x[:, 3:], alpha=3.0)], 1)),
    "neg": lambda: (randn(2, 3), lambda x: -x),
    "mul_scalar": lambda: (randn(2, 3), lambda x: x * 3 * 0.5),
    "mul_tensor": lambda: (randn(2, 3), (lambda c: lambda x: c * x * c[0])(randn(3))),
    "mul_broadcast_reduce": lambda: (randn(1, 4), (lambda c: lambda x: x * c)(randn(3, 4))),
    "mul_parameter": lambda: (randn(2, 3), (lambda c: lambda x: x * c)(nn.Parameter(randn(3)))),
    "div_scalar_tensor": lambda: (randn(2, 3), (lambda c: lambda x: (x / 2) / c)(positive(3))),
    "to_dtype": lambda: (randn(2, 3), lambda x: x.to(torch.float32).to(DT) * 1.0),
    "squeeze_unsqueeze_transpose_variants": lambda: (
        randn(3, 1, 4, 1),
        lambda x: torch.cat(
            [
                x.squeeze().flatten(),
                x.squeeze((1, 3)).flatten(),
                x.clone().squeeze_().flatten(),
                x.clone().unsqueeze_(0).flatten(),
                x.clone().transpose_(0, 2).flatten(),
            ]
        ),
    ),
    "alias_as_strided_diagonal": lambda: (
        randn(3, 4),
        lambda x: torch.cat([torch.ops.aten.alias(x).flatten(), x.as_strided((2, 2), (1, 2)).flatten(), x.diagonal()]),
    ),
    "scalar_overloads": lambda: (
        randn(2, 3),
        lambda x: torch.cat(
            [
                torch.ops.aten.mul.Scalar(x, 3.0),
                torch.ops.aten.div.Scalar(x, -2.0),
                torch.ops.aten.add.Scalar(x, 1.0),
                torch.ops.aten.sub.Scalar(x, 1.0),
            ]
        ),
    ),
    "unsafe_split": lambda: (
        randn(4, 3),
        lambda x: torch.cat(
            [torch.unsafe_split(x, 2, 0)[1] * 2.0, torch.unsafe_split_with_sizes(x, [1, 3], 0)[0] * -3.0]
        ),
        lambda x: torch.cat([x.split(2, 0)[1] * 2.0, x.split([1, 3], 0)[0] * -3.0]),  # vmap lacks unsafe_split
    ),
    "pad_1d": lambda: (
        randn(2, 3, 5), lambda x: F.pad(F.pad(x, (2, 1), mode="reflect"), (1, 3), mode="replicate")
    ),
    "pad_3d": lambda: (
        randn(1, 2, 3, 3, 4), lambda x: F.pad(F.pad(x, (1, 2, 0, 1, 1, 1), mode="reflect"), (1, 0, 1, 1, 0, 2), mode="replicate")
    ),
    "upsample_nearest_1d_3d": lambda: (
        randn(1, 2, 2, 2, 3),
        lambda x: torch.cat([F.interpolate(x, scale_factor=(2, 1, 2)).flatten(), F.interpolate(x[0], size=7).flatten()]),
    ),
}


@pytest.mark.parametrize("gauss_newton", [False, True], ids=["hesscale", "gn"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_single_operation(name, gauss_newton):
    x, f, *f_ref = CASES[name]()  # an optional third entry: the same function for torch.func
    run_single(f, x, gauss_newton, *f_ref)


INPLACE = {
    "elu_": (lambda x: F.elu_(x * 1.0, alpha=0.8), lambda x: F.elu(x, alpha=0.8)),
    "selu_": (lambda x: F.selu(x * 1.0, inplace=True), F.selu),
    "celu_": (lambda x: F.celu_(x * 1.0, alpha=2.0), lambda x: F.celu(x, alpha=2.0)),
    "leaky_relu_": (lambda x: F.leaky_relu_(x * 1.0, 0.2), lambda x: F.leaky_relu(x, 0.2)),
    "relu_": (lambda x: F.relu_(x * 1.0), F.relu),
    "hardtanh_": (lambda x: F.hardtanh_(x * 1.0, -0.3, 0.4), lambda x: F.hardtanh(x, -0.3, 0.4)),
    "sigmoid_": (lambda x: (x * 1.0).sigmoid_(), torch.sigmoid),
    "tanh_": (lambda x: (x * 1.0).tanh_(), torch.tanh),
}


@pytest.mark.parametrize("name", sorted(INPLACE))
def test_inplace_activation(name):
    f, f_ref = INPLACE[name]
    run_single(f, randn(3, 7), False, f_ref)


@pytest.mark.parametrize("gauss_newton", [False, True], ids=["hesscale", "gn"])
def test_activation_second_term_is_included_or_dropped(gauss_newton):
    """A sanity check of the two variants against each other on tanh (φ'' ≠ 0)."""
    x = randn(4, 5)
    d_x = run_single(torch.tanh, x, gauss_newton)
    leaf = x.clone().requires_grad_(True)
    xx = leaf.clone()
    y = torch.tanh(xx)
    d, g = torch.ones_like(y), torch.ones_like(y)
    other = backpropagate_diagonal(y, d, g, {xx.grad_fn: 0}, gauss_newton=not gauss_newton)[0][0]
    t = torch.tanh(x)
    assert torch.allclose(other - (1 - t**2) ** 2, (0.0 if not gauss_newton else 1.0) * (-2 * t * (1 - t**2)))
    assert d_x.shape == x.shape


def _batch_norm(cls, channels):
    bn = double(cls(channels))
    bn.running_mean.copy_(randn(channels))
    bn.running_var.copy_(positive(channels))
    with torch.no_grad():
        if bn.weight is not None:
            bn.weight.copy_(randn(channels))
            bn.bias.copy_(randn(channels))
    return bn.eval()


BN_CASES = {
    "bn2d": (lambda: _batch_norm(nn.BatchNorm2d, 3), (2, 3, 4, 4)),
    "bn1d_2d": (lambda: _batch_norm(nn.BatchNorm1d, 3), (4, 3)),
    "bn1d_3d": (lambda: _batch_norm(nn.BatchNorm1d, 3), (2, 3, 5)),
    "bn3d": (lambda: _batch_norm(nn.BatchNorm3d, 2), (1, 2, 3, 2, 2)),
    "bn2d_noaffine": (lambda: double(nn.BatchNorm2d(3, affine=False)).eval(), (2, 3, 2, 2)),
    "legit_no_training": (
        lambda: (
            lambda w, b, m, v: lambda x: torch.ops.aten._native_batch_norm_legit_no_training(x, w, b, m, v, 0.1, 1e-3)[0]
        )(randn(3), randn(3), randn(3), positive(3)),
        (2, 3, 2),
    ),
}


@pytest.mark.parametrize("name", sorted(BN_CASES))
def test_batch_norm_eval(name):
    make, shape = BN_CASES[name]
    run_single(make(), randn(*shape))


@pytest.mark.parametrize("kind", ["functional", "native", "dropout2d"])
def test_dropout_train_mode(kind):
    x = randn(4, 3, 5)
    leaf = x.clone().requires_grad_(True)
    xx = leaf.clone()
    if kind == "functional":
        y = F.dropout(xx, 0.4, training=True)
    elif kind == "native":
        y = torch.native_dropout(xx, 0.4, True)[0]
    else:
        y = F.dropout1d(xx, 0.4, training=True)
    # the realised mask times the scale, read off the forward pass (not the code under test)
    factor = y.detach() / x
    f = lambda z: z * factor  # noqa: E731
    d, g = torch.rand_like(y) + 0.1, torch.randn_like(y)
    found = backpropagate_diagonal(y, d, g, {xx.grad_fn: "x"})
    d_ref, g_ref = reference(f, x, d, g)
    torch.testing.assert_close(found["x"][0], d_ref, **TOL)
    torch.testing.assert_close(found["x"][1], g_ref, **TOL)
    if kind == "native":
        assert type(y.grad_fn).__name__ == "NativeDropoutBackward0"


def test_watch_multi_output_split_node():
    x = randn(4, 3)
    leaf = x.clone().requires_grad_(True)
    a, b = leaf.clone().split([1, 3])
    y = torch.cat([b * 2.0, a * 3.0])
    d, g = torch.rand_like(y), torch.randn_like(y)
    (d_a, d_b), (g_a, g_b) = backpropagate_diagonal(y, d, g, {a.grad_fn: "split"})["split"]
    torch.testing.assert_close(d_b, 4 * d[:3])
    torch.testing.assert_close(d_a, 9 * d[3:])
    torch.testing.assert_close(g_a, 3 * g[3:])


# ----------------------------------------------------------------------------------------------
# whole networks against a layer-by-layer BL89 recursion with dense per-layer Jacobians


def _layer_step(layer, a_in, d_out, g_out, gauss_newton):
    """One BL89 step through ``layer`` with dense jacrev/hessian (the reference recursion)."""
    return reference(layer, a_in, d_out, g_out, gauss_newton)


@pytest.mark.parametrize("gauss_newton", [False, True], ids=["hesscale", "gn"])
def test_sequential_cnn(gauss_newton):
    net = double(
        nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(3, 4, 2),
            nn.Sigmoid(),
            nn.Flatten(),
            nn.Linear(16, 5),
        )
    )
    x = randn(2, 2, 6, 6)
    activations = [x]
    outputs = []
    a = x
    for layer in net:
        a = layer(a)
        outputs.append(a)
    with torch.no_grad():
        activations += [layer_out.detach() for layer_out in outputs[:-1]]
    y = outputs[-1]
    d, g = torch.rand_like(y) + 0.1, torch.randn_like(y)
    watch = {out.grad_fn: k for k, out in enumerate(outputs)}
    found = backpropagate_diagonal(y, d, g, watch, gauss_newton=gauss_newton)
    assert set(found) == set(range(len(net)))

    d_ref, g_ref = d, g
    for k in reversed(range(len(net))):
        torch.testing.assert_close(found[k][0], d_ref, **TOL)
        torch.testing.assert_close(found[k][1], g_ref, **TOL)
        if k > 0:
            d_ref, g_ref = _layer_step(net[k], activations[k], d_ref, g_ref, gauss_newton)


@pytest.mark.parametrize("gauss_newton", [False, True], ids=["hesscale", "gn"])
def test_residual_block(gauss_newton):
    stem = double(nn.Conv2d(2, 3, 3, padding=1))
    inner = double(nn.Conv2d(3, 3, 3, padding=1))
    head = double(nn.Linear(3 * 4 * 4, 4))
    x = randn(2, 2, 4, 4)
    a1 = stem(x)
    c = inner(a1)
    b = torch.relu(c)
    a2 = b + a1
    t = torch.tanh(a2)
    y = head(t.flatten(1))
    d, g = torch.rand_like(y) + 0.1, torch.randn_like(y)
    watch = {a1.grad_fn: "a1", c.grad_fn: "c", b.grad_fn: "b", a2.grad_fn: "a2", t.grad_fn: "t"}
    found = backpropagate_diagonal(y, d, g, watch, gauss_newton=gauss_newton)

    a1_, c_, b_, a2_, t_ = (v.detach() for v in (a1, c, b, a2, t))
    d_t, g_t = _layer_step(lambda z: head(z.flatten(1)), t_, d, g, gauss_newton)
    d_a2, g_a2 = _layer_step(torch.tanh, a2_, d_t, g_t, gauss_newton)
    d_b, g_b = d_a2, g_a2  # identity branch of the addition
    d_c, g_c = _layer_step(torch.relu, c_, d_b, g_b, gauss_newton)
    d_inner, g_inner = _layer_step(inner, a1_, d_c, g_c, gauss_newton)
    d_a1, g_a1 = d_inner + d_a2, g_inner + g_a2  # BL89: consumers' diagonals summed
    for key, (d_ref, g_ref) in {"t": (d_t, g_t), "a2": (d_a2, g_a2), "b": (d_b, g_b), "c": (d_c, g_c), "a1": (d_a1, g_a1)}.items():
        torch.testing.assert_close(found[key][0], d_ref, **TOL, msg=lambda m: f"{key}: {m}")
        torch.testing.assert_close(found[key][1], g_ref, **TOL, msg=lambda m: f"{key}: {m}")


def test_unwatched_and_unreachable_nodes():
    lin = double(nn.Linear(3, 2))
    x = randn(4, 3).requires_grad_(True)
    h = torch.tanh(x)
    other = torch.sigmoid(x)  # not an ancestor of the output
    y = lin(h)
    d, g = torch.ones_like(y), torch.ones_like(y)
    found = backpropagate_diagonal(y, d, g, {h.grad_fn: "h", other.grad_fn: "other"})
    assert set(found) == {"h"}
    assert backpropagate_diagonal(y, d, g, {}) == {}


def test_parameter_branch_needs_no_rule():
    """Unknown operations on the parameter side (weight re-parametrisation) are never visited."""
    w = nn.Parameter(randn(4, 3))
    x = randn(5, 3)
    f = lambda z: F.linear(z, torch.cumsum(w, 0))  # noqa: E731
    run_single(f, x)


# ----------------------------------------------------------------------------------------------
# errors


def _error(f, x, match):
    leaf = x.clone().requires_grad_(True)
    xx = leaf.clone()
    y = f(xx)
    with pytest.raises(ValueError, match=match):
        backpropagate_diagonal(y, torch.ones_like(y), torch.ones_like(y), {xx.grad_fn: "x"})


def test_unknown_node_raises():
    _error(lambda x: torch.cumsum(x, 1), randn(2, 3), "no rule for CumsumBackward0")
    _error(lambda x: torch.softmax(x, 1), randn(2, 3), "no rule for SoftmaxBackward0")
    _error(lambda x: F.layer_norm(x, (3,)), randn(2, 3), "no rule for NativeLayerNormBackward0")


def test_bilinear_raises():
    _error(lambda x: x * x, randn(2, 3), "MulBackward0.*bilinear")
    _error(lambda x: torch.tanh(x) * torch.sigmoid(x), randn(2, 3), "MulBackward0.*bilinear")
    _error(lambda x: x / torch.exp(x), randn(2, 3), "DivBackward0")
    _error(lambda x: torch.bmm(x, x.transpose(1, 2)), randn(2, 3, 4), "BmmBackward0.*bilinear")


def test_batch_norm_train_mode_raises():
    bn = double(nn.BatchNorm2d(3)).train()
    _error(bn, randn(2, 3, 2, 2), "BatchNorm in train mode.*eval")
    with pytest.raises(ValueError, match="eval mode"):
        parameter_diagonals(bn, (randn(2, 3, 2, 2),), randn(2, 3, 2, 2))


def test_invalid_arguments():
    x = randn(2, 3)
    with pytest.raises(ValueError, match="grad_fn"):
        backpropagate_diagonal(x, x, x, {})
    y = torch.tanh(x.clone().requires_grad_(True))
    with pytest.raises(ValueError, match="shape"):
        backpropagate_diagonal(y, x[0], x, {y.grad_fn: 0})


def test_supported_nodes_lists_rules():
    names = supported_nodes()
    for name in ("AddmmBackward0", "ConvolutionBackward0", "ReluBackward0", "AvgPool2DBackward0", "NativeBatchNormBackward0"):
        assert name in names


# ----------------------------------------------------------------------------------------------
# parameter diagonals


def reference_parameter_diagonals(module, x, d):
    params = {name: p.detach() for name, p in module.named_parameters()}
    buffers = {name: b for name, b in module.named_buffers()}
    result = {}
    for name in params:

        def f(p, name=name):
            return functional_call(module, {**params, **buffers, name: p}, (x,))

        jac = jacrev(f)(params[name]).reshape(d.numel(), -1)
        result[name] = (jac.square() * d.reshape(-1, 1)).sum(0).reshape(params[name].shape)
    return result


PARAM_CASES = {
    "linear": (lambda: double(nn.Linear(5, 3)), (4, 5)),
    "linear_3d": (lambda: double(nn.Linear(5, 3)), (2, 4, 5)),
    "linear_nobias": (lambda: double(nn.Linear(5, 3, bias=False)), (4, 5)),
    "conv1d": (lambda: double(nn.Conv1d(2, 4, 3, stride=2, dilation=2, padding=1)), (2, 2, 9)),
    "conv2d_groups_stride": (lambda: double(nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)), (2, 4, 7, 6)),
    "conv2d_same": (lambda: double(nn.Conv2d(2, 3, 4, padding="same", dilation=2)), (2, 2, 6, 6)),
    "conv2d_unbatched": (lambda: double(nn.Conv2d(2, 3, 3)), (2, 5, 5)),
    "conv3d": (lambda: double(nn.Conv3d(2, 2, 2, padding=(1, 0, 1))), (1, 2, 3, 3, 3)),
    "conv_transpose2d": (
        lambda: double(nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2)),
        (2, 4, 3, 3),
    ),
    "conv_transpose1d": (lambda: double(nn.ConvTranspose1d(2, 3, 2, stride=2, dilation=3, bias=False)), (2, 2, 4)),
    "batch_norm2d_eval": (lambda: _batch_norm(nn.BatchNorm2d, 3), (2, 3, 3, 3)),
    "batch_norm1d_eval": (lambda: _batch_norm(nn.BatchNorm1d, 3), (5, 3)),
}


@pytest.mark.parametrize("name", sorted(PARAM_CASES))
def test_parameter_diagonals(name):
    make, shape = PARAM_CASES[name]
    module = make()
    x = randn(*shape)
    y = module(x)
    d = torch.rand_like(y) + 0.1
    found = parameter_diagonals(module, (x,), d)
    expected = reference_parameter_diagonals(module, x, d)
    assert set(found) == set(expected)
    for key in expected:
        torch.testing.assert_close(found[key], expected[key], **TOL)


def test_parameter_diagonals_conv_transpose_output_size():
    module = double(nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1))
    x = randn(2, 2, 3, 3)
    y = module(x, output_size=(6, 6))  # implies output_padding=1
    d = torch.rand_like(y) + 0.1
    found = parameter_diagonals(module, (x, (6, 6)), d)
    module.output_padding = (1, 1)
    expected = reference_parameter_diagonals(module, x, d)
    for key in expected:
        torch.testing.assert_close(found[key], expected[key], **TOL)


def test_parameter_diagonals_errors():
    conv = double(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ValueError, match="padding_mode"):
        parameter_diagonals(conv, (randn(1, 2, 4, 4),), randn(1, 2, 4, 4))
    with pytest.raises(ValueError, match="LayerNorm"):
        parameter_diagonals(nn.LayerNorm(3), (randn(2, 3),), randn(2, 3))
    bn = double(nn.BatchNorm2d(2, track_running_stats=False)).eval()
    with pytest.raises(ValueError, match="BatchNorm"):
        parameter_diagonals(bn, (randn(2, 2, 2, 2),), randn(2, 2, 2, 2))
