"""Every function of ``curvlib.functional.__all__`` against an independent float64 reference.

References come from ``torch.nn.functional`` (convolutions, ``unfold``, ``fold``), autograd,
``torch.func`` (``jacrev``, ``vmap``, ``jvp``, ``grad``) and explicit loops, see ``conftest.py``;
never from another curvlib network. Every configuration runs on every pathway (:mod:`curvlib.pathways`):
the tensor network as built and simplified, ``unfold``, ``native`` (where it applies) and ``auto``.
"""

from __future__ import annotations

import functools
import itertools
import math
import random

import pytest
import torch
import torch.nn.functional as tf
from torch.func import grad, jacrev, jvp, vmap

import curvlib.functional as F
from curvlib import simplify as simplify_module
from conftest import DTYPE, Layer, assert_close, expand, torch_padding_pairs, unfold_loop

L = Layer

# ----------------------------------------------------------------------------------------------
# configurations
#
# Hand-picked layers make sure that every rewrite of the simplification pipeline is exercised
# (test_pipeline_rewrites_are_exercised checks it): dense K = S, down-sampling S > K (with trailing
# pixels that no window touches), point-wise K = S = 1, mixed K = (1, 3), overlapping windows that
# keep their patterns, groups (incl. depthwise and mini-blocks straddling groups), 'same' with even
# kernels (asymmetric padding), 'valid', and transposed layers with output_padding.

HAND_PICKED = [
    # 1d
    L("1d-dense", (8,), (2,), stride=2, c_in=3, c_out=4),
    L("1d-downsample-remainder", (7,), (2,), stride=3, padding=1, c_in=2, c_out=3, batch=3),
    L("1d-overlap-dilated-groups", (8,), (3,), padding=2, dilation=2, groups=2, c_in=4, c_out=6),
    L("1d-same-even", (6,), (4,), padding="same", batch=1, columns=3),
    L("1d-pointwise-depthwise", (5,), (1,), groups=3, c_in=3, c_out=6),
    L("1d-transposed", (4,), (3,), stride=2, padding=1, output_padding=1, groups=2, c_in=4, c_out=2,
      transposed=True),
    L("1d-transposed-dense", (4,), (2,), stride=2, c_in=2, c_out=3, transposed=True),
    # 2d
    L("2d-dense", (6, 4), (2, 2), stride=2, c_in=3, c_out=2),
    L("2d-mixed-dense", (5, 6), (1, 3), stride=(1, 3), groups=2, c_in=2, c_out=4),
    L("2d-mixed-overlap", (5, 6), (1, 3), padding=(0, 1), c_in=3, c_out=3, batch=3),
    L("2d-stride-gt-kernel", (7, 5), (2, 1), stride=(3, 2), padding=(1, 0), c_in=2, c_out=4, batch=3),
    L("2d-depthwise-same", (5, 6), (3, 2), padding="same", dilation=(1, 2), groups=4, c_in=4, c_out=4),
    L("2d-valid-groups", (6, 5), (3, 2), stride=(2, 1), padding="valid", groups=2, c_in=4, c_out=6,
      columns=3),
    L("2d-pointwise", (4, 3), (1, 1), c_in=3, c_out=5),
    L("2d-dilated-overlap", (7, 7), (2, 3), stride=(1, 2), padding=(2, 1), dilation=(3, 2), c_in=2, c_out=3),
    L("2d-groups-straddle", (5, 4), (2, 2), groups=3, c_in=3, c_out=6, batch=1),
    L("2d-transposed", (3, 3), (3, 2), stride=2, padding=(1, 0), output_padding=(1, 1), groups=2, c_in=4,
      c_out=6, transposed=True),
    L("2d-transposed-dense", (3, 2), (2, 2), stride=2, c_in=3, c_out=2, transposed=True),
    L("2d-transposed-dilated", (3, 4), (2, 2), dilation=2, padding=(1, 0), output_padding=1, groups=2,
      c_in=2, c_out=4, transposed=True),
    # 3d
    L("3d-dense", (4, 4, 2), (2, 2, 2), stride=2, c_in=2, c_out=3),
    L("3d-mixed", (5, 3, 4), (1, 2, 3), stride=(1, 2, 1), padding=(0, 0, 1), groups=2, c_in=2, c_out=4),
    L("3d-same-even", (3, 4, 3), (2, 3, 1), padding="same", c_in=2, c_out=2, batch=1),
    L("3d-transposed", (2, 3, 2), (2, 1, 3), stride=(2, 1, 1), padding=(0, 0, 1), output_padding=(1, 0, 0),
      c_in=2, c_out=2, transposed=True),
]


