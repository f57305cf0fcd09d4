"""The rewrites of curvlib.simplify on networks built by curvlib.expressions from random data.

For every rewrite: (1) it fires where its preconditions hold — checked on the network's structure
(patterns dropped, pattern spec or legs changed) — (2) the contraction is unchanged up to
round-off, and (3) it returns the very same network object where its preconditions fail.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from curvlib import simplify as S
from curvlib.contract import contract
from curvlib.expressions import convolution, ggn, hesscale, kfac, unfold, weight
from curvlib.hyperparams import make_geometry
from curvlib.patterns import PatternSpec
from curvlib.tensor_network import Operand, TensorNetwork
from conftest import DTYPE, assert_close

KINDS = ("conv", "input_vjp", "weight_vjp", "kfc", "kfac_reduce", "ggn_diag", "ggn_blocks", "gram",
         "hesscale_weight", "hesscale_input", "unfold", "unfold_vjp", "unfold_kernel")


def geometry(size, kernel, stride=1, padding=0, dilation=1, groups=1, c_in=2, c_out=3, **kwargs):
    return make_geometry(c_in, c_out, size, kernel, stride, padding, dilation, groups, **kwargs)


def build(kind: str, geo, batch: int = 2, columns: int = 2) -> TensorNetwork:
    """A network of the given kind with random float64 data for the layer ``geo``."""
    x = torch.randn(batch, geo.layer_input_channels, *geo.layer_input_size, dtype=DTYPE)
    out = torch.randn(batch, geo.layer_output_channels, *geo.layer_output_size, dtype=DTYPE)
    w = torch.randn(geo.weight_shape, dtype=DTYPE)
    s = torch.randn(columns, *out.shape, dtype=DTYPE)
    i_side, o_side = (out, x) if geo.transposed else (x, out)
    if kind == "conv":
        return convolution.propagate(i_side, w, geo, "i")
    if kind == "input_vjp":
        return convolution.propagate(o_side, w, geo, "o")
    if kind == "weight_vjp":
        return weight.weight_vjp(i_side, o_side, geo)
    if kind == "kfc":
        return kfac.kfc(x, geo)
    if kind == "kfac_reduce":
        return kfac.kfac_reduce(x, geo)
    if kind == "ggn_diag":
        return ggn.ggn_blocks(x, s, geo, geo.weight_shape)
    if kind == "ggn_blocks":
        return ggn.ggn_blocks(x, s, geo, (1,) * len(geo.weight_shape))
    if kind == "gram":
        return ggn.ggn_gram(x, s, geo)
    if kind == "hesscale_weight":
        return hesscale.weight_diag(x, out, geo)
    if kind == "hesscale_input":
        return hesscale.input_diag(w, out, geo)
    assert not geo.transposed
    if kind == "unfold":
        return unfold.unfold(x, geo)
    if kind == "unfold_vjp":
        unfolded = contract(unfold.unfold(x, geo))
        return unfold.unfold_vjp(torch.randn_like(unfolded), geo, x.shape[1])
    if kind == "unfold_kernel":
        return unfold.unfold_kernel(w, geo)
    raise ValueError(kind)


def pattern_positions(network):
    return [pos for pos, op in enumerate(network.operands) if op.pattern is not None]


def assert_same_value(rewritten, network, name):
    assert_close(contract(rewritten), contract(network), name=name)


DENSE = geometry((6, 4), 2, stride=2)  # K = S: T1
DOWNSAMPLE = geometry((7, 5), (2, 1), stride=3, padding=(1, 0))  # S > K, trailing pixels: T2
POINTWISE = geometry((4, 3), 1, groups=1)  # K = S = 1
OVERLAP = geometry((6, 5), 3, padding=1, groups=2, c_in=4, c_out=4)  # overlapping windows: patterns stay
TRANSPOSED_DENSE = geometry((3, 2), 2, stride=2, transposed=True)


# ----------------------------------------------------------------------------------------------
# unfold_input_leg (T1, T2, averaged patterns)


UNFOLD_CASES = [
    pytest.param(kind, geo, id=f"{kind}-{name}")
    for name, geo in (("dense", DENSE), ("downsample", DOWNSAMPLE), ("transposed", TRANSPOSED_DENSE))
    for kind in ("conv", "weight_vjp", "kfc", "kfac_reduce", "ggn_diag", "gram", "hesscale_weight")
    if not (kind == "kfac_reduce" and geo.transposed)  # averaged over the input leg: see the preconditions test
]


@pytest.mark.parametrize("kind,geo", UNFOLD_CASES)
def test_unfold_input_leg(kind, geo, seed):
    network = build(kind, geo)
    positions = pattern_positions(network)
    rewritten = network
    fired = 0
    while True:
        candidates = [p for p in pattern_positions(rewritten)
                      if rewritten.operands[p].legs[0] not in rewritten.output]
        changed = [S.unfold_input_leg(rewritten, p) for p in candidates]
        changed = [c for c in changed if c is not rewritten]
        if not changed:
            break
        assert changed[0].num_patterns == rewritten.num_patterns - 1
        rewritten = changed[0]
        fired += 1
        assert_same_value(rewritten, network, f"{kind} after {fired} unfold_input_leg")
    if kind in ("kfc", "hesscale_weight") and geo.transposed:
        # the layer input lives on the o side; both copies' patterns share the i legs (the layer's
        # output locations), which no single data operand carries: no view
        assert fired == 0
        assert all(len(network.users(network.operands[p].legs[0])) > 2 for p in positions) or kind == "kfc"
    else:
        assert fired == len(positions), f"{kind}: {fired} of {len(positions)} patterns unfolded"
        assert rewritten.num_patterns == 0
    if kind == "kfac_reduce":
        o_sizes = [network.operands[p].pattern.output_size for p in positions]
        expected_scale = network.scale
        for size in o_sizes:
            expected_scale /= size
        assert rewritten.scale == pytest.approx(expected_scale)


def test_unfold_input_leg_preconditions(seed):
    overlap = build("kfc", OVERLAP)
    for position in range(len(overlap.operands)):  # data operands and overlapping patterns
        assert S.unfold_input_leg(overlap, position) is overlap
    # the input leg is an output leg (input VJP, fold): not a view, embed_output_leg's job
    vjp = build("input_vjp", DENSE)
    for position in pattern_positions(vjp):
        assert S.unfold_input_leg(vjp, position) is vjp
    # a modified pattern (T4 applied) is not unfolded
    strided = S.stride_as_subsampling(build("kfc", DENSE), pattern_positions(build("kfc", DENSE))[0])
    assert S.unfold_input_leg(strided, pattern_positions(strided)[0]) is strided
    # averaged over the input leg (KFAC-reduce of a transposed layer)
    reduce_t = build("kfac_reduce", TRANSPOSED_DENSE)
    for position in pattern_positions(reduce_t):
        assert reduce_t.operands[position].pattern.mean_over == "input"
        assert S.unfold_input_leg(reduce_t, position) is reduce_t


def test_unfold_input_leg_allow_overlap(seed):
    network = build("kfc", OVERLAP)
    rewritten = network
    for _ in range(network.num_patterns):
        rewritten = S.unfold_input_leg(rewritten, pattern_positions(rewritten)[0], allow_overlap=True)
    assert rewritten.num_patterns == 0
    assert_same_value(rewritten, network, "kfc with overlapping windows viewed")


# ----------------------------------------------------------------------------------------------
# embed_output_leg


@pytest.mark.parametrize("geo", [DENSE, DOWNSAMPLE], ids=["dense", "downsample"])
@pytest.mark.parametrize("kind", ["input_vjp", "unfold_vjp"])
def test_embed_output_leg(geo, kind, seed):
    network = build(kind, geo)
    rewritten = network
    for count in range(1, network.num_patterns + 1):
        position = pattern_positions(rewritten)[0]
        i, o, k = rewritten.operands[position].legs
        assert i in rewritten.output
        new = S.embed_output_leg(rewritten, position)
        assert new is not rewritten and new.num_patterns == rewritten.num_patterns - 1
        assert len(new.embeddings) == count and new.embeddings[-1].input_leg == i
        assert i not in new.output and new.output.index(k) == new.output.index(o) + 1
        rewritten = new
        assert_same_value(rewritten, network, f"{kind} after {count} embed_output_leg")


@pytest.mark.parametrize("padding", [(2, 0), (0, 1), (1, 2)])
def test_embed_output_leg_asymmetric_padding(padding, seed):
    """Scatter with unequal left/right padding (not reachable from the layers, where non-overlapping
    windows have symmetric padding): v[n, o, k] → out[n, i] with i = o·S + k − P_left."""
    spec = PatternSpec(7, 2, 3, padding, 1)
    v = torch.randn(2, spec.output_size, 2, dtype=DTYPE)
    network = TensorNetwork(
        operands=(Operand(("i", "o", "k"), pattern=spec), Operand(("n", "o", "k"), tensor=v)),
        output=("n", "i"), sizes={"n": 2, "i": 7, "o": spec.output_size, "k": 2}, output_shape=(2, 7),
        device=torch.device("cpu"), dtype=DTYPE,
    )
    embedded = S.embed_output_leg(network, 0)
    assert embedded.num_patterns == 0 and len(embedded.embeddings) == 1
    expected = torch.zeros(2, 7, dtype=DTYPE)
    for o in range(spec.output_size):
        for k in range(2):
            i = o * 3 + k - padding[0]
            if 0 <= i < 7:
                expected[:, i] += v[:, o, k]
    assert_close(contract(embedded), expected, name=f"scatter with padding {padding}")
    assert_close(contract(network), expected, name=f"pattern with padding {padding}")


def test_embed_output_leg_preconditions(seed):
    overlap = build("input_vjp", OVERLAP)
    for position in range(len(overlap.operands)):
        assert S.embed_output_leg(overlap, position) is overlap
    # the output leg o is itself an output leg (Toeplitz matrix of the kernel): no scatter
    toeplitz = build("unfold_kernel", DENSE)
    for position in range(len(toeplitz.operands)):
        assert S.embed_output_leg(toeplitz, position) is toeplitz
    conv = build("conv", DENSE)  # input legs are summed, not output legs
    for position in range(len(conv.operands)):
        assert S.embed_output_leg(conv, position) is conv
    # the input leg is shared by two patterns (HesScale input diagonal): no scatter
    shared = build("hesscale_input", DENSE)
    for position in pattern_positions(shared):
        assert S.embed_output_leg(shared, position) is shared


# ----------------------------------------------------------------------------------------------
# prune_identities, squeeze_legs, merge_parallel_legs


@pytest.mark.parametrize("kind", ["conv", "weight_vjp", "hesscale_input", "ggn_blocks"])
def test_squeeze_then_prune_point_wise(kind, seed):
    network = build(kind, POINTWISE)
    assert S.prune_identities(network) is network  # size-1 kernel legs are still used elsewhere
    squeezed = S.squeeze_legs(network)
    assert squeezed is not network
    assert all(squeezed.sizes[leg] > 1 for op in squeezed.operands if not op.delta for leg in op.legs)
    assert squeezed.num_patterns == network.num_patterns
    assert_same_value(squeezed, network, f"{kind} squeezed")
    pruned = S.prune_identities(squeezed)
    assert pruned.num_patterns == 0, pruned
    assert_same_value(pruned, network, f"{kind} squeezed and pruned")


def test_prune_deltas(seed):
    a, b = torch.randn(3, 4, dtype=DTYPE), torch.randn(4, 5, dtype=DTYPE)
    network = TensorNetwork(
        operands=(Operand(("i", "j"), tensor=a), Operand(("j", "k"), delta=True), Operand(("k", "l"), tensor=b)),
        output=("i", "l"), sizes={"i": 3, "j": 4, "k": 4, "l": 5}, output_shape=(3, 5),
        device=torch.device("cpu"), dtype=DTYPE,
    )
    pruned = S.prune_identities(network)
    assert len(pruned.operands) == 2 and not any(op.delta for op in pruned.operands)
    assert_close(contract(pruned), a @ b, name="delta pruned")
    assert_close(contract(network), a @ b, name="delta contracted")
    # a delta between two output legs stays
    keep = replace(network, output=("i", "j", "k", "l"), output_shape=(3, 4, 4, 5))
    assert S.prune_identities(keep) is keep


@pytest.mark.parametrize("spec", [PatternSpec(4, 1, 1, (1, 1)), PatternSpec(5, 1, 2), PatternSpec(4, 2, 1)],
                         ids=["padded", "strided", "kernel2"])
def test_prune_keeps_non_identity_patterns(spec, seed):
    x = torch.randn(3, spec.input_size, dtype=DTYPE)
    network = TensorNetwork(
        operands=(Operand(("n", "i"), tensor=x), Operand(("i", "o", "k"), pattern=spec)),
        output=("n", "o"), sizes={"n": 3, "i": spec.input_size, "o": spec.output_size, "k": spec.kernel_size},
        output_shape=(3, spec.output_size), device=torch.device("cpu"), dtype=DTYPE,
    )
    assert S.prune_identities(network) is network
    # the same network with the identity pattern Π(I, 1, 1, 0, 1) instead is pruned
    identity = TensorNetwork(
        operands=(Operand(("n", "i"), tensor=x), Operand(("i", "o", "k"), pattern=PatternSpec(spec.input_size, 1))),
        output=("n", "o"), sizes={"n": 3, "i": spec.input_size, "o": spec.input_size, "k": 1},
        output_shape=(3, spec.input_size), device=torch.device("cpu"), dtype=DTYPE,
    )
    pruned = S.prune_identities(identity)
    assert pruned.num_patterns == 0
    assert_close(contract(pruned), x, name="identity pattern pruned")


def test_squeeze_legs_no_size_one(seed):
    network = build("kfc", OVERLAP, batch=2)
    assert all(size > 1 for size in network.sizes.values())
    assert S.squeeze_legs(network) is network


def test_merge_parallel_legs(seed):
    network = build("unfold", OVERLAP)  # n c i0 i1, i0 o0 k0, i1 o1 k1 -> n c k0 k1 o0 o1
    merged = S.merge_parallel_legs(network)
    assert merged is not network
    legs = {leg for op in merged.operands for leg in op.legs}
    assert len(legs) < len({leg for op in network.operands for leg in op.legs})
    assert "c" not in legs and merged.sizes["n"] == network.sizes["n"] * network.sizes["c"]
    assert_same_value(merged, network, "unfold with n, c merged")
    assert S.merge_parallel_legs(merged) is merged  # nothing left to merge


def test_merge_parallel_legs_preconditions(seed):
    # n and c are not adjacent in the output of a weight VJP: nothing to merge
    network = build("weight_vjp", OVERLAP)
    assert S.merge_parallel_legs(network) is network
    # data that does not allow a view: merging would copy, so it is not done
    x = torch.randn(3, 2, 5, 6, dtype=DTYPE).transpose(0, 1)
    strided = unfold.unfold(x, geometry((5, 6), 3, c_in=3, c_out=3))
    assert not strided.operands[0].tensor.is_contiguous()
    assert S.merge_parallel_legs(strided) is strided


def test_merge_parallel_legs_keeps_deltas_whole(seed):
    """Legs joined by a delta are adjacent everywhere but must not be merged (regression)."""
    x = torch.randn(2, 3, 3, dtype=DTYPE)
    network = TensorNetwork(
        operands=(Operand(("n", "p", "q"), tensor=x), Operand(("p", "q"), delta=True)),
        output=("n",), sizes={"n": 2, "p": 3, "q": 3}, output_shape=(2,), device=torch.device("cpu"), dtype=DTYPE,
    )
    assert S.merge_parallel_legs(network) is network
    assert_close(contract(network), torch.einsum("npp->n", x), name="trace through a delta")
    # both delta legs in the output: the pipeline keeps the delta and the result is x ⊙ identity
    kept = replace(network, output=("n", "p", "q"), output_shape=(2, 3, 3))
    simplified = S.simplify(kept)
    assert any(op.delta for op in simplified.operands)
    assert_close(contract(simplified), x * torch.eye(3, dtype=DTYPE), name="delta between output legs")


# ----------------------------------------------------------------------------------------------
# T3 - T6


def _apply_everywhere(rewrite, network):
    rewritten = network
    for position in pattern_positions(network):
        rewritten = rewrite(rewritten, position)
    return rewritten


T_GEOMETRIES = {
    "strided-dilated": geometry((7, 8), (3, 2), stride=(2, 1), dilation=(1, 2), padding=(0, 1)),  # D14 holds
    "asymmetric-same": geometry((5, 6), (4, 2), padding="same"),
    "grouped": geometry((6, 5), (2, 3), stride=(2, 1), groups=2, c_in=4, c_out=2),
}


@pytest.mark.parametrize("geo", list(T_GEOMETRIES.values()), ids=list(T_GEOMETRIES))
@pytest.mark.parametrize("kind", ["conv", "input_vjp", "kfc", "ggn_diag", "hesscale_input", "unfold_vjp"])
def test_swap_kernel_output(geo, kind, seed):
    network = build(kind, geo)
    rewritten = network
    swapped = 0
    for position in pattern_positions(network):
        spec = network.operands[position].pattern
        new = S.swap_kernel_output(rewritten, position)
        if spec.remainder != 0:
            assert new is rewritten, "T3 needs D14"
            continue
        i, o, k = network.operands[position].legs
        assert new.operands[position].legs == (i, k, o)
        assert new.operands[position].pattern == PatternSpec(spec.input_size, spec.output_size, spec.dilation,
                                                             spec.padding, spec.stride)
        rewritten, swapped = new, swapped + 1
    assert swapped > 0 or all(network.operands[p].pattern.remainder for p in pattern_positions(network))
    assert_same_value(rewritten, network, f"{kind} after T3")


def test_swap_kernel_output_fires_and_refuses(seed):
    network = build("conv", T_GEOMETRIES["strided-dilated"])
    assert all(network.operands[p].pattern.remainder == 0 for p in pattern_positions(network))
    assert _apply_everywhere(S.swap_kernel_output, network).num_patterns == network.num_patterns
    remainder = build("conv", DOWNSAMPLE)
    for position in pattern_positions(remainder):
        if remainder.operands[position].pattern.remainder:
            assert S.swap_kernel_output(remainder, position) is remainder
    data = [p for p, op in enumerate(network.operands) if op.pattern is None][0]
    assert S.swap_kernel_output(network, data) is network


@pytest.mark.parametrize("geo", list(T_GEOMETRIES.values()) + [DOWNSAMPLE], ids=list(T_GEOMETRIES) + ["downsample"])
@pytest.mark.parametrize("kind", ["conv", "input_vjp", "weight_vjp", "kfc", "ggn_blocks", "gram", "hesscale_input"])
def test_stride_and_dilation_as_subsampling(geo, kind, seed):
    network = build(kind, geo)
    for rewrite, attribute in ((S.stride_as_subsampling, "stride"), (S.dilation_as_subsampling, "dilation")):
        rewritten = _apply_everywhere(rewrite, network)
        for position in pattern_positions(network):
            before, after = network.operands[position].pattern, rewritten.operands[position].pattern
            assert getattr(after, attribute) == 1
            if attribute == "stride":
                assert after.output_step == before.stride and after.output_size == before.output_size
            else:
                assert after.kernel_step == before.dilation and after.kernel_legs == before.kernel_size
                assert after.kernel_size == before.dilation * (before.kernel_size - 1) + 1
            if getattr(before, attribute) > 1:
                assert after != before
        assert_same_value(rewritten, network, f"{kind} after {rewrite.__name__}")
        # the rewritten patterns are no longer plain: neither rewrite applies again, nor do T3 / T6
        strided = [p for p in pattern_positions(network) if getattr(network.operands[p].pattern, attribute) > 1]
        for position in strided:
            for other in (S.stride_as_subsampling, S.dilation_as_subsampling, S.swap_kernel_output,
                          S.transpose_as_convolution):
                assert other(rewritten, position) is rewritten


def test_stride_as_subsampling_fires(seed):
    network = build("ggn_diag", DOWNSAMPLE)
    rewritten = _apply_everywhere(S.stride_as_subsampling, network)
    specs = [(network.operands[p].pattern, rewritten.operands[p].pattern) for p in pattern_positions(network)]
    assert all(b.stride == 3 and a.stride == 1 and a.output_step == 3 for b, a in specs)
    assert_same_value(rewritten, network, "ggn_diag after T4")


def test_dilation_as_subsampling_fires(seed):
    network = build("kfc", T_GEOMETRIES["strided-dilated"])
    rewritten = _apply_everywhere(S.dilation_as_subsampling, network)
    dilated = [p for p in pattern_positions(network) if network.operands[p].pattern.dilation == 2]
    assert dilated and all(rewritten.operands[p].pattern.kernel_step == 2 for p in dilated)
    assert_same_value(rewritten, network, "kfc after T5")


T6_GEOMETRIES = {
    "padded": geometry((6, 5), (3, 2), padding=(1, 0)),
    "asymmetric-same": geometry((5, 6), (4, 3), padding="same"),
    "full-padding": geometry((4, 3), 3, padding=2),
    "transposed": geometry((3, 4), (2, 3), padding=(1, 0), transposed=True),
}


@pytest.mark.parametrize("geo", list(T6_GEOMETRIES.values()), ids=list(T6_GEOMETRIES))
@pytest.mark.parametrize("kind,absorbed", [("conv", True), ("input_vjp", True), ("weight_vjp", False),
                                           ("kfc", False), ("hesscale_input", True), ("ggn_diag", False)])
def test_transpose_as_convolution(geo, kind, absorbed, seed):
    network = build(kind, geo)
    rewritten = network
    for position in pattern_positions(network):
        spec = rewritten.operands[position].pattern
        i, o, k = rewritten.operands[position].legs
        new = S.transpose_as_convolution(rewritten, position)
        assert new is not rewritten
        after = new.operands[position]
        assert after.legs == (o, i, k)
        assert after.pattern.input_size == spec.output_size and after.pattern.output_size == spec.input_size
        assert after.pattern.padding == tuple(spec.kernel_size - 1 - p for p in spec.padding)
        assert after.pattern.flip_kernel == (not absorbed)
        if absorbed:  # the one data operand with the kernel leg was flipped instead
            carrier = [p for p in new.users(k) if p != position]
            assert len(carrier) == 1
            old_tensor = rewritten.operands[carrier[0]].tensor
            axis = new.operands[carrier[0]].legs.index(k)
            assert torch.equal(new.operands[carrier[0]].tensor, old_tensor.flip(axis))
        rewritten = new
        assert_same_value(rewritten, network, f"{kind} after T6 on {position}")


@pytest.mark.parametrize("geo", [geometry((7, 6), 3, stride=(2, 1), padding=(1, 1)),
                                 geometry((7, 6), 3, dilation=(2, 1), padding=(1, 1)),
                                 geometry((7, 6), 2, padding=(2, 0))],
                         ids=["strided", "dilated", "padding-past-kernel"])
def test_transpose_as_convolution_preconditions(geo, seed):
    network = build("conv", geo)
    refused = [p for p in pattern_positions(network) if S.transpose_as_convolution(network, p) is network]
    assert len(refused) == 1  # only the offending dimension
    spec = network.operands[refused[0]].pattern
    assert spec.stride > 1 or spec.dilation > 1 or max(spec.padding) > spec.kernel_size - 1
    data = [p for p, op in enumerate(network.operands) if op.pattern is None][0]
    assert S.transpose_as_convolution(network, data) is network


# ----------------------------------------------------------------------------------------------
# the pipeline


PIPELINE = {
    "dense": (DENSE, 0),
    "downsample": (DOWNSAMPLE, 0),
    "pointwise": (POINTWISE, 0),
    "mixed-dense": (geometry((5, 6), (1, 3), stride=(1, 3)), 0),
    "overlap": (OVERLAP, None),
    "transposed-dense": (TRANSPOSED_DENSE, 0),
}
PIPELINE_KINDS = {"conv", "input_vjp", "weight_vjp", "kfc", "kfac_reduce", "ggn_diag", "ggn_blocks", "gram",
                  "hesscale_weight", "hesscale_input", "unfold", "unfold_vjp", "unfold_kernel"}


@pytest.mark.parametrize("name,kind", [
    (name, kind) for name in PIPELINE for kind in sorted(PIPELINE_KINDS)
    if not (PIPELINE[name][0].transposed and kind.startswith("unfold"))  # no transposed unfold
])
def test_pipeline(name, kind, seed):
    geo, remaining = PIPELINE[name]
    network = build(kind, geo)
    simplified = S.simplify(network)
    assert_same_value(simplified, network, f"simplify({kind}, {name})")
    if remaining == 0:
        # (HesScale's two pattern copies share two legs and are merged first, so they vanish too)
        stays = kind in ("kfc", "kfac_reduce") and geo.transposed  # i legs shared by two patterns
        stays |= kind == "kfac_reduce"  # averaged patterns are kept by default (cheaper than the view)
        stays |= kind == "unfold_kernel" and name != "pointwise"  # i and o are both output legs
        if kind == "unfold_kernel" and name == "pointwise":
            # identity patterns between two output legs are the Toeplitz matrix' identity blocks
            assert all(len(op.legs) == 2 for op in simplified.operands if op.pattern is not None)
            stays = True
        if stays:
            assert simplified.num_patterns > 0
        else:
            assert simplified.num_patterns == 0, simplified
    elif kind.startswith("hesscale"):
        # overlapping windows keep their patterns, but HesScale's two copies merge into one
        assert simplified.num_patterns == network.num_patterns // 2
    else:
        assert simplified.num_patterns == network.num_patterns  # overlapping windows keep their patterns
    assert S.simplify(simplified).named_equation == simplified.named_equation


def test_pipeline_leaves_irreducible_network_alone(seed):
    network = build("kfc", OVERLAP)
    assert S.simplify(network) is network


# --------------------------------------------------------------------------------------------
# merge_duplicate_patterns: two copies of one pattern sharing two legs


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("which", ["input_diag", "weight_diag"])
def test_merge_duplicate_patterns_hesscale(seed, transposed, which):
    from curvlib.contract import contract
    from curvlib.expressions import hesscale
    from curvlib.hyperparams import make_geometry
    from curvlib.simplify import merge_duplicate_patterns

    g = torch.Generator().manual_seed(seed)
    geometry = make_geometry(4, 6, (7, 6), kernel_size=(3, 2), stride=(2, 1), padding=1, dilation=(1, 2), groups=2,
                             transposed=transposed, output_padding=(1, 0) if transposed else 0)
    weight = torch.randn(*geometry.weight_shape, generator=g, dtype=torch.float64)
    d = torch.rand(3, geometry.layer_output_channels, *geometry.layer_output_size, generator=g, dtype=torch.float64)
    if which == "input_diag":
        network = hesscale.input_diag(weight, d, geometry)
    else:
        x = torch.randn(3, geometry.layer_input_channels, *geometry.layer_input_size, generator=g, dtype=torch.float64)
        network = hesscale.weight_diag(x, d, geometry)
    merged = merge_duplicate_patterns(network)
    assert merged.num_patterns == network.num_patterns // 2  # one copy of each spatial pattern dropped
    reference = contract(network)
    assert torch.allclose(contract(merged), reference, rtol=1e-10, atol=1e-12 * reference.abs().max())


def test_merge_duplicate_patterns_keeps_distinct_output_legs(seed):
    """Full GGN: both kernel legs are output legs, the copies share no two legs: nothing to merge."""
    from curvlib.expressions import ggn
    from curvlib.hyperparams import make_geometry
    from curvlib.simplify import merge_duplicate_patterns

    geometry = make_geometry(2, 2, (5, 5), kernel_size=3)
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    s = torch.randn(3, 2, 2, 3, 3, dtype=torch.float64)
    network = ggn.ggn_blocks(x, s, geometry, (1, 1, 1, 1))
    assert merge_duplicate_patterns(network) is network
