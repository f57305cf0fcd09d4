"""Index patterns Π against a literal loop of Algorithm D1 and against torch's convolutions."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as tf

from curvlib.patterns import (
    PatternSpec,
    averaged_index_pattern,
    group_membership,
    index_pattern,
    pattern_tensor,
    transpose_index_pattern,
)
from conftest import DTYPE, assert_close


def loop_pattern(I, K, S, P, D):
    """Algorithm D1, literally: Π[i, o, k] = 1 iff i = k·D + o·S − P_left and 0 ≤ i < I."""
    left, right = P
    O = (I + left + right - D * (K - 1) - 1) // S + 1
    pattern = torch.zeros(I, O, K, dtype=DTYPE)
    for o in range(O):
        for k in range(K):
            i = k * D + o * S - left
            if 0 <= i < I:
                pattern[i, o, k] = 1
    return pattern


def _grid():
    for I, K, S, D in itertools.product((1, 3, 5, 8), (1, 2, 3), (1, 2, 3, 4), (1, 2)):
        for P in ((0, 0), (1, 1), (2, 2), (0, 1), (1, 2), (2, 0)):
            if I + P[0] + P[1] >= D * (K - 1) + 1:
                yield I, K, S, P, D


GRID = list(_grid())


def test_grid_is_rich():
    """The grid covers strided, dilated, asymmetric and zero-sized-remainder cases."""
    assert len(GRID) > 300
    assert any(S > K for _, K, S, _, _ in GRID) and any(P[0] != P[1] for *_, P, _ in GRID)


def _torch_output_size(I, K, S, P, D):
    x = torch.zeros(1, 1, I + P[0] + P[1], device="meta")
    return tf.conv1d(x, torch.zeros(1, 1, K, device="meta"), stride=S, dilation=D).shape[-1]


def test_index_pattern_matches_algorithm_d1():
    for I, K, S, P, D in GRID:
        expected = loop_pattern(I, K, S, P, D)
        result = index_pattern(I, K, S, P, D, dtype=DTYPE)
        assert result.shape == (I, _torch_output_size(I, K, S, P, D), K), (I, K, S, P, D)
        assert torch.equal(result, expected), f"Π({I}, {K}, {S}, {P}, {D}) differs from Algorithm D1"
        spec = PatternSpec(I, K, S, P, D)
        assert spec.output_size == expected.shape[1] and spec.shape == tuple(expected.shape)


def test_int_padding_is_symmetric():
    assert PatternSpec(5, 3, 1, 2).padding == (2, 2)
    assert torch.equal(index_pattern(6, 3, 2, 1, dtype=DTYPE), loop_pattern(6, 3, 2, (1, 1), 1))


@pytest.mark.parametrize("I,K,S,P,D", [(8, 3, 1, (1, 1), 1), (7, 2, 3, (0, 0), 1), (8, 3, 2, (1, 2), 2),
                                       (5, 1, 1, (0, 0), 1), (6, 4, 1, (1, 2), 1)])
def test_pattern_contraction_is_torch_convolution(I, K, S, P, D, seed):
    """y[o] = Σ_{i,k} x[i] Π[i, o, k] w[k] is torch's conv1d of the (asymmetrically) padded input."""
    x, w = torch.randn(2, 3, I, dtype=DTYPE), torch.randn(4, 3, K, dtype=DTYPE)
    pattern = index_pattern(I, K, S, P, D, dtype=DTYPE)
    result = torch.einsum("nci,iok,dck->ndo", x, pattern, w)
    assert_close(result, tf.conv1d(tf.pad(x, P), w, stride=S, dilation=D), name=f"Π({I},{K},{S},{P},{D}) conv")


def test_transpose_pattern_matches_conv_transpose():
    """Π from (O, output_padding) via Eq. D13 has torch's conv_transpose1d output size and reproduces it."""
    generator = torch.Generator().manual_seed(0)
    count = 0
    for O, K, S, P, D in itertools.product((1, 2, 4), (1, 2, 3), (1, 2, 3), (0, 1, 2), (1, 2)):
        for A in range(max(S, D)):
            x = torch.randn(1, 2, O, dtype=DTYPE, generator=generator)
            w = torch.randn(2, 3, K, dtype=DTYPE, generator=generator)
            try:
                expected = tf.conv_transpose1d(x, w, stride=S, padding=P, output_padding=A, dilation=D)
            except RuntimeError:
                continue  # non-positive output size
            pattern = transpose_index_pattern(O, K, S, P, D, A, dtype=DTYPE)
            assert pattern.shape[0] == expected.shape[-1], (O, K, S, P, D, A)
            assert torch.equal(pattern, loop_pattern(pattern.shape[0], K, S, (P, P), D))
            # the transposed convolution uses the first O outputs of the pattern (all of them if A < S)
            assert pattern.shape[1] == O + A // S
            result = torch.einsum("nco,iok,cdk->ndi", x, pattern[:, :O], w)
            assert_close(result, expected, name=f"conv_transpose via Π (O={O}, K={K}, S={S}, P={P}, D={D}, A={A})",
                         allow_zero=True)
            count += 1
    assert count > 100


