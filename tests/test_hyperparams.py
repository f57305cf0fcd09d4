"""Normalisation of hyper-parameters and every user error, with messages that name the argument."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as tf

import curvlib.functional as F
from curvlib.hyperparams import (
    as_tuple,
    conv_output_size,
    make_geometry,
    padding_pairs,
    spatial_size_argument,
    transpose_output_size,
)
from conftest import DTYPE, TORCH_CONV, assert_close

# ----------------------------------------------------------------------------------------------
# normalisation


@pytest.mark.parametrize("kernel,dilation", [((4,), (1,)), ((2, 3), (1, 1)), ((4, 2), (1, 3)), ((2, 3, 4), (2, 1, 1))])
def test_same_padding_matches_torch(kernel, dilation, seed):
    """'same' with even kernels pads like PyTorch (the smaller half on the left): outputs agree."""
    num_dims = len(kernel)
    size = (6, 5, 4)[:num_dims]
    x = torch.randn(2, 3, *size, dtype=DTYPE)
    w = torch.randn(4, 3, *kernel, dtype=DTYPE)
    expected = TORCH_CONV[num_dims](x, w, padding="same", dilation=dilation)
    assert expected.shape[2:] == x.shape[2:]
    for simplify in (True, False):
        result = F.conv(x, w, padding="same", dilation=dilation, simplify=simplify)
        assert_close(result, expected, name=f"conv(padding='same', simplify={simplify})")
    totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
    assert padding_pairs("same", kernel, (1,) * num_dims, dilation) == tuple((t // 2, t - t // 2) for t in totals)


def test_same_padding_is_asymmetric_for_even_kernels(seed):
    """An even kernel needs asymmetric padding; a symmetric split either way would differ from torch."""
    x = torch.randn(1, 1, 7, dtype=DTYPE)
    w = torch.randn(1, 1, 4, dtype=DTYPE)
    expected = tf.conv1d(x, w, padding="same")
    assert_close(F.conv(x, w, padding="same"), expected, name="conv(padding='same')")
    right_heavy = tf.conv1d(tf.pad(x, (2, 1)), w)
    assert not torch.allclose(right_heavy, expected), "test input does not distinguish the two splits"
    assert padding_pairs("same", (4,), (1,), (1,)) == ((1, 2),)


@pytest.mark.parametrize("kernel,stride", [((3, 2), (1, 1)), ((2, 3), (2, 3))])
def test_valid_padding(kernel, stride, seed):
    x = torch.randn(2, 2, 7, 6, dtype=DTYPE)
    w = torch.randn(3, 2, *kernel, dtype=DTYPE)
    expected = tf.conv2d(x, w, stride=stride, padding="valid")
    assert_close(F.conv(x, w, stride=stride, padding="valid"), expected, name="conv(padding='valid')")
    assert padding_pairs("valid", kernel, stride, (1, 1)) == ((0, 0), (0, 0))


def test_as_tuple_expands_and_checks():
    assert as_tuple(2, 3, "stride") == (2, 2, 2)
    assert as_tuple((1, 2), 2, "stride") == (1, 2)
    assert as_tuple([3, 1], 2, "kernel_size") == (3, 1)
    assert as_tuple(torch.Size([2, 2]), 2, "kernel_size") == (2, 2)
    assert as_tuple(0, 2, "padding", minimum=0) == (0, 0)


@pytest.mark.parametrize("size", [(1, 3), (2, 3, 5)])
def test_geometry_of_convolution(size):
    """Output sizes and channel bookkeeping of make_geometry agree with torch."""
    kernel, stride, padding, dilation = (2,) * len(size), (1,) + (2,) * (len(size) - 1), 1, 1
    geometry = make_geometry(4, 6, size, kernel, stride, padding, dilation, groups=2)
    x = torch.zeros(1, 4, *size, device="meta")
    w = torch.zeros(6, 2, *kernel, device="meta")
    expected = TORCH_CONV[len(size)](x, w, stride=stride, padding=padding, dilation=dilation, groups=2).shape[2:]
    assert geometry.output_size == tuple(expected)
    assert geometry.weight_shape == (6, 2, *kernel)
    assert geometry.layer_output_size == geometry.output_size and not geometry.transposed


@pytest.mark.parametrize("stride,dilation,output_padding", [(2, 1, 1), (1, 2, 1), (3, 2, 2), (1, 3, 2)])
def test_geometry_of_transposed_convolution(stride, dilation, output_padding):
    """The transposed layer's output size (Eq. D13) matches torch, also with output_padding ≥ stride."""
    size, kernel, padding = (4, 3), 2, 1
    geometry = make_geometry(4, 6, size, kernel, stride, padding, dilation, groups=2, transposed=True,
                             output_padding=output_padding)
    x = torch.zeros(1, 4, *size, device="meta")
    w = torch.zeros(4, 3, kernel, kernel, device="meta")
    y = tf.conv_transpose2d(x, w, stride=stride, padding=padding, output_padding=output_padding, groups=2,
                            dilation=dilation)
    assert geometry.layer_output_size == tuple(y.shape[2:]) == geometry.input_size
    assert geometry.layer_input_size == size == geometry.output_size
    assert geometry.weight_shape == (4, 3, kernel, kernel)  # PyTorch's ConvTranspose layout
    assert (geometry.layer_input_channels, geometry.layer_output_channels) == (4, 6)


