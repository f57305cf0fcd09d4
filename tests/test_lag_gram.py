"""``curvlib.lag_gram``: the KFC factor of stride-1 convolutions from lag products and border corrections.

The reference never uses curvlib: the unfolded input is cut from the zero-padded input by slicing (one
slice per kernel offset), its Gram is a plain float64 product. ``torch.nn.functional.unfold`` and
``curvlib.native.kfc`` are compared in addition on some cases. Both lag methods (``"conv"``: one
convolution weight gradient, ``"gemm"``: matrix products of slices) run against the reference.
"""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch
import torch.nn.functional as tf

from curvlib import native
from curvlib.hyperparams import ConvGeometry, conv_output_size, make_geometry
from curvlib import lag_gram
from curvlib.lag_gram import kfc_by_lags, lag_flops, resolve_lag_method, supports_lags, unfold_flops

DTYPE = torch.float64


def reference_kfc(x: torch.Tensor, kernel, pads, dilation, groups: int) -> torch.Tensor:
    """``1/N Σ_{n,o} u uᵀ`` per group from an unfolded input built by slicing, in float64."""
    x = x.to(DTYPE)
    n, c = x.shape[:2]
    padded = tf.pad(x, [p for pair in reversed(pads) for p in pair])
    out = [padded.shape[2 + t] - dilation[t] * (kernel[t] - 1) for t in range(len(kernel))]
    columns = [
        padded[(slice(None), slice(None), *(slice(dilation[t] * k[t], dilation[t] * k[t] + out[t])
                                            for t in range(len(kernel))))]
        for k in itertools.product(*(range(k) for k in kernel))
    ]
    u = torch.stack(columns, dim=2)  # [N, C, ∏K, *O]: rows (c, k...) like weight.flatten(1)
    u = u.reshape(n, groups, c // groups * math.prod(kernel), -1)
    return torch.einsum("ngdo,ngeo->gde", u, u) / n


def geometry_for(channels, size, kernel, padding, dilation, groups) -> ConvGeometry:
    """``padding``: an int, 'same' or per-dim ``(left, right)`` pairs (built directly: make_geometry takes no pairs)."""
    d = len(size)
    if isinstance(padding, (int, str)):
        return make_geometry(channels, channels, size, kernel_size=kernel, padding=padding, dilation=dilation,
                             groups=groups)
    kernel = (kernel,) * d if isinstance(kernel, int) else tuple(kernel)
    dilation = (dilation,) * d if isinstance(dilation, int) else tuple(dilation)
    output = tuple(conv_output_size(i, k, 1, p, dl) for i, k, p, dl in zip(size, kernel, padding, dilation))
    assert all(o >= 1 for o in output)
    return ConvGeometry(channels, channels, groups, kernel, (1,) * d, tuple(padding), dilation, tuple(size), output)


METHODS = ("conv", "gemm")


def check(x, geometry, rtol=1e-11, methods=("auto",)):
    """``kfc_by_lags`` by each of ``methods`` against the reference (computed once); the last result."""
    expected = reference_kfc(x, geometry.kernel_size, geometry.padding, geometry.dilation, geometry.groups)
    scale = expected.abs().max().item()
    assert scale > 0, "vacuous comparison"
    for method in methods:
        result = kfc_by_lags(x, geometry, lag_method=method)
        assert result.shape == expected.shape and result.dtype == x.dtype
        error = (result.to(DTYPE) - expected).abs().max().item()
        assert error <= rtol * scale, f"{geometry}, {method}: max error {error:.3e} (scale {scale:.3e})"
    return result, expected


def _cases():
    """Dims × kernel × dilation × padding ('asym': the low slab is all padding in even dims, the high one
    in odd dims), groups and batch cycling. The test picks non-square inputs that admit 'valid'."""
    cases = []
    cycle = itertools.cycle([(1, 1), (2, 3), ("dw", 1), (1, 3), (2, 1), ("dw", 3)])
    for d, k, dil, pad in itertools.product((1, 2, 3), (1, 2, 3, 5), (1, 2), ("zero", "sym", "asym", "same")):
        border = dil * (k - 1)
        padding = {"zero": 0, "sym": max(1, border // 2), "same": "same",
                   "asym": tuple((border, 1) if t % 2 == 0 else (0, border + 1) for t in range(d))}[pad]
        groups, batch = next(cycle)
        cases.append(pytest.param(d, k, dil, padding, groups, batch, id=f"{d}d-k{k}-dil{dil}-{pad}-g{groups}-n{batch}"))
    return cases


@pytest.mark.parametrize("dims,kernel,dilation,padding,groups,batch", _cases())
def test_matches_unfolded_reference(dims, kernel, dilation, padding, groups, batch, seed):
    """Both lag methods on the whole grid (tiny tensors: the second method costs little)."""
    channels = 4
    groups = channels if groups == "dw" else groups
    size = tuple(dilation * (kernel - 1) + 2 + 2 * t for t in range(dims))
    geometry = geometry_for(channels, size, kernel, padding, dilation, groups)
    check(torch.randn(batch, channels, *size, dtype=DTYPE), geometry, methods=METHODS)


@pytest.mark.parametrize("size,padding,groups", [((14, 11), 3, 6), ((8, 9), 3, 6), ((5, 7), 3, 6),
                                                   ((9, 10), 0, 6), ((12, 9), ((2, 4), (5, 1)), 6),
                                                   ((10, 9), 3, 3)])
def test_kernel_7_depthwise(size, padding, groups, seed):
    """ConvNeXt's depthwise 7x7 (and a grouped variant), also with the output smaller than the border."""
    geometry = geometry_for(6, size, 7, padding, 1, groups)
    check(torch.randn(2, 6, *size, dtype=DTYPE), geometry, methods=METHODS)


@pytest.mark.parametrize("size,kernel,padding,dilation", [
    ((4,), 3, 1, 2),  # O = 2 < B = 4: the low and high slabs of x_pad overlap
    ((4, 5), 3, 1, 2),
    ((4, 3, 5), 3, 1, 2),
    ((3,), 5, 2, 1),  # O = 3 < B = 4
    ((2, 3), 5, 2, 1),
    ((1, 2), 3, 1, 1),  # a one-pixel input
    ((3, 4), 3, ((3, 0), (0, 4)), 2),  # O = (2, 4) against B = 4, asymmetric padding
    ((5,), 4, ((6, 0),), 2),  # left padding beyond the border: the low slab holds no input
    ((2, 2, 2), 3, 2, 2),
    ((6, 2), (3, 5), ((1, 1), (4, 4)), (1, 2)),  # per-dim kernels and dilations, O = (6, 1)
])
@pytest.mark.parametrize("groups", [1, 2])
def test_output_smaller_than_border(size, kernel, padding, dilation, groups, seed):
    geometry = geometry_for(4, size, kernel, padding, dilation, groups)
    check(torch.randn(3, 4, *size, dtype=DTYPE), geometry, methods=METHODS)


def test_random_geometries(seed):
    """Random geometries (sizes, kernels, dilations, asymmetric padding, groups) against the reference and
    against ``curvlib.native.kfc``."""
    rng = random.Random(seed)
    done = 0
    while done < 40:
        d = rng.choice([1, 2, 3])
        kernel = tuple(rng.choice([1, 2, 3, 4, 5]) for _ in range(d))
        dilation = tuple(rng.choice([1, 2, 3]) for _ in range(d))
        pads = tuple((rng.randint(0, 6), rng.randint(0, 6)) for _ in range(d))
        size = tuple(rng.randint(1, 8 if d < 3 else 6) for _ in range(d))
        if any(i + left + right < dl * (k - 1) + 1 for i, (left, right), dl, k in zip(size, pads, dilation, kernel)):
            continue
        groups = rng.choice([1, 2, 3])
        channels = groups * rng.choice([1, 2])
        geometry = geometry_for(channels, size, kernel, pads, dilation, groups)
        x = torch.randn(rng.choice([1, 2]), channels, *size, dtype=DTYPE)
        expected = reference_kfc(x, kernel, pads, dilation, groups)
        if expected.abs().max() == 0:  # every window of this geometry sees padding only
            continue
        result, _ = check(x, geometry, methods=METHODS)
        torch.testing.assert_close(result, native.kfc(x, geometry), rtol=1e-11, atol=1e-11 * expected.abs().max())
        done += 1


def test_matches_torch_unfold_and_native(seed):
    """2-d, 'same' with an even kernel (asymmetric padding (1, 2)), groups 2: against F.unfold + matmul."""
    geometry = make_geometry(6, 6, (9, 7), kernel_size=4, padding="same", groups=2)
    assert geometry.padding == ((1, 2), (1, 2))
    x = torch.randn(3, 6, 9, 7, dtype=DTYPE)
    u = tf.unfold(tf.pad(x, (1, 2, 1, 2)), 4)  # [N, C·16, O]
    u = u.view(3, 2, 3 * 16, -1)
    expected = torch.einsum("ngdo,ngeo->gde", u, u) / 3
    for method in METHODS:
        result = kfc_by_lags(x, geometry, lag_method=method)
        torch.testing.assert_close(result, expected, rtol=1e-11, atol=1e-11 * expected.abs().max())
        torch.testing.assert_close(result, native.kfc(x, geometry), rtol=1e-11, atol=1e-11 * expected.abs().max())


def test_float32_non_contiguous_and_grad(seed):
    geometry = make_geometry(8, 8, (10, 12), kernel_size=3, padding=1, dilation=2)
    x = torch.randn(3, 10, 8, 12).transpose(1, 2).requires_grad_()  # non-contiguous [3, 8, 10, 12]
    result, expected = check(x.detach(), geometry, rtol=1e-5, methods=METHODS)
    assert result.dtype == torch.float32
    for method in METHODS:
        again = kfc_by_lags(x, geometry, lag_method=method)  # under no_grad: no graph, no error from out=
        assert not again.requires_grad
        torch.testing.assert_close(again, result, rtol=1e-5, atol=1e-5 * expected.abs().max())
        channels_last = x.detach().contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(kfc_by_lags(channels_last, geometry, lag_method=method), result, rtol=1e-5,
                                   atol=1e-5 * expected.abs().max())


@pytest.mark.parametrize("size,kernel,dilation,groups", [
    ((9, 8), 3, 1, 1), ((7, 9), 3, 2, 2), ((6, 5, 7), 3, 1, 1), ((5, 6, 4), (3, 1, 2), (1, 1, 2), 2), ((11,), 5, 1, 1),
    ((6, 7), 3, 1, 4)])
def test_gemm_variants(size, kernel, dilation, groups, seed, monkeypatch):
    """The GEMM form's paths, forced on tiny tensors: chunks of samples (as on CPUs; here one sample each)
    and slices of the reduction down to a few positions (many slices, the last running into the tail),
    for one group (batched over slices), several (a product per slice) and depthwise (dot products)."""
    geometry = geometry_for(4, size, kernel, 1, dilation, groups)
    x = torch.randn(3, 4, *size, dtype=DTYPE)
    for chunk_bytes, slice_length in [(2**22, 4096), (1, 4096), (1, 3), (2**22, 5), (2**22, 1)]:
        monkeypatch.setattr(lag_gram, "_CPU_CHUNK_BYTES", chunk_bytes)
        monkeypatch.setitem(lag_gram._SLICE_CANDIDATES, "cpu", (slice_length,))
        check(x, geometry, methods=("gemm",))


@pytest.mark.parametrize("samples", [1, 2, 4])
def test_gemm_chunk_bytes_bounds_the_copy_and_keeps_the_result(samples, seed, monkeypatch):
    """``chunk_bytes``: the GEMM form copies at most half that many bytes of samples at once (at least one)
    and adds their products; the result equals the unfolded Gram (5 samples: an uneven last chunk)."""
    geometry = geometry_for(4, (7, 6), 3, 1, 1, 2)
    x = torch.randn(5, 4, 7, 6, dtype=DTYPE)
    copies = []
    layout = lag_gram._flat_layout
    monkeypatch.setattr(lag_gram, "_flat_layout", lambda t, *a: copies.append(t.shape[0]) or layout(t, *a))
    padded_sample = 4 * (7 + 2) * (6 + 2) * x.element_size()  # the box padded by the largest shift, 2
    # the copy takes half of chunk_bytes (its partial products the other half)
    result = kfc_by_lags(x, geometry, lag_method="gemm", chunk_bytes=2 * (samples * padded_sample + 1))
    assert copies == [samples] * (5 // samples) + ([5 % samples] if 5 % samples else [])
    torch.testing.assert_close(result, reference_kfc(x, (3, 3), ((1, 1), (1, 1)), (1, 1), 2), rtol=1e-11, atol=1e-11)
    for bad in (0, -1.0, True, "1"):
        with pytest.raises(ValueError, match="chunk_bytes must be None or a positive number"):
            kfc_by_lags(x, geometry, lag_method="gemm", chunk_bytes=bad)


CHUNK_CASES = [  # (size, kernel, padding, dilation, groups, batch): 1-3 dims, borders on both sides, one side, groups
    ((9,), 3, 1, 1, 2, 5), ((8, 7), 3, 1, 1, 1, 5), ((7, 9), (3, 2), ((2, 0), (1, 1)), (1, 2), 2, 4),
    ((5, 6, 4), 3, 1, 1, 2, 3), ((6, 4, 5), (2, 3, 1), ((1, 0), (2, 1), (0, 0)), 1, 1, 3),
]


@pytest.mark.parametrize("size,kernel,padding,dilation,groups,batch", CHUNK_CASES)
@pytest.mark.parametrize("method", ["conv", "gemm"])
def test_chunk_bytes_chunks_the_border_slabs_and_the_rows(size, kernel, padding, dilation, groups, batch, method,
                                                          seed, monkeypatch):
    """``chunk_bytes`` also bounds the border terms' slabs (chunks of samples, products added) and the
    assembly (chunks of rows): the chunks are what the per-sample / per-row counts allow, at least one,
    uneven last chunks included, and the result is the unfolded Gram whatever the chunks."""
    geometry = geometry_for(4, size, kernel, padding, dilation, groups)
    x = torch.randn(batch, 4, *size, dtype=DTYPE)
    expected = reference_kfc(x, geometry.kernel_size, geometry.padding, geometry.dilation, groups)
    plans = lag_gram._dim_plans(lag_gram._plan_key(geometry))
    assert lag_gram._subsets(plans), "no border term: the case does not test the slabs"
    ci = 4 // groups
    per_row = lag_gram._assembly_row_elements(plans, 4) * x.element_size()
    border_calls, row_calls = [], []
    border, assemble = lag_gram._border_products, lag_gram._assemble_rows
    monkeypatch.setattr(lag_gram, "_border_products",
                        lambda z, plans, groups, subset, *a: border_calls.append((subset, z.shape[0]))
                        or border(z, plans, groups, subset, *a))
    monkeypatch.setattr(lag_gram, "_assemble_rows",
                        lambda terms, plans, tensors, rows, *a: row_calls.append(rows.stop - rows.start)
                        or assemble(terms, plans, tensors, rows, *a))
    slabs = min(lag_gram._border_sample_elements(plans, t, 4, method) for t in lag_gram._subsets(plans)) * 8
    for chunk_bytes in (per_row + 1, 3 * per_row + 1, 2 * slabs + 1):  # chunks of rows, then of samples
        border_calls.clear(), row_calls.clear()
        result = kfc_by_lags(x, geometry, lag_method=method, chunk_bytes=chunk_bytes)
        torch.testing.assert_close(result, expected, rtol=1e-11, atol=1e-11 * expected.abs().max())
        rows = max(1, int(chunk_bytes // per_row))
        assert row_calls == [min(rows, ci - i) for i in range(0, ci, rows)]
        for subset in lag_gram._subsets(plans):
            per_sample = lag_gram._border_sample_elements(plans, subset, 4, method) * x.element_size()
            samples = max(1, min(batch, int(chunk_bytes // per_sample)))
            assert [n for t, n in border_calls if t == subset] == [min(samples, batch - i) for i in range(0, batch, samples)]
    assert any(n < batch for _, n in border_calls), "no chunk of samples: the case does not test the slab chunks"


def test_extra_bytes_shrink_with_the_chunk_and_chunk_bytes_follow_the_limits(seed):
    """:func:`kfc_extra_bytes` grows with ``chunk_bytes`` up to the unchunked peak and never below the terms;
    :func:`kfc_chunk_bytes` is ``None`` without limits, what a limit leaves beside the terms under one
    (at least ``MIN_CHUNK_BYTES``), and the smaller of ``memory_budget`` and ``memory_fraction``."""
    from curvlib import pathways

    geometry = make_geometry(64, 64, (28, 28), kernel_size=3, padding=1)
    plans = lag_gram._dim_plans(lag_gram._plan_key(geometry))
    terms = sum(lag_gram._term_elements(plans, f, 64, 64) for f in lag_gram._all_forms(plans)) * 4
    whole = lag_gram.kfc_extra_bytes(geometry, 32, 4)
    sizes = [lag_gram.kfc_extra_bytes(geometry, 32, 4, chunk) for chunk in (1, 2**20, 2**23, 2**26, 2**40)]
    assert sizes == sorted(sizes) and terms < sizes[0] < sizes[-1] == whole
    assert lag_gram.kfc_extra_bytes(geometry, 32, 4, lag_method="triton") < whole  # no copy of x
    assert lag_gram.kfc_chunk_bytes(geometry, 32, 4) is None
    unfold = 2 * native.unfolded_bytes(geometry, 32, 4)
    largest = max(lag_gram._term_elements(plans, f, 64, 64) for f in lag_gram._all_forms(plans)) * 4
    fraction = random.uniform(0.05, 0.2)
    with pathways.options(memory_fraction=fraction):
        assert lag_gram.kfc_chunk_bytes(geometry, 32, 4) == pytest.approx(fraction * unfold - terms - largest)
        with pathways.options(memory_budget=3 * 2**20):
            assert lag_gram.kfc_chunk_bytes(geometry, 32, 4) == pytest.approx(3 * 2**20 - terms - largest)
        with pathways.options(memory_budget=1):
            assert lag_gram.kfc_chunk_bytes(geometry, 32, 4) == lag_gram.MIN_CHUNK_BYTES


@pytest.mark.parametrize("size,shifts", [
    ((5, 6), [(0, 0), (0, 2), (1, -2), (2, 1), (1, 0)]), ((7,), [(0,), (3,), (6,)]),
    ((3, 4, 5), [(0, 0, 0), (0, 1, -4), (1, -3, 2), (2, 3, 4), (0, 0, 1)])])
def test_flat_layout_addresses_every_shift(size, shifts, seed):
    """Column ``q + offset`` of the flat layout holds x at ``q + s`` where that is inside the input and zero
    where it is not, for every ``q`` inside the input; zeros everywhere outside the copy."""
    n, c = 2, 3
    x = torch.rand(n, c, *size, dtype=DTYPE) + 0.5  # never zero: a zero read is padding
    tail = 4
    data, offsets, total = lag_gram._flat_layout(x, shifts, tail)
    assert data.shape[1] == total + max(offsets) + tail
    d = len(size)
    pads = [max(abs(s[t]) for s in shifts) for t in range(d)]
    padded = [i + p for i, p in zip(size, pads)]
    assert total == n * math.prod(padded)
    inside = torch.zeros(data.shape[1], dtype=torch.bool)
    for sample in range(n):
        for q in itertools.product(*(range(i) for i in size)):
            column = sample * math.prod(padded) + sum(qt * math.prod(padded[t + 1:]) for t, qt in enumerate(q))
            inside[column] = True
            torch.testing.assert_close(data[:, column], x[(sample, slice(None), *q)], rtol=0, atol=0)
            for shift, offset in zip(shifts, offsets):
                partner = tuple(qt + st for qt, st in zip(q, shift))
                expected = (x[(sample, slice(None), *partner)] if all(0 <= p < i for p, i in zip(partner, size))
                            else torch.zeros(c, dtype=DTYPE))
                torch.testing.assert_close(data[:, column + offset], expected, rtol=0, atol=0)
    assert not data[:, ~inside].any()
    with pytest.raises(ValueError, match="positive"):
        lag_gram._flat_layout(x, [(0,) * d, (0,) * (d - 1) + (-1,)], tail)


def test_gemm_lag_products_equal_conv(seed):
    """The private lag products of the methods agree element for element, zero lags (no overlap) too."""
    for size, kernel, dilation, groups, channels in [((7, 6), (3, 5), (1, 2), 1, 3), ((4,), 5, 2, 2, 4),
                                                     ((5, 3, 4), 3, (1, 2, 1), 3, 3), ((6, 6), 7, 1, 4, 4)]:
        d = len(size)
        kernels = (kernel,) * d if isinstance(kernel, int) else kernel
        dilations = (dilation,) * d if isinstance(dilation, int) else dilation
        x = torch.randn(2, channels, *size, dtype=DTYPE)
        conv = lag_gram._lag_products_conv(x, kernels, dilations, groups)
        gemm = lag_gram._lag_products_gemm(x, kernels, dilations, groups)
        assert gemm.shape == conv.shape == (channels, channels // groups, *(2 * k - 1 for k in kernels))
        torch.testing.assert_close(gemm, conv, rtol=1e-12, atol=1e-12 * conv.abs().max())


def test_bad_lag_method():
    geometry = make_geometry(3, 4, (8, 8), kernel_size=3, padding=1)
    with pytest.raises(ValueError, match=r"lag_method must be one of 'auto', 'conv', 'gemm', 'triton', got 'winograd'"):
        kfc_by_lags(torch.randn(1, 3, 8, 8), geometry, lag_method="winograd")
    with pytest.raises(ValueError, match="lag_method"):
        lag_flops(geometry, 2, lag_method="auto")


def _record_lag_methods(monkeypatch):
    """Replace the private lag functions by recording wrappers; returns the list of names called."""
    calls = []
    for name in ("conv", "gemm", "triton"):
        original = getattr(lag_gram, f"_lag_products_{name}")

        def wrapper(*args, name=name, original=original):
            calls.append(name)
            return original(*args)

        monkeypatch.setattr(lag_gram, f"_lag_products_{name}", wrapper)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_auto_picks_gemm_for_float32_and_conv_for_float64(dtype, monkeypatch):
    """``"auto"`` runs the GEMM form for float32 (float32 convolutions are not accurate enough) and the
    convolution for float64; an explicit method runs only that one, also for the 3-d border terms with
    two lag dims."""
    calls = _record_lag_methods(monkeypatch)
    geometry = make_geometry(4, 4, (6, 5, 7), kernel_size=3, padding=1)  # 3 border terms with two lag dims
    x = torch.randn(2, 4, 6, 5, 7, dtype=dtype)
    expected = kfc_by_lags(x, geometry, lag_method="conv")
    assert calls == ["conv"] * 4
    calls.clear()
    kfc_by_lags(x, geometry)
    assert calls == ["gemm" if dtype == torch.float32 else "conv"] * 4
    calls.clear()
    result = kfc_by_lags(x, geometry, lag_method="gemm")
    assert calls == ["gemm"] * 4
    tol = 1e-5 if dtype == torch.float32 else 1e-11
    torch.testing.assert_close(result, expected, rtol=tol, atol=tol * expected.abs().max())


def test_resolve_lag_method(monkeypatch):
    """``"auto"``: for float32 on CUDA the Triton kernel for groups of at most 64 channels (when Triton is
    there) and the GEMM form for wider ones, the GEMM form for other float32, the convolution otherwise; ``"triton"``
    where it cannot run is an error."""
    from curvlib import kernels

    monkeypatch.setattr(kernels, "available", lambda: True)
    assert resolve_lag_method("auto", torch.float32, torch.device("cuda"), channels_per_group=1) == "triton"
    assert resolve_lag_method("auto", torch.float32, "cuda:1", numel=100, channels_per_group=64) == "triton"
    assert resolve_lag_method("auto", torch.float32, "cuda", channels_per_group=65) == "gemm"  # cuBLAS
    assert resolve_lag_method("auto", torch.float32, "cuda", numel=2**31, channels_per_group=1) == "gemm"
    assert resolve_lag_method("auto", torch.float32, "cpu", channels_per_group=1) == "gemm"
    assert resolve_lag_method("triton", torch.float32, "cuda") == "triton"
    for dtype, device in ((torch.float64, "cuda"), (torch.float32, "cpu")):
        with pytest.raises(ValueError, match="lag_method='triton' needs Triton, a float32 input"):
            resolve_lag_method("triton", dtype, device)
    monkeypatch.setattr(kernels, "available", lambda: False)
    assert resolve_lag_method("auto", torch.float32, torch.device("cuda")) == "gemm"
    assert resolve_lag_method("auto", torch.float32, "cuda:1") == "gemm"
    with pytest.raises(ValueError, match="use 'gemm' or 'conv'"):
        resolve_lag_method("triton", torch.float32, "cuda")
    assert resolve_lag_method("auto", torch.float64, "cuda") == "conv"
    assert resolve_lag_method("auto", torch.float32, "cpu") == "gemm"
    assert resolve_lag_method("auto", torch.float64, torch.device("cpu")) == "conv"
    assert resolve_lag_method("gemm", torch.float64, "cpu") == "gemm"
    assert resolve_lag_method("conv", torch.float32, "cuda") == "conv"
    with pytest.raises(ValueError, match="lag_method"):
        resolve_lag_method("GEMM", torch.float32, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda(seed):
    """The parametrised cases of this file once more on the GPU (float64, and float32 for a few)."""
    cases = [p.values for p in _cases()] + [
        (2, 7, 1, 3, "dw", 2), (2, 7, 1, ((2, 4), (5, 1)), "dw", 2), (1, 3, 2, 1, 1, 3), (3, 3, 2, 1, 2, 3)]
    for dims, kernel, dilation, padding, groups, batch in cases:
        groups = 4 if groups == "dw" else groups
        size = tuple(max(dilation * (kernel - 1) + 2 + 2 * t, 4) for t in range(dims))
        geometry = geometry_for(4, size, kernel, padding, dilation, groups)
        x = torch.randn(batch, 4, *size, dtype=DTYPE)
        expected = reference_kfc(x, geometry.kernel_size, geometry.padding, geometry.dilation, groups)
        for method in METHODS:
            result = kfc_by_lags(x.cuda(), geometry, lag_method=method)
            assert result.is_cuda
            torch.testing.assert_close(result.cpu(), expected, rtol=1e-11, atol=1e-11 * expected.abs().max())
    geometry = make_geometry(32, 32, (20, 18), kernel_size=3, padding=1)
    x = torch.randn(8, 32, 20, 18)
    expected = reference_kfc(x, geometry.kernel_size, geometry.padding, geometry.dilation, 1)
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # float32 accuracy
    try:
        result = kfc_by_lags(x.cuda(), geometry, lag_method="conv")
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags
    assert result.dtype == torch.float32
    # cuDNN may pick a Winograd algorithm for the 5x5 lag weight gradient: ~2e-4 relative error (H200)
    torch.testing.assert_close(result.cpu().double(), expected, rtol=0, atol=2e-3 * expected.abs().max())


#: float32 CUDA cases: dot path (C/G ≥ 16, one and several tiles), narrow path (depthwise, 3 channels),
#: 1-d/3-d, dilation, groups, a reduction long enough to be split
CUDA_FLOAT32_CASES = [((20, 18), 3, 1, 1, 32, 1), ((28, 28), 3, 1, 1, 64, 1), ((14, 14), 7, 3, 48, 48, 1),
                      ((9, 10, 8), 3, 1, 1, 16, 1), ((12, 11), 5, 2, 2, 16, 1), ((64,), 3, 1, 1, 32, 1),
                      ((16, 16), 3, 1, 1, 3, 1), ((10, 12), 3, 2, 1, 80, 2), ((30, 30), 3, 1, 1, 24, 1)]


def _cuda_float32_errors(methods, calls, precision="ieee"):
    """Per case and method the relative error (Frobenius) of float32 against float64 (TF32 off)."""
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    errors = {}
    try:
        for size, kernel, padding, groups, channels, dilation in CUDA_FLOAT32_CASES:
            geometry = make_geometry(channels, channels, size, kernel_size=kernel, padding=padding, groups=groups,
                                     dilation=dilation)
            x = torch.randn(24, channels, *size, device="cuda")
            expected = kfc_by_lags(x.double(), geometry)
            for method in methods:
                calls.clear()
                result = kfc_by_lags(x, geometry, lag_method=method, precision=precision)
                assert result.dtype == torch.float32
                # auto: the faster of the two, timed on the first call of a shape (both run then)
                allowed = {"triton", "gemm"} if method == "auto" else {method}
                assert calls and set(calls) <= allowed, (method, calls)
                errors[(str(geometry), method)] = ((result.double() - expected).norm() / expected.norm()).item()
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags
    return errors


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_extra_memory_within_the_model(seed):
    """The peak extra memory of an eager call (allocator statistics, result excluded) stays within
    :func:`kfc_extra_bytes` for each lag method and chunk size, and above the terms it must hold; the
    chunked calls agree with the whole one."""
    from curvlib import cuda_graphs

    cases = [(64, (28, 28), 3, 1, 1, 16), (96, (16, 12), 3, 1, 1, 8), (64, (14, 14), 7, 3, 64, 8),
             (32, (20, 20), 5, 2, 4, 8), (16, (8, 6, 7), 3, 1, 1, 4)]
    methods = ["gemm"] + (["triton"] if lag_gram.triton_usable(torch.float32, "cuda") else [])
    for c, size, kernel, padding, groups, batch in cases:
        geometry = make_geometry(c, c, size, kernel_size=kernel, padding=padding, groups=groups)
        plans = lag_gram._dim_plans(lag_gram._plan_key(geometry))
        terms = sum(lag_gram._term_elements(plans, f, c, c // groups) for f in lag_gram._all_forms(plans)) * 4
        x = torch.randn(batch, c, *size, device="cuda")
        for method in methods:
            whole = None
            for chunk_bytes in (None, lag_gram.kfc_extra_bytes(geometry, batch, 4, None, method) / 4, 1):
                with cuda_graphs.eager():
                    kfc_by_lags(x, geometry, lag_method=method, chunk_bytes=chunk_bytes)  # workspaces, tuning
                    torch.cuda.synchronize()
                    before = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                    result = kfc_by_lags(x, geometry, lag_method=method, chunk_bytes=chunk_bytes)
                    torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated() - before - result.numel() * 4
                model = lag_gram.kfc_extra_bytes(geometry, batch, 4, chunk_bytes, method)
                assert terms <= peak <= model, (geometry, method, chunk_bytes, terms, peak, model)
                if whole is None:
                    whole = result
                torch.testing.assert_close(result, whole, rtol=1e-5, atol=1e-5 * whole.abs().max().item())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_float32_gemm_and_triton(seed, monkeypatch):
    """float32 on CUDA: ``"auto"`` runs the faster of the Triton lag products and the GEMM form (cuBLAS);
    both are within 2e-5 relative (Frobenius) of float64 with TF32 off (cuDNN's Winograd weight
    gradient, ``"conv"``: ~2e-4)."""
    from curvlib import kernels

    methods = ("gemm", "triton", "auto") if kernels.available() else ("gemm",)
    errors = _cuda_float32_errors(methods, _record_lag_methods(monkeypatch))
    bad = {key: error for key, error in errors.items() if not error < 2e-5}
    assert not bad, bad


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_triton_tf32(seed, monkeypatch):
    """``precision="tf32"``: the matrix units are used (error above float32's) and stay within 2e-3."""
    from curvlib import kernels

    if not kernels.available():
        pytest.skip("needs Triton")
    errors = _cuda_float32_errors(("triton",), _record_lag_methods(monkeypatch), precision="tf32")
    assert all(error < 2e-3 for error in errors.values()), errors
    assert max(errors.values()) > 2e-5, errors  # TF32 rounding is visible: the option took effect


def test_supports_lags():
    assert supports_lags(make_geometry(3, 4, (8, 8), kernel_size=3, padding=1))
    assert supports_lags(make_geometry(3, 4, (8,), kernel_size=1))
    assert supports_lags(make_geometry(4, 4, (5, 6, 7), kernel_size=3, groups=4))
    assert not supports_lags(make_geometry(3, 4, (8, 8), kernel_size=3, stride=2))
    assert not supports_lags(make_geometry(3, 4, (8, 8), kernel_size=3, stride=(1, 2)))
    assert not supports_lags(make_geometry(3, 4, (8, 8), kernel_size=3, transposed=True))
    four_d = ConvGeometry(2, 2, 1, (3,) * 4, (1,) * 4, ((0, 0),) * 4, (1,) * 4, (5,) * 4, (3,) * 4)
    assert not supports_lags(four_d)
    with pytest.raises(ValueError, match="stride 1"):
        kfc_by_lags(torch.randn(1, 3, 8, 8), make_geometry(3, 4, (8, 8), kernel_size=3, stride=2))


def test_lag_flops():
    """A 3x3, 64-channel, 32x32 layer: the lag form needs fewer multiply-adds than the unfolded Gram."""
    geometry = make_geometry(64, 64, (32, 32), kernel_size=3, padding=1)
    unfold = unfold_flops(geometry, 8)
    assert unfold == (64 * 9) ** 2 * 8 * 32 * 32
    lags = lag_flops(geometry, 8)
    assert 64 * 64 * 25 * 8 * 32 * 32 <= lags < unfold / 2.5
    depthwise = make_geometry(96, 96, (56, 56), kernel_size=7, padding=3, groups=96)
    assert lag_flops(depthwise, 8) < unfold_flops(depthwise, 8) / 10
    # Triton: half the lags, each over its overlap region only; the GEMM form: the same lags over the
    # padded box (34x34 here)
    assert lag_flops(geometry, 8, "triton") < lags - 64 * 64 * 25 * 8 * 32 * 32 / 2 + 1
    assert lag_flops(geometry, 8, "gemm") - lag_flops(geometry, 8, "triton") == 64 * 64 * 8 * (
        13 * 34 * 34 - ((32 + 2 * 31 + 2 * 30) ** 2 + 32 * 32) // 2)
    assert lag_flops(depthwise, 8, "gemm") < lag_flops(depthwise, 8, "conv")


@pytest.mark.parametrize("size,kernel,dilation", [((9, 8), 3, 1), ((7, 9, 5), (3, 5, 1), (2, 1, 1)), ((6,), 5, 2),
                                                  ((4, 5), 3, 3)])
def test_lag_flops_gemm_counts_what_runs(size, kernel, dilation):
    """The GEMM count of the lag products is the sum over the computed lags of their overlap regions."""
    d = len(size)
    kernels = (kernel,) * d if isinstance(kernel, int) else kernel
    dilations = (dilation,) * d if isinstance(dilation, int) else dilation
    order = lag_gram._gemm_plan(size, kernels, dilations)
    counted = sum(math.prod(i - dl * abs(dt) for i, dl, dt in zip(size, dilations, delta)) for delta in order)
    assert lag_gram._lag_positions(size, kernels, dilations, "triton") == counted
    pads = [max(dl * abs(delta[t]) for delta in order) for t, dl in enumerate(dilations)]
    padded = len(order) * math.prod(i + p for i, p in zip(size, pads))
    assert lag_gram._lag_positions(size, kernels, dilations, "gemm") == padded >= counted
    # 1-d and 2-d: the only product run by the lag method is the lag term
    if d < 3:
        pads = tuple((dl * (k - 1), 1) for k, dl in zip(kernels, dilations))
        geometry = geometry_for(4, size, kernels, pads, dilations, 2)
        difference = lag_flops(geometry, 3, "conv") - lag_flops(geometry, 3, "triton")
        assert difference == 4 * 2 * 3 * (math.prod(2 * k - 1 for k in kernels) * math.prod(size) - counted)
