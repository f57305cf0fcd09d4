"""curvlib.kernels.threshold_backward (CUDA with Triton) against PyTorch's threshold_backward.

The operation selects (no arithmetic), so results must be equal bit for bit; fresh random tensors,
about half of each mask zero, NaN activations included (PyTorch passes the gradient on there).
"""

import pytest
import torch

from curvlib import kernels

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and kernels.available()),
                                reason="the kernel runs on CUDA with Triton")


def module():
    return kernels._module("threshold_backward")


def reference(g, saved, threshold):
    wide = torch.promote_types(g.dtype, saved.dtype)
    expanded = saved.to(wide).expand_as(g)
    return torch.ops.aten.threshold_backward(g.to(wide), expanded, threshold).to(g.dtype)


def cropped(shape, pad, dtype, channels_last=False):
    """``[J, N, C, *S]`` gradients as the cropped view of a padded, possibly channels-last buffer."""
    j, n, c, *spatial = shape
    big = torch.randn(j * n, c, *(s + 2 * pad for s in spatial), device="cuda", dtype=dtype)
    if channels_last:
        big = big.contiguous(memory_format=torch.channels_last if len(spatial) == 2 else torch.channels_last_3d)
    window = (slice(None), slice(None)) + tuple(slice(pad, pad + s) for s in spatial)
    return big[window].unflatten(0, (j, n))


CASES = {
    "contiguous-2d": dict(shape=(3, 4, 5, 6, 7), pad=0, channels_last=False),
    "cropped-2d": dict(shape=(3, 4, 6, 8, 8), pad=1, channels_last=False),
    "cropped-2d-channels-last": dict(shape=(2, 5, 16, 9, 9), pad=1, channels_last=True),
    "1d": dict(shape=(4, 3, 5, 33), pad=2, channels_last=False),
    "3d-contiguous": dict(shape=(2, 3, 4, 5, 6, 7), pad=0, channels_last=False),
    "3d-channels-last": dict(shape=(2, 3, 8, 4, 5, 6), pad=0, channels_last=True),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype, saved_dtype", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                                                (torch.float32, torch.float32), (torch.float16, torch.float16)])
@pytest.mark.parametrize("threshold", [0.0, 0.3])
def test_equals_pytorch(case, dtype, saved_dtype, threshold):
    spec = CASES[case]
    g = cropped(spec["shape"], spec["pad"], dtype, spec["channels_last"])
    saved = torch.randn(g.shape[1:], device="cuda", dtype=saved_dtype)
    if spec["channels_last"]:
        saved = saved.contiguous(memory_format=torch.channels_last if saved.dim() == 4 else torch.channels_last_3d)
    memory = saved if saved.is_contiguous() else saved.permute(0, *range(2, saved.dim()), 1)  # in memory order
    memory.view(-1)[::7] = float("nan")
    assert module().supported(g, saved)
    got = module().threshold_backward(g, saved, threshold)
    expected = reference(g, saved, threshold)
    assert got.shape == g.shape and got.dtype == g.dtype
    assert torch.equal(got, expected)
    assert (got == 0).float().mean().item() > 0.2 and (got != 0).float().mean().item() > 0.2
    # laid out like the activation, the vectors' axis outermost
    order = lambda t: sorted(range(t.dim()), key=lambda d: -t.stride(d))  # noqa: E731
    assert order(got)[1:] == [d + 1 for d in order(saved)] and order(got)[0] == 0


def test_declines_what_it_does_not_handle():
    saved = torch.randn(2, 3, 4, 5, 6, device="cuda")
    big = torch.randn(4, 5, 6, 7, 8, device="cuda")
    crop = big[:, 1:4, 1:5, 1:6, 1:7].unflatten(0, (2, 2))  # cropped along every axis: six dimensions that do not merge
    assert not module().supported(crop, saved)
    assert module().threshold_backward(crop, saved, 0.0) is None
    assert module().threshold_backward(torch.randn(2, 2, 3, 4, 5, 6, device="cuda"), saved.double(), 0.0) is None
    assert module().threshold_backward(torch.randn(2, 3, 3, device="cuda"), torch.randn(3, 3), 0.0) is None