def _random_layers(count_per_dim: int = 4):
    """A small sample of hyper-parameters (fixed generator: identical collection on every worker)."""
    rng = random.Random(20240611)
    max_size = {1: 8, 2: 7, 3: 4}
    layers = []
    for num_dims in (1, 2, 3):
        made = 0
        while made < count_per_dim:
            transposed = rng.random() < 0.3
            kernel = tuple(rng.choice((1, 2, 3)) for _ in range(num_dims))
            stride = tuple(rng.choice((1, 2, 3)) for _ in range(num_dims))
            dilation = tuple(rng.choice((1, 1, 2)) for _ in range(num_dims))
            groups = rng.choice((1, 1, 2, 3))
            c_in = groups * rng.choice((1, 2))
            c_out = groups * rng.choice((1, 2))
            in_size = tuple(rng.randint(2 if transposed else 3, 3 if transposed and num_dims > 1 else max_size[num_dims])
                            for _ in range(num_dims))
            if transposed:
                padding = tuple(rng.randint(0, d * (k - 1)) for k, d in zip(kernel, dilation))
                output_padding = tuple(rng.randint(0, max(s, d) - 1) for s, d in zip(stride, dilation))
                extra = dict(transposed=True, output_padding=output_padding)
            else:
                padding = rng.choice(["int", "tuple", "same", "valid"])
                if padding == "same":
                    stride = (1,) * num_dims
                elif padding == "int":
                    padding = rng.randint(0, 2)
                elif padding == "tuple":
                    padding = tuple(rng.randint(0, 2) for _ in range(num_dims))
                extra = {}
            stride_arg = stride[0] if len(set(stride)) == 1 and rng.random() < 0.5 else stride
            layer = L(
                f"{num_dims}d-random{made}", in_size, kernel, stride=stride_arg, padding=padding,
                dilation=dilation, groups=groups, c_in=c_in, c_out=c_out, batch=rng.randint(1, 3),
                columns=rng.randint(1, 3), **extra,
            )
            try:
                out = layer.output_shape()
            except RuntimeError:
                continue  # kernel larger than the (padded) input
            if min(out[2:]) < 1 or math.prod(out[2:]) > 150:
                continue
            ones = torch.ones(layer.x_shape, dtype=DTYPE), torch.ones(layer.weight_shape, dtype=DTYPE)
            if not layer.forward(ones[1], ones[0]).any():
                continue  # every window lies in the padding: all quantities vanish
            layers.append(layer)
            made += 1
    return layers


LAYERS = HAND_PICKED + _random_layers()
ROUTES = [
    pytest.param(dict(pathway="tn", simplify=True), id="simplified"),
    pytest.param(dict(pathway="tn", simplify=False), id="plain"),
    pytest.param(dict(pathway="unfold"), id="unfold"),
    pytest.param(dict(pathway="native"), id="native"),
    pytest.param(dict(pathway="auto"), id="auto"),
]
by_layer = pytest.mark.parametrize("layer", LAYERS, ids=str)