def test_spatial_size_argument():
    assert spatial_size_argument(5, 2, "input_size") == (5, 5)
    assert spatial_size_argument((4, 5), 2, "input_size") == (4, 5)
    assert spatial_size_argument(torch.Size([2, 3, 4, 5]), 2, "input_size") == (4, 5)
    with pytest.raises(ValueError, match="input_size"):
        spatial_size_argument((4, 5, 6), 2, "input_size")
    with pytest.raises(ValueError, match="input_size"):
        spatial_size_argument((4, 0), 2, "input_size")


# ----------------------------------------------------------------------------------------------
# errors


def _x(*shape, dtype=DTYPE):
    return torch.randn(*shape, dtype=dtype)


class TestErrors:
    def test_input_channels_not_divisible_by_groups(self):
        with pytest.raises(ValueError, match=r"input channels \(3\) must be divisible by groups \(2\)"):
            F.kfc(_x(2, 3, 5, 5), 3, groups=2)

    def test_output_channels_not_divisible_by_groups(self):
        with pytest.raises(ValueError, match=r"output channels \(3\) must be divisible by groups \(2\)"):
            F.weight_vjp(_x(2, 4, 5), _x(2, 3, 3), 3, groups=2)

    def test_weight_not_divisible_by_groups(self):
        with pytest.raises(ValueError, match=r"weight.shape\[0\] \(3\) must be divisible by groups \(2\)"):
            F.conv(_x(2, 4, 5), _x(3, 2, 3), groups=2)

    def test_input_channels_do_not_match_weight(self):
        with pytest.raises(ValueError, match=r"x has 3 channels.*groups=2 expects 4"):
            F.conv(_x(2, 3, 5), _x(4, 2, 3), groups=2)
        with pytest.raises(ValueError, match="x has 3 channels"):
            F.conv_transpose(_x(2, 3, 5), _x(4, 2, 3))

    @pytest.mark.parametrize("groups", [0, -1, 1.5, True])
    def test_groups_not_a_positive_int(self, groups):
        with pytest.raises(ValueError, match="groups must be a positive int"):
            F.conv(_x(2, 2, 5), _x(2, 2, 3), groups=groups)
        with pytest.raises(ValueError, match="groups must be a positive int"):
            F.kfc(_x(2, 2, 5), 3, groups=groups)

    @pytest.mark.parametrize("kwargs", [dict(), dict(padding=1), dict(dilation=2, padding=1)])
    def test_kernel_larger_than_padded_input(self, kwargs):
        with pytest.raises(ValueError, match="kernel .* is larger than the padded input"):
            F.conv(_x(1, 1, 2, 8), _x(1, 1, 5, 3), **kwargs)

    def test_s_with_wrong_shape(self):
        x = _x(2, 3, 6, 6)  # output [2, 4, 4, 4] for a 3x3 kernel
        with pytest.raises(ValueError, match=r"s must have shape \(5, 2, 4, 4, 4\)"):
            F.ggn_diag(x, _x(5, 2, 4, 4, 5), 3)
        with pytest.raises(ValueError, match=r"s must have shape \(5, 2, 4, 4, 4\)"):
            F.ggn(x, _x(5, 3, 4, 4, 4), 3)  # wrong batch size
        with pytest.raises(ValueError, match="s must have 5 dimensions"):
            F.ggn_gram(x, _x(2, 4, 4, 4), 3)

    def test_d_with_wrong_shape(self):
        x = _x(2, 3, 6, 6)
        with pytest.raises(ValueError, match=r"d must have shape \(2, 4, 4, 4\)"):
            F.hesscale_weight_diag(x, _x(2, 4, 5, 4), 3)
        with pytest.raises(ValueError, match=r"d must have shape \(2, 4, 4, 4\)"):
            F.hesscale_input_diag(_x(4, 3, 3, 3), _x(2, 4, 3, 3), (6, 6))

    def test_v_with_wrong_shape(self):
        with pytest.raises(ValueError, match=r"v must have shape \(2, 4, 4, 4\)"):
            F.weight_vjp(_x(2, 3, 6, 6), _x(2, 4, 4, 3), 3)
        with pytest.raises(ValueError, match=r"v must have shape \(2, 4, 4, 4\)"):
            F.input_vjp(_x(4, 3, 3, 3), _x(2, 4, 5, 4), (6, 6))
        with pytest.raises(ValueError, match=r"v must have 4 dimensions"):
            F.weight_vjp(_x(2, 3, 6, 6), _x(2, 4, 16), 3)
        with pytest.raises(ValueError, match=r"v must have shape"):
            F.unfold_vjp(_x(2, 27, 15), (6, 6), 3)  # 16 output locations
        with pytest.raises(ValueError, match=r"v.shape\[1\] \(10\) must be C·∏kernel_size"):
            F.unfold_vjp(_x(2, 10, 16), (6, 6), 3)

    def test_padding_mode(self):
        with pytest.raises(ValueError, match="padding_mode must be one of .*'reflect'"):
            F.conv(_x(1, 2, 5, 5), _x(3, 2, 3, 3), padding=1, padding_mode="reflect")
        with pytest.raises(ValueError, match="padding_mode"):
            make_geometry(2, 3, (5, 5), 3, padding=1, padding_mode="circular")

    @pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
    def test_non_floating_dtypes(self, dtype):
        x = torch.ones(2, 2, 5, dtype=dtype)
        with pytest.raises(TypeError, match="x must have a floating-point dtype"):
            F.kfc(x, 3)
        with pytest.raises(TypeError, match="x must have a floating-point dtype"):
            F.unfold(x, 3)
        with pytest.raises(TypeError, match="weight must have a floating-point dtype"):
            F.conv(_x(2, 2, 5), torch.ones(2, 2, 3, dtype=dtype))
        with pytest.raises(TypeError, match="s must have a floating-point dtype"):
            F.ggn_diag(_x(2, 2, 5), torch.ones(1, 2, 2, 3, dtype=dtype), 3)

    def test_not_a_tensor(self):
        with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
            F.kfc([[1.0]], 3)

    def test_dtype_mismatch(self):
        x = _x(2, 2, 5)
        with pytest.raises(TypeError, match="weight has dtype torch.float32 but x has dtype torch.float64"):
            F.conv(x, _x(2, 2, 3, dtype=torch.float32))
        with pytest.raises(TypeError, match="s has dtype torch.float32"):
            F.ggn(x, _x(1, 2, 2, 3, dtype=torch.float32), 3)
        with pytest.raises(TypeError, match="v has dtype torch.float32"):
            F.weight_vjp(x, _x(2, 2, 3, dtype=torch.float32), 3)
        with pytest.raises(TypeError, match="d has dtype torch.float32"):
            F.hesscale_input_diag(x.new_ones(2, 2, 3), _x(2, 2, 3, dtype=torch.float32), 5)
        with pytest.raises(TypeError, match="bias has dtype torch.float32"):
            F.conv(x, _x(2, 2, 3), _x(2, dtype=torch.float32))

    def test_device_mismatch(self):
        """A second device without an accelerator: the 'meta' device (no computation happens)."""
        x = _x(2, 2, 5)
        with pytest.raises(ValueError, match="weight is on meta but x is on cpu"):
            F.conv(x, torch.randn(2, 2, 3, dtype=DTYPE, device="meta"))
        with pytest.raises(ValueError, match="s is on meta"):
            F.ggn_diag(x, torch.randn(1, 2, 2, 3, dtype=DTYPE, device="meta"), 3)

    def test_bias_shape(self):
        with pytest.raises(ValueError, match=r"bias must have shape \(2,\)"):
            F.conv(_x(2, 2, 5), _x(2, 2, 3), _x(3))

    @pytest.mark.parametrize(
        "blocks,match",
        [
            (None, "blocks must be given"),
            ((1, 1, 1), "blocks must have one positive int per weight axis"),
            ((1, 1, 1, 1, 1), "blocks must have one positive int per weight axis"),
            ((0, 1, 1, 1), "blocks must have one positive int per weight axis"),
            ((1.0, 1, 1, 1), "blocks must have one positive int per weight axis"),
            ((4, 1, 1, 1), r"blocks\[0\] = 4 does not divide weight axis 0 of size 6"),
            ((1, 1, 2, 1), r"blocks\[2\] = 2 does not divide weight axis 2 of size 3"),
        ],
    )
    def test_bad_mini_blocks(self, blocks, match):
        x, s = _x(2, 2, 5, 5), _x(1, 2, 6, 3, 4)  # kernel (3, 2): weight (6, 2, 3, 2)
        with pytest.raises(ValueError, match=match):
            F.ggn_mini_block(x, s, (3, 2), blocks=blocks)

    def test_same_padding_with_stride(self):
        with pytest.raises(ValueError, match=r"padding='same' requires stride 1 .* stride=\(1, 2\)"):
            F.conv(_x(1, 2, 6, 6), _x(2, 2, 3, 3), stride=(1, 2), padding="same")
        with pytest.raises(ValueError, match="padding='same' requires stride 1"):
            F.kfc(_x(1, 2, 6, 6), 3, stride=2, padding="same")

    def test_unknown_padding_string(self):
        with pytest.raises(ValueError, match="padding must be an int, a tuple, 'same' or 'valid', got 'full'"):
            F.conv(_x(1, 2, 6), _x(2, 2, 3), padding="full")

    def test_string_padding_for_transposed(self):
        with pytest.raises(ValueError, match="transposed convolutions take int or tuple padding"):
            F.weight_vjp(_x(1, 2, 6), _x(1, 2, 8), 3, padding="same", transposed=True)

    @pytest.mark.parametrize("stride,dilation,output_padding", [(2, 1, 2), (1, 1, 1), (2, 3, 3), (1, 2, (0, 2))])
    def test_output_padding_too_large(self, stride, dilation, output_padding):
        with pytest.raises(ValueError, match="output_padding must be smaller than stride or dilation"):
            F.conv_transpose(_x(1, 2, 4, 4), _x(2, 2, 3, 3), stride=stride, dilation=dilation,
                             output_padding=output_padding)
        with pytest.raises(ValueError, match="output_padding must be smaller than stride or dilation"):
            F.kfc(_x(1, 2, 4, 4), 3, stride=stride, dilation=dilation, output_padding=output_padding,
                  transposed=True)

    def test_output_padding_without_transposed(self):
        with pytest.raises(ValueError, match="output_padding is only valid with transposed=True"):
            F.kfc(_x(1, 2, 6), 3, stride=2, output_padding=1)
        with pytest.raises(ValueError, match="output_padding is only valid with transposed=True"):
            F.ggn_diag(_x(1, 2, 6), _x(1, 1, 2, 2), 3, stride=2, output_padding=(1,))

    def test_transposed_output_not_positive(self):
        with pytest.raises(ValueError, match="transposed convolution output size .* is not positive"):
            F.conv_transpose(_x(1, 2, 1), _x(2, 2, 1), padding=1)

    @pytest.mark.parametrize(
        "kwargs,error,match",
        [
            (dict(stride=(1, 2, 3)), ValueError, r"stride must have one entry per spatial dimension \(2\)"),
            (dict(stride=0), ValueError, r"stride entries must be >= 1"),
            (dict(dilation=(1, 0)), ValueError, r"dilation entries must be >= 1"),
            (dict(padding=-1), ValueError, r"padding entries must be >= 0"),
            (dict(padding=(1,)), ValueError, "padding must have one entry per spatial dimension"),
            (dict(stride=True), TypeError, "stride must be an int or a sequence"),
            (dict(stride=1.0), TypeError, "stride must be an int or a sequence"),
            (dict(dilation=(1, 2.0)), TypeError, "dilation entries must be ints"),
            (dict(padding=(True, 1)), TypeError, "padding entries must be ints"),
        ],
    )
    def test_bad_hyper_parameters(self, kwargs, error, match):
        with pytest.raises(error, match=match):
            F.conv(_x(1, 2, 6, 6), _x(2, 2, 3, 3), **kwargs)

    def test_bad_kernel_size(self):
        with pytest.raises(ValueError, match=r"kernel_size must have one entry per spatial dimension \(2\)"):
            F.kfc(_x(1, 2, 6, 6), (3, 3, 3))
        with pytest.raises(ValueError, match="kernel_size entries must be >= 1"):
            F.unfold(_x(1, 2, 6, 6), 0)

    def test_input_without_spatial_dims(self):
        with pytest.raises(ValueError, match=r"x must have at least 3 dimensions"):
            F.kfc(_x(2, 3), 1)
        with pytest.raises(ValueError, match=r"weight must have 3 dimensions"):
            F.conv(_x(2, 3, 5), _x(2, 3, 3, 3))

    def test_bad_input_size(self):
        with pytest.raises(ValueError, match="input_size must be the spatial size"):
            F.input_vjp(_x(2, 2, 3), _x(1, 2, 4), (6, 6))


def test_conv_output_size_formulas():
    """Eq. D12 (asymmetric padding) and D13 against torch for a grid of 1d hyper-parameters."""
    for size in (3, 6):
        for kernel in (1, 2, 3):
            for stride in (1, 2, 3):
                for dilation in (1, 2):
                    for pad in ((0, 0), (1, 2), (2, 0)):
                        if size + sum(pad) < dilation * (kernel - 1) + 1:
                            continue
                        x = torch.zeros(1, 1, size + sum(pad), device="meta")
                        w = torch.zeros(1, 1, kernel, device="meta")
                        expected = tf.conv1d(x, w, stride=stride, dilation=dilation).shape[-1]
                        assert conv_output_size(size, kernel, stride, pad, dilation) == expected
                    for pad in (0, 1):
                        for output_padding in range(max(stride, dilation)):
                            y = tf.conv_transpose1d(torch.zeros(1, 1, size, device="meta"), torch.zeros(1, 1, kernel, device="meta"),
                                                    stride=stride, padding=pad, output_padding=output_padding,
                                                    dilation=dilation)
                            assert transpose_output_size(size, kernel, stride, pad, dilation, output_padding) == y.shape[-1]
