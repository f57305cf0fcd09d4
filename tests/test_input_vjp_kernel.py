"""curvlib.kernels.input_vjp: the polyphase data-gradient kernel, against autograd in float64.

- CPU (always): the phase arithmetic (:func:`curvlib.kernels._geometry.polyphase`) against a brute-force
  enumeration of which kernel entries and output locations reach each input position;
- Triton interpreter (when Triton is importable): the kernel on the CPU, float32, against autograd's
  input gradient in float64 (a subprocess: ``TRITON_INTERPRET`` is read at import);
- GPU: bfloat16/float32, channels-last and contiguous gradients, a NaN-poisoned strided output buffer;
  the engine's rule choosing between the kernel and cuDNN by measurement.
"""

import itertools
import math
import os
import random
import sys

import pytest
import torch
import torch.nn.functional as F

from curvlib import kernels
from curvlib.hyperparams import ConvGeometry, conv_output_size, make_geometry
from curvlib.kernels._geometry import kernel_geometry, polyphase
from conftest import relative_error

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}

#: (in channels, out channels, input size, kernel, stride, padding, dilation, groups)
CASES = {
    "2d-stride2": (6, 5, (9, 8), 3, 2, 0, 1, 1),
    "2d-stride2-padded-groups": (6, 4, (9, 8), 3, 2, 1, 1, 2),
    "1d-stride3-dilated": (4, 4, (10,), 3, 3, 2, 2, 1),
    "3d-mixed": (3, 6, (5, 6, 7), 2, (2, 1, 3), (1, 0, 1), (1, 2, 1), 3),
    "2d-kernel-smaller-than-stride": (4, 4, (11, 7), (1, 2), (4, 3), 0, 1, 1),
    "2d-depthwise-stride1": (8, 8, (7, 7), 3, 1, 1, 1, 8),
    "2d-asymmetric-padding": (5, 3, (8, 9), 3, 2, ((2, 0), (1, 2)), 1, 1),
}


def geometry(c_in, c_out, size, kernel, stride, padding, dilation, groups=1) -> ConvGeometry:
    """A convolution's geometry; ``padding`` an int or ``(left, right)`` per dim (asymmetric)."""
    dims = len(size)
    kernel, stride, dilation = ((v,) * dims if isinstance(v, int) else tuple(v) for v in (kernel, stride, dilation))
    padding = ((padding, padding),) * dims if isinstance(padding, int) else tuple(
        (p, p) if isinstance(p, int) else tuple(p) for p in padding)
    output = tuple(conv_output_size(*args) for args in zip(size, kernel, stride, padding, dilation))
    return ConvGeometry(c_in, c_out, groups, kernel, stride, padding, dilation, tuple(size), output)


def geometry_of(case):
    return geometry(*CASES[case])


def reference(geometry, g, weight):
    """autograd's input gradient of the convolution (float64), padding applied with ``F.pad``."""
    x = torch.randn(g.shape[0], geometry.in_channels, *geometry.input_size, dtype=torch.float64, device=g.device,
                    requires_grad=True)
    pads = [p for left, right in reversed(geometry.padding) for p in (left, right)]
    y = CONV[geometry.num_dims](F.pad(x, pads), weight.double(), stride=geometry.stride, dilation=geometry.dilation,
                                groups=geometry.groups)
    assert y.shape == g.shape
    return torch.autograd.grad(y, x, g.double())[0]


def random_geometry(rng: random.Random):
    dims = rng.randint(1, 3)
    size = tuple(rng.randint(1, 9) for _ in range(dims))
    kernel = tuple(rng.randint(1, 4) for _ in range(dims))
    dilation = tuple(rng.randint(1, 3) for _ in range(dims))
    padding = tuple((rng.randint(0, 3), rng.randint(0, 3)) for _ in range(dims))
    stride = tuple(rng.randint(1, 4) for _ in range(dims))
    if any(s + l + r < d * (k - 1) + 1 for s, k, d, (l, r) in zip(size, kernel, dilation, padding)):
        return None  # no output location
    return geometry(2, 2, size, kernel, stride, padding, dilation)