def by_route(test):
    """Run ``test`` on every pathway; a forced native pathway that does not apply (transposed layers
    for unfold-based operations, per-sample weight VJPs) must say so and is skipped."""

    @functools.wraps(test)
    def wrapper(*args, **kwargs):
        try:
            return test(*args, **kwargs)
        except ValueError as error:
            if kwargs["route"]["pathway"] == "native" and "pathway='native' is not available" in str(error):
                pytest.skip(str(error))
            raise

    return pytest.mark.parametrize("route", ROUTES)(wrapper)
forward_layers = [layer for layer in LAYERS if not layer.transposed]


def _data(layer: Layer, dtype=DTYPE):
    x, w = layer.random(dtype)
    y_shape = layer.output_shape()
    return x, w, y_shape


# ----------------------------------------------------------------------------------------------
# sanity of the references themselves


@by_layer
def test_reference_patches_reproduce_forward(layer, seed):
    """The unfolded-input reference (used for KFC) reproduces torch's forward pass."""
    x, w, y_shape = _data(layer)
    patches = layer.unfolded_input(x)  # [N, G, L, D]
    groups = layer.groups
    if layer.transposed:
        w_g = w.reshape(groups, layer.c_in // groups, layer.c_out // groups, -1).transpose(2, 3)
        w_g = w_g.reshape(groups, -1, layer.c_out // groups).transpose(1, 2)
    else:
        w_g = w.reshape(groups, layer.c_out // groups, -1)
    y = torch.einsum("ngld,gcd->ngcl", patches, w_g).reshape(y_shape)
    assert_close(y, layer.forward(w, x), name="patches @ weight")


# ----------------------------------------------------------------------------------------------
# forward maps and JVPs


@by_route
@by_layer
def test_forward(layer, route, seed):
    x, w, y_shape = _data(layer)
    bias = torch.randn(y_shape[1], dtype=DTYPE)
    if layer.transposed:
        result = F.conv_transpose(x, w, bias, layer.stride, layer.padding, layer.output_padding, layer.groups,
                                  layer.dilation, **route)
        name = "conv_transpose"
    else:
        result = F.conv(x, w, bias, layer.stride, layer.padding, layer.dilation, layer.groups, **route)
        name = "conv"
    assert_close(result, layer.forward(w, x, bias), name=name)
    no_bias = F.conv_transpose(x, w, **_transpose_kwargs(layer), **route) if layer.transposed else \
        F.conv(x, w, stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups,
               **route)
    assert_close(no_bias, layer.forward(w, x), name=name + " without bias")


def _transpose_kwargs(layer):
    return dict(stride=layer.stride, padding=layer.padding, output_padding=layer.output_padding,
                groups=layer.groups, dilation=layer.dilation)


@by_route
@by_layer
def test_weight_jvp(layer, route, seed):
    x, w, _ = _data(layer)
    v_w = torch.randn_like(w)
    _, expected = jvp(lambda w: layer.forward(w, x), (w,), (v_w,))
    assert_close(F.weight_jvp(x, v_w, **layer.hyper(), **route), expected, name="weight_jvp")


@by_route
@by_layer
def test_input_jvp(layer, route, seed):
    x, w, _ = _data(layer)
    v_x = torch.randn_like(x)
    _, expected = jvp(lambda x: layer.forward(w, x), (x,), (v_x,))
    assert_close(F.input_jvp(w, v_x, **layer.hyper(), **route), expected, name="input_jvp")


# ----------------------------------------------------------------------------------------------
# VJPs


@by_route
@by_layer
def test_weight_vjp(layer, route, seed):
    x, w, y_shape = _data(layer)
    v = torch.randn(y_shape, dtype=DTYPE)
    w.requires_grad_(True)
    (expected,) = torch.autograd.grad(layer.forward(w, x), w, v)
    result = F.weight_vjp(x, v, layer.kernel, **layer.hyper(), **route)
    assert_close(result, expected, name="weight_vjp")


@by_route
@by_layer
def test_weight_vjp_per_sample(layer, route, seed):
    x, w, y_shape = _data(layer)
    v = torch.randn(y_shape, dtype=DTYPE)

    def sample_loss(w, x_n, v_n):
        return (layer.forward(w, x_n[None]) * v_n[None]).sum()

    expected = vmap(grad(sample_loss), in_dims=(None, 0, 0))(w, x, v)
    result = F.weight_vjp(x, v, layer.kernel, **layer.hyper(), per_sample=True, **route)
    assert_close(result, expected, name="weight_vjp(per_sample=True)")


@by_route
@pytest.mark.parametrize("per_sample", [False, True], ids=["summed", "per_sample"])
@by_layer
def test_weight_vjp_columns(layer, per_sample, route, seed):
    """Several backpropagated vectors at once (``columns=True``): one weight VJP per column."""
    x, w, y_shape = _data(layer)
    v = torch.randn(layer.columns, *y_shape, dtype=DTYPE)

    def sample_loss(w, x_n, v_n):
        return (layer.forward(w, x_n[None]) * v_n[None]).sum()

    per_column_and_sample = vmap(vmap(grad(sample_loss), in_dims=(None, 0, 0)), in_dims=(None, None, 0))(w, x, v)
    expected = per_column_and_sample if per_sample else per_column_and_sample.sum(1)
    result = F.weight_vjp(x, v, layer.kernel, **layer.hyper(), columns=True, per_sample=per_sample,
                          **route)
    assert_close(result, expected, name=f"weight_vjp(columns=True, per_sample={per_sample})")


@by_route
@by_layer
def test_input_vjp(layer, route, seed):
    x, w, y_shape = _data(layer)
    v = torch.randn(y_shape, dtype=DTYPE)
    x.requires_grad_(True)
    (expected,) = torch.autograd.grad(layer.forward(w, x), x, v)
    assert_close(F.input_vjp(w, v, x.shape[2:], **layer.hyper(), **route), expected, name="input_vjp")
    # the full input shape is accepted as well
    assert_close(F.input_vjp(w, v, x.shape, **layer.hyper(), **route), expected,
                 name="input_vjp(full input shape)")


# ----------------------------------------------------------------------------------------------
# Kronecker factors


@by_route
@by_layer
def test_kfc(layer, route, seed):
    x, _, _ = _data(layer)
    patches = layer.unfolded_input(x)  # [N, G, L, D]
    expected = torch.einsum("ngld,ngle->gde", patches, patches) / x.shape[0]
    assert_close(F.kfc(x, layer.kernel, **layer.hyper(), **route), expected, name="kfc")


@by_route
@by_layer
def test_kfac_reduce(layer, route, seed):
    x, _, _ = _data(layer)
    mean_patch = layer.unfolded_input(x).mean(2)  # [N, G, D]
    expected = torch.einsum("ngd,nge->gde", mean_patch, mean_patch) / x.shape[0]
    assert_close(F.kfac_reduce(x, layer.kernel, **layer.hyper(), **route), expected,
                 name="kfac_reduce")


# ----------------------------------------------------------------------------------------------
# GGN quantities from the full Jacobian


def _ggn_setup(layer):
    x, w, y_shape = _data(layer)
    s = torch.randn(layer.columns, *y_shape, dtype=DTYPE)
    jac = layer.weight_jacobian(x)  # [N, P, W]
    # the weight VJP of every column and sample: J_{c,n} = J_nᵀ s_{c,n}
    vjps = torch.einsum("cnp,npw->cnw", s.reshape(layer.columns, x.shape[0], -1), jac)
    return x, w, s, vjps


@by_route
@by_layer
def test_ggn(layer, route, seed):
    x, w, s, vjps = _ggn_setup(layer)
    expected = torch.einsum("cnw,cnv->wv", vjps, vjps)
    assert_close(F.ggn(x, s, layer.kernel, **layer.hyper(), **route), expected, name="ggn")


@by_route
@by_layer
def test_ggn_diag(layer, route, seed):
    x, w, s, vjps = _ggn_setup(layer)
    expected = (vjps**2).sum((0, 1)).reshape(w.shape)
    assert_close(F.ggn_diag(x, s, layer.kernel, **layer.hyper(), **route), expected, name="ggn_diag")
    expected_per_sample = (vjps**2).sum(0).reshape(x.shape[0], *w.shape)
    result = F.ggn_diag(x, s, layer.kernel, **layer.hyper(), per_sample=True, **route)
    assert_close(result, expected_per_sample, name="ggn_diag(per_sample=True)")


@by_route
@by_layer
def test_ggn_gram(layer, route, seed):
    x, w, s, vjps = _ggn_setup(layer)
    expected = torch.einsum("cnw,dmw->cndm", vjps, vjps)
    assert_close(F.ggn_gram(x, s, layer.kernel, **layer.hyper(), **route), expected, name="ggn_gram")


@by_route
@by_layer
def test_ggn_diag_with_bias(layer, route, seed):
    """``bias=True`` adds the bias's GGN diagonal; the bias's per-(column, sample) gradients come from
    autograd's Jacobian of the layer with respect to its bias."""
    x, w, s, vjps = _ggn_setup(layer)
    bias = torch.randn(layer.weight_shape[1] * layer.groups if layer.transposed else layer.weight_shape[0],
                       dtype=DTYPE)
    jac = jacrev(lambda b: layer.forward(w, x, bias=b).reshape(x.shape[0], -1))(bias)  # [N, P, C_out]
    bias_vjps = torch.einsum("cnp,npb->cnb", s.reshape(layer.columns, x.shape[0], -1), jac)
    for per_sample in (False, True):
        weight, got = F.ggn_diag(x, s, layer.kernel, **layer.hyper(), per_sample=per_sample, bias=True, **route)
        expected = (vjps**2).sum(0 if per_sample else (0, 1)).reshape(*lead(x, per_sample), *w.shape)
        assert_close(weight, expected, name=f"ggn_diag(bias=True, per_sample={per_sample})[0]")
        assert_close(got, (bias_vjps**2).sum(0 if per_sample else (0, 1)), name=f"bias diagonal (per_sample={per_sample})")


def lead(x, per_sample):
    return (x.shape[0],) if per_sample else ()


def test_ggn_diag_bias_flag_is_checked():
    x, s = torch.randn(2, 3, 6, 6), torch.randn(2, 2, 4, 4, 4)
    with pytest.raises(TypeError, match="bias must be a bool, got str"):
        F.ggn_diag(x, s, 3, bias="yes")


@by_layer
def test_ggn_diag_and_gram_of_channels_innermost_columns(layer, seed):
    """Columns stored channels-last (``[C, N, *O, C_out]`` in memory, what the graph walk's channels-last
    data gradients produce): the native pathway takes another sample-major copy; same results."""
    x, w, s, vjps = _ggn_setup(layer)
    k = s.dim() - 3
    inner = s.permute(0, 1, *range(3, 3 + k), 2).contiguous().permute(0, 1, 2 + k, *range(2, 2 + k))
    assert torch.equal(inner, s) and (s.shape[2] == 1 or inner.stride(2) == 1)
    pathway = "native" if not layer.transposed else "auto"
    got = F.ggn_diag(x, inner, layer.kernel, **layer.hyper(), pathway=pathway)
    assert_close(got, (vjps**2).sum((0, 1)).reshape(w.shape), name="ggn_diag")
    got = F.ggn_diag(x, inner, layer.kernel, **layer.hyper(), per_sample=True, pathway=pathway)
    assert_close(got, (vjps**2).sum(0).reshape(x.shape[0], *w.shape), name="ggn_diag(per_sample=True)")
    got = F.ggn_gram(x, inner, layer.kernel, **layer.hyper(), pathway=pathway)
    assert_close(got, torch.einsum("cnw,dmw->cndm", vjps, vjps), name="ggn_gram")


def _divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


def _block_choices(layer):
    """Full GGN, diagonal, one random mix and (with groups) blocks that straddle / split / join groups."""
    shape = layer.weight_shape
    rng = random.Random(layer.name)
    choices = {tuple(1 for _ in shape), tuple(shape), tuple(rng.choice(_divisors(n)) for n in shape)}
    per_group = shape[0] // layer.groups
    for b in _divisors(shape[0]):
        within = shape[0] // b
        if layer.groups > 1 and per_group % within and within % per_group:  # straddles groups
            choices.add((b,) + tuple(rng.choice(_divisors(n)) for n in shape[1:]))
            break
    if layer.groups > 1:
        choices.add((layer.groups,) + (1,) * (len(shape) - 1))  # one block per group
    return sorted(choices)


def _mini_block_reference(full, shape, blocks):
    z = [n // b for n, b in zip(shape, blocks)]
    tensor = full.reshape(*shape, *shape)
    result = full.new_zeros(*blocks, math.prod(z), math.prod(z))
    for block in itertools.product(*[range(b) for b in blocks]):
        region = tuple(slice(b * zz, (b + 1) * zz) for b, zz in zip(block, z))
        result[block] = tensor[region + region].reshape(math.prod(z), math.prod(z))
    return result


@pytest.mark.parametrize("blocks,membership", [((3, 1, 1, 1), False), ((6, 1, 1, 1), False),
                                                 ((1, 1, 1, 1), False), ((2, 1, 1, 1), True)],
                         ids=["group-per-block", "within-group", "whole-channel-axis", "straddling"])
def test_ggn_blocks_use_membership_only_when_straddling(blocks, membership, seed):
    """C_out = 6 in 3 groups: only blocks that straddle groups need the group-membership tensor."""
    from curvlib.expressions import ggn
    from curvlib.hyperparams import make_geometry

    geometry = make_geometry(3, 6, (4, 4), 2, groups=3)
    x, s = torch.randn(2, 3, 4, 4, dtype=DTYPE), torch.randn(2, 2, 6, 3, 3, dtype=DTYPE)
    network = ggn.ggn_blocks(x, s, geometry, blocks)
    names = [op.name for op in network.operands]
    assert ("group_membership" in names) == membership, names


@by_route
@by_layer
def test_ggn_mini_block(layer, route, seed):
    x, w, s, vjps = _ggn_setup(layer)
    full = torch.einsum("cnw,cnv->wv", vjps, vjps)
    for blocks in _block_choices(layer):
        expected = _mini_block_reference(full, w.shape, blocks)
        result = F.ggn_mini_block(x, s, layer.kernel, blocks=blocks, **layer.hyper(), **route)
        assert_close(result, expected, name=f"ggn_mini_block(blocks={blocks})")


# ----------------------------------------------------------------------------------------------
# HesScale


@by_route
@by_layer
def test_hesscale_weight_diag(layer, route, seed):
    x, w, y_shape = _data(layer)
    d = torch.randn(y_shape, dtype=DTYPE)  # any sign: the formula is linear in d
    jac = layer.weight_jacobian(x)  # [N, P, W]
    weighted = torch.einsum("npw,np->nw", jac**2, d.reshape(x.shape[0], -1))
    result = F.hesscale_weight_diag(x, d, layer.kernel, **layer.hyper(), **route)
    assert_close(result, weighted.sum(0).reshape(w.shape), name="hesscale_weight_diag")
    result = F.hesscale_weight_diag(x, d, layer.kernel, **layer.hyper(), per_sample=True, **route)
    assert_close(result, weighted.reshape(x.shape[0], *w.shape), name="hesscale_weight_diag(per_sample=True)")


@by_route
@by_layer
def test_hesscale_input_diag(layer, route, seed):
    x, w, y_shape = _data(layer)
    d = torch.randn(y_shape, dtype=DTYPE)
    jac = layer.input_jacobian(w)  # [P, |x_n|]
    expected = torch.einsum("pi,np->ni", jac**2, d.reshape(d.shape[0], -1)).reshape(x.shape)
    result = F.hesscale_input_diag(w, d, x.shape[2:], **layer.hyper(), **route)
    assert_close(result, expected, name="hesscale_input_diag")


# ----------------------------------------------------------------------------------------------
# unfolding


def _unfold_args(layer):
    kernel = layer.kernel
    dilation = expand(layer.dilation, layer.num_dims)
    stride = expand(layer.stride, layer.num_dims)
    pads = torch_padding_pairs(layer.padding, kernel, dilation)
    kwargs = dict(dilation=layer.dilation, padding=layer.padding, stride=layer.stride)
    return kernel, stride, pads, dilation, kwargs


def _torch_unfold_supported(layer):
    return layer.num_dims == 2 and not isinstance(layer.padding, str)


@by_route
@pytest.mark.parametrize("layer", forward_layers, ids=str)
def test_unfold(layer, route, seed):
    x, _, _ = _data(layer)
    kernel, stride, pads, dilation, kwargs = _unfold_args(layer)
    result = F.unfold(x, kernel, **kwargs, **route)
    assert_close(result, unfold_loop(x, kernel, stride, pads, dilation), name="unfold (loop reference)")
    if _torch_unfold_supported(layer):
        assert_close(result, tf.unfold(x, kernel, **kwargs), name="unfold (torch reference)")


@by_route
@pytest.mark.parametrize("layer", forward_layers, ids=str)
def test_unfold_jvp(layer, route, seed):
    x, _, _ = _data(layer)
    v_x = torch.randn_like(x)
    kernel, stride, pads, dilation, kwargs = _unfold_args(layer)
    _, expected = jvp(lambda x: unfold_loop(x, kernel, stride, pads, dilation), (x,), (v_x,))
    assert_close(F.unfold_jvp(v_x, kernel, **kwargs, **route), expected, name="unfold_jvp")


@by_route
@pytest.mark.parametrize("layer", forward_layers, ids=str)
def test_unfold_vjp(layer, route, seed):
    x, _, _ = _data(layer)
    kernel, stride, pads, dilation, kwargs = _unfold_args(layer)
    x.requires_grad_(True)
    unfolded = unfold_loop(x, kernel, stride, pads, dilation)
    v = torch.randn_like(unfolded)
    (expected,) = torch.autograd.grad(unfolded, x, v)
    result = F.unfold_vjp(v, x.shape[2:], kernel, **kwargs, **route)
    assert_close(result, expected, name="unfold_vjp (autograd of the loop)")
    if _torch_unfold_supported(layer):
        assert_close(result, tf.fold(v, x.shape[2:], kernel, **kwargs), name="unfold_vjp (torch fold)")


@by_route
@pytest.mark.parametrize("layer", forward_layers, ids=str)
def test_unfold_kernel(layer, route, seed):
    _, w, _ = _data(layer)
    expected = layer.input_jacobian(w)  # [C_out·∏O, C_in·∏I], zero between groups
    result = F.unfold_kernel(w, layer.in_size, stride=layer.stride, padding=layer.padding,
                             dilation=layer.dilation, groups=layer.groups, **route)
    assert_close(result, expected, name="unfold_kernel")


def test_unfold_int_kernel_and_sizes(seed):
    """Int ``kernel_size``/``input_size`` in 1d (``unfold_vjp`` infers the dimension from them)."""
    x = torch.randn(2, 3, 7, dtype=DTYPE, requires_grad=True)
    unfolded = unfold_loop(x, (3,), (2,), ((1, 1),), (1,))
    assert_close(F.unfold(x, 3, stride=2, padding=1), unfolded, name="unfold(int kernel)")
    v = torch.randn_like(unfolded)
    (expected,) = torch.autograd.grad(unfolded, x, v)
    assert_close(F.unfold_vjp(v, 7, 3, stride=2, padding=1), expected, name="unfold_vjp(int sizes)")


# ----------------------------------------------------------------------------------------------
# float32


FLOAT32_LAYERS = [layer for layer in HAND_PICKED if layer.name in
                  ("1d-overlap-dilated-groups", "2d-valid-groups", "2d-transposed", "3d-mixed")]


@by_route
@pytest.mark.parametrize("layer", FLOAT32_LAYERS, ids=str)
def test_float32(layer, route, seed):
    """float32 in, float32 out, close to the float64 reference up to float32 round-off."""
    x64, w64, y_shape = _data(layer)
    s64 = torch.randn(layer.columns, *y_shape, dtype=DTYPE)
    x, w, s = x64.float(), w64.float(), s64.float()
    hyper = layer.hyper()
    jac = layer.weight_jacobian(x64)
    vjps = torch.einsum("cnp,npw->cnw", s64.reshape(layer.columns, x.shape[0], -1), jac)
    patches = layer.unfolded_input(x64)
    checks = {
        "conv": (F.weight_jvp(x, w, **hyper, **route), layer.forward(w64, x64)),
        "ggn": (F.ggn(x, s, layer.kernel, **hyper, **route), torch.einsum("cnw,cnv->wv", vjps, vjps)),
        "ggn_diag": (F.ggn_diag(x, s, layer.kernel, **hyper, **route),
                     (vjps**2).sum((0, 1)).reshape(w.shape)),
        "kfc": (F.kfc(x, layer.kernel, **hyper, **route),
                torch.einsum("ngld,ngle->gde", patches, patches) / x.shape[0]),
        "weight_vjp": (F.weight_vjp(x, s[0], layer.kernel, **hyper, **route),
                       vjps[0].sum(0).reshape(w.shape)),
    }
    for name, (result, expected) in checks.items():
        assert result.dtype == torch.float32, f"{name}: dtype {result.dtype}, expected float32"
        assert_close(result, expected, rtol=1e-4, name=f"{name} (float32)", check_dtype=False)


# ----------------------------------------------------------------------------------------------
# the grid exercises every rewrite of the pipeline


def test_pipeline_rewrites_are_exercised(monkeypatch, seed):
    """Across the hand-picked layers every rewrite of ``simplify.simplify`` fires at least once."""
    fired = {name: 0 for name in ("unfold_input_leg", "unfold_input_leg(averaged)", "embed_output_leg",
                                  "prune_identities", "squeeze_legs", "merge_parallel_legs")}

    def counting(name, rewrite):
        def wrapped(network, *args, **kwargs):
            result = rewrite(network, *args, **kwargs)
            if result is not network:
                fired[name] += 1
                if name == "unfold_input_leg" and network.operands[args[0]].pattern.mean_over == "output":
                    fired["unfold_input_leg(averaged)"] += 1
            return result
        return wrapped

    for name in ("unfold_input_leg", "embed_output_leg", "prune_identities", "squeeze_legs", "merge_parallel_legs"):
        monkeypatch.setattr(simplify_module, name, counting(name, getattr(simplify_module, name)))

    for layer in HAND_PICKED:
        x, w, y_shape = _data(layer)
        s = torch.randn(layer.columns, *y_shape, dtype=DTYPE)
        hyper = layer.hyper()
        F.weight_vjp(x, s[0], layer.kernel, **hyper, pathway="tn")
        F.input_vjp(w, s[0], x.shape[2:], **hyper, pathway="tn")
        F.kfc(x, layer.kernel, **hyper, pathway="tn")
        F.kfac_reduce(x, layer.kernel, **hyper, pathway="tn")
        F.kfac_reduce(x, layer.kernel, pathway="unfold", **hyper)  # averaged patterns are viewed only here
        F.ggn_diag(x, s, layer.kernel, **hyper, pathway="tn")
        F.hesscale_input_diag(w, s[0], x.shape[2:], **hyper, pathway="tn")
    missing = [name for name, count in fired.items() if count == 0]
    assert not missing, f"rewrites never exercised by the grid: {missing} (counts {fired})"
