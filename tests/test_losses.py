"""Tests of :mod:`curvlib.engine.losses`: square-root factorisations of the loss Hessian.

References: ``torch.func.hessian`` of the loss w.r.t. the model output, autograd gradients of the
unreduced loss, and the reduction factor read off the loss itself (``mean / sum``); float64.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import hessian

from conftest import assert_close
from curvlib.engine.losses import LossCall

DT = torch.float64


@pytest.fixture(autouse=True)
def _seeded(seed):
    return seed


def _targets(kind: str, shape):
    n = shape[0]
    if kind == "ce":
        return torch.randint(0, shape[1], (n,))
    if kind == "ce_prob":
        return torch.rand(*shape, dtype=DT).softmax(1)
    if kind == "ce_prob_unnormalised":  # torch accepts any non-negative soft targets
        return torch.rand(*shape, dtype=DT) * 2
    if kind == "mse":
        return torch.randn(*shape, dtype=DT)
    return torch.rand(*shape, dtype=DT)  # bce: targets in [0, 1]


def _loss_module(kind: str, reduction: str) -> nn.Module:
    if kind.startswith("ce"):
        return nn.CrossEntropyLoss(reduction=reduction)
    if kind == "mse":
        return nn.MSELoss(reduction=reduction)
    return nn.BCEWithLogitsLoss(reduction=reduction)


CASES = [
    (kind, reduction, shape)
    for reduction in ("mean", "sum")
    for kind, shape in [
        ("ce", (3, 4)),
        ("ce_prob", (3, 4)),
        ("ce_prob_unnormalised", (2, 3)),
        ("mse", (3, 4)),
        ("mse", (2, 2, 3)),
        ("bce", (3, 4)),
        ("bce", (2, 3, 2)),
    ]
]
IDS = [f"{kind}-{reduction}-{'x'.join(map(str, shape))}" for kind, reduction, shape in CASES]


def make_call(kind, reduction, shape, scale_logits=1.0):
    loss_fn = _loss_module(kind, reduction)
    output = (torch.randn(*shape, dtype=DT) * scale_logits).requires_grad_(True)
    target = _targets(kind, shape)
    return LossCall(loss_fn, output, target), loss_fn, output, target


def reference_hessian(loss_fn, output, target):
    """``∇²_f L`` ``[|f|, |f|]``."""
    H = hessian(lambda o: loss_fn(o, target))(output.detach())
    return H.reshape(output.numel(), output.numel())


def reference_scale(loss_fn, output, target) -> float:
    """The reduction factor ``L / Σ_n ℓ_n``, read off the loss itself."""
    summed = type(loss_fn)(reduction="sum")
    return (loss_fn(output, target) / summed(output, target)).item()


def per_sample_hessian(columns):
    """``Σ_c S[c, n] S[c, n]ᵀ`` as the block-diagonal ``[|f|, |f|]`` matrix (no cross-sample terms)."""
    flat = columns.reshape(columns.shape[0], columns.shape[1], -1)
    return torch.block_diag(*torch.einsum("cni,cnj->nij", flat, flat))


@pytest.mark.parametrize("kind,reduction,shape", CASES, ids=IDS)
def test_sqrt_hessian_factorises_the_hessian(kind, reduction, shape):
    call, loss_fn, output, target = make_call(kind, reduction, shape)
    S = call.sqrt_hessian()
    per_sample = math.prod(shape[1:])
    assert S.shape == (per_sample, *shape), "one column per class / output entry, then the output's shape"
    assert S.dtype == DT
    assert_close(per_sample_hessian(S), reference_hessian(loss_fn, output, target), name="Σ_c S_c S_cᵀ")


@pytest.mark.parametrize("kind,reduction,shape", CASES, ids=IDS)
def test_hessian_diagonal(kind, reduction, shape):
    call, loss_fn, output, target = make_call(kind, reduction, shape)
    expected = reference_hessian(loss_fn, output, target).diagonal().reshape(shape)
    assert_close(call.hessian_diagonal(), expected, name="hessian_diagonal")


@pytest.mark.parametrize("kind,reduction,shape", CASES, ids=IDS)
def test_gradient_and_empirical(kind, reduction, shape):
    call, loss_fn, output, target = make_call(kind, reduction, shape)
    (gradient,) = torch.autograd.grad(loss_fn(output, target), output)
    assert_close(call.gradient(), gradient, name="gradient")
    # per-sample gradients ∇ℓ_n of the unreduced loss (ℓ_n depends on f_n only)
    unreduced = type(loss_fn)(reduction="none")(output, target).sum()
    (per_sample,) = torch.autograd.grad(unreduced, output)
    scale = reference_scale(loss_fn, output, target)
    expected = math.sqrt(scale) * per_sample
    empirical = call.empirical()
    assert empirical.shape == (1, *shape)
    assert_close(empirical[0], expected, name="empirical = √scale · ∇ℓ_n")


def test_scale_of_the_reductions():
    for kind, shape, mean_scale in [("ce", (4, 3), 1 / 4), ("mse", (4, 3, 2), 1 / 24), ("bce", (2, 5), 1 / 10)]:
        for reduction, expected in (("mean", mean_scale), ("sum", 1.0)):
            call, loss_fn, output, target = make_call(kind, reduction, shape)
            assert call.scale == pytest.approx(expected)
            assert call.scale == pytest.approx(reference_scale(loss_fn, output, target))


@pytest.mark.parametrize("kind,reduction,shape", CASES, ids=IDS)
def test_sqrt_hessian_mc_is_unbiased(kind, reduction, shape):
    """``E[S Sᵀ] = H``: the mean over ``M`` single draws is within 6 standard errors of ``H``."""
    M = 4000
    call, loss_fn, output, target = make_call(kind, reduction, shape)
    S = call.sqrt_hessian_mc(M)
    assert S.shape == (M, *shape)
    # column m is √(scale/M)·∇ℓ(f, ŷ_m): √M times it is one single-draw factor
    single = (S * math.sqrt(M)).reshape(M, shape[0], -1)
    draws = torch.einsum("mni,mnj->mnij", single, single)  # [M, N, D, D]
    mean, std = draws.mean(0), draws.std(0)
    exact = reference_hessian(loss_fn, output, target)
    blocks = torch.stack([exact[n * mean.shape[1] : (n + 1) * mean.shape[1], n * mean.shape[1] : (n + 1) * mean.shape[1]] for n in range(shape[0])])
    bound = 6 * std / math.sqrt(M) + 1e-12 * exact.abs().max()
    error = (mean - blocks).abs()
    assert (error <= bound).all(), f"MC estimate off by {(error / bound).max():.2f} bounds"
    # the cross-sample blocks of H vanish, and so does every draw's (columns stay on their sample)
    off = exact - torch.block_diag(*blocks)
    assert off.abs().max() <= 1e-14 * exact.abs().max()
    # the bound is tight enough to reject a wrong expectation (1.3·H)
    assert ((mean - 1.3 * blocks).abs() > bound).any(), "test has no power: bound too loose"


@pytest.mark.parametrize("kind", ["ce", "ce_prob", "bce", "mse"])
def test_sqrt_hessian_mc_columns_are_gradients_at_sampled_targets(kind):
    """Each MC column is √(scale/M) times the gradient of ℓ_n at a target drawn from the model."""
    M = 5
    shape = (3, 4)
    call, loss_fn, output, target = make_call(kind, "mean", shape)
    S = call.sqrt_hessian_mc(M) / math.sqrt(call.scale / M)  # [M, N, K]: ∇ℓ(f_n, ŷ_m)
    f = output.detach()
    if kind.startswith("ce"):  # p − e_ŷ with ŷ a class
        residual = f.softmax(1)[None] - S
        assert_close(residual.sum(-1), torch.ones(M, 3, dtype=DT), name="one-hot sum")
        assert ((residual.abs() < 1e-12) | ((residual - 1).abs() < 1e-12)).all(), "not one-hot"
    elif kind == "bce":  # σ(f) − b with b ∈ {0, 1}
        residual = f.sigmoid()[None] - S
        assert ((residual.abs() < 1e-12) | ((residual - 1).abs() < 1e-12)).all(), "not Bernoulli samples"
    else:  # MSE: 2(f − ŷ) with ŷ ~ N(f, 1/2): √2·standard normal
        assert S.abs().max() > 0
        assert S.std().item() == pytest.approx(math.sqrt(2), rel=0.5)


def test_sqrt_hessian_mc_generator_reproducible():
    call, *_ = make_call("ce", "mean", (3, 4))
    first = call.sqrt_hessian_mc(7, generator=torch.Generator().manual_seed(3))
    again = call.sqrt_hessian_mc(7, generator=torch.Generator().manual_seed(3))
    other = call.sqrt_hessian_mc(7, generator=torch.Generator().manual_seed(4))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_probability_targets_scale_with_their_mass():
    """Soft targets summing to s give s·(diag p − p pᵀ); the MC factor scales alike."""
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    output = torch.randn(2, 3, dtype=DT, requires_grad=True)
    target = torch.rand(2, 3, dtype=DT)
    target = target / target.sum(1, keepdim=True) * torch.tensor([[0.5], [3.0]], dtype=DT)
    call = LossCall(loss_fn, output, target)
    H = reference_hessian(loss_fn, output, target)
    assert_close(per_sample_hessian(call.sqrt_hessian()), H, name="scaled Hessian")
    p = output.detach().softmax(1)
    assert_close(H[:3, :3], 0.5 * (torch.diag(p[0]) - torch.outer(p[0], p[0])), name="H block 0")


# ----------------------------------------------------------------------------------------------
# unsupported losses and options


UNSUPPORTED = {
    "NLLLoss": (lambda: nn.NLLLoss(), "NLLLoss"),
    "KLDivLoss": (lambda: nn.KLDivLoss(), "KLDivLoss"),
    "L1Loss": (lambda: nn.L1Loss(), "L1Loss"),
    "reduction_none": (lambda: nn.MSELoss(reduction="none"), "reduction.*'none'"),
    "ce_label_smoothing": (lambda: nn.CrossEntropyLoss(label_smoothing=0.1), "label_smoothing"),
    "ce_weight": (lambda: nn.CrossEntropyLoss(weight=torch.ones(3)), "weights"),
    "bce_pos_weight": (lambda: nn.BCEWithLogitsLoss(pos_weight=torch.ones(3)), "pos_weight"),
    "bce_weight": (lambda: nn.BCEWithLogitsLoss(weight=torch.ones(3)), "weight"),
}


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_unsupported_losses_raise(name):
    make, match = UNSUPPORTED[name]
    with pytest.raises(ValueError, match=match):
        LossCall(make(), torch.randn(2, 3), torch.zeros(2, 3))


def test_unsupported_cross_entropy_inputs_raise():
    with pytest.raises(ValueError, match=r"logits \[N, K\].*\(2, 3, 4\)"):
        LossCall(nn.CrossEntropyLoss(), torch.randn(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="ignore_index"):
        LossCall(nn.CrossEntropyLoss(ignore_index=1), torch.randn(2, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="non-negative"):
        LossCall(nn.CrossEntropyLoss(), torch.randn(2, 3), torch.tensor([[0.5, -0.5, 1.0], [0.2, 0.3, 0.5]]))