def test_averaged_patterns_match_loop():
    for I, K, S, P, D in GRID:
        expected = loop_pattern(I, K, S, P, D)
        over_output = averaged_index_pattern(I, K, S, P, D, over="output", dtype=DTYPE)
        assert_close(over_output, expected.mean(1), name=f"Π({I},{K},{S},{P},{D}) mean over o", allow_zero=True)
        over_input = averaged_index_pattern(I, K, S, P, D, over="input", dtype=DTYPE)
        assert_close(over_input, expected.mean(0), name=f"Π({I},{K},{S},{P},{D}) mean over i", allow_zero=True)
        assert PatternSpec(I, K, S, P, D, mean_over="output").shape == (I, K)
        assert PatternSpec(I, K, S, P, D, mean_over="input").shape == (expected.shape[1], K)


def test_averaged_pattern_values():
    """A hand-checked case: I=4, K=2, S=2 — two disjoint windows, each pixel seen once in 2 outputs."""
    expected = torch.tensor([[0.5, 0], [0, 0.5], [0.5, 0], [0, 0.5]], dtype=DTYPE)
    assert torch.equal(averaged_index_pattern(4, 2, 2, dtype=DTYPE), expected)
    assert torch.equal(averaged_index_pattern(4, 2, 2, over="input", dtype=DTYPE), torch.full((2, 2), 0.25, dtype=DTYPE))


def test_invalid_mean_over():
    with pytest.raises(ValueError, match="mean_over must be one of"):
        PatternSpec(4, 2, mean_over="kernel")
    with pytest.raises(ValueError, match="mean_over must be one of"):
        averaged_index_pattern(4, 2, over="both")


def test_modified_specs_match_loop():
    """Sub-sampling, limits and kernel flip materialise as the corresponding slices of the loop pattern."""
    base = loop_pattern(9, 5, 1, (1, 2), 1)
    spec = PatternSpec(9, 5, 1, (1, 2), 1)
    assert torch.equal(pattern_tensor(replace(spec, output_step=2), dtype=DTYPE), base[:, ::2])
    assert torch.equal(pattern_tensor(replace(spec, kernel_step=2), dtype=DTYPE), base[:, :, ::2])
    assert torch.equal(pattern_tensor(replace(spec, output_limit=3), dtype=DTYPE), base[:, :3])
    assert torch.equal(pattern_tensor(replace(spec, kernel_limit=2, kernel_step=2), dtype=DTYPE), base[:, :, ::2][:, :, :2])
    assert torch.equal(pattern_tensor(replace(spec, flip_kernel=True), dtype=DTYPE), base.flip(-1))
    assert not replace(spec, flip_kernel=True).is_plain and spec.is_plain
    assert replace(spec, output_step=2, mean_over="output").plain() == spec


def test_remainder():
    """Trailing pixels that no window touches (D14 holds iff the remainder is 0)."""
    for I, K, S, P, D in GRID:
        pattern = loop_pattern(I, K, S, P, D)
        span = D * (K - 1) + 1
        reach = (pattern.shape[1] - 1) * S + span - P[0]  # first index past the last window
        # the remainder counts the (padded) positions past the last window
        assert PatternSpec(I, K, S, P, D).remainder == I + P[1] - reach, (I, K, S, P, D)
        assert not pattern[max(reach, 0):].any()
        if 0 < reach <= I:  # the last window's last element touches pixel reach - 1
            assert pattern[reach - 1, -1, -1] == 1


def test_caching_and_dtype():
    first = index_pattern(7, 3, 2, (1, 0), 1, dtype=DTYPE)
    assert first.dtype == DTYPE and first.device == torch.device("cpu")
    assert index_pattern(7, 3, 2, (1, 0), 1, dtype=DTYPE) is first
    assert index_pattern(7, 3, 2, (1, 0), 1, device="cpu", dtype=DTYPE) is first
    single = index_pattern(7, 3, 2, (1, 0), 1, dtype=torch.float32)
    assert single.dtype == torch.float32 and single is not first
    assert torch.equal(single.double(), first)
    assert index_pattern(7, 3, 2, (1, 1), 1, dtype=DTYPE) is not first
    half = index_pattern(7, 3, 2, (1, 0), 1, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    averaged = averaged_index_pattern(7, 3, 2, over="output", dtype=DTYPE)
    assert averaged_index_pattern(7, 3, 2, over="output", dtype=DTYPE) is averaged


@pytest.mark.parametrize("channels,groups", [(6, 1), (6, 2), (6, 3), (6, 6), (4, 4), (1, 1)])
def test_group_membership(channels, groups):
    member = group_membership(channels, groups, dtype=DTYPE)
    expected = torch.zeros(channels, groups, dtype=DTYPE)
    per_group = channels // groups
    for c in range(channels):
        expected[c, c // per_group] = 1
    assert torch.equal(member, expected)
    assert group_membership(channels, groups, dtype=DTYPE) is member
    assert group_membership(channels, groups, dtype=torch.float32).dtype == torch.float32
