"""curvlib.kernels: fused Triton kernels and their fallbacks against independent float64 references.

- CPU (always): the fallback (tensor network) of every function, argument validation, ``supports``.
- Triton interpreter (when Triton is importable): this file run as a script with ``TRITON_INTERPRET=1``
  (``python tests/test_kernels.py --interpret``) runs the kernels themselves on CPU tensors, tiny shapes.
- GPU (when CUDA is available): every kernel, case and precision on the GPU, outputs poisoned with NaN
  before each run (an element a kernel forgets to write fails), split reductions forced.

References never use curvlib: patches from an explicit im2col loop (``conftest.unfold_loop``), then
einsums in float64.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as tf

from conftest import Layer

from curvlib import functional as F
from curvlib import kernels
from curvlib.hyperparams import make_geometry

#: relative Frobenius error allowed per precision (float32 inputs; see curvlib.kernels' docstring)
TOLERANCE = {"ieee": 2e-5, "tf32x3": 2e-5, "tf32": 5e-3, "bf16": 4e-2}

CASES = [
    Layer("2d-grouped-strided-dilated", (9, 9), (3, 3), stride=(2, 1), padding=1, dilation=(1, 2), groups=2,
          c_in=4, c_out=6, batch=3, columns=3),
    Layer("1d-same-even-kernel", (11,), (4,), padding="same", c_in=3, c_out=5, batch=2, columns=2),
    Layer("3d-mixed", (5, 6, 4), (2, 3, 2), stride=(1, 2, 1), padding=(1, 0, 1), c_in=2, c_out=3, batch=2, columns=1),
    Layer("2d-depthwise", (7, 7), (3, 3), padding=1, groups=6, c_in=6, c_out=6, batch=2, columns=5),
    Layer("2d-dense-1x1", (5, 5), (1, 1), c_in=40, c_out=20, batch=2, columns=4),
    Layer("2d-many-locations", (12, 12), (3, 3), c_in=3, c_out=4, batch=2, columns=3),
    # 64 output locations: tiles of 16 or 32 locations divide them (the unfolded GGN kernel's unmasked path)
    Layer("2d-even-locations", (8, 8), (3, 3), padding=1, c_in=3, c_out=5, batch=3, columns=3),
]
OPS = kernels.OPS


def geometry_of(layer: Layer):
    return make_geometry(layer.c_in, layer.c_out, layer.in_size, layer.kernel, layer.stride, layer.padding,
                         layer.dilation, layer.groups, transposed=layer.transposed,
                         output_padding=layer.output_padding)


def random_inputs(layer: Layer, dtype=torch.float64, device="cpu"):
    """``x``, ``s`` ``[C, N, *out]``, ``d`` (positive) on ``device``: fresh random, never zero."""
    out = layer.output_shape()
    x = torch.randn(layer.x_shape, dtype=torch.float64)
    s = torch.randn(layer.columns, *out, dtype=torch.float64)
    d = torch.rand(out, dtype=torch.float64) + 0.1
    return tuple(t.to(device=device, dtype=dtype) for t in (x, s, d))


def references(layer: Layer, x, s, d):
    """Every operation in float64 from the explicitly unfolded input ``U[n, g, l, d]``."""
    x, s, d = (t.detach().cpu().double() for t in (x, s, d))
    U = layer.unfolded_input(x)  # [N, G, L, D]
    N, G, L, D = U.shape
    weight = layer.weight_shape
    s_ = s.reshape(s.shape[0], N, G, -1, L)  # [C, N, G, C_out/G, L]
    d_ = d.reshape(N, G, -1, L)
    mean = U.mean(2)
    J = torch.einsum("cngol,ngld->cngod", s_, U)
    bias = s_.sum(-1).reshape(s.shape[0], N, -1)  # [C, N, C_out]: the bias's per-(column, sample) gradients
    return {
        ("ggn_bias", False): (bias**2).sum((0, 1)),
        ("ggn_bias", True): (bias**2).sum(0),
        "kfc": torch.einsum("ngld,ngle->gde", U, U) / N,
        "kfac_reduce": torch.einsum("ngd,nge->gde", mean, mean) / N,
        ("ggn_diag", False): (J**2).sum((0, 1)).reshape(weight),
        ("ggn_diag", True): (J**2).sum(0).reshape(N, *weight),
        ("hesscale_weight_diag", False): torch.einsum("ngol,ngld->god", d_, U**2).reshape(weight),
        ("hesscale_weight_diag", True): torch.einsum("ngol,ngld->ngod", d_, U**2).reshape(N, *weight),
    }


def run_op(op, x, s, d, geometry, per_sample=False, **options):
    if op == "kfc":
        return kernels.kfc(x, geometry, **options)
    if op == "kfac_reduce":
        return kernels.kfac_reduce(x, geometry, **options)
    if op == "ggn_diag":
        return kernels.ggn_diag(x, s, geometry, per_sample=per_sample, **options)
    return kernels.hesscale_weight_diag(x, d, geometry, per_sample=per_sample, **options)


def relative_error(actual, expected) -> float:
    actual, expected = actual.detach().cpu().double(), expected.detach().cpu().double()
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != reference {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), "result has non-finite entries (unwritten NaN-poisoned elements?)"
    scale = expected.norm().item()
    assert scale > 0, "the reference is zero; the comparison would be vacuous"
    return (actual - expected).norm().item() / scale


def check_kernels(layer: Layer, device, precision="ieee", dtype=torch.float32):
    """Run every fused kernel (asserting it is the kernel, not the fallback) on poisoned outputs; return
    ``{(op, per_sample): relative error}`` against the float64 references."""
    from curvlib.kernels import _host

    x, s, d = random_inputs(layer, dtype, device)
    ref = references(layer, x, s, d)
    geometry = geometry_of(layer)
    errors = {}
    for op in OPS:
        for per_sample in ((False, True) if op in ("ggn_diag", "hesscale_weight_diag") else (False,)):
            assert kernels.supports(op, x, geometry, s=s, d=d, per_sample=per_sample, precision=precision), op
            with _host.poison_outputs():
                result = run_op(op, x, s, d, geometry, per_sample, precision=precision)
            assert result.dtype == dtype and result.device == x.device
            key = (op, per_sample) if op in ("ggn_diag", "hesscale_weight_diag") else op
            errors[(op, per_sample)] = relative_error(result, ref[key])
    return errors


def check_forced_splits(layer: Layer, device):
    """The launch paths autotuning may skip on small shapes: several tiles, split (atomic) reductions."""
    from curvlib.kernels import _geometry, _host, ggn_unfolded, gram, patch_mean, weight_diag

    x, s, d = random_inputs(layer, torch.float32, device)
    ref = references(layer, x, s, d)
    kg = _geometry.kernel_geometry(geometry_of(layer))
    weight = layer.weight_shape
    errors = {}
    with _host.poison_outputs():
        for split in (1, 3):
            config = gram.KFCConfig(block_d=16, block_m=16, num_warps=4, split=split)
            errors[("kfc", split)] = relative_error(gram.kfc_factor(x, kg, "ieee", 1 / x.shape[0], config), ref["kfc"])
            config = patch_mean.MeanConfig(block_r=16, block_i=16, block_k=16, num_warps=4, split=split)
            for mode in ("split", "fma"):
                result = patch_mean.kfac_reduce_factor(x, kg, "ieee", config, mode)
                errors[("kfac_reduce", mode, split)] = relative_error(result, ref["kfac_reduce"])
                # ū in chunks of one and of two samples, each chunk's Gram added into the factor
                for samples in (1, 2):
                    result = patch_mean.kfac_reduce_factor(x, kg, "ieee", config, mode,
                                                           chunk_bytes=samples * 4 * kg.in_channels * kg.kernel_numel)
                    errors[("kfac_reduce chunked", samples, mode, split)] = relative_error(result, ref["kfac_reduce"])
        for split in (2, 5):
            ggn = weight_diag.ggn_diag(x, s, kg, False, "ieee", config=weight_diag.gathered_candidates(
                s.shape[0], kg.out_channels_per_group, kg.rows, kg.output_numel, "fma")[0], split=split)
            errors[("ggn_diag", split)] = relative_error(ggn.reshape(weight), ref[("ggn_diag", False)])
            hs = weight_diag.hesscale_weight_diag(x, d, kg, False, "ieee", split=split)
            errors[("hesscale", split)] = relative_error(hs.reshape(weight), ref[("hesscale_weight_diag", False)])
        # the unfolded-chunk GGN kernel: one sample per chunk, several slices, several column blocks,
        # tiles that do and do not divide the output locations
        per_sample_bytes = kg.groups * kg.output_numel * kg.rows * x.element_size()
        block_o = 32 if kg.output_numel % 32 == 0 else 16
        # (nested and flat loops over samples and location blocks)
        for config in (ggn_unfolded.UnfoldedGGNConfig(2, 8, 16, 16, 4, 2),
                       ggn_unfolded.UnfoldedGGNConfig(1, 16, 32, block_o, 4, 1),
                       ggn_unfolded.UnfoldedGGNConfig(2, 8, 16, 16, 4, 2, flat=True),
                       ggn_unfolded.UnfoldedGGNConfig(1, 16, 32, block_o, 4, 1, flat=True)):
            for per_sample in (False, True):
                # (and s stored channels last, as a channels-last column backpropagation leaves it)
                for chunk_bytes, split, s_in in ((per_sample_bytes, 1, s), (None, 2, s), (None, 2, channels_last(s))):
                    ggn = weight_diag.ggn_diag(x, s_in, kg, per_sample, "ieee", config=config, split=split,
                                               chunk_bytes=chunk_bytes)
                    key = ("ggn_diag", per_sample)
                    shape = (x.shape[0], *weight) if per_sample else weight
                    errors[("ggn_unfolded", config, per_sample, chunk_bytes, s_in is s)] = relative_error(
                        ggn.reshape(shape), ref[key])
    return errors


def channels_last(s: torch.Tensor) -> torch.Tensor:
    """``s [C, N, C_out, *O]`` with the same values, stored ``[C, N, *O, C_out]``."""
    return s.movedim(2, -1).contiguous().movedim(-1, 2)


# ----------------------------------------------------------------------------------------------
# CPU: the fallbacks


@pytest.mark.parametrize("layer", CASES, ids=str)
def test_fallback_matches_references(seed, layer):
    x, s, d = random_inputs(layer)
    ref = references(layer, x, s, d)
    geometry = geometry_of(layer)
    for op in OPS:
        for per_sample in (False, True):
            if op in ("kfc", "kfac_reduce") and per_sample:
                continue
            result = run_op(op, x, s, d, geometry, per_sample)
            key = (op, per_sample) if op in ("ggn_diag", "hesscale_weight_diag") else op
            assert result.dtype == torch.float64
            assert relative_error(result, ref[key]) < 1e-12, (op, per_sample)


@pytest.mark.parametrize("layer", CASES, ids=str)
def test_fallback_ggn_diag_with_bias(seed, layer):
    x, s, d = random_inputs(layer)
    ref = references(layer, x, s, d)
    for per_sample in (False, True):
        weight, bias = kernels.ggn_diag(x, s, geometry_of(layer), per_sample=per_sample, bias=True)
        assert relative_error(weight, ref[("ggn_diag", per_sample)]) < 1e-12
        assert relative_error(bias, ref[("ggn_bias", per_sample)]) < 1e-12
    with pytest.raises(TypeError, match="bias must be a bool"):
        kernels.ggn_diag(x, s, geometry_of(layer), bias=1)


def test_fallback_equals_functional_tn(seed):
    """Same semantics as curvlib.functional (the lead's pathway 'tn'), transposed layers included."""
    layer = Layer("transposed", (5, 6), (3, 2), stride=2, padding=1, groups=2, c_in=4, c_out=6, batch=2,
                  columns=3, transposed=True, output_padding=1)
    x, s, d = random_inputs(layer)
    geometry = geometry_of(layer)
    hyper = dict(layer.hyper(), pathway="tn")
    assert not kernels.supports("kfc", x.float(), geometry)  # transposed: never fused
    torch.testing.assert_close(kernels.kfc(x, geometry), F.kfc(x, layer.kernel, **hyper), rtol=1e-12, atol=0)
    torch.testing.assert_close(kernels.kfac_reduce(x, geometry), F.kfac_reduce(x, layer.kernel, **hyper),
                               rtol=1e-12, atol=0)
    for per_sample in (False, True):
        torch.testing.assert_close(kernels.ggn_diag(x, s, geometry, per_sample=per_sample),
                                   F.ggn_diag(x, s, layer.kernel, per_sample=per_sample, **hyper), rtol=1e-12, atol=0)
        torch.testing.assert_close(kernels.hesscale_weight_diag(x, d, geometry, per_sample=per_sample),
                                   F.hesscale_weight_diag(x, d, layer.kernel, per_sample=per_sample, **hyper),
                                   rtol=1e-12, atol=0)


def test_supports_rejects(seed):
    layer = CASES[0]
    x, s, d = random_inputs(layer, torch.float32)
    geometry = geometry_of(layer)
    interpreting = kernels.available() and kernels._triton.INTERPRET
    # CPU tensors run the kernels only in Triton's interpreter
    assert kernels.supports("kfc", x, geometry) == interpreting
    assert not kernels.supports("ggn_gram", x, geometry)  # no fused kernel for this op
    assert not kernels.supports("kfc", x.double(), geometry)  # float64 falls back
    assert not kernels.supports("kfc", x[:, :2], geometry)  # channels do not match
    assert not kernels.supports("kfc", x, geometry, precision="fp8")
    assert not kernels.supports("ggn_diag", x, geometry, s=s.double())
    assert not kernels.supports("ggn_diag", x, geometry, per_sample="yes")
    transposed = make_geometry(4, 6, (9, 9), 3, stride=2, groups=2, transposed=True)
    assert not kernels.supports("kfc", x, transposed)
    four_d = make_geometry(4, 6, (3, 3, 3, 3), 1)
    assert not kernels.supports("kfc", torch.randn(2, 4, 3, 3, 3, 3), four_d)  # > 3 spatial dims
    for garbage in (None, "x", 3):  # a question, never an error
        assert not kernels.supports("kfc", garbage, geometry)
        assert not kernels.supports("kfc", x, garbage)


def test_errors_name_the_argument(seed):
    layer = CASES[0]
    x, s, d = random_inputs(layer)
    geometry = geometry_of(layer)
    with pytest.raises(ValueError, match="precision must be one of .* got 'fp8'"):
        kernels.kfc(x, geometry, precision="fp8")
    with pytest.raises(TypeError, match="geometry must be a curvlib.hyperparams.ConvGeometry"):
        kernels.kfac_reduce(x, {"kernel_size": 3})
    with pytest.raises(ValueError, match=r"x must have shape \(3, 4, 9, 9\).*got \(3, 4, 9, 8\)"):
        kernels.kfc(x[..., :8], geometry)
    with pytest.raises(ValueError, match=r"s must have shape"):
        kernels.ggn_diag(x, s[:, :, :3], geometry)
    with pytest.raises(TypeError, match="s has dtype torch.float32 but x has dtype torch.float64"):
        kernels.ggn_diag(x, s.float(), geometry)
    with pytest.raises(TypeError, match="per_sample must be a bool"):
        kernels.hesscale_weight_diag(x, d, geometry, per_sample=1)
    with pytest.raises(ValueError, match=r"d must have 4 dimensions"):
        kernels.hesscale_weight_diag(x, s, geometry)
    with pytest.raises(ValueError, match=r"d must have shape \(3, 6, 5, 7\)"):
        kernels.hesscale_weight_diag(x, s[0, :, :, :4], geometry)


def test_repeated_calls_are_validated_once(seed, monkeypatch):
    """A configuration checked before skips the checks; another configuration, or bad arguments, are
    checked (and refused) as before; results follow the new values."""
    layer = CASES[0]
    geometry = geometry_of(layer)
    monkeypatch.setattr(kernels, "_VALIDATED", {})  # other tests may have validated this configuration
    checks = []
    original = kernels._check_input
    monkeypatch.setattr(kernels, "_check_input", lambda *a: checks.append(1) or original(*a))
    for _ in range(3):
        x, s, d = random_inputs(layer)
        expected = references(layer, x, s, d)["kfac_reduce"]
        assert relative_error(kernels.kfac_reduce(x, geometry), expected) < 1e-12
    assert len(checks) == 1
    with pytest.raises(ValueError, match="precision must be one of"):
        kernels.kfac_reduce(x, geometry, precision="fp8")
    with pytest.raises(ValueError, match=r"x must have shape"):
        kernels.kfac_reduce(x[..., :8], geometry)
    kernels.kfc(x, geometry)  # another operation: its own check
    assert len(checks) == 3


@pytest.mark.skipif(not kernels.available(), reason="Triton is not installed")
@pytest.mark.parametrize("size, stride, padding", [
    ((9, 8), 1, 0), ((9, 8), 2, 0), ((10, 7), (3, 2), 1), ((7,), 2, 3), ((5, 6, 4), (2, 1, 3), (1, 0, 2)), ((4, 4), 1, 2),
])
def test_pointwise_means_equal_a_depthwise_convolution(size, stride, padding, seed):
    """KFAC-reduce's patch means of a kernel-size-1 layer (a strided view of x, summed in float32) against a
    depthwise convolution with ones, averaged over its outputs (float64), for strides, padding (also larger
    than the stride: outputs entirely in the padding) and 1-3 spatial dims."""
    from curvlib.kernels import _geometry, patch_mean

    d = len(size)
    x = torch.randn(3, 5, *size, dtype=torch.float64)
    geometry = make_geometry(5, 5, size, 1, stride=stride, padding=padding)
    conv = {1: tf.conv1d, 2: tf.conv2d, 3: tf.conv3d}[d]
    ones = torch.ones(5, 1, *(1,) * d, dtype=torch.float64)
    expected = conv(x, ones, stride=geometry.stride, padding=[p for p, _ in geometry.padding], groups=5).mean(
        tuple(range(2, 2 + d)))
    means = patch_mean.patch_means(x.float(), _geometry.kernel_geometry(geometry), "ieee")
    assert means.dtype == torch.float32 and means.shape == (3, 5)
    torch.testing.assert_close(means.double(), expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="kernel size 1"):
        patch_mean.pointwise_means(x, _geometry.kernel_geometry(make_geometry(5, 5, size, 2)))


def one_hot_patches(x: torch.Tensor, geometry) -> torch.Tensor:
    """The unfolded input ``[n, G, O, D]`` of ``x`` as a convolution with one-hot filters extracts it
    (float64): filter ``(g, c, k)`` copies input channel ``c`` of group ``g`` at kernel offset ``k``."""
    dims, groups = geometry.num_dims, geometry.groups
    per_group = geometry.in_channels // groups
    rows = per_group * math.prod(geometry.kernel_size)
    one_hot = torch.eye(rows, dtype=torch.float64, device=x.device).reshape(rows, per_group, *geometry.kernel_size)
    conv = {1: tf.conv1d, 2: tf.conv2d, 3: tf.conv3d}[dims]
    padded = tf.pad(x.double(), [v for pair in reversed(geometry.padding) for v in pair])
    patches = conv(padded, one_hot.repeat(groups, *(1,) * (dims + 1)), stride=geometry.stride,
                   dilation=geometry.dilation, groups=groups)
    return patches.reshape(x.shape[0], groups, rows, -1).transpose(2, 3)


@pytest.mark.skipif(not kernels.available(), reason="Triton is not installed")
@pytest.mark.parametrize("layer", CASES, ids=str)
def test_unfolded_chunk_equals_a_one_hot_convolution(layer, seed):
    """The GGN kernel's unfolded chunk ``[n, G, O, D]`` against the patches a convolution with one-hot
    filters extracts (float64, exact): strides, dilation, groups, asymmetric ("same") padding, 1-3
    spatial dims."""
    from curvlib.kernels import _geometry, ggn_unfolded

    geometry = geometry_of(layer)
    kg = _geometry.kernel_geometry(geometry)
    x, _, _ = random_inputs(layer)
    expected = one_hot_patches(x, geometry)
    rows = expected.shape[-1]
    out = torch.full(expected.shape, float("nan"), dtype=torch.float64)
    result = ggn_unfolded.unfold_chunk(x, kg, out)
    assert result.data_ptr() == out.data_ptr()
    torch.testing.assert_close(result, expected, rtol=0, atol=0)
    # K-major (the TMA form's chunk), written into a buffer whose rows are padded
    padded = torch.full((*expected.shape[:2], rows, expected.shape[2] + 3), float("nan"), dtype=torch.float64)
    result = ggn_unfolded.unfold_chunk(x, kg, padded[..., :-3], k_major=True)
    torch.testing.assert_close(result, expected.transpose(2, 3), rtol=0, atol=0)
    assert padded[..., -3:].isnan().all()  # the padding is left alone


def test_autotune_cache_chooses_once():
    from curvlib.kernels.autotune import ConfigCache

    calls = []
    cache = ConfigCache("test")
    first = cache.choose(("k",), ["a", "b"], launch=calls.append, device=torch.device("cpu"))
    again = cache.choose(("k",), ["b"], launch=calls.append, device=torch.device("cpu"))
    assert first == again == "a" and calls == []  # off the GPU: the first candidate, nothing launched
    with pytest.raises(ValueError, match="no candidate"):
        cache.choose(("other",), [], launch=calls.append, device=torch.device("cpu"))


# ----------------------------------------------------------------------------------------------
# Triton interpreter: the kernels themselves on the CPU (a subprocess: TRITON_INTERPRET is read at import)


def _interpreter_usable() -> bool:
    """Some Triton versions' interpreters (3.6 with NumPy 2.x) cannot run a loop whose bounds are kernel
    arguments (they hold 1-element arrays, which NumPy no longer converts to ints)."""
    import triton
    import triton.language as tl

    @triton.jit
    def probe(out_ptr, steps):
        total = tl.zeros((16,), dtype=tl.float32)
        for _ in range(0, steps):
            total += 1.0
        tl.store(out_ptr + tl.arange(0, 16), total)

    out = torch.zeros(16)
    try:
        probe[(1,)](out, 3)
    except Exception as error:  # the interpreter's own failure, not ours
        print(f"interpreter unusable: Triton {triton.__version__}: {error!r}")
        return False
    return bool((out == 3).all())


def _functional_fused_pathway_failures() -> list:
    """``curvlib.functional``'s ``pathway="fused"`` dispatches to the kernels and agrees with the TN."""
    import curvlib.functional as F

    hyper = dict(stride=(2, 1), padding=1, groups=2)
    x = torch.randn(2, 4, 7, 6)
    out = F.conv(x, torch.randn(6, 2, 3, 2), **hyper, pathway="tn")
    s, d = torch.randn(3, *out.shape), torch.rand_like(out)
    checks = {
        "kfc": lambda pw: F.kfc(x, (3, 2), **hyper, pathway=pw),
        "kfac_reduce": lambda pw: F.kfac_reduce(x, (3, 2), **hyper, pathway=pw),
        "ggn_diag": lambda pw: F.ggn_diag(x, s, (3, 2), **hyper, pathway=pw),
        "hesscale_weight_diag": lambda pw: F.hesscale_weight_diag(x, d, (3, 2), **hyper, pathway=pw),
    }
    failures = []
    for name, run in checks.items():
        fused, reference = run("fused"), run("tn")
        error = ((fused - reference).norm() / reference.norm()).item()
        if not error < TOLERANCE["ieee"]:
            failures.append(("functional pathway='fused'", name, error))
    return failures


def _lag_products_failures() -> list:
    """The lag-product kernel (both paths, forced splits) against a float64 slicing reference, and the
    lags pathway's ``"triton"`` method against the float64 unfolded Gram (curvlib's convolution form)."""
    import itertools

    from curvlib import lag_gram
    from curvlib.hyperparams import make_geometry
    from curvlib.kernels import lag_products as lp

    def reference(x, shifts, groups):
        n, c, *size = x.shape
        out = []
        for shift in shifts:
            a = x[(slice(None), slice(None), *(slice(max(0, -s), i - max(0, s)) for i, s in zip(size, shift)))]
            b = x[(slice(None), slice(None), *(slice(max(0, s), i + min(0, s)) for i, s in zip(size, shift)))]
            a, b = (t.double().unflatten(1, (groups, c // groups)).flatten(3) for t in (a, b))
            out.append(torch.einsum("ngip,ngjp->gij", a, b))
        return torch.stack(out)

    failures = []
    # (channels, groups, size, shift range): dot path one/several tiles, narrow path (1, 3, 2 channels)
    for c, groups, size, reach in [(20, 1, (7, 6), 2), (40, 1, (5, 4), 1), (6, 3, (9,), 3), (4, 4, (5, 6, 4), 1),
                                   (3, 1, (8, 8), 2), (34, 2, (6, 5), 2)]:
        x = torch.randn(3, c, *size)
        shifts = list(itertools.product(*(range(-reach, reach + 1) for _ in size)))
        expected = reference(x, shifts, groups)
        total = 3 * math.prod(size)
        configs = lp.candidates(c // groups, groups, len(shifts), total, x.device)
        for config in configs[:2]:
            for split in (1, 3):
                forced = lp.LagConfig(config.narrow, config.block, config.block_r, config.num_warps, split)
                error = relative_error(lp.lag_products(x, shifts, groups, config=forced), expected)
                if not error < TOLERANCE["ieee"]:
                    failures.append(("lag_products", (c, groups, size), forced, error))
    for c, size, kernel, padding, dilation, groups in [(16, (7, 6), 3, 1, 1, 1), (4, (9,), 3, 2, 2, 4),
                                                       (2, (5, 4, 6), 3, 1, 1, 1)]:
        geometry = make_geometry(c, c, size, kernel_size=kernel, padding=padding, dilation=dilation, groups=groups)
        x = torch.randn(2, c, *size)
        expected = lag_gram.kfc_by_lags(x.double(), geometry, lag_method="conv")
        error = relative_error(lag_gram.kfc_by_lags(x, geometry, lag_method="triton"), expected)
        if not error < TOLERANCE["ieee"]:
            failures.append(("kfc_by_lags triton", str(geometry), error))
    return failures


def _interpret_main() -> int:
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
    if not _interpreter_usable():
        return 3
    failures = []
    for layer in CASES:
        for key, error in check_kernels(layer, "cpu").items():
            if not error < TOLERANCE["ieee"]:
                failures.append((layer.name, key, error))
    for layer in (CASES[0], CASES[-1]):
        for key, error in check_forced_splits(layer, "cpu").items():
            if not error < TOLERANCE["ieee"]:
                failures.append((layer.name, key, error))
    failures += _functional_fused_pathway_failures()
    failures += _lag_products_failures()
    for failure in failures:
        print("FAILED", *failure)
    print("interpreter check:", "failed" if failures else "passed")
    return 1 if failures else 0


def run_interpreter_check(script: str) -> None:
    """Run ``script --interpret`` with ``TRITON_INTERPRET=1`` (read at import, hence a subprocess): it
    must print ``interpreter check: passed``; exit code 3 (an interpreter that cannot run the kernels)
    skips."""
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([os.path.dirname(here), here, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, os.path.abspath(script), "--interpret"], env=env,
                          capture_output=True, text=True, timeout=300)
    if proc.returncode == 3:
        pytest.skip(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0 and "interpreter check: passed" in proc.stdout, proc.stdout + proc.stderr[-3000:]


@pytest.mark.skipif(not kernels.available(), reason="Triton is not installed")
def test_kernels_in_triton_interpreter():
    run_interpreter_check(__file__)


# ----------------------------------------------------------------------------------------------
# GPU: the compiled kernels

cuda = pytest.mark.skipif(not (torch.cuda.is_available() and kernels.available()), reason="needs CUDA and Triton")


@cuda
@pytest.mark.parametrize("layer", CASES, ids=str)
@pytest.mark.parametrize("precision", ["ieee", "tf32x3", "tf32", "bf16"])
def test_kernels_on_gpu(seed, layer, precision):
    errors = check_kernels(layer, "cuda", precision)
    bad = {key: error for key, error in errors.items() if not error < TOLERANCE[precision]}
    assert not bad, f"relative errors above {TOLERANCE[precision]:.0e}: {bad}"


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernels_on_gpu_half_inputs(seed, dtype):
    layer = CASES[0]
    # the reference sees the same rounded inputs: what is left is accumulation and output rounding
    errors = check_kernels(layer, "cuda", "ieee", dtype)
    bad = {key: error for key, error in errors.items() if not error < (2e-2 if dtype == torch.bfloat16 else 4e-3)}
    assert not bad, bad


@cuda
@pytest.mark.parametrize("layer", CASES[:4] + CASES[-1:], ids=str)
def test_kernels_on_gpu_forced_splits(seed, layer):
    bad = {key: error for key, error in check_forced_splits(layer, "cuda").items() if not error < TOLERANCE["ieee"]}
    assert not bad, bad


#: layers whose output locations fill 16-byte rows in float32 (the TMA form runs on them)
TMA_CASES = [
    CASES[-1],  # 64 locations
    Layer("2d-grouped-strided-tma", (16, 16), (3, 3), stride=2, padding=1, groups=3, c_in=6, c_out=9, batch=5,
          columns=6),  # 64 locations, 3 channels per group: tiles read the next group's channels
    Layer("3d-odd-rows", (4, 6, 6), (3, 3, 3), padding=1, c_in=3, c_out=7, batch=3, columns=11),  # 144 locations, D = 81
    Layer("2d-grouped-12-channels", (8, 8), (3, 3), padding=1, groups=2, c_in=4, c_out=12, batch=3,
          columns=5),  # C_out·4 bytes a multiple of 16 (channels-last s: rows of the channels 16-byte aligned)
]


@cuda
@pytest.mark.parametrize("layer", TMA_CASES + CASES[:1], ids=str)
@pytest.mark.parametrize("precision", ["ieee", "tf32"])
def test_ggn_unfolded_tma_on_gpu(seed, layer, precision):
    """The TMA form of the unfolded GGN kernel (Hopper and newer) against float64: per-sample and summed,
    nested and flat loops, one-sample chunks and split batches, column blocks past ``C``; an ``s`` whose
    address is not 16-byte aligned (and a layer whose locations are not) runs the pointer form instead."""
    from curvlib.kernels import _geometry, ggn_unfolded, weight_diag

    x, s, d = random_inputs(layer, torch.float32, "cuda")
    kg = _geometry.kernel_geometry(geometry_of(layer))
    if not ggn_unfolded.tma_supported(x.device):
        pytest.skip("TMA needs compute capability 9.0 and Triton's host descriptors")
    ref = references(layer, x, s, d)
    errors = {}
    per_sample_bytes = kg.groups * kg.output_numel * kg.rows * 4
    configs = [c for c in ggn_unfolded.candidates(s.shape[0], kg.out_channels_per_group, kg.rows, kg.output_numel,
                                                  "mma", tma=True) if c.tma]
    configs.append(ggn_unfolded.UnfoldedGGNConfig(4, 16, 32, 16, 4, 2, flat=True, tma=True))
    misaligned = torch.empty(s.numel() + 1, device="cuda")[1:].view(s.shape).copy_(s)
    s_cl = channels_last(s)  # runs the pointer form
    assert ggn_unfolded.channels_last_view(s_cl) is not None and ggn_unfolded.channels_last_view(s) is None
    for config in configs:
        for per_sample in (False, True):
            for chunk_bytes, split, s_in in ((per_sample_bytes, 1, s), (None, 2, s), (None, None, misaligned),
                                             (per_sample_bytes, 1, s_cl), (None, 2, s_cl)):
                ggn = weight_diag.ggn_diag(x, s_in, kg, per_sample, precision, config=config, split=split,
                                           chunk_bytes=chunk_bytes)
                shape = (x.shape[0], *layer.weight_shape) if per_sample else layer.weight_shape
                key = (config, per_sample, chunk_bytes, split, s_in is misaligned, s_in is s_cl)
                errors[key] = relative_error(ggn.reshape(shape), ref[("ggn_diag", per_sample)])
    bad = {key: error for key, error in errors.items() if not error < TOLERANCE[precision]}
    assert not bad, bad
    assert ggn_unfolded.tma_shape_ok(kg.output_numel, 4) == (layer in TMA_CASES)


def test_ggn_unfolded_tiles_for_sixteen_bit_operands_come_first():
    """16-bit products (bf16 column passes) try the tiles with 128 locations per step first; TF32 tiles
    follow; without TMA or with float32 operands they are not offered."""
    pytest.importorskip("triton")
    from curvlib.kernels import ggn_unfolded

    args = (21, 96, 864, 1024, "mma")
    plain = ggn_unfolded.candidates(*args, tma=True)
    sixteen = ggn_unfolded.candidates(*args, tma=True, sixteen_bit=True)
    assert sixteen[0].block_o == 128 and sixteen[0].num_stages == 4 and sixteen[0].flat and sixteen[0].tma
    assert all(c in sixteen for c in plain) and len(sixteen) > len(plain)
    assert all(c.block_o <= 64 for c in plain)
    assert ggn_unfolded.candidates(*args, tma=False, sixteen_bit=True) == ggn_unfolded.candidates(*args, tma=False)
    small = ggn_unfolded.candidates(21, 96, 864, 36, "mma", tma=True, sixteen_bit=True)
    assert small[0].block_o == 64  # capped at the locations' power of two


@cuda
@pytest.mark.parametrize("layer", CASES + TMA_CASES, ids=str)
@pytest.mark.parametrize("precision", ["ieee", "bf16"])
def test_ggn_kernels_with_bias_on_gpu(seed, layer, precision):
    """``bias=True``: every GGN tile (unfolded pointer and TMA forms with their row of ones, the gathered
    kernel with separate sums), summed and per sample, ``s`` dense and channels last, against float64."""
    from curvlib.kernels import _geometry, ggn_unfolded, weight_diag
    from curvlib.kernels.gram import unit_class

    x, s, d = random_inputs(layer, torch.float32, "cuda")
    ref = references(layer, x, s, d)
    kg = _geometry.kernel_geometry(geometry_of(layer))
    tma = ggn_unfolded.tma_supported(x.device)
    configs = weight_diag.ggn_candidates(s.shape[0], kg.out_channels_per_group, kg.rows, kg.output_numel,
                                         unit_class(precision, x.dtype), tma)
    assert any(isinstance(c, ggn_unfolded.UnfoldedGGNConfig) for c in configs)
    assert any(isinstance(c, weight_diag.GGNConfig) for c in configs)
    errors = {}
    for config in configs:
        for per_sample in (False, True):
            for layout, s_in in (("dense", s), ("channels last", channels_last(s))):
                out = weight_diag.ggn_diag(x, s_in, kg, per_sample, precision, config=config, bias=True)
                shape = (x.shape[0],) * per_sample + (layer.weight_shape[0], -1)
                out = out.reshape(shape)
                key = (config, per_sample, layout)
                errors[key + ("weight",)] = relative_error(out[..., :-1].reshape(ref[("ggn_diag", per_sample)].shape),
                                                           ref[("ggn_diag", per_sample)])
                errors[key + ("bias",)] = relative_error(out[..., -1], ref[("ggn_bias", per_sample)])
    bad = {key: error for key, error in errors.items() if not error < TOLERANCE[precision]}
    assert not bad, bad
    weight, bias = kernels.ggn_diag(x, s, geometry_of(layer), bias=True, precision=precision)
    assert relative_error(bias, ref[("ggn_bias", False)]) < TOLERANCE[precision]


#: channels-last ``s`` of 16-bit entries runs the TMA form where ``C_out`` fills 16-byte rows (multiples of 8)
CHANNELS_LAST_TMA_CASES = [
    Layer("2d-16-channels", (8, 8), (3, 3), padding=1, c_in=4, c_out=16, batch=3, columns=5),
    Layer("2d-grouped-8-per-group", (9, 9), (3, 3), stride=2, padding=1, groups=2, c_in=4, c_out=16, batch=4,
          columns=6),  # 25 locations (not a multiple of the tile), tiles of 8 channels (16 bytes)
    Layer("3d-8-channels", (4, 5, 6), (3, 3, 3), padding=1, c_in=3, c_out=8, batch=2, columns=3),
    Layer("2d-12-channels", (6, 6), (3, 3), padding=1, c_in=2, c_out=12, batch=3, columns=4),  # pointer form
]


@cuda
@pytest.mark.parametrize("layer", CHANNELS_LAST_TMA_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ggn_unfolded_channels_last_half_on_gpu(seed, layer, dtype):
    """The unfolded GGN kernel on ``s`` stored channels last in 16-bit (a bf16 column backpropagation):
    TMA tiles of ``[C, N, O, C_out]`` transposed for the product where the channels fill 16-byte rows,
    the pointer form elsewhere; against float64 on the same rounded inputs, per-sample and summed,
    nested and flat loops, one-sample chunks and split batches."""
    from curvlib.kernels import _geometry, ggn_unfolded, weight_diag

    x, s, d = random_inputs(layer, dtype, "cuda")
    kg = _geometry.kernel_geometry(geometry_of(layer))
    if not ggn_unfolded.tma_supported(x.device):
        pytest.skip("TMA needs compute capability 9.0 and Triton's host descriptors")
    ref = references(layer, x, s, d)
    s_cl = channels_last(s)
    view = ggn_unfolded.channels_last_view(s_cl)
    configs = [c for c in ggn_unfolded.candidates(s.shape[0], kg.out_channels_per_group, kg.rows, kg.output_numel,
                                                  "mma", tma=True, sixteen_bit=True) if c.tma]
    configs.append(ggn_unfolded.UnfoldedGGNConfig(4, 8, 32, 16, 4, 2, flat=True, tma=True))
    assert all(ggn_unfolded.channels_last_tma_ok(view, c.block_co) == (layer.c_out % 8 == 0) for c in configs)
    per_sample_bytes = kg.groups * kg.output_numel * kg.rows * 2
    errors = {}
    for config in configs:
        for per_sample in (False, True):
            for chunk_bytes, split in ((per_sample_bytes, 1), (None, 2)):
                ggn = weight_diag.ggn_diag(x, s_cl, kg, per_sample, "ieee", config=config, split=split,
                                           chunk_bytes=chunk_bytes)
                shape = (x.shape[0], *layer.weight_shape) if per_sample else layer.weight_shape
                errors[(config, per_sample, chunk_bytes)] = relative_error(ggn.reshape(shape),
                                                                           ref[("ggn_diag", per_sample)])
            # with the bias's row of ones (D + 1 rows)
            both = weight_diag.ggn_diag(x, s_cl, kg, per_sample, "ieee", config=config, bias=True)
            both = both.reshape(*((x.shape[0],) if per_sample else ()), layer.c_out, -1)
            errors[(config, per_sample, "bias")] = relative_error(both[..., -1], ref[("ggn_bias", per_sample)])
            errors[(config, per_sample, "weight with bias")] = relative_error(
                both[..., :-1].reshape(shape), ref[("ggn_diag", per_sample)])
    bad = {key: error for key, error in errors.items() if not error < (2e-2 if dtype == torch.bfloat16 else 4e-3)}
    assert not bad, bad


@cuda
def test_fast_launch_matches_jit_dispatch(seed, monkeypatch):
    """Launching the cached compiled kernel directly gives what Triton's dispatch gives."""
    layer = CASES[0]
    x, s, d = random_inputs(layer, torch.float32, "cuda")
    geometry = geometry_of(layer)
    for op in OPS:
        monkeypatch.setenv("CURVLIB_KERNEL_FAST_LAUNCH", "0")
        slow = run_op(op, x, s, d, geometry)
        monkeypatch.setenv("CURVLIB_KERNEL_FAST_LAUNCH", "1")
        run_op(op, x, s, d, geometry)  # records the compiled kernel
        fast = run_op(op, x, s, d, geometry)
        assert relative_error(fast, slow.double()) < 1e-6, op
    # a contiguous input whose pointer is not 16-byte aligned must not reuse the aligned binary
    x2 = torch.randn(x.numel() + 1, device="cuda")[1:].view(x.shape)
    monkeypatch.setenv("CURVLIB_KERNEL_FAST_LAUNCH", "0")
    slow = kernels.kfac_reduce(x2, geometry)
    monkeypatch.setenv("CURVLIB_KERNEL_FAST_LAUNCH", "1")
    assert relative_error(kernels.kfac_reduce(x2, geometry), slow.double()) < 1e-6


@cuda
def test_direct_launch_leaves_launch_hooks_to_triton(seed, monkeypatch):
    """A launch hook installed (a profiler's) sends the cached kernel through Triton's own launch, which
    calls it; without one the direct launch runs. Both give PyTorch's ReLU backward (the mask kernel)."""
    from triton import knobs

    from curvlib.kernels import _launch, threshold_backward

    saved = torch.randn(3, 5, 6, 7, device="cuda")
    g = torch.randn(4, 3, 5, 6, 7, device="cuda")
    expected = torch.ops.aten.threshold_backward(g, saved.expand_as(g), 0.0)
    threshold_backward.threshold_backward(g, saved, 0.0)  # compiles and records the kernel
    direct = [entry[2] is not None for entry in threshold_backward._launch._compiled.values()]
    assert direct and all(direct), "no direct launch was prepared"
    assert not _launch._launch_hooks()
    assert torch.equal(threshold_backward.threshold_backward(g, saved, 0.0), expected)
    seen = []
    monkeypatch.setattr(knobs.runtime, "launch_enter_hook", lambda metadata: seen.append(metadata))
    assert _launch._launch_hooks()
    assert torch.equal(threshold_backward.threshold_backward(g, saved, 0.0), expected)
    assert seen, "the launch hook was not called"


@cuda
@pytest.mark.parametrize("bias", [False, True], ids=["weight", "with-bias"])
def test_ggn_diag_shortcut_under_a_precision_setting(seed, monkeypatch, bias):
    """Repeated fused GGN diagonals under a precision setting take the shortcut of repeated calls (the
    kernels take the precision as an argument) and compute with the new tensors at that precision."""
    from curvlib import pathways
    from curvlib.kernels import _host

    layer = CASES[0]
    geometry = geometry_of(layer)
    monkeypatch.setattr(F, "_SHORTCUTS", {})
    hyper = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups)
    with pathways.options(precision="bf16"), _host.poison_outputs():
        for _ in range(3):
            x, s, d = random_inputs(layer, torch.float32, "cuda")
            ref = references(layer, x, s, d)
            got = F.ggn_diag(x, s, layer.kernel, bias=bias, pathway="fused", **hyper)
            weight, bias_diag = got if bias else (got, None)
            assert relative_error(weight, ref[("ggn_diag", False)]) < TOLERANCE["bf16"]
            if bias:
                assert relative_error(bias_diag, ref[("ggn_bias", False)]) < TOLERANCE["bf16"]
    assert [key for key in F._SHORTCUTS if key[0] == "ggn_diag"], "no shortcut was stored"
    assert geometry.weight_shape == tuple(weight.shape)


@cuda
@pytest.mark.parametrize("layer", [CASES[0], CASES[6]], ids=str)
@pytest.mark.parametrize("per_sample", [False, True], ids=["summed", "per-sample"])
def test_prepared_ggn_diag_runs_new_operands_without_checks(seed, monkeypatch, layer, per_sample):
    """``kernels.prepare_ggn_diag``: the returned function computes the diagonal of fresh bfloat16 operands
    (s channels last, as the engine's messages) without validating or choosing again, in float32 with
    ``dtype=torch.float32`` (bfloat16 products are exact in float32: far below bfloat16's rounding, which
    ``dtype=None`` shows), NaN-poisoned outputs, against float64."""
    from curvlib.kernels import _host

    geometry = geometry_of(layer)

    def operands():
        x, s, d = random_inputs(layer, torch.bfloat16, "cuda")
        s = s.flatten(0, 1).contiguous(memory_format=torch.channels_last).unflatten(0, s.shape[:2])
        return x, s, references(layer, x, s, d)

    x, s, _ = operands()
    with _host.poison_outputs():
        run = kernels.prepare_ggn_diag(x, s, geometry, per_sample=per_sample, precision="bf16", bias=True,
                                       dtype=torch.float32)
        rounded = kernels.prepare_ggn_diag(x, s, geometry, per_sample=per_sample, precision="bf16", bias=True)
        checks = []
        monkeypatch.setattr(kernels, "supports", lambda *a, **k: checks.append(a) or True)
        for _ in range(3):
            x, s, ref = operands()
            weight, bias = run(x, s)
            assert weight.dtype == bias.dtype == torch.float32
            assert relative_error(weight, ref[("ggn_diag", per_sample)]) < 1e-5
            assert relative_error(bias, ref[("ggn_bias", per_sample)]) < 1e-5
            weight16, _ = rounded(x, s)
            assert weight16.dtype == torch.bfloat16
            assert relative_error(weight16, ref[("ggn_diag", per_sample)]) > 1e-4  # the float32 result's gain
    assert not checks, "a prepared call checked its arguments again"


@cuda
def test_kernels_on_gpu_table_e3_layer(seed):
    """One realistic layer (ResNet-18 layer2.0.conv1, batch 4) through the autotuned public functions."""
    layer = Layer("resnet18-layer2.0.conv1", (32, 32), (3, 3), stride=2, padding=1, c_in=64, c_out=128, batch=4,
                  columns=2)
    errors = check_kernels(layer, "cuda", "ieee")
    assert all(error < TOLERANCE["ieee"] for error in errors.values()), errors


if __name__ == "__main__" and "--interpret" in sys.argv:
    sys.exit(_interpret_main())


@cuda
@pytest.mark.parametrize("layer", CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_unfold_kernel_equals_a_one_hot_convolution_on_gpu(layer, dtype, seed):
    """The gather kernel (:mod:`curvlib.kernels.unfold`) against one-hot-convolution patches: a later
    sample range of float32 ``x`` (channels-last where 2-d), both buffer layouts, ``dtype`` buffers
    with padded rows (NaN-poisoned: every entry written, the padding left alone)."""
    from curvlib.kernels import _geometry, unfold

    geometry = geometry_of(layer)
    kg = _geometry.kernel_geometry(geometry)
    x, _, _ = random_inputs(layer)
    x = x.float().cuda()
    if x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    first, n = 1, x.shape[0] - 1
    expected = one_hot_patches(x[first:], geometry).to(dtype)  # [n, G, O, D]
    rows, locations = expected.shape[-1], expected.shape[-2]
    for k_major in (True, False):
        inner = (rows, locations + 3) if k_major else (locations, rows + 3)
        buffer = torch.full((n, geometry.groups, *inner), float("nan"), dtype=dtype, device="cuda")
        out = unfold.unfold_into(x, kg, buffer[..., :-3], first, k_major=k_major)
        assert out.data_ptr() == buffer.data_ptr()
        torch.testing.assert_close(out, expected.transpose(2, 3) if k_major else expected, rtol=0, atol=0)
        assert buffer[..., -3:].isnan().all()
    with pytest.raises(ValueError, match="out must have shape"):
        unfold.unfold_into(x, kg, buffer, first)
    with pytest.raises(ValueError, match="batch"):
        unfold.unfold_into(x, kg, buffer[..., :-3], first + 1, k_major=False)
