"""Exact GGN extensions, per-sample gradients and Monte-Carlo diagonals against independent references.

Models (tests/test_engine_references.py): a sequential CNN (conv, ReLU, max-pool, grouped strided
conv, flatten, linear), residual networks with BatchNorm in train (samples coupled) and eval mode
and a 1×1 conv applied twice, a network of Conv1d/Conv3d/depthwise Conv2d/ConvTranspose2d with
output_padding, a Linear applied twice, and Linear layers on ``[N, T, D]`` inputs.

References: ``GGN = Jᵀ H J`` with ``J`` = jacrev of the network output w.r.t. each parameter and
``H`` = torch.func.hessian of the loss w.r.t. the output (torch.func on a copy whose train-mode
BatchNorms do not track statistics); per-sample gradients by vmap(grad).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from conftest import assert_close
from curvlib.extensions import (
    BatchDiagGGNExact,
    BatchDiagGGNMC,
    BatchGrad,
    DiagGGNExact,
    DiagGGNMC,
    GGNGram,
    GGNMiniBlock,
)
from test_engine_references import (
    DT,
    MODELS,
    GGNReference,
    make_loss,
    make_model,
    mini_blocks,
    per_sample_gradients,
    run_engine,
)

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")

RTOL = 1e-9


@pytest.fixture(autouse=True)
def _seeded(seed):
    return seed


def setup(model_name: str, loss_kind: str):
    model, X = make_model(model_name)
    reference_model = copy.deepcopy(model)  # before the engine's forward pass touches BN statistics
    with torch.no_grad():
        out_shape = copy.deepcopy(model)(X).shape
    loss_fn, y = make_loss(loss_kind, out_shape)
    return model, X, loss_fn, y, reference_model


def compare(actual, expected, scale, name):
    """``actual ≈ expected`` up to round-off relative to the model-wide ``scale``.

    Parameters whose GGN vanishes (a bias followed by train-mode BatchNorm) are compared with the
    model-wide tolerance; the scale itself is checked to be non-zero by the callers.
    """
    assert_close(actual, expected, rtol=RTOL, atol=RTOL * scale, name=name, allow_zero=True)


def model_scale(values) -> float:
    scale = max(v.abs().max().item() for v in values)
    assert scale > 0, "all reference values vanish: the comparison would be vacuous"
    return scale


# ----------------------------------------------------------------------------------------------
# GGN diagonal, per-sample diagonal, full mini-block and Gram on every model


EXACT_CASES = [
    ("cnn", "ce"),
    ("cnn", "mse_sum"),
    ("cnn", "bce"),
    ("residual_train", "ce"),
    ("residual_train", "mse"),
    ("residual_eval", "ce_prob"),
    ("residual_eval", "bce_sum"),
    ("resbn_train", "ce"),
    ("resbn_eval", "ce"),
    ("mixed_conv", "ce"),
    ("mixed_conv", "mse"),
    ("shared", "ce"),
    ("shared", "bce"),
    ("sequence", "ce_sum"),
    ("sequence", "mse"),
    ("sequence_output", "mse"),
    ("sequence_output", "bce_sum"),
]


@pytest.mark.parametrize("model_name,loss_kind", EXACT_CASES, ids=[f"{m}-{l}" for m, l in EXACT_CASES])
def test_exact_ggn_quantities(model_name, loss_kind):
    model, X, loss_fn, y, reference_model = setup(model_name, loss_kind)
    gram = GGNGram()
    run_engine(model, loss_fn, X, y, DiagGGNExact(), BatchDiagGGNExact(), GGNMiniBlock("full"), gram)
    ref = GGNReference(reference_model, loss_fn, X, y)
    params = dict(model.named_parameters())
    assert set(params) == set(ref.J)
    scale = model_scale(ref.diag(name) for name in params)  # also bounds the off-diagonal GGN entries
    grams = {name: ref.gram(name) for name in params}
    gram_scale = model_scale(grams.values())
    N = X.shape[0]
    for name, p in params.items():
        compare(p.diag_ggn_exact, ref.diag(name), scale, f"{name}.diag_ggn_exact")
        compare(p.diag_ggn_exact_batch, ref.diag_batch(name), scale, f"{name}.diag_ggn_exact_batch")
        compare(p.diag_ggn_exact_batch.sum(0), p.diag_ggn_exact, scale, f"{name}: per-sample sum")
        block = ref.block(name)
        assert p.ggn_mini_block.shape == (*([1] * p.dim()), p.numel(), p.numel())
        compare(p.ggn_mini_block.reshape(block.shape), block, scale, f"{name}.ggn_mini_block")
        C = math.prod(ref.out.shape[1:])
        assert p.ggn_gram.shape == (C, N, C, N)
        compare(p.ggn_gram, grams[name], gram_scale, f"{name}.ggn_gram")
    total_gram = sum(grams.values())
    compare(gram.gram, total_gram, total_gram.abs().max().item(), "network gram")


@pytest.mark.parametrize("model_name", ["cnn", "residual_train", "shared"])
def test_network_gram_spectrum_is_the_ggn_spectrum(model_name):
    """The non-zero eigenvalues of the network Gram matrix are those of the full GGN (cross-parameter blocks included)."""
    model, X, loss_fn, y, reference_model = setup(model_name, "ce")
    gram = GGNGram()
    run_engine(model, loss_fn, X, y, gram)
    ref = GGNReference(reference_model, loss_fn, X, y)
    G = gram.gram.reshape(3 * X.shape[0], -1)
    assert_close(G, G.T, name="symmetry")
    gram_eigs = torch.linalg.eigvalsh(G).flip(0)
    ggn_eigs = torch.linalg.eigvalsh(ref.full()).flip(0)[: G.shape[0]]
    assert_close(gram_eigs, ggn_eigs, rtol=1e-8, atol=1e-10 * ggn_eigs.max().item(), name="eigenvalues")


def test_gram_of_mse_sum_is_twice_the_ntk():
    """Documented: for MSELoss(reduction='sum') the Gram matrix is 2·J Jᵀ (the empirical NTK)."""
    model, X, loss_fn, y, reference_model = setup("mixed_conv", "mse_sum")
    gram = GGNGram()
    run_engine(model, loss_fn, X, y, gram)
    ref = GGNReference(reference_model, loss_fn, X, y)
    J = torch.cat([ref.J[name] for name in ref.J], 1).reshape(X.shape[0], 3, -1)  # [N, K, P]
    ntk = torch.einsum("nkp,mlp->knlm", J, J)
    compare(gram.gram, 2 * ntk, ntk.abs().max().item(), "2·NTK")


def test_gram_is_reset_between_backward_passes():
    model, X, loss_fn, y, reference_model = setup("shared", "ce")
    gram = GGNGram()
    run_engine(model, loss_fn, X, y, gram)
    first = gram.gram.clone()
    run_engine(model, loss_fn, X, y, gram)
    compare(gram.gram, first, first.abs().max().item(), "second pass (not accumulated)")


# ----------------------------------------------------------------------------------------------
# mini-blocks: presets and a callable


def _callable_blocks(name, param):
    return tuple(2 if size % 2 == 0 else 1 for size in param.shape)


PRESETS = {
    "full": lambda shape: (1,) * len(shape),
    "output": lambda shape: (shape[0],) + (1,) * (len(shape) - 1),
    "diagonal": lambda shape: tuple(shape),
    "callable": lambda shape: tuple(2 if size % 2 == 0 else 1 for size in shape),
}


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("model_name", ["cnn", "resbn_train", "mixed_conv", "shared"])
def test_mini_block_presets(model_name, preset):
    model, X, loss_fn, y, reference_model = setup(model_name, "ce")
    blocks = _callable_blocks if preset == "callable" else preset
    run_engine(model, loss_fn, X, y, GGNMiniBlock(blocks))
    ref = GGNReference(reference_model, loss_fn, X, y)
    scale = model_scale(ref.diag(name) for name in ref.J)
    for name, p in model.named_parameters():
        cut = PRESETS[preset](tuple(p.shape))
        expected = mini_blocks(ref.block(name), tuple(p.shape), cut)
        compare(p.ggn_mini_block, expected, scale, f"{name}.ggn_mini_block[{preset}]")
        if preset == "diagonal":
            compare(p.ggn_mini_block.reshape(p.shape), ref.diag(name), scale, f"{name}: diagonal preset")


def test_mini_block_bad_blocks_raise():
    model, X, loss_fn, y, _ = setup("cnn", "ce")
    with pytest.raises(ValueError, match="one divisor per axis"):
        run_engine(model, loss_fn, X, y, GGNMiniBlock(lambda name, p: (3,) * p.dim()))
    with pytest.raises(ValueError, match="blocks must be one of"):
        GGNMiniBlock("rows")


# ----------------------------------------------------------------------------------------------
# per-sample gradients


@pytest.mark.parametrize(
    "model_name,loss_kind",
    [
        ("cnn", "ce"), ("residual_eval", "mse"), ("resbn_eval", "ce_sum"), ("mixed_conv", "bce"), ("shared", "ce_prob"),
        ("sequence", "mse_sum"), ("sequence_output", "mse"),
    ],
)
def test_batch_grad_matches_vmap_grad(model_name, loss_kind):
    model, X, loss_fn, y, reference_model = setup(model_name, loss_kind)
    run_engine(model, loss_fn, X, y, BatchGrad())
    expected = per_sample_gradients(reference_model, loss_fn, X, y)
    scale = model_scale(expected.values())
    for name, p in model.named_parameters():
        assert p.grad_batch.shape == (X.shape[0], *p.shape)
        compare(p.grad_batch, expected[name], scale, f"{name}.grad_batch")
        compare(p.grad_batch.sum(0), p.grad, scale, f"{name}: grad_batch sums to grad")


@pytest.mark.parametrize("model_name", ["residual_train", "resbn_train"])
def test_batch_grad_sums_to_grad_in_train_mode(model_name):
    model, X, loss_fn, y, _ = setup(model_name, "ce")
    run_engine(model, loss_fn, X, y, BatchGrad())
    scale = model_scale(p.grad for p in model.parameters())
    for name, p in model.named_parameters():
        assert p.grad_batch.shape == (X.shape[0], *p.shape)
        compare(p.grad_batch.sum(0), p.grad, scale, f"{name}: grad_batch sums to grad")


# ----------------------------------------------------------------------------------------------
# Monte-Carlo diagonals


@pytest.mark.parametrize("model_name", ["cnn", "resbn_train", "shared"])
def test_mc_diagonals_share_their_samples(model_name):
    """Extensions with equal mc_samples share one set of sampled columns: the batch version sums to the total."""
    model, X, loss_fn, y, _ = setup(model_name, "ce")
    run_engine(model, loss_fn, X, y, DiagGGNMC(3), BatchDiagGGNMC(3))
    scale = model_scale(p.diag_ggn_mc for p in model.parameters())
    for name, p in model.named_parameters():
        assert p.diag_ggn_mc.shape == p.shape
        assert p.diag_ggn_mc_batch.shape == (X.shape[0], *p.shape)
        compare(p.diag_ggn_mc_batch.sum(0), p.diag_ggn_mc, scale, f"{name}: MC per-sample sum")


@pytest.mark.parametrize("model_name,loss_kind", [("cnn", "ce"), ("resbn_train", "bce"), ("sequence_output", "mse")])
def test_mc_diagonal_is_unbiased(model_name, loss_kind):
    """Mean of R independent DiagGGNMC(M) estimates within 6 standard errors of DiagGGNExact.

    The standard error comes from the spread of the R estimates themselves; the same bound must
    reject a wrong expectation (1.5× the exact diagonal), so the test has power.
    """
    R, M = 60, 8
    model, X, loss_fn, y, _ = setup(model_name, loss_kind)
    run_engine(model, loss_fn, X, y, DiagGGNExact(), BatchDiagGGNExact())
    exact = {name: p.diag_ggn_exact.clone() for name, p in model.named_parameters()}
    exact_batch = {name: p.diag_ggn_exact_batch.clone() for name, p in model.named_parameters()}
    draws = {name: [] for name in exact}
    draws_batch = {name: [] for name in exact}
    state = {name: b.clone() for name, b in model.named_buffers()}
    for _ in range(R):
        model.load_state_dict(state, strict=False)  # identical BN statistics in every repetition
        run_engine(model, loss_fn, X, y, DiagGGNMC(M), BatchDiagGGNMC(M))
        for name, p in model.named_parameters():
            draws[name].append(p.diag_ggn_mc.clone())
            draws_batch[name].append(p.diag_ggn_mc_batch.clone())
    scale = model_scale(exact.values())
    rejects_wrong = False
    for name in exact:
        for label, samples, target in (("", draws, exact), ("batch ", draws_batch, exact_batch)):
            stacked = torch.stack(samples[name])
            mean, std = stacked.mean(0), stacked.std(0)
            bound = 6 * std / math.sqrt(R) + 1e-12 * scale
            error = (mean - target[name]).abs()
            assert (error <= bound).all(), (
                f"{name}: {label}MC mean off by up to {(error / bound).max():.2f} bounds "
                f"(exact {target[name].flatten()[(error / bound).argmax()]:.3e})"
            )
            rejects_wrong |= bool(((mean - 1.5 * target[name]).abs() > bound).any())
            assert not torch.equal(stacked[0], stacked[1]) or target[name].abs().max() == 0, "draws do not vary"
    assert rejects_wrong, "the bound does not reject 1.5× the exact diagonal: no power"


def test_mc_samples_validation():
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="mc_samples"):
            DiagGGNMC(bad)
        with pytest.raises(ValueError, match="mc_samples"):
            BatchDiagGGNMC(bad)


# ----------------------------------------------------------------------------------------------
# weight sharing: the exact quantities include the cross terms between the calls


def test_shared_layer_includes_cross_terms():
    """For a layer applied twice the per-call GGN blocks do not add up to the true GGN; the engine gives the true one."""
    model, X, loss_fn, y, reference_model = setup("shared", "ce")
    run_engine(model, loss_fn, X, y, GGNMiniBlock("full"))
    ref = GGNReference(reference_model, loss_fn, X, y)
    expected = ref.block("shared.weight")
    actual = model.shared.weight.ggn_mini_block.reshape(expected.shape)
    compare(actual, expected, expected.abs().max().item(), "shared weight GGN")

    # per-call blocks: differentiate each call's use of the weight separately (untied copies)
    from torch.func import functional_call, jacrev

    ref_model = reference_model
    params = {n: p.detach() for n, p in ref_model.named_parameters()}

    def untied(w1, w2):
        h = torch.tanh(functional_call(ref_model.inp, {"weight": params["inp.weight"], "bias": params["inp.bias"]}, (X,)))
        h = torch.tanh(nn.functional.linear(h, w1, params["shared.bias"]))
        h = nn.functional.linear(h, w2, params["shared.bias"]) + h
        return functional_call(ref_model.out, {"weight": params["out.weight"], "bias": params["out.bias"]}, (h,))

    w = params["shared.weight"]
    J1, J2 = jacrev(untied, argnums=(0, 1))(w, w)
    J1, J2 = J1.reshape(ref.out.numel(), -1), J2.reshape(ref.out.numel(), -1)
    assert_close(J1 + J2, ref.J["shared.weight"], name="tied Jacobian = sum of untied ones")
    without_cross = J1.T @ ref.H @ J1 + J2.T @ ref.H @ J2
    assert (without_cross - expected).abs().max() > 1e-3 * expected.abs().max(), "cross terms are negligible here"