@pytest.mark.skipif(not kernels.available(), reason="Triton is not installed")
def test_positions_beyond_32_bits_are_refused_or_left_to_the_adjoint():
    from curvlib.kernels import input_vjp

    geometry = kernel_geometry(make_geometry(1, 1, (2**16, 2**16), kernel_size=2, stride=2))
    g = torch.empty(1, 1, 1, 1).expand(2, 1, 2**15, 2**15)  # 2·2³² input positions, no storage
    with pytest.raises(ValueError, match="exceed 2147483647"):
        input_vjp.input_vjp(g, torch.randn(1, 1, 2, 2), geometry)
    assert input_vjp.fastest(g, torch.randn(1, 1, 2, 2), geometry, lambda: "adjoint") == "adjoint"


@pytest.mark.parametrize("windowed", [False, True], ids=["whole-input", "window"])
def test_phases_list_exactly_the_taps_reaching_each_position(windowed):
    """Every input position (every position of a random box, for the cropped epilogue) is in exactly
    one phase, which lists exactly the kernel entries and output locations that reach it."""
    rng = random.Random(int.from_bytes(os.urandom(4), "little"))
    checked = 0
    while checked < 200:
        geometry = random_geometry(rng)
        if geometry is None:
            continue
        kg = kernel_geometry(geometry)
        window = ((0, 1),) * (3 - geometry.num_dims) + random_window(geometry, rng) if windowed else None
        box = window or tuple((0, size) for size in kg.input_size)
        seen = {}
        for phase in polyphase(kg, window):
            per_dim = []
            for j, (r, (positions, first, step, taps, delta, delta_step)) in enumerate(phase):
                entries = {}
                for a in range(positions):
                    entries[box[j][0] + r + kg.stride[j] * a] = {
                        (first + m * step, a + delta - m * delta_step) for m in range(taps)}
                per_dim.append(entries)
            for position in itertools.product(*(sorted(e) for e in per_dim)):
                assert position not in seen, (geometry, window, position)
                seen[position] = [e[i] for e, i in zip(per_dim, position)]
        assert sorted(seen) == sorted(itertools.product(*(range(f, f + n) for f, n in box))), (geometry, window)
        for position, listed in seen.items():
            for j, i in enumerate(position):
                expected = {(k, (i + kg.pad_left[j] - k * kg.dilation[j]) // kg.stride[j]) for k in range(kg.kernel_size[j])
                            if (i + kg.pad_left[j] - k * kg.dilation[j]) % kg.stride[j] == 0}
                # the phase lists every reaching tap; output locations out of range are the kernel's to mask
                assert listed[j] == expected, (geometry, window, position, j)
        checked += 1


# ----------------------------------------------------------------------------------------------
# Triton interpreter


def random_window(geometry, rng: random.Random) -> tuple:
    """A random box ``(first, size)`` per spatial dim inside the input (sizes of at least one)."""
    window = []
    for size in geometry.input_size:
        first = rng.randint(0, size - 1)
        window.append((first, rng.randint(1, size - first)))
    return tuple(window)


def cropped_masked(expected, window, mask, threshold):
    """The float64 gradient's box ``window`` (``(first, size)`` per spatial dim), zero where ``mask``
    (``[N, ...]``, repeated over the ``M = J·N`` gradients) is ``<= threshold``: an explicit crop and
    ``torch.where``, the way PyTorch's backward of a padding and a ReLU composes."""
    for d, (first, size) in enumerate(window):
        expected = expected.narrow(2 + d, first, size)
    repeated = mask.double().repeat(expected.shape[0] // mask.shape[0], *([1] * (mask.dim() - 1)))
    return torch.where(repeated <= threshold, torch.zeros_like(expected), expected)


def _interpret_main() -> int:
    from test_kernels import _interpreter_usable

    from curvlib.kernels import input_vjp

    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    rng = random.Random(seed)
    if not _interpreter_usable():
        return 3
    failures = []
    for case in sorted(CASES):
        geometry = geometry_of(case)
        g = torch.randn(6, geometry.out_channels, *geometry.output_size)
        weight = torch.randn(geometry.out_channels, geometry.in_channels // geometry.groups, *geometry.kernel_size)
        expected = reference(geometry, g, weight)
        got = input_vjp.input_vjp(g, weight, kernel_geometry(geometry))
        error = relative_error(got, expected)
        if not error < 1e-6:
            failures.append((case, error))
        # the fused epilogue: a box of the input, masked by a [3, ...] activation repeated twice; the
        # activation is on a grid of halves, so that entries equal to the threshold occur (a ReLU's zeros)
        window = random_window(geometry, rng)
        mask = torch.randn(3, geometry.in_channels, *(size for _, size in window)).mul(2).round().div(2)
        threshold = rng.choice([-0.5, 0.0, 0.5])
        wanted = cropped_masked(expected, window, mask, threshold)
        got = input_vjp.input_vjp(g, weight, kernel_geometry(geometry), window=window, mask=mask, threshold=threshold)
        error = relative_error(got, wanted)
        if not (error < 1e-6 and got.shape == wanted.shape):
            failures.append((case, "window", window, error))
    for failure in failures:
        print("FAILED seed", seed, *failure)
    print("interpreter check:", "failed" if failures else "passed")
    return 1 if failures else 0


@pytest.mark.skipif(not kernels.available(), reason="Triton is not installed")
def test_kernel_in_triton_interpreter():
    from test_kernels import run_interpreter_check

    run_interpreter_check(__file__)


# ----------------------------------------------------------------------------------------------
# GPU

cuda = pytest.mark.skipif(not (torch.cuda.is_available() and kernels.available()), reason="needs CUDA and Triton")

#: relative Frobenius error against float64: bfloat16 operands are exact in the products, the result
#: is rounded once (2⁻⁹); float32 "ieee" multiplies exactly
TOLERANCE = {torch.bfloat16: 8e-3, torch.float32: 1e-5}


def channels_last(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format={4: torch.channels_last, 5: torch.channels_last_3d}.get(t.dim(),
                                                                                               torch.contiguous_format))


@cuda
@pytest.mark.parametrize("case", sorted(CASES) + ["all-cnn-c-stride2"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("layout", ["channels-last", "contiguous"])
@pytest.mark.parametrize("epilogue", ["plain", "window-and-mask"])
def test_kernel_matches_autograd(case, dtype, layout, epilogue, seed):
    from curvlib.kernels import input_vjp

    geometry = (make_geometry(96, 96, (34, 34), kernel_size=3, stride=2) if case == "all-cnn-c-stride2"
                else geometry_of(case))
    g = torch.randn(6, geometry.out_channels, *geometry.output_size, device="cuda").to(dtype)
    weight = torch.randn(geometry.out_channels, geometry.in_channels // geometry.groups, *geometry.kernel_size,
                         device="cuda").to(dtype)
    if layout == "channels-last":
        g, weight = channels_last(g), channels_last(weight)
    expected = reference(geometry, g, weight)
    fused = {}
    if epilogue == "window-and-mask":  # [3, ...] activations of g's dtype, with ties at the threshold
        window = (((1, 32),) * 2 if case == "all-cnn-c-stride2" else random_window(geometry, random.Random(seed)))
        mask = torch.randn(3, geometry.in_channels, *(size for _, size in window), device="cuda")
        mask = mask.mul(2).round().div(2).to(dtype)
        fused = dict(window=window, mask=channels_last(mask) if layout == "channels-last" else mask, threshold=0.0)
        expected = cropped_masked(expected, window, mask, 0.0)
    # a NaN-poisoned buffer with a gap between samples: every entry must be written, none outside
    shape = tuple(expected.shape)
    buffer = torch.full((shape[0], math.prod(shape[1:]) + 7), float("nan"), device="cuda", dtype=dtype)
    out = buffer[:, 3:3 + math.prod(shape[1:])].view(shape)
    got = input_vjp.input_vjp(g, weight, kernel_geometry(geometry), out=out, **fused)
    assert got.data_ptr() == out.data_ptr()
    assert torch.isnan(buffer[:, :3]).all() and torch.isnan(buffer[:, 3 + math.prod(shape[1:]):]).all()
    error = relative_error(got, expected)
    assert error < TOLERANCE[dtype], error
    fresh = input_vjp.input_vjp(g, weight, kernel_geometry(geometry), **fused)
    # a new result is laid out as g is (the strides of an empty tensor of g's format: unambiguous
    # where the format is, e.g. for 1×1 boxes)
    format_of_g = (torch.contiguous_format if layout == "contiguous" or g.is_contiguous()
                   else {4: torch.channels_last, 5: torch.channels_last_3d}.get(g.dim(), torch.contiguous_format))
    assert fresh.stride() == torch.empty(fresh.shape, memory_format=format_of_g).stride()
    assert torch.equal(fresh, got)


def test_window_and_mask_are_checked():
    """Bad boxes and masks get a ValueError naming them before any launch (the checks run on the CPU)."""
    pytest.importorskip("triton")
    if not kernels.available():
        pytest.skip("Triton is not usable")
    from curvlib.kernels import input_vjp

    geometry = kernel_geometry(make_geometry(4, 4, (9, 9), kernel_size=3, stride=2))
    g, weight = torch.randn(6, 4, 4, 4), torch.randn(4, 4, 3, 3)
    for window in [((0, 10), (0, 9)), ((-1, 3), (0, 9)), ((0, 9),), ((0, 9, 1), (0, 9))]:
        with pytest.raises(ValueError, match="window must hold"):
            input_vjp.input_vjp(g, weight, geometry, window=window)
    for mask in [torch.randn(4, 4, 9, 9), torch.randn(3, 5, 9, 9), torch.randn(3, 4, 8, 9),
                 torch.randn(3, 4, 9, 9, dtype=torch.float64)]:
        with pytest.raises(ValueError, match="mask must be"):
            input_vjp.input_vjp(g, weight, geometry, mask=mask)


@cuda
def test_engine_rule_chooses_by_measurement_and_agrees_with_cudnn(monkeypatch):
    """The batched rule of a stride-2 convolution: curvlib's kernel or cuDNN by measured time (both
    tried), the same gradients either way; with autotuning off, cuDNN."""
    from curvlib.engine.batched_rules import BackwardOptions, rule_for
    from curvlib.kernels import input_vjp

    x = torch.randn(4, 32, 17, 17, device="cuda", requires_grad=True)
    conv = torch.nn.Conv2d(32, 48, 3, stride=2).cuda()
    node = conv(x).grad_fn
    g = torch.randn(3, 4, 48, 8, 8, device="cuda")
    expected = torch.func.vmap(lambda v: torch.autograd.grad(conv(x), x, v, retain_graph=True)[0])(g)
    options = BackwardOptions(channels_last=True, message_dtype=torch.bfloat16)
    input_vjp._CHOICES.clear()
    need = [True] + [False] * (len(node.next_functions) - 1)
    got = rule_for(node)(node, g.to(torch.bfloat16), need, {}, options)[0]
    assert ((got.double() - expected.double()).norm() / expected.double().norm()).item() < 1e-2
    (timings,) = input_vjp._CHOICES.timings.values()
    assert len(timings) >= 2 and repr(input_vjp.ADJOINT) in timings
    input_vjp._CHOICES.clear()
    monkeypatch.setenv("CURVLIB_KERNEL_AUTOTUNE", "0")
    calls = []
    original = input_vjp.input_vjp
    monkeypatch.setattr(input_vjp, "input_vjp", lambda *a, **k: calls.append(1) or original(*a, **k))
    again = rule_for(node)(node, g.to(torch.bfloat16), need, {}, options)[0]
    assert not calls and torch.allclose(again.float(), got.float(), rtol=2e-2, atol=2e-2)
    monkeypatch.delenv("CURVLIB_KERNEL_AUTOTUNE")

    # float64 gradients (the kernel takes 16-bit and float32 ones): cuDNN, never the kernel
    double = conv.double()
    node64 = double(x.detach().double().requires_grad_()).grad_fn
    g64 = g.double()
    got64 = rule_for(node64)(node64, g64, need, {}, BackwardOptions(channels_last=True))[0]
    assert got64.dtype == torch.float64 and not calls
    expected64 = torch.func.vmap(lambda v: torch.nn.grad.conv2d_input(x.shape, double.weight, v, stride=2))(g64)
    torch.testing.assert_close(got64, expected64, rtol=1e-10, atol=1e-10)
    assert input_vjp.fastest(g64[0], double.weight.detach(), kernel_geometry(make_geometry(32, 48, (17, 17), 3, 2)),
                             lambda: "adjoint") == "adjoint"


if __name__ == "__main__" and "--interpret" in sys.argv:
    sys.exit(_interpret_main())
