"""Shared fixtures and independent references for the curvlib test suite.

Randomness: every test that asks for the ``seed`` fixture gets its own seed, derived from a base
seed and the test's node id; the global torch generator is seeded with it. The base seed is fresh
for every session (drawn from the OS) unless ``CURVLIB_TEST_SEED`` is set; a failing test reports
the base seed, and ``CURVLIB_TEST_SEED=<base> python -m pytest <node id>`` replays it.

References never use curvlib: they are built from ``torch.nn.functional`` convolutions, autograd,
``torch.func`` and explicit loops, always in float64.
"""

from __future__ import annotations

import itertools
import math
import os
import zlib
from dataclasses import dataclass
from typing import Optional, Tuple

import pytest
import torch
import torch.nn.functional as tf
from torch.func import jacrev

DTYPE = torch.float64

# tiny tensors: intra-op threads only add overhead and oversubscribe the cores pytest-xdist uses
torch.set_num_threads(1)

# set in the environment so that pytest-xdist workers (spawned after this import) share the base seed
os.environ.setdefault("CURVLIB_TEST_SEED", str(int.from_bytes(os.urandom(4), "little")))
_BASE_SEED = int(os.environ["CURVLIB_TEST_SEED"])


def pytest_configure(config):
    # torch-internal noise: forward-mode AD loads TorchScript decompositions on first use, and
    # torch warns that 'same' padding with even kernels copies the input
    config.addinivalue_line("filterwarnings", "ignore:`torch.jit.script` is deprecated:DeprecationWarning")
    config.addinivalue_line("filterwarnings", "ignore:Using padding='same' with even kernel lengths:UserWarning")


def pytest_report_header(config):
    return f"curvlib test base seed: {_BASE_SEED} (set CURVLIB_TEST_SEED to replay)"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    seed = getattr(item, "_curvlib_seed", None)
    if report.failed and seed is not None:
        report.sections.append(
            ("curvlib seed", f"test seed {seed}; replay with CURVLIB_TEST_SEED={_BASE_SEED} python -m pytest '{item.nodeid}'")
        )


@pytest.fixture(autouse=True)
def _float32_flags_restored():
    """PyTorch's float32 precision flags as they were before each test: benchmark scripts run in-process
    set them globally, and a later ``torch.backends.cudnn.flags`` raises once cuDNN's convolution and RNN
    flags disagree (which test ran before is up to pytest-xdist's scheduling)."""
    from curvlib.precision import saved_fp32_flags

    with saved_fp32_flags():
        yield


@pytest.fixture(autouse=True)
def _fresh_engine_plans():
    """No plans of the engine's column passes from an earlier test (:mod:`curvlib.engine.plan_cache`):
    tests that replace batched rules or observe planning must see their own. Reuse across steps is
    tested within a test (``test_engine.py``)."""
    from curvlib.engine import plan_cache

    plan_cache.clear()
    yield
    plan_cache.clear()


@pytest.fixture
def seed(request) -> int:
    """A fresh seed for this test (base seed mixed with the node id); torch's generator is seeded with it."""
    value = (_BASE_SEED + zlib.crc32(request.node.nodeid.encode())) % (2**31)
    request.node._curvlib_seed = value
    torch.manual_seed(value)
    return value


# ----------------------------------------------------------------------------------------------
# comparisons


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Norm-wise relative error in float64; where the reference is exactly zero (all ReLUs off for the
    drawn inputs, a mask that zeroes a whole box), 0 if ``actual`` is zero too, else infinite."""
    diff, scale = (actual.double() - expected.double()).norm().item(), expected.double().norm().item()
    if scale == 0:
        return 0.0 if diff == 0 else float("inf")
    return diff / scale


def assert_close(actual, expected, *, rtol: float = 1e-10, atol: Optional[float] = None, name: str = "result",
                 allow_zero: bool = False, check_dtype: bool = True) -> None:
    """``actual ≈ expected`` elementwise with a message naming the quantity, worst error and location.

    ``atol`` defaults to ``rtol · max|expected|`` (errors of sums scale with the magnitude). Unless
    ``allow_zero``, an all-zero reference is rejected: comparing zeros with zeros proves nothing.
    """
    assert isinstance(actual, torch.Tensor), f"{name}: expected a tensor, got {type(actual).__name__}"
    assert tuple(actual.shape) == tuple(expected.shape), (
        f"{name}: shape {tuple(actual.shape)} != reference shape {tuple(expected.shape)}"
    )
    if check_dtype:
        assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != reference dtype {expected.dtype}"
    scale = expected.abs().max().item() if expected.numel() else 0.0
    if not allow_zero:
        assert scale > 0, f"{name}: the reference is identically zero; the comparison would be vacuous"
    if atol is None:
        atol = rtol * max(scale, 1e-300)
    actual64, expected64 = actual.detach().to(torch.float64), expected.detach().to(torch.float64)
    assert torch.isfinite(actual64).all(), f"{name}: result has non-finite entries"
    error = (actual64 - expected64).abs()
    bound = atol + rtol * expected64.abs()
    bad = error > bound
    if bad.any():
        worst = (error - bound).flatten().argmax().item()
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), error.shape)) if error.dim() else ()
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {error.numel()} entries differ (rtol={rtol:.1e}, atol={atol:.1e}); "
            f"max abs error {error.max().item():.3e} (reference scale {scale:.3e}); worst at {index}: "
            f"got {actual64[index].item():.10e}, expected {expected64[index].item():.10e}"
        )


# ----------------------------------------------------------------------------------------------
# independent references


TORCH_CONV = {1: tf.conv1d, 2: tf.conv2d, 3: tf.conv3d}
TORCH_CONV_TRANSPOSE = {1: tf.conv_transpose1d, 2: tf.conv_transpose2d, 3: tf.conv_transpose3d}


def expand(value, num_dims):
    return (value,) * num_dims if isinstance(value, int) else tuple(value)


def torch_padding_pairs(padding, kernel, dilation):
    """``(left, right)`` per dimension as torch pads (for 'same': total D(K-1), the smaller half left)."""
    num_dims = len(kernel)
    if padding == "valid":
        return ((0, 0),) * num_dims
    if padding == "same":
        totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
        return tuple((t // 2, t - t // 2) for t in totals)
    return tuple((p, p) for p in expand(padding, num_dims))


def unfold_loop(x: torch.Tensor, kernel, stride, pads, dilation) -> torch.Tensor:
    """im2col by an explicit loop: ``[N, C, *I]`` → ``[N, C·∏K, ∏O]`` (rows ``(c, k…)``, columns ``(o…)``)."""
    num_dims = x.dim() - 2
    flat_pads = [p for pair in reversed(pads) for p in pair]
    padded = tf.pad(x, flat_pads)
    out = [
        (padded.shape[2 + j] - dilation[j] * (kernel[j] - 1) - 1) // stride[j] + 1 for j in range(num_dims)
    ]
    result = x.new_zeros(x.shape[0], x.shape[1], *kernel, *out)
    for o in itertools.product(*[range(n) for n in out]):
        for k in itertools.product(*[range(n) for n in kernel]):
            position = tuple(o[j] * stride[j] + k[j] * dilation[j] for j in range(num_dims))
            result[(slice(None), slice(None), *k, *o)] = padded[(slice(None), slice(None), *position)]
    return result.reshape(x.shape[0], x.shape[1] * math.prod(kernel), math.prod(out))


@dataclass(frozen=True)
class Layer:
    """Hyper-parameters of one (transposed) convolution layer and the torch reference of it."""

    name: str
    in_size: Tuple[int, ...]
    kernel: Tuple[int, ...]
    stride: object = 1
    padding: object = 0
    dilation: object = 1
    groups: int = 1
    c_in: int = 2
    c_out: int = 2
    batch: int = 2
    columns: int = 2
    transposed: bool = False
    output_padding: object = 0

    @property
    def num_dims(self) -> int:
        return len(self.in_size)

    @property
    def weight_shape(self) -> Tuple[int, ...]:
        if self.transposed:
            return (self.c_in, self.c_out // self.groups, *self.kernel)
        return (self.c_out, self.c_in // self.groups, *self.kernel)

    @property
    def x_shape(self) -> Tuple[int, ...]:
        return (self.batch, self.c_in, *self.in_size)

    def hyper(self) -> dict:
        """Keyword arguments of curvlib's weight-side functions (besides ``simplify``)."""
        kwargs = dict(stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups)
        if self.transposed:
            kwargs.update(transposed=True, output_padding=self.output_padding)
        return kwargs

    def forward(self, w: torch.Tensor, x: torch.Tensor, bias=None) -> torch.Tensor:
        """torch's (transposed) convolution of ``x`` with weight ``w``."""
        if self.transposed:
            return TORCH_CONV_TRANSPOSE[self.num_dims](
                x, w, bias, stride=self.stride, padding=self.padding, output_padding=self.output_padding,
                groups=self.groups, dilation=self.dilation,
            )
        return TORCH_CONV[self.num_dims](
            x, w, bias, stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups
        )

    def output_shape(self) -> Tuple[int, ...]:
        x = torch.zeros(self.x_shape, dtype=DTYPE, device="meta")
        w = torch.zeros(self.weight_shape, dtype=DTYPE, device="meta")
        return tuple(self.forward(w, x).shape)

    def random(self, dtype=DTYPE):
        """Random ``(x, w)`` in ``dtype`` (never zero)."""
        return torch.randn(self.x_shape, dtype=dtype), torch.randn(self.weight_shape, dtype=dtype)

    # Jacobians ---------------------------------------------------------------------------------

    def weight_jacobian(self, x: torch.Tensor) -> torch.Tensor:
        """``∂y/∂w`` flattened ``[N, |y_n|, |w|]`` by ``torch.func.jacrev`` of torch's convolution."""
        w = torch.zeros(self.weight_shape, dtype=x.dtype)
        jac = jacrev(lambda w: self.forward(w, x))(w)
        return jac.reshape(x.shape[0], -1, w.numel())

    def input_jacobian(self, w: torch.Tensor) -> torch.Tensor:
        """``∂y_n/∂x_n`` ``[|y_n|, |x_n|]`` (the same for every sample: the layer is linear)."""
        x0 = torch.zeros(self.x_shape[1:], dtype=w.dtype)
        jac = jacrev(lambda x0: self.forward(w, x0[None])[0])(x0)
        return jac.reshape(-1, x0.numel())

    def unfolded_input(self, x: torch.Tensor) -> torch.Tensor:
        """The layer input's patches ``[N, G, L, D]``: ``y[n, g·(C_out/G) + c, l] = Σ_d U[n, g, l, d] W_g[c, d]``.

        ``D = C_in/G · ∏K`` ordered like ``weight.flatten(1)`` (conv) or the ``(C_in/G, *K)`` axes of the
        transposed layer's weight; ``L`` runs over the layer's output locations.
        """
        groups = self.groups
        if not self.transposed:
            kernel = self.kernel
            dilation = expand(self.dilation, self.num_dims)
            pads = torch_padding_pairs(self.padding, kernel, dilation)
            patches = unfold_loop(x, kernel, expand(self.stride, self.num_dims), pads, dilation)  # [N, C·K, L]
            patches = patches.reshape(x.shape[0], groups, -1, patches.shape[-1])
            return patches.transpose(2, 3)
        # transposed: the output at location l is linear in the weight; its derivative w.r.t. the
        # weight entries feeding output channel 0 of group g is the patch of group g.
        jac = jacrev(lambda w: self.forward(w, x))(torch.zeros(self.weight_shape, dtype=x.dtype))
        # jac: [N, C_out, *L, C_in, C_out/G, *K]
        c_in_g, c_out_g = self.c_in // groups, self.c_out // groups
        spatial = jac.shape[2 : 2 + self.num_dims]
        result = []
        for g in range(groups):
            block = jac[:, g * c_out_g][..., g * c_in_g : (g + 1) * c_in_g, 0, *([slice(None)] * self.num_dims)]
            result.append(block.reshape(x.shape[0], math.prod(spatial), -1))
        return torch.stack(result, 1)

    def __str__(self) -> str:
        return self.name
